//! A GPU against the CPU on one model (`r3 device-check`), as one JSON
//! object. The same f32 weights run on both: the last-position logits of a
//! left-padded batch of prompts of different lengths, greedy continuations,
//! sampled reflect-and-retry rollouts (forks, rows set aside, the retry
//! turn), and one real training step (`Trainer::train_step`: rollouts,
//! rewards, the GRPO loss with its reference term, accumulation over micro
//! batches, clipping, AdamW); then the device's bf16 logits against the
//! CPU's f32 ones. A GPU machine has no Rust toolchain to run the test
//! suite, so `scripts/gpu-check.sh` runs the binary's shim of this instead.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use r3_generate::{Generator, Sampler, SamplingParams};
use r3_loop::mine::MinedFailure;
use r3_loop::model::{self, ModelSpec};
use r3_loop::{Failure, Policy, Rollouts};
use r3_model::{device_name, DeviceChoice, KvCache, Llama, LoadedModel, Message, Weights};
use r3_tasks::Prompts;
use r3_train::config::TrainConfig;
use r3_train::grpo::ImportanceSampling;
use r3_train::trainer::{StartWeights, Trainer};
use serde_json::{json, Value};

use crate::train::{stand_in_failures, Alternating};
use crate::{BenchError, Result};

/// What to compare, and how closely.
pub struct DeviceCheck {
    /// The base model (no adapter), and the device under test.
    pub model: ModelSpec,
    /// An HF config.json: random weights of that shape (`model`'s tokenizer).
    pub random_init: Option<PathBuf>,
    /// Prompts in the batch, each longer than the one before.
    pub batch: usize,
    /// Greedy tokens compared per prompt.
    pub new_tokens: usize,
    /// Reflections sampled per failure, in the rollouts and the step.
    pub group: usize,
    /// Most tokens sampled per turn in the rollouts and the step.
    pub rollout_tokens: usize,
    /// Run the training step (a model too large to train on the CPU cannot).
    pub train: bool,
    /// Largest logits difference (times the largest logit, when above 1).
    pub logits_tolerance: f64,
    /// Largest difference between the two devices' weight updates,
    /// relative to the largest update.
    pub update_tolerance: f64,
    /// Largest bf16-vs-f32 logits difference, relative to the largest logit.
    pub bf16_tolerance: f64,
}

/// The learning rate of the compared step: large enough that updates
/// (`LR` times the gradient, see [`ADAM_EPSILON`]) dwarf the rounding of
/// the weights they are added to.
const LR: f64 = 1e-2;

/// AdamW's ε in the compared step. Adam's first update is `lr·g/(|g|+ε)`:
/// at the usual ε = 1e-8 that is `lr·sign(g)`, so a weight whose gradient
/// is at rounding level (zero on one device, -1e-12 on the other) moves
/// by `lr` one way on one device and the other way on the other, which
/// says nothing about the gradients. At ε = 1 (gradients are far below 1
/// per weight) the update is `lr·g`: the updates compare the gradients.
const ADAM_EPSILON: f64 = 1.0;

/// Candidates each sampled token is drawn from. A random model at the
/// high temperature below spreads its probability over the whole
/// vocabulary, 150k tokens on a Qwen shape, whose neighbouring CDF
/// boundaries lie closer than the devices' rounding: a full-vocabulary
/// draw would differ between devices without any fault. Among the top 20
/// the boundaries are far apart, and rows still differ.
const TOP_K: usize = 20;

