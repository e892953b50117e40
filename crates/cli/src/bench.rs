//! `r3 bench`: speed and memory, printed as one JSON object.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use r3_generate::{Generator, Sampler, SamplingParams};
use r3_kernels::CpuLevel;
use r3_model::{KvCache, Message};
use r3_tasks::Task;

use crate::{model, ModelArgs};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Prefill and decode throughput of batched generation
    Generate(GenerateBench),
    /// Verdicts per second of the verifiers
    Verify(VerifyBench),
    /// Seconds per GRPO step, split by phase, and peak memory
    Train(TrainBench),
}

#[derive(Args)]
pub struct TrainBench {
    #[command(flatten)]
    model: ModelArgs,
    /// A model of this shape (an HF config.json, e.g. configs/Qwen2.5-1.5B.json)
    /// with random weights, and the tokenizer of --model (default: the default model's)
    #[arg(long, conflicts_with = "adapter")]
    random_init: Option<std::path::PathBuf>,
    /// Failures per step (B)
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Reflections per failure (G)
    #[arg(long, default_value_t = 8)]
    group: usize,
    #[arg(long, default_value_t = 128)]
    max_reflection_tokens: usize,
    #[arg(long, default_value_t = 128)]
    max_retry_tokens: usize,
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Reflections per forward/backward pass
    #[arg(long, default_value_t = 4)]
    micro_batch_size: usize,
    /// Keep every activation instead of recomputing them in the backward
    #[arg(long)]
    no_gradient_checkpointing: bool,
    /// Seconds spent measuring the machine's GEMM rate before the work;
    /// 0 skips it
    #[arg(long, default_value_t = 1.0)]
    limit_seconds: f64,
    #[command(flatten)]
    lora: crate::train::LoraArgs,
}

/// A stand-in verifier that passes every other retry it judges, whatever
/// it says: every group gets mixed rewards, so every step runs its
/// backward pass. (A coin seeded by the answer did not: a larger model
/// often retries with the same text in all G rollouts.)
#[derive(Default)]
struct Alternating {
    judged: AtomicUsize,
}

impl Task for Alternating {
    fn name(&self) -> &'static str {
        "alternating"
    }
    fn check_record(&self, _: &serde_json::Value) -> std::result::Result<(), String> {
        Ok(())
    }
    fn user_prompt(&self, record: &serde_json::Value) -> String {
        record["prompt"].as_str().unwrap_or_default().to_string()
    }
    fn verify(&self, _: &serde_json::Value, _answer: &str) -> r3_tasks::Verdict {
        match self.judged.fetch_add(1, Ordering::Relaxed) % 2 {
            0 => r3_tasks::Verdict::pass(),
            _ => r3_tasks::Verdict::fail("the other half"),
        }
    }
}

#[derive(Args)]
pub struct VerifyBench {
    /// Function-calling records to judge
    #[arg(long, default_value = "data/function_calling.jsonl")]
    data: std::path::PathBuf,
    /// Also time an external verifier command (JSON lines, see README)
    #[arg(long)]
    verifier: Option<String>,
    /// Seconds to spend on each verifier
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
}

#[derive(Args)]
pub struct GenerateBench {
    #[command(flatten)]
    model: ModelArgs,
    /// A model of this shape (an HF config.json, e.g. configs/Qwen2.5-1.5B.json)
    /// with random weights, and the tokenizer of --model (default: the default model's)
    #[arg(long, conflicts_with = "adapter")]
    random_init: Option<std::path::PathBuf>,
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
    /// Expand every weight to f32 instead of keeping packed encodings: the
    /// baseline the packed kernels are measured against
    #[arg(long)]
    f32: bool,
    /// Seconds spent measuring each of the machine's limits (GEMM rate,
    /// memory read rate) before the work; 0 skips them
    #[arg(long, default_value_t = 1.0)]
    limit_seconds: f64,
}

/// The machine's limits, measured on the CPU before the work they judge.
struct Limits {
    gemm_gflops: f64,
    read_gb_per_s: f64,
}

impl Limits {
    /// Measures both, `seconds` each: a 1024³ product through r3's gemm
    /// entry on every thread, and a 512 MiB read.
    fn measure(seconds: f64) -> Option<Self> {
        if seconds <= 0.0 {
            return None;
        }
        let threads = candle_core::utils::get_num_threads();
        Some(Self {
            gemm_gflops: r3_kernels::machine::gemm_gflops(1024, seconds, threads),
            read_gb_per_s: r3_kernels::machine::read_gb_per_s(512 << 20, seconds),
        })
    }
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Generate(args) => generate(args),
        BenchCommand::Verify(args) => verify(args),
        BenchCommand::Train(args) => train(args),
    }
}

