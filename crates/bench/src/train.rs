//! Seconds per GRPO step, split by phase, with forward and backward as a
//! fraction of the machine's GEMM rate, and peak memory: the production
//! trainer on a stand-in task whose every group has signal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use r3_generate::SamplingParams;
use r3_loop::mine::MinedFailure;
use r3_loop::model::{Model, ModelSpec};
use r3_loop::Policy;
use r3_tasks::{Prompts, Task, Verdict};
use r3_train::config::TrainConfig;
use r3_train::metrics::StepMetrics;
use r3_train::trainer::{StartWeights, Trainer};
use serde_json::{json, Value};

use crate::machine::{self, fraction, Limits};
use crate::{bench_model, Result};

/// The steps to time: `config` as the trainer takes it (`max_steps` steps
/// of `failures_per_step` × `num_generations` rollouts; its output_dir is
/// scratch, removed after).
pub struct TrainBench {
    pub model: ModelSpec,
    /// An HF config.json: random weights of that shape instead of a file's.
    pub random_init: Option<PathBuf>,
    pub config: TrainConfig,
    /// Seconds spent measuring the machine's GEMM rate first; 0 skips it.
    pub limit_seconds: f64,
    /// Returns freed memory to the OS (the binary's allocator knows how).
    pub release_memory: fn(),
}

/// A stand-in verifier that passes every other retry it judges, whatever
/// it says: every group gets mixed rewards, so every step runs its
/// backward pass. (A coin seeded by the answer did not: a larger model
/// often retries with the same text in all G rollouts.)
#[derive(Default)]
pub(crate) struct Alternating {
    judged: AtomicUsize,
}

impl Task for Alternating {
    fn name(&self) -> &'static str {
        "alternating"
    }
    fn check_record(&self, _: &Value) -> std::result::Result<(), String> {
        Ok(())
    }
    fn user_prompt(&self, record: &Value) -> String {
        record["prompt"].as_str().unwrap_or_default().to_string()
    }
    fn verify(&self, _: &Value, _answer: &str) -> Verdict {
        match self.judged.fetch_add(1, Ordering::Relaxed) % 2 {
            0 => Verdict::pass(),
            _ => Verdict::fail("the other half"),
        }
    }
}

/// Greedy first attempts at `n` arithmetic questions, standing in for
/// mined failures.
pub(crate) fn stand_in_failures(
    policy: &Policy<'_>,
    task: &dyn Task,
    prompts: &Prompts,
    n: usize,
) -> Result<Vec<MinedFailure>> {
    let records = r3_tasks::arithmetic::generate(n, 30, 0);
    let values: Vec<&Value> = records.iter().collect();
    let rollouts = r3_loop::Rollouts::new(policy, task, prompts, 32);
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
            MinedFailure {
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

/// Runs the steps and returns the report.
pub fn run(bench: &TrainBench) -> Result<Value> {
    let config = &bench.config;
    config.validate()?;
    let model = bench_model(&bench.model, bench.random_init.as_deref())?;
    let task = Alternating::default();
    let prompts = Prompts::for_task(&task);
    let wanted = config.failures_per_step * config.max_steps;
    let failures = stand_in_failures(&model.policy(), &task, &prompts, wanted)?;
    // The trainer builds its own decoders: keep only the loaded weights.
    let Model {
        loaded: mut model,
        llama,
        ..
    } = model;
    drop(llama);
    (bench.release_memory)();
    let device = r3_model::device_name(model.weights.device());
    let limits = Limits::measure(bench.limit_seconds, model.weights.device().is_cpu());
    let weights = StartWeights {
        policy: std::mem::take(&mut model.weights),
        reference: None,
    };
    let mut trainer = Trainer::new(
        config.clone(),
        &model,
        weights,
        &task,
        prompts,
        failures,
        None,
    )?;
    trainer.set_memory_release(bench.release_memory);
    let mut steps = Vec::new();
    for _ in 0..config.max_steps {
        steps.push(trainer.train_step()?.0);
    }
    let _ = std::fs::remove_dir_all(&config.output_dir);
    let mean =
        |f: &dyn Fn(&StepMetrics) -> f64| steps.iter().map(f).sum::<f64>() / steps.len() as f64;
    let gemm = limits.as_ref().map(|l| l.gemm_gflops);
    let flops: f64 = steps.iter().map(|m| m.forward_backward_flops).sum();
    let seconds: f64 = steps.iter().map(|m| m.seconds_forward_backward).sum();
    Ok(json!({
        "bench": "train",
        "machine": machine::describe(limits.as_ref()),
        "device": device,
        "model": model.path,
        "batch": config.failures_per_step,
        "group": config.num_generations,
        "max_reflection_tokens": config.max_completion_length,
        "max_retry_tokens": config.retry_max_tokens,
        "micro_batch_size": config.micro_batch_size,
        "train_on": config.train_on,
        "gradient_checkpointing": config.gradient_checkpointing,
        "bf16_products": config.bf16_products && r3_kernels::bf16::available(),
        "steps": config.max_steps,
        "beta": config.beta,
        "use_peft": config.use_peft,
        "lora": config.use_peft.then(|| json!({"r": config.lora_r, "alpha": config.lora_alpha, "target_modules": config.lora_target_modules})),
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
        "forward_backward_fraction_of_limit": fraction(flops, seconds, gemm),
        "peak_rss_bytes": machine::peak_rss_bytes(),
    }))
}