/// Runs the comparison; returns the report, whose `ok` says whether every
/// required agreement held.
pub fn run(check: &DeviceCheck) -> Result<Value> {
    if check.batch == 0 || check.new_tokens == 0 || check.group < 2 || check.rollout_tokens == 0 {
        return Err(BenchError::Invalid(
            "--batch, --new-tokens and --rollout-tokens must be positive, and --group at least 2"
                .into(),
        ));
    }
    let device = model::open_device(check.model.device)?;
    if device.is_cpu() && check.model.device == DeviceChoice::Auto {
        return Err(BenchError::Invalid(
            "no GPU opens here (a build without CUDA, or no device), so there is nothing to \
             compare the CPU against; --device cpu runs the comparison CPU against CPU, as a \
             self-test of the check itself"
                .into(),
        ));
    }
    if check.model.adapter.is_some() {
        return Err(BenchError::Invalid(
            "device-check compares a base model; merge the adapter first (r3 merge)".into(),
        ));
    }
    let loaded = match &check.random_init {
        Some(shape) => model::random_model(shape, check.model.path.as_deref())?,
        None => model::load_base(check.model.path.as_deref())?,
    };
    let on = |device: &Device| -> Weights {
        let mut weights = loaded.weights.clone();
        weights.set_device(device.clone());
        weights
    };
    let (cpu, gpu) = (on(&Device::Cpu), on(&device));
    let config = &loaded.config;
    let prompts = prompts(&loaded, check.batch)?;

    // Inference: the f32 decoder on both (no packed weights on the CPU side
    // either, so that both read the same values).
    let build =
        |w: &Weights| -> Result<Llama> { Ok(Llama::trainable(config, w)?.0.for_generation()?) };
    let (cpu_model, gpu_model) = (build(&cpu)?, build(&gpu)?);
    let (cpu_logits, cpu_tokens) = greedy(&cpu_model, &loaded, &prompts, check.new_tokens)?;
    let (gpu_logits, gpu_tokens) = greedy(&gpu_model, &loaded, &prompts, check.new_tokens)?;
    // A random model's logits are large (tens, for unit-variance tied
    // embeddings), which makes 0.9 nearly greedy: the rollouts sample at a
    // temperature that grows with them, so that rows really differ.
    let logits_scale = max_abs(&cpu_logits)?;
    let sampling = SamplingParams {
        temperature: 0.9f64.max(logits_scale / 4.0),
        top_k: TOP_K,
        max_new_tokens: check.rollout_tokens,
        seed: 7,
        ..Default::default()
    };
    let sample = |model| rollouts(model, &loaded, check.group, &sampling);
    let (cpu_rollouts, gpu_rollouts) = (sample(&cpu_model)?, sample(&gpu_model)?);
    drop((cpu_model, gpu_model));
    let mut bf16 = on(&device);
    bf16.set_dtype(DType::BF16)?;
    let bf16_model = Llama::new(config, &bf16)?;
    let (bf16_logits, bf16_tokens) = greedy(&bf16_model, &loaded, &prompts, check.new_tokens)?;
    drop(bf16_model);
    let bf16_diff = max_abs_diff(&cpu_logits, &bf16_logits)?;
    let bf16_relative = bf16_diff / logits_scale.max(f64::MIN_POSITIVE);
    let bf16_same_tokens = count_equal(&cpu_tokens, &bf16_tokens);
    let logits_diff = max_abs_diff(&cpu_logits, &gpu_logits)?;
    // f32 rounding grows with the logits' size: above 1, the tolerance
    // scales with the largest logit (a random-init 1.5B model, whose tied
    // embeddings have unit deviation, has logits of order 100).
    let logits_ok = logits_diff <= check.logits_tolerance * logits_scale.max(1.0);
    let first_divergence = cpu_tokens
        .iter()
        .zip(&gpu_tokens)
        .map(|(a, b)| first_difference(a, b))
        .collect::<Vec<_>>();
    let greedy_equal = cpu_tokens == gpu_tokens;
    let rollouts_equal = cpu_rollouts.ids == gpu_rollouts.ids;
    let rollout_divergence = cpu_rollouts
        .ids
        .iter()
        .zip(&gpu_rollouts.ids)
        .enumerate()
        .find_map(|(i, (a, b))| first_difference(a, b).map(|position| [i, position]));

    let mut report = json!({
        "check": "device",
        "device": device_name(&device),
        "model": loaded.path,
        "batch": check.batch,
        "prompt_tokens": prompts.iter().map(Vec::len).collect::<Vec<_>>(),
        "logits_max_abs_diff": logits_diff,
        "logits_ok": logits_ok,
        "greedy_tokens": check.new_tokens,
        "greedy_equal": greedy_equal,
        "greedy_first_divergence": first_divergence,
        "rollout_temperature": sampling.temperature,
        "rollout_sequences": cpu_rollouts.ids.len(),
        "rollout_reflection_tokens": cpu_rollouts.reflection_tokens,
        "rollout_equal": rollouts_equal,
        // [sequence, position] of the first sampled id that differs.
        "rollout_first_divergence": rollout_divergence,
        "logits_max_abs": logits_scale,
        "bf16_logits_max_abs_diff": bf16_diff,
        "bf16_logits_relative_diff": bf16_relative,
        "bf16_ok": bf16_relative <= check.bf16_tolerance,
        // Greedy tokens of the bf16 model equal to the f32 CPU model's: a
        // near-tie may flip in bf16, so this is reported, not required.
        "bf16_greedy_same_tokens": bf16_same_tokens,
    });
    let mut ok =
        logits_ok && greedy_equal && rollouts_equal && bf16_relative <= check.bf16_tolerance;
    if check.train {
        let step = training_step(&loaded, [&cpu, &gpu], check, &sampling)?;
        let update_relative = step.update_diff / step.update_max.max(f64::MIN_POSITIVE);
        // Each device rounds `w + Δ` once: the updates, read back as
        // differences of weights, also differ by up to an ulp of the
        // largest weight (2.4e-7 against updates of 3.3e-5 on the
        // random-init 1.5B shape, whose embeddings reach ~4).
        let weight_rounding = step.weight_max * f32::EPSILON as f64;
        let update_ok = step.samples_equal
            && step.update_diff <= check.update_tolerance * step.update_max + weight_rounding;
        report["train_lr"] = LR.into();
        report["train_adam_epsilon"] = ADAM_EPSILON.into();
        report["train_tokens"] = step.tokens.into();
        // The step's own rollouts (reflection and retry texts, rewards):
        // unequal ones would make the gradients differ for another reason.
        report["train_samples_equal"] = step.samples_equal.into();
        report["train_loss"] = json!(step.loss);
        report["train_grad_norm"] = json!(step.grad_norm);
        report["grad_norm_abs_diff"] = step.gradient_diff.into();
        report["update_max_abs"] = step.update_max.into();
        report["update_max_abs_diff"] = step.update_diff.into();
        report["update_relative_diff"] = update_relative.into();
        report["weight_rounding"] = weight_rounding.into();
        report["update_ok"] = update_ok.into();
        ok &= update_ok;
    }
    report["ok"] = ok.into();
    Ok(report)
}

