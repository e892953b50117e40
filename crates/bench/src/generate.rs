//! Prefill and decode throughput of batched generation, each as a
//! fraction of the limit that binds it.

use std::path::PathBuf;
use std::time::Instant;

use r3_generate::{Generator, Sampler, SamplingParams};
use r3_loop::model::{Model, ModelSpec};
use r3_model::{KvCache, Message};
use serde_json::{json, Value};

use crate::machine::{self, fraction, Limits};
use crate::{bench_model, BenchError, Result};

/// What to generate: `batch` rows of one synthetic `prompt_tokens` prompt,
/// each decoding exactly `new_tokens` (end-of-sequence ignored).
pub struct GenerateBench {
    pub model: ModelSpec,
    /// An HF config.json: random weights of that shape instead of a file's.
    pub random_init: Option<PathBuf>,
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub temperature: f64,
    /// Expand every weight to f32: the baseline of the packed kernels.
    pub f32: bool,
    /// Seconds spent measuring each machine limit first; 0 skips them.
    pub limit_seconds: f64,
    /// Returns freed memory to the OS (the binary's allocator knows how).
    pub release_memory: fn(),
}

/// The work a generation bench asks of the machine, counted exactly from
/// the model's shape ([`r3_model::ModelConfig::token_flops`]).
struct GenerateWork {
    prefill_flops: f64,
    decode_flops: f64,
    decode_bytes: f64,
}

impl GenerateWork {
    const FORMULA: &'static str = "prefill: rows × (Σ_{i=1..P} token_flops(i) + head_flops); decode: rows × Σ_{j=1..N} (token_flops(P+j) + head_flops) FLOPs, and Σ_{j=1..N} (weight_bytes_per_step + rows × kv_bytes(P+j)) bytes; token_flops(c) = layers × (2h(q+2kv) + 2qh + 6h·mlp + 4q·c), head_flops = 2h·vocab";

    fn of(model: &Model, rows: usize, prompt: usize, new_tokens: usize) -> Self {
        let c = &model.loaded.config;
        let rows_f = rows as f64;
        let prefill: f64 = (1..=prompt).map(|i| c.token_flops(i)).sum::<f64>() + c.head_flops();
        let value_bytes = model.llama.dtype().size_in_bytes();
        let weights = model.llama.weight_bytes_per_step() as f64;
        let (mut flops, mut bytes) = (0f64, 0f64);
        for j in 1..=new_tokens {
            flops += c.token_flops(prompt + j) + c.head_flops();
            bytes += weights + rows_f * c.kv_bytes(prompt + j, value_bytes) as f64;
        }
        Self {
            prefill_flops: rows_f * prefill,
            decode_flops: rows_f * flops,
            decode_bytes: bytes,
        }
    }
}

/// A prompt of exactly `n` tokens: a chat about a repeated text, cut to size.
fn synthetic_prompt(model: &Model, n: usize) -> Result<Vec<u32>> {
    let filler = "Reflect on what went wrong, then try again with care. ".repeat(n / 8 + 8);
    let text = model
        .loaded
        .chat_template
        .render(&[Message::new("user", filler)], true)?;
    let mut ids = model.loaded.tokenizer.encode(&text)?;
    if ids.len() < n {
        return Err(BenchError::Invalid(format!(
            "could not build a {n}-token prompt"
        )));
    }
    ids.truncate(n);
    Ok(ids)
}

