//! `r3 generate`, `r3 logits`, `r3 merge`, `r3 export-adapter`, `r3 init`
//! and `r3 fetch`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, IndexOp, D};
use clap::Args;
use r3_generate::{Generator, SamplingParams};
use r3_model::atomic::write_dir_atomic;
use r3_model::{KvCache, Message};

use crate::{model, DecodeArgs, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    /// The user message
    #[arg(
        long,
        conflicts_with = "messages",
        required_unless_present = "messages"
    )]
    prompt: Option<String>,
    /// A JSON file holding a list of {"role", "content"} messages
    #[arg(long)]
    messages: Option<PathBuf>,
    /// A system message put first
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A JSON file holding a list of {"role", "content"} messages
    #[arg(long)]
    messages: PathBuf,
    /// How many of the last position's largest logits to print
    #[arg(long, default_value_t = 10)]
    top_k: usize,
}

fn read_messages(path: &PathBuf) -> Result<Vec<Message>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let messages: Vec<Message> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON list of {{\"role\", \"content\"}} messages",
            path.display()
        )
    })?;
    if messages.is_empty() {
        bail!("{}: the conversation is empty", path.display());
    }
    Ok(messages)
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    crate::config::check_sampling(args.sampling.temperature, args.sampling.top_p)?;
    if args.sampling.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let model = model::load(&args.model.sampling_spec(args.decode))?;
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system.as_str()));
    }
    match (&args.prompt, &args.messages) {
        (Some(prompt), _) => messages.push(Message::new("user", prompt.as_str())),
        (None, Some(path)) => messages.extend(read_messages(path)?),
        (None, None) => bail!("give --prompt or --messages"),
    }
    let text = model.loaded.chat_template.render(&messages, true)?;
    let ids = model.loaded.tokenizer.encode(&text)?;
    let s = &args.sampling;
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        max_new_tokens: model
            .policy()
            .within_context(s.max_new_tokens, "--max-new-tokens"),
        stop_strings: Vec::new(),
        seed: s.seed,
    };
    let generator = Generator::new(
        &model.llama,
        &model.loaded.tokenizer,
        &model.loaded.eos_token_ids,
    );
    let out = generator.generate(&[ids], &params)?;
    writeln!(std::io::stdout(), "{}", out[0].text)?;
    Ok(())
}

pub fn logits(args: LogitsArgs) -> Result<()> {
    let model = model::load(&args.model.spec())?;
    let messages = read_messages(&args.messages)?;
    let text = model.loaded.chat_template.render(&messages, true)?;
    let ids = model.loaded.tokenizer.encode(&text)?;
    let mut cache = KvCache::new(&model.loaded.config, 1, ids.len());
    let hidden = model.llama.forward(&[&ids], &mut cache)?;
    let logits = model.llama.all_logits(&hidden)?.i(0)?;
    let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let last: Vec<f32> = logits.i(ids.len() - 1)?.to_vec1()?;
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top: Vec<(usize, f32)> = order
        .iter()
        .take(args.top_k)
        .map(|&i| (i, last[i]))
        .collect();
    let out = serde_json::json!({
        "rendered": text,
        "input_ids": ids,
        "argmax_per_position": argmax,
        "last_top_k": top,
    });
    writeln!(std::io::stdout(), "{out}")?;
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The HF model directory to write (must not exist yet)
    #[arg(long)]
    out: PathBuf,
}