/// `batch` chat prompts, each a few tokens longer than the one before, so
/// that the batch is left-padded.
fn prompts(loaded: &LoadedModel, batch: usize) -> Result<Vec<Vec<u32>>> {
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
    loaded: &LoadedModel,
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

/// Every id sequence of [`rollouts`], and how many tokens each reflection
/// took.
struct SampledRollouts {
    ids: Vec<Vec<u32>>,
    reflection_tokens: Vec<usize>,
}

/// The loop's own rollouts of one Countdown record, every turn sampled
/// with `params` from fixed per-row streams: `group` first attempts forked from one
/// prefilled prompt, then `group` reflections on the first attempt forked
/// from their shared prefix, then each row's retry turn continued in its
/// own cache. Every eighth id ends a turn, so that rows finish at
/// different steps and are set aside while the others decode (a random
/// model would seldom sample its real end-of-turn token). Equal logits
/// give equal ids on both devices: each row's sampler reads only its own
/// logits.
fn rollouts(
    model: &Llama,
    loaded: &LoadedModel,
    group: usize,
    params: &SamplingParams,
) -> Result<SampledRollouts> {
    let task = r3_tasks::builtin("countdown")?;
    let prompts = Prompts::for_task(task.as_ref());
    let ends: Vec<u32> = (0..model.config.vocab_size as u32).step_by(8).collect();
    let mut policy = Policy::new(model, loaded);
    policy.eos_token_ids = &ends;
    let rollouts = Rollouts::new(&policy, task.as_ref(), &prompts, group);
    let record = serde_json::json!({"nums": [3, 7, 25], "target": 46});
    let attempts = rollouts.attempts(&[&record], group, params, 0, &mut |_| {})?;
    let failure = Failure {
        record: &record,
        attempt_tokens: attempts[0][0].tokens.clone(),
    };
    let groups = rollouts.reflect_and_retry(&[failure], group, params, params, 0, &mut |_| {})?;
    let mut out = SampledRollouts {
        ids: attempts[0].iter().map(|a| a.tokens.clone()).collect(),
        reflection_tokens: Vec::with_capacity(group),
    };
    for rollout in groups.into_iter().flatten() {
        out.reflection_tokens.push(rollout.reflection.len());
        out.ids.push(rollout.ids);
    }
    Ok(out)
}

struct StepComparison {
    tokens: usize,
    /// The loss and gradient norm, CPU first.
    loss: [f64; 2],
    grad_norm: [f64; 2],
    gradient_diff: f64,
    samples_equal: bool,
    update_diff: f64,
    update_max: f64,
    /// The largest trained weight before the step.
    weight_max: f64,
}

/// One `Trainer::train_step` on each device from the same weights: the
/// stand-in failures (the CPU model's greedy attempts at arithmetic), G
/// rollouts each sampled as in the comparison above, rewards from a judge
/// that passes every other retry (so every group trains), the GRPO loss
/// with its reference term over two micro batches, clipping and AdamW.
fn training_step(
    loaded: &LoadedModel,
    weights: [&Weights; 2],
    check: &DeviceCheck,
    sampling: &SamplingParams,
) -> Result<StepComparison> {
    let prompts = Prompts::for_task(&Alternating::default());
    let failures: Vec<MinedFailure> = {
        let (cpu_model, _) = Llama::trainable(&loaded.config, weights[0])?;
        let cpu_model = cpu_model.for_generation()?;
        let policy = Policy::new(&cpu_model, loaded);
        stand_in_failures(&policy, &Alternating::default(), &prompts, 2)?
    };
    let mut runs = Vec::with_capacity(2);
    let mut weight_max = None;
    for (i, w) in weights.into_iter().enumerate() {
        let config = TrainConfig {
            output_dir: std::env::temp_dir()
                .join(format!("r3-device-check-{}-{i}", std::process::id())),
            max_steps: 1,
            failures_per_step: failures.len(),
            num_generations: check.group,
            temperature: sampling.temperature,
            top_k: sampling.top_k,
            // The top-k draws' log-probs are far from the full softmax the
            // trainer scores, so the default correction would mask every
            // sequence: the comparison is of the gradients, uncorrected.
            importance_sampling: ImportanceSampling::None,
            max_completion_length: check.rollout_tokens,
            retry_temperature: sampling.temperature,
            retry_max_tokens: check.rollout_tokens,
            micro_batch_size: check.group,
            learning_rate: LR,
            adam_epsilon: ADAM_EPSILON,
            warmup_steps: 0,
            // Every rollout's texts, to tell whether both steps sampled
            // the same ones.
            log_completions: usize::MAX,
            save_steps: 0,
            seed: sampling.seed,
            device: device_name(w.device())
                .parse()
                .map_err(BenchError::Invalid)?,
            ..Default::default()
        };
        let task = Alternating::default();
        let start = StartWeights {
            policy: w.clone(),
            reference: None,
        };
        let mut trainer = Trainer::new(
            config.clone(),
            loaded,
            start,
            &task,
            prompts.clone(),
            failures.clone(),
            None,
        )?;
        let before: Vec<Tensor> = trainer
            .trained_parameters()
            .iter()
            // A copy: on the CPU `to_device` shares the storage the update
            // changes in place.
            .map(|(_, v)| v.as_tensor().to_device(&Device::Cpu)?.copy())
            .collect::<candle_core::Result<_>>()?;
        if weight_max.is_none() {
            let largest = before.iter().map(max_abs).collect::<Result<Vec<_>>>()?;
            weight_max = Some(largest.into_iter().fold(0.0, f64::max));
        }
        let (metrics, samples) = trainer.train_step()?;
        let updates = trainer
            .trained_parameters()
            .iter()
            .zip(before)
            .map(|((_, v), b)| Ok((v.as_tensor().to_device(&Device::Cpu)? - b)?))
            .collect::<Result<Vec<Tensor>>>()?;
        let _ = std::fs::remove_dir_all(&config.output_dir);
        runs.push((metrics, updates, samples));
    }
    let (gpu, cpu) = (runs.pop().expect("two runs"), runs.pop().expect("two runs"));
    let mut out = StepComparison {
        tokens: cpu.0.trained_tokens,
        loss: [cpu.0.loss, gpu.0.loss],
        grad_norm: [cpu.0.grad_norm, gpu.0.grad_norm],
        gradient_diff: (cpu.0.grad_norm - gpu.0.grad_norm).abs(),
        samples_equal: cpu.2 == gpu.2,
        update_diff: 0.0,
        update_max: 0.0,
        weight_max: weight_max.unwrap_or(0.0),
    };
    for (c, g) in cpu.1.iter().zip(&gpu.1) {
        out.update_diff = out.update_diff.max(max_abs_diff(c, g)?);
        out.update_max = out.update_max.max(max_abs(c)?);
    }
    Ok(out)
}

/// The first position where two id sequences differ, a missing id
/// included (one sequence ended earlier).
fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    let at = a.iter().zip(b).position(|(x, y)| x != y);
    at.or((a.len() != b.len()).then(|| a.len().min(b.len())))
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

#[cfg(test)]
mod tests {
    use super::first_difference;

    #[test]
    fn first_difference_finds_a_changed_or_missing_id() {
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2]), Some(2));
        assert_eq!(first_difference(&[], &[4]), Some(0));
    }
}
