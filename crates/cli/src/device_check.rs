//! `r3 device-check`: a GPU against the CPU on one model, as one JSON line.
//! The same f32 weights run on both: the last-position logits of a
//! left-padded batch of prompts of different lengths, greedy continuations,
//! and one training step (the production span log-probs, backward, AdamW);
//! then the device's bf16 logits against the CPU's f32 ones.
//! A GPU machine has no Rust toolchain to run the test suite, so
//! `scripts/gpu-check.sh` runs this binary instead.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use clap::Args;
use r3_generate::{Generator, Sampler, SamplingParams};
use r3_model::{device_name, KvCache, Llama, Message, Weights};
use r3_train::optim::AdamW;
use r3_train::score::span_logprobs;
use r3_train::spans::TrainedSpan;

use crate::{model, ModelArgs};

#[derive(Args)]
pub struct DeviceCheckArgs {
    /// The model, and with --device the device under test (against the CPU)
    #[command(flatten)]
    model: ModelArgs,
    /// A model of this shape with random weights (the tokenizer of --model)
    #[arg(long, conflicts_with = "adapter")]
    random_init: Option<PathBuf>,
    /// Prompts in the batch, each longer than the one before
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Greedy tokens compared per prompt
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Leave out the training step (a model too large to train on the CPU)
    #[arg(long)]
    no_train: bool,
    /// Largest difference allowed between the two devices' logits (times
    /// the largest logit, when that is above 1)
    #[arg(long, default_value_t = 1e-4)]
    logits_tolerance: f64,
    /// Largest difference allowed between the two devices' updated weights
    #[arg(long, default_value_t = 1e-5)]
    update_tolerance: f64,
    /// Largest difference allowed between the device's bf16 logits and the
    /// CPU's f32 ones, relative to the largest f32 logit (bf16 keeps 8 bits
    /// of mantissa, so its error grows with the logits' scale)
    #[arg(long, default_value_t = 5e-2)]
    bf16_tolerance: f64,
}

/// The learning rate of the compared step: large enough that an update
/// (about `LR` per weight after Adam's first step) dwarfs the tolerance.
const LR: f64 = 1e-4;

pub fn device_check(args: DeviceCheckArgs) -> Result<()> {
    if args.batch == 0 || args.new_tokens == 0 {
        bail!("--batch and --new-tokens must be positive");
    }
    let device = model::open_device(args.model.device)?;
    let loaded = match &args.random_init {
        Some(shape) => model::random_model(shape, args.model.model.as_deref())?,
        None if args.model.adapter.is_some() => {
            bail!("device-check compares a base model; merge the adapter first (r3 merge)")
        }
        None => model::load_base(args.model.model.as_deref())?,
    };
    let on = |device: &Device| -> Weights {
        let mut weights = loaded.weights.clone();
        weights.set_device(device.clone());
        weights
    };
    let (cpu, gpu) = (on(&Device::Cpu), on(&device));
    let config = &loaded.config;
    let prompts = prompts(&loaded, args.batch)?;

    // Inference: the f32 decoder on both (no packed weights on the CPU side
    // either, so that both read the same values).
    let build =
        |w: &Weights| -> Result<Llama> { Ok(Llama::trainable(config, w)?.0.for_generation()?) };
    let (cpu_model, gpu_model) = (build(&cpu)?, build(&gpu)?);
    let (cpu_logits, cpu_tokens) = greedy(&cpu_model, &loaded, &prompts, args.new_tokens)?;
    let (gpu_logits, gpu_tokens) = greedy(&gpu_model, &loaded, &prompts, args.new_tokens)?;
    drop((cpu_model, gpu_model));
    let mut bf16 = on(&device);
    bf16.set_dtype(DType::BF16)?;
    let bf16_model = Llama::new(config, &bf16)?;
    let (bf16_logits, bf16_tokens) = greedy(&bf16_model, &loaded, &prompts, args.new_tokens)?;
    drop(bf16_model);
    let bf16_diff = max_abs_diff(&cpu_logits, &bf16_logits)?;
    let logits_scale = max_abs(&cpu_logits)?;
    let bf16_relative = bf16_diff / logits_scale.max(f64::MIN_POSITIVE);
    let bf16_same_tokens = count_equal(&cpu_tokens, &bf16_tokens);
    let logits_diff = max_abs_diff(&cpu_logits, &gpu_logits)?;
    // f32 rounding grows with the logits' size: above 1, the tolerance
    // scales with the largest logit (a random-init 1.5B model, whose tied
    // embeddings have unit deviation, has logits of order 100).
    let logits_ok = logits_diff <= args.logits_tolerance * logits_scale.max(1.0);
    let first_divergence = cpu_tokens
        .iter()
        .zip(&gpu_tokens)
        .map(|(a, b)| a.iter().zip(b).position(|(x, y)| x != y))
        .collect::<Vec<_>>();
    let greedy_equal = cpu_tokens == gpu_tokens;

    let mut report = serde_json::json!({
        "check": "device",
        "device": device_name(&device),
        "model": loaded.path,
        "batch": args.batch,
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        "logits_max_abs_diff": logits_diff,
        "logits_ok": logits_ok,
        "greedy_tokens": args.new_tokens,
        "greedy_equal": greedy_equal,
        "greedy_first_divergence": first_divergence,
        "logits_max_abs": logits_scale,
        "bf16_logits_max_abs_diff": bf16_diff,
        "bf16_logits_relative_diff": bf16_relative,
        "bf16_ok": bf16_relative <= args.bf16_tolerance,
        // Greedy tokens of the bf16 model equal to the f32 CPU model's: a
        // near-tie may flip in bf16, so this is reported, not required.
        "bf16_greedy_same_tokens": bf16_same_tokens,
    });
    let mut ok = logits_ok && greedy_equal && bf16_relative <= args.bf16_tolerance;
    if !args.no_train {
        let step = training_step(config, [&cpu, &gpu], &prompts, &cpu_tokens)?;
        let update_ok = step.update_diff <= args.update_tolerance;
        report["train_lr"] = LR.into();
        report["train_tokens"] = step.tokens.into();
        report["gradient_max_abs_diff"] = step.gradient_diff.into();
        report["gradient_max_abs"] = step.gradient_max.into();
        report["update_max_abs"] = step.update_max.into();
        report["update_max_abs_diff"] = step.update_diff.into();
        report["update_ok"] = update_ok.into();
        ok &= update_ok;
    }
    report["ok"] = ok.into();
    println!("{report}");
    if !ok {
        bail!(
            "{} disagrees with the CPU (see the JSON line)",
            device_name(&device)
        );
    }
    Ok(())
}