/// `r3 merge`: the base with its adapter folded in (`W + (α/r)·B·A`),
/// written as a plain HF directory that any loader reads.
pub fn merge(args: MergeArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{} exists; choose a new directory", args.out.display());
    }
    let model = model::load(&args.model.spec())?;
    let Some(adapter) = &model.adapter else {
        bail!("nothing to merge: give --adapter DIR (or --model an adapter directory)");
    };
    let weights = model.llama.merged_hf_weights()?;
    write_dir_atomic(&args.out, |tmp| -> Result<()> {
        Ok(r3_model::export::save_hf_dir(
            &model.loaded,
            tmp,
            weights,
            DType::F32,
            &model.loaded.path.display().to_string(),
        )?)
    })
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} with {} merged)",
        args.out.display(),
        model.loaded.path.display(),
        adapter.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ExportAdapterArgs {
    /// A PEFT adapter directory, or a checkpoint of a LoRA training run
    #[arg(long)]
    adapter: PathBuf,
    /// The adapter directory to write (must not exist yet)
    #[arg(long)]
    out: PathBuf,
    /// The type the tensors are written in: bf16 halves the file
    #[arg(long, default_value = "bf16")]
    dtype: r3_model::Precision,
    /// The base the adapter names (`base_model_name_or_path`), for the
    /// machines that will load it: a name `r3 fetch` knows, a hub id or a
    /// path [default: the one it names now, often a path on this machine]
    #[arg(long)]
    base_model: Option<String>,
}

/// `r3 export-adapter`: an adapter's two PEFT files alone, in `--dtype`,
/// to share or commit (a checkpoint also holds the optimizer's moments,
/// twice the adapter's size).
pub fn export_adapter(args: ExportAdapterArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{} exists; choose a new directory", args.out.display());
    }
    let mut adapter = r3_model::lora::Adapter::load(&args.adapter)
        .with_context(|| format!("cannot read the adapter in {}", args.adapter.display()))?;
    if let Some(base) = args.base_model {
        adapter.base_model = Some(base);
    }
    write_dir_atomic(&args.out, |tmp| -> Result<()> {
        Ok(adapter.export(tmp, args.dtype.dtype())?)
    })
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} in {})",
        args.out.display(),
        args.adapter.display(),
        args.dtype
    );
    Ok(())
}

#[derive(Args)]
pub struct InitArgs {
    /// The shape: an HF config.json (e.g. configs/Qwen2.5-1.5B.json)
    #[arg(long)]
    pub shape: PathBuf,
    /// The model whose tokenizer and chat template to use [default: the default model]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The new HF directory
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The type the weights are written in: bf16 halves the file (a stand-in
    /// model to copy to another machine), and reads back as f32 exactly
    #[arg(long, default_value = "f32")]
    pub dtype: r3_model::Precision,
}

/// Writes a randomly initialised model of a given shape, with a real
/// tokenizer, as an HF directory: a small stand-in for tests and device
/// checks on machines that cannot download weights.
pub fn init(args: InitArgs) -> Result<()> {
    if args.out.exists() {
        bail!("{} exists; choose a new directory", args.out.display());
    }
    let loaded = model::random_shape(&args.shape, args.model.as_deref())?;
    let weights = r3_model::random::random_weights(&loaded.config, args.seed)?;
    write_dir_atomic(&args.out, |tmp| -> Result<()> {
        Ok(r3_model::export::save_hf_dir(
            &loaded,
            tmp,
            weights,
            args.dtype.dtype(),
            &args.shape.display().to_string(),
        )?)
    })
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} (shape {})",
        args.out.display(),
        args.shape.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct FetchArgs {
    /// The model: smollm2-135m (the default), qwen2.5-coder-0.5b or
    /// qwen2.5-coder-1.5b; without one, the list and what is cached
    name: Option<String>,
}

/// `r3 fetch`: a known model's GGUF into the cache, its path on stdout, so
/// that scripts can say `--model "$(r3 fetch qwen2.5-coder-1.5b)"` (or
/// `--model qwen2.5-coder-1.5b`, which fetches the same way).
pub fn fetch(args: FetchArgs) -> Result<()> {
    let Some(name) = args.name else {
        for known in &r3_fetch::MODELS {
            let cached = known.cached_path();
            let state = if cached.exists() {
                "cached"
            } else {
                "not fetched"
            };
            writeln!(
                std::io::stdout(),
                "{:<20} {:>6} MB  {state:<12} {}",
                known.name,
                known.megabytes,
                cached.display()
            )?;
        }
        return Ok(());
    };
    let known = r3_fetch::known(&name).ok_or(r3_fetch::FetchError::Unknown(name))?;
    writeln!(std::io::stdout(), "{}", known.fetch_noisily()?.display())?;
    Ok(())
}