/// Peak resident memory of this process so far, from /proc.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The machine a benchmark ran on, printed with its numbers because
/// machines differ from run to run: the CPU's name, the vector levels it
/// has and the one r3's kernels used (`R3_CPU` may lower it).
fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |key: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let wanted = [
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512_bf16",
        "avx512_fp16",
    ];
    let features: Vec<&str> = wanted
        .into_iter()
        .filter(|f| flags.split_whitespace().any(|x| x == *f))
        .collect();
    serde_json::json!({
        "cpu": field("model name"),
        "cores": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "features": features,
        "kernel_level": CpuLevel::current().name(),
        "detected_level": CpuLevel::detected().name(),
    })
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

    fn of(model: &model::Model, rows: usize, prompt: usize, new_tokens: usize) -> Self {
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

/// The model a benchmark runs, with the file's tensors kept (the bench
/// builds other decoders from them): `--model`, or random weights of the
/// `--random-init` shape.
fn bench_model(args: &ModelArgs, random_init: Option<&std::path::Path>) -> Result<model::Model> {
    match random_init {
        Some(config) => {
            model::load_random_init(config, args.model.as_deref(), args.device, args.dtype)
        }
        None => model::load_with_weights(&args.spec()),
    }
}

fn generate(args: GenerateBench) -> Result<()> {
    if args.batch == 0 || args.prompt_tokens == 0 {
        bail!("--batch and --prompt-tokens must be positive");
    }
    let mut model = bench_model(&args.model, args.random_init.as_deref())?;
    if args.f32 {
        let (dense, _) = r3_model::Llama::trainable(&model.loaded.config, &model.loaded.weights)?;
        model.llama = dense.for_generation()?;
    }
    model.loaded.weights = Default::default();
    crate::release_freed_memory();
    // The limits are the CPU's: a GPU run reports none.
    let limits = match model.llama.device().is_cpu() {
        true => Limits::measure(args.limit_seconds),
        false => None,
    };
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
    // The generator's errors name the step (prefill or decode) and its rows.
    let oom_hint = || {
        format!(
            "--batch {} (lower it if the device ran out of memory)",
            args.batch
        )
    };
    let logits = generator
        .prefill(&mut cache, &prompts)
        .with_context(oom_hint)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let samplers = (0..args.batch as u64)
        .map(|r| Sampler::new(&params, r))
        .collect();
    let start = Instant::now();
    let out = generator
        .decode(cache, logits, &params, samplers, false)
        .with_context(oom_hint)?;
    let decode_s = start.elapsed().as_secs_f64();
    let decoded: usize = out.completions.iter().map(|c| c.tokens.len()).sum();
    let work = GenerateWork::of(&model, args.batch, args.prompt_tokens, args.new_tokens);
    let fraction = |amount: f64, seconds: f64, limit: Option<f64>| {
        limit.map(|limit| amount / seconds / (limit * 1e9))
    };
    let gemm = limits.as_ref().map(|l| l.gemm_gflops);
    let read = limits.as_ref().map(|l| l.read_gb_per_s);
    let decode_bandwidth = fraction(work.decode_bytes, decode_s, read);
    let decode_compute = fraction(work.decode_flops, decode_s, gemm);
    let mut machine = machine();
    machine["gemm_gflops"] = gemm.into();
    machine["read_gb_per_s"] = read.into();
    let report = serde_json::json!({
        "bench": "generate",
        "machine": machine,
        "device": r3_model::device_name(model.llama.device()),
        "dtype": format!("{:?}", model.llama.dtype()),
        "model": model.loaded.path,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "threads": candle_core::utils::get_num_threads(),
        // Weights read in the file's compact encoding rather than as f32.
        "packed_weights": model.llama.packed_weights(),
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_s": (args.batch * args.prompt_tokens) as f64 / prefill_s,
        "decode_seconds": decode_s,
        "decode_tokens_per_s": decoded as f64 / decode_s,
        "peak_rss_bytes": peak_rss_bytes(),
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
    });
    println!("{report}");
    Ok(())
}

/// Judges (record, answer) pairs round-robin for about `seconds`; returns
/// verdicts per second and the fraction judged correct.
fn verdicts_per_second(
    task: &dyn Task,
    cases: &[(serde_json::Value, String)],
    seconds: f64,
) -> Result<(f64, f64)> {
    let start = Instant::now();
    let (mut n, mut passed) = (0usize, 0usize);
    while start.elapsed().as_secs_f64() < seconds {
        for (record, answer) in cases {
            passed += task.verify(record, answer).success as usize;
            if let Some(why) = task.broken() {
                bail!("{why}");
            }
        }
        n += cases.len();
    }
    Ok((
        n as f64 / start.elapsed().as_secs_f64(),
        passed as f64 / n.max(1) as f64,
    ))
}

fn verify(args: VerifyBench) -> Result<()> {
    let difficulty = r3_tasks::countdown_data::Difficulty {
        count: 3..=4,
        max_number: 100,
        target: 1..=100,
    };
    let puzzles =
        r3_tasks::countdown_data::generate(500, &difficulty, 0).map_err(anyhow::Error::msg)?;
    // Half right (the solver's equation), half wrong (the numbers summed).
    let countdown_cases: Vec<(serde_json::Value, String)> = puzzles
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let answer = if i % 2 == 0 {
                p["solution"].as_str().unwrap_or_default().to_string()
            } else {
                let nums: Vec<String> = p["nums"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect();
                nums.join(" + ")
            };
            (p, format!("Let me think. <answer>{answer}</answer>"))
        })
        .collect();
    let countdown = r3_tasks::countdown::Countdown;
    let (countdown_rate, countdown_ok) =
        verdicts_per_second(&countdown, &countdown_cases, args.seconds)?;

    let fc = r3_tasks::function_calling::FunctionCalling;
    let records = r3_tasks::read_records(&args.data, &fc, false)?.records;
    let fc_cases: Vec<(serde_json::Value, String)> = records
        .into_iter()
        .map(|r| {
            let answers = r.value["answers"].as_str().unwrap_or("[]").to_string();
            (
                r.value,
                format!("Here are the calls:\n```json\n{answers}\n```"),
            )
        })
        .collect();
    let (fc_rate, fc_ok) = verdicts_per_second(&fc, &fc_cases, args.seconds)?;

    let external = match &args.verifier {
        None => serde_json::Value::Null,
        Some(command) => {
            let v = r3_tasks::external::ExternalVerifier::new(
                command,
                std::time::Duration::from_secs(10),
            );
            let cases = vec![(
                serde_json::json!({"prompt": "p", "answer": "42"}),
                "42".to_string(),
            )];
            let (rate, ok) = verdicts_per_second(&v, &cases, args.seconds)?;
            serde_json::json!({"command": command, "calls_per_s": rate, "round_trip_us": 1e6 / rate, "fraction_correct": ok})
        }
    };
    let report = serde_json::json!({
        "bench": "verify",
        "machine": machine(),
        "countdown_verdicts_per_s": countdown_rate,
        "countdown_fraction_correct": countdown_ok,
        "function_calling_verdicts_per_s": fc_rate,
        "function_calling_fraction_correct": fc_ok,
        "function_calling_records": fc_cases.len(),
        "external": external,
        "threads": 1,
    });
    println!("{report}");
    Ok(())
}