/// `batch` chat prompts, each a few tokens longer than the one before, so
/// that the batch is left-padded.
fn prompts(loaded: &r3_model::LoadedModel, batch: usize) -> Result<Vec<Vec<u32>>> {
    (0..batch)
        .map(|i| {
            let question = format!(
                "Question {i}: {} What comes next?",
                "one two three four five six ".repeat(i + 1)
            );
            let text = loaded
                .chat_template
                .render(&[Message::new("user", question)], true)?;
            Ok(loaded.tokenizer.encode(&text)?)
        })
        .collect()
}

/// The last-position logits of the prefilled batch (on the CPU) and each
/// row's greedy continuation.
fn greedy(
    model: &Llama,
    loaded: &r3_model::LoadedModel,
    prompts: &[Vec<u32>],
    new_tokens: usize,
) -> Result<(Tensor, Vec<Vec<u32>>)> {
    // No end-of-sequence ids: every row decodes the whole budget.
    let generator = Generator::new(model, &loaded.tokenizer, &[]);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = KvCache::new(&loaded.config, prompts.len(), longest + new_tokens);
    let segments: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let logits = generator.prefill(&mut cache, &segments)?;
    let params = SamplingParams {
        temperature: 0.0,
        max_new_tokens: new_tokens,
        ..Default::default()
    };
    let samplers = (0..prompts.len() as u64)
        .map(|r| Sampler::new(&params, r))
        .collect();
    let out = generator.decode(cache, logits.clone(), &params, samplers, false)?;
    let tokens = out.completions.into_iter().map(|c| c.tokens).collect();
    Ok((logits.to_device(&Device::Cpu)?, tokens))
}

struct StepComparison {
    tokens: usize,
    gradient_diff: f64,
    gradient_max: f64,
    update_diff: f64,
    update_max: f64,
}

/// One training step on each device from the same weights: every prompt's
/// greedy continuation scored by the trainer's span log-probs, the mean
/// negative log-likelihood backpropagated, and one AdamW update.
fn training_step(
    config: &r3_model::ModelConfig,
    weights: [&Weights; 2],
    prompts: &[Vec<u32>],
    continuations: &[Vec<u32>],
) -> Result<StepComparison> {
    let spans: Vec<TrainedSpan> = prompts
        .iter()
        .zip(continuations)
        .map(|(context, tokens)| TrainedSpan {
            context,
            tokens,
            advantage: 1.0,
            weight: 1.0,
        })
        .collect();
    let tokens: usize = continuations.iter().map(Vec::len).sum();
    let mut runs = Vec::with_capacity(2);
    for w in weights {
        let (model, vars) = Llama::trainable(config, w).context("building a trainable model")?;
        let before: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        let loss = span_logprobs(&model, &spans, true)?.mean_all()?.neg()?;
        let store = loss.backward()?;
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| match store.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let mut optimizer = AdamW::new(vars.clone(), 0.9, 0.999, 1e-8, 0.0)?;
        optimizer.update(&grads, LR, 1.0)?;
        let updates = vars
            .iter()
            .zip(before)
            .map(|((_, v), b): (&(String, Var), Tensor)| {
                Ok((v.as_tensor() - b)?.to_device(&Device::Cpu)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let grads = grads
            .iter()
            .map(|g| g.to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        runs.push((grads, updates));
    }
    let (gpu, cpu) = (runs.pop().expect("two runs"), runs.pop().expect("two runs"));
    let mut out = StepComparison {
        tokens,
        gradient_diff: 0.0,
        gradient_max: 0.0,
        update_diff: 0.0,
        update_max: 0.0,
    };
    for i in 0..cpu.0.len() {
        out.gradient_diff = out.gradient_diff.max(max_abs_diff(&cpu.0[i], &gpu.0[i])?);
        out.gradient_max = out.gradient_max.max(max_abs(&cpu.0[i])?);
        out.update_diff = out.update_diff.max(max_abs_diff(&cpu.1[i], &gpu.1[i])?);
        out.update_max = out.update_max.max(max_abs(&cpu.1[i])?);
    }
    Ok(out)
}

/// Positions where two sets of continuations agree.
fn count_equal(a: &[Vec<u32>], b: &[Vec<u32>]) -> usize {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).filter(|(p, q)| p == q).count())
        .sum()
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    max_abs(&(a - b)?)
}