/// Runs the bench and returns its report.
pub fn run(bench: &GenerateBench) -> Result<Value> {
    if bench.batch == 0 || bench.prompt_tokens == 0 {
        return Err(BenchError::Invalid(
            "--batch and --prompt-tokens must be positive".into(),
        ));
    }
    let mut model = bench_model(&bench.model, bench.random_init.as_deref())?;
    if bench.f32 {
        let (dense, _) = r3_model::Llama::trainable(&model.loaded.config, &model.loaded.weights)?;
        model.llama = dense.for_generation()?;
    }
    model.loaded.weights = Default::default();
    (bench.release_memory)();
    let limits = Limits::measure(bench.limit_seconds, model.llama.device().is_cpu());
    let prompt = synthetic_prompt(&model, bench.prompt_tokens)?;
    let prompts: Vec<&[u32]> = vec![prompt.as_slice(); bench.batch];
    // No end-of-sequence ids: every row decodes the full budget.
    let generator = Generator::new(&model.llama, &model.loaded.tokenizer, &[]);
    let params = SamplingParams {
        temperature: bench.temperature,
        max_new_tokens: bench.new_tokens,
        seed: 0,
        ..Default::default()
    };
    let new_cache = || {
        KvCache::new(
            &model.loaded.config,
            bench.batch,
            bench.prompt_tokens + bench.new_tokens,
        )
    };
    // The generator's errors name the step (prefill or decode) and its rows.
    let out_of_memory = |e: r3_generate::GenerateError| {
        BenchError::Invalid(format!(
            "{e}\n(--batch {}: lower it if the device ran out of memory)",
            bench.batch
        ))
    };
    // One untimed prefill first, as the peers' scripts warm up
    // (scripts/bench_transformers.py): the timed one then runs on memory
    // the process already holds, as every prefill after a run's first does.
    generator
        .prefill(&mut new_cache(), &prompts)
        .map_err(out_of_memory)?;
    let mut cache = new_cache();
    let start = Instant::now();
    let logits = generator
        .prefill(&mut cache, &prompts)
        .map_err(out_of_memory)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let samplers = (0..bench.batch as u64)
        .map(|r| Sampler::new(&params, r))
        .collect();
    let start = Instant::now();
    let out = generator
        .decode(cache, logits, &params, samplers, false)
        .map_err(out_of_memory)?;
    let decode_s = start.elapsed().as_secs_f64();
    let decoded: usize = out.completions.iter().map(|c| c.tokens.len()).sum();
    let work = GenerateWork::of(&model, bench.batch, bench.prompt_tokens, bench.new_tokens);
    let gemm = limits.as_ref().map(|l| l.gemm_gflops);
    let read = limits.as_ref().map(|l| l.read_gb_per_s);
    let decode_bandwidth = fraction(work.decode_bytes, decode_s, read);
    let decode_compute = fraction(work.decode_flops, decode_s, gemm);
    Ok(json!({
        "bench": "generate",
        "machine": machine::describe(limits.as_ref()),
        "device": r3_model::device_name(model.llama.device()),
        "dtype": format!("{:?}", model.llama.dtype()),
        // Products' inputs: exact, or rounded (--int8-decode, --bf16-products).
        "activations": bench.model.activations.name().unwrap_or("exact"),
        "model": model.loaded.path,
        "batch": bench.batch,
        "prompt_tokens": bench.prompt_tokens,
        "new_tokens": bench.new_tokens,
        "temperature": bench.temperature,
        "threads": candle_core::utils::get_num_threads(),
        // Weights read in the file's compact encoding rather than as f32.
        "packed_weights": model.llama.packed_weights(),
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": (bench.batch * bench.prompt_tokens) as f64 / prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": decoded as f64 / decode_s,
        "peak_rss_bytes": machine::peak_rss_bytes(),
        "work": {
            "weight_bytes_per_step": model.llama.weight_bytes_per_step(),
            "prefill_flops": work.prefill_flops,
            "decode_flops": work.decode_flops,
            "decode_bytes": work.decode_bytes,
            "formula": GenerateWork::FORMULA,
        },
        "prefill_fraction_of_limit": fraction(work.prefill_flops, prefill_s, gemm),
        "decode_bandwidth_fraction": decode_bandwidth,
        "decode_compute_fraction": decode_compute,
        // The limit that binds: bandwidth at small batches, compute at large.
        "decode_fraction_of_limit": decode_bandwidth.zip(decode_compute).map(|(b, c)| b.max(c)),
    }))
}