/// First attempts at arithmetic questions, standing in for mined failures.
fn stand_in_failures(
    model: &model::Model,
    task: &dyn Task,
    prompts: &r3_tasks::Prompts,
    n: usize,
) -> Result<Vec<r3_loop::mine::MinedFailure>> {
    let records = r3_tasks::arithmetic::generate(n, 30, 0);
    let values: Vec<&serde_json::Value> = records.iter().collect();
    let policy = crate::evaluate::policy(model);
    let rollouts = r3_loop::Rollouts::new(&policy, task, prompts, 32);
    let greedy = SamplingParams {
        max_new_tokens: 32,
        ..Default::default()
    };
    let attempts = rollouts.attempts(&values, 1, &greedy, 0, &mut |_| {})?;
    Ok(records
        .iter()
        .zip(attempts)
        .enumerate()
        .map(|(index, (record, mut a))| {
            let a = a.remove(0);
            r3_loop::mine::MinedFailure {
                index,
                record: record.clone(),
                attempt: a.text,
                attempt_tokens: a.tokens,
                reason: String::new(),
                samples: 1,
                failures: 1,
                failure_rate: 1.0,
            }
        })
        .collect())
}

fn train(args: TrainBench) -> Result<()> {
    if args.batch == 0 || args.group < 2 || args.steps == 0 {
        bail!("need --batch ≥ 1, --group ≥ 2 and --steps ≥ 1");
    }
    let out = std::env::temp_dir().join(format!("r3-bench-train-{}", std::process::id()));
    let flags = r3_train::config::TrainConfig::load(None, &args.lora.overrides())?;
    let config = r3_train::config::TrainConfig {
        use_peft: flags.use_peft,
        lora_r: flags.lora_r,
        lora_alpha: flags.lora_alpha,
        lora_target_modules: flags.lora_target_modules,
        output_dir: out.clone(),
        max_steps: args.steps,
        failures_per_step: args.batch,
        num_generations: args.group,
        max_completion_length: args.max_reflection_tokens,
        retry_max_tokens: args.max_retry_tokens,
        retry_temperature: 0.9,
        micro_batch_size: args.micro_batch_size,
        gradient_checkpointing: !args.no_gradient_checkpointing,
        device: args.model.device.to_string(),
        dtype: args.model.dtype.to_string(),
        save_steps: 0,
        ..Default::default()
    };
    config.validate()?;
    let model = bench_model(&args.model, args.random_init.as_deref())?;
    let task = Alternating::default();
    let prompts = r3_tasks::Prompts::for_task(&task);
    let failures = stand_in_failures(&model, &task, &prompts, args.batch * args.steps)?;
    // The trainer builds its own decoders: keep only the loaded weights.
    let model::Model {
        loaded: mut model,
        llama,
        ..
    } = model;
    drop(llama);
    crate::release_freed_memory();
    let device = r3_model::device_name(model.weights.device());
    let limits = match model.weights.device().is_cpu() {
        true => Limits::measure(args.limit_seconds),
        false => None,
    };
    let weights = r3_train::trainer::StartWeights {
        policy: std::mem::take(&mut model.weights),
        reference: None,
    };
    let mut trainer = r3_train::trainer::Trainer::new(
        config.clone(),
        &model,
        weights,
        &task,
        prompts,
        failures,
        None,
    )?;
    trainer.set_memory_release(crate::release_freed_memory);
    let mut steps = Vec::new();
    for _ in 0..args.steps {
        steps.push(trainer.train_step()?.0);
    }
    let _ = std::fs::remove_dir_all(&out);
    let mean = |f: &dyn Fn(&r3_train::metrics::StepMetrics) -> f64| {
        steps.iter().map(f).sum::<f64>() / steps.len() as f64
    };
    let gemm = limits.as_ref().map(|l| l.gemm_gflops);
    let flops: f64 = steps.iter().map(|m| m.forward_backward_flops).sum();
    let seconds: f64 = steps.iter().map(|m| m.seconds_forward_backward).sum();
    let mut machine = machine();
    machine["gemm_gflops"] = gemm.into();
    machine["read_gb_per_s"] = limits.as_ref().map(|l| l.read_gb_per_s).into();
    let report = serde_json::json!({
        "bench": "train",
        "machine": machine,
        "device": device,
        "model": model.path,
        "batch": args.batch,
        "group": args.group,
        "max_reflection_tokens": args.max_reflection_tokens,
        "max_retry_tokens": args.max_retry_tokens,
        "micro_batch_size": args.micro_batch_size,
        "gradient_checkpointing": config.gradient_checkpointing,
        "steps": args.steps,
        "beta": config.beta,
        "use_peft": config.use_peft,
        "lora": config.use_peft.then(|| serde_json::json!({"r": config.lora_r, "alpha": config.lora_alpha, "target_modules": config.lora_target_modules})),
        "threads": candle_core::utils::get_num_threads(),
        "seconds_per_step": mean(&|m| m.seconds_step),
        "seconds_generation": mean(&|m| m.seconds_generation),
        "seconds_verification": mean(&|m| m.seconds_verification),
        "seconds_reference": mean(&|m| m.seconds_reference),
        "seconds_forward_backward": mean(&|m| m.seconds_forward_backward),
        "seconds_optimizer": mean(&|m| m.seconds_optimizer),
        "generated_tokens_per_step": mean(&|m| m.generated_tokens as f64),
        "trained_tokens_per_step": mean(&|m| m.trained_tokens as f64),
        "tokens_per_s": mean(&|m| m.tokens_per_s),
        "zero_signal_groups_per_step": mean(&|m| m.zero_signal_groups as f64),
        "forward_backward_flops_per_step": flops / steps.len() as f64,
        // What r3_train::score::training_flops counts, over the seconds
        // the forward and backward passes took.
        "forward_backward_fraction_of_limit": gemm.filter(|_| seconds > 0.0).map(|g| flops / seconds / (g * 1e9)),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    println!("{report}");
    Ok(())
}
