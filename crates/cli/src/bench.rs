//! `r3 bench`: speed and memory, printed as one JSON object.

use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use r3_generate::{Generator, Sampler, SamplingParams};
use r3_model::{KvCache, Message};

use crate::{model, ModelArgs};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of batched generation
    Generate(GenerateBench),
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Length of the synthetic prompt of every row
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded per row (end-of-sequence is ignored, so every row
    /// decodes exactly this many)
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    #[arg(long, default_value_t = 0.9)]
    temperature: f64,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Generate(args) => generate(args),
    }
}

/// Peak resident memory of this process so far, from /proc.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A prompt of exactly `n` tokens: a chat about a repeated text, cut to size.
fn synthetic_prompt(model: &model::Model, n: usize) -> Result<Vec<u32>> {
    let filler = "Reflect on what went wrong, then try again with care. ".repeat(n / 8 + 8);
    let text = model
        .loaded
        .chat_template
        .render(&[Message::new("user", filler)], true)?;
    let mut ids = model.loaded.tokenizer.encode(&text)?;
    if ids.len() < n {
        bail!("could not build a {n}-token prompt");
    }
    ids.truncate(n);
    Ok(ids)
}

fn generate(args: GenerateBench) -> Result<()> {
    if args.batch == 0 || args.prompt_tokens == 0 {
        bail!("--batch and --prompt-tokens must be positive");
    }
    let model = model::load(&args.model)?;
    let prompt = synthetic_prompt(&model, args.prompt_tokens)?;
    let prompts: Vec<&[u32]> = vec![prompt.as_slice(); args.batch];
    // No end-of-sequence ids: every row decodes the full budget.
    let generator = Generator::new(&model.llama, &model.loaded.tokenizer, &[]);
    let params = SamplingParams {
        temperature: args.temperature,
        max_new_tokens: args.new_tokens,
        seed: 0,
        ..Default::default()
    };
    let mut cache = KvCache::new(
        &model.loaded.config,
        args.batch,
        args.prompt_tokens + args.new_tokens,
    );
    let start = Instant::now();
    let logits = generator.prefill(&mut cache, &prompts)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let samplers = (0..args.batch as u64)
        .map(|r| Sampler::new(&params, r))
        .collect();
    let start = Instant::now();
    let out = generator.decode(cache, logits, &params, samplers, false)?;
    let decode_s = start.elapsed().as_secs_f64();
    let decoded: usize = out.completions.iter().map(|c| c.tokens.len()).sum();
    let report = serde_json::json!({
        "bench": "generate",
        "model": model.loaded.path,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "threads": candle_core::utils::get_num_threads(),
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": (args.batch * args.prompt_tokens) as f64 / prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": decoded as f64 / decode_s,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{report}");
    Ok(())
}
