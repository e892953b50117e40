//! The training loop. One optimizer step, top to bottom:
//! 1. take B failures; sample G reflections each and one retry per
//!    reflection with the current policy; verify → rewards;
//! 2. group advantages; groups whose rewards are all equal are counted and
//!    skipped;
//! 3. score reflection tokens under the reference (and the old policy when
//!    num_iterations > 1), without gradients;
//! 4. forward + backward on reflection tokens only, in micro-batches;
//! 5. clip the global gradient norm and take an AdamW step.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use r3_generate::SamplingParams;
use r3_loop::mine::MinedFailure;
use r3_loop::{Failure, Policy, Rollout, Rollouts};
use r3_model::{Llama, LoadedModel};
use r3_tasks::{Prompts, Task};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::checkpoint::{self, TrainerState};
use crate::config::{TrainConfig, TrainOn};
use crate::grpo::{
    group_advantages, grpo_loss, has_signal, token_weights, LossStats, Objective, TokenTerms,
};
use crate::optim::{clip_scale, global_norm, AdamW, Gradients};
use crate::score::{span_logprobs, TrainingForward};
use crate::{Result, TrainError};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub learning_rate: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Fraction of retries verified correct (the same as reward_mean: the
    /// reward is binary), kept under its own name for plots.
    pub retry_success: f64,
    pub loss: f64,
    pub kl: f64,
    pub grad_norm: f64,
    pub clip_fraction: f64,
    pub reflection_length: f64,
    pub groups: usize,
    pub zero_signal_groups: usize,
    pub trained_tokens: usize,
    pub generated_tokens: usize,
    pub seconds_generation: f64,
    pub seconds_verification: f64,
    pub seconds_reference: f64,
    pub seconds_forward_backward: f64,
    pub seconds_optimizer: f64,
    pub seconds_step: f64,
    pub tokens_per_s: f64,
}

/// One group: the G rollouts of one failure and their advantages.
struct Group {
    rollouts: Vec<Rollout>,
    advantages: Vec<f32>,
}

impl Group {
    /// (prefix, trained tokens) of each rollout.
    fn spans(&self, train_on: TrainOn) -> Vec<(&[u32], &[u32])> {
        self.rollouts
            .iter()
            .map(|r| {
                let span = match train_on {
                    TrainOn::Reflection => r.reflection.clone(),
                    TrainOn::Retry => r.retry_span(),
                };
                (&r.ids[..span.start], &r.ids[span])
            })
            .collect()
    }
}

pub struct Trainer<'a> {
    pub config: TrainConfig,
    pub model: &'a LoadedModel,
    pub task: &'a dyn Task,
    pub prompts: Prompts,
    failures: Vec<MinedFailure>,
    /// The policy as trained: every weight a `Var`.
    train_model: Llama,
    grads: Gradients,
    reference: Option<Llama>,
    optimizer: AdamW,
    pub step: usize,
    cursor: usize,
    /// The epoch whose shuffled failure order is cached in `order`.
    order_epoch: Option<usize>,
    order: Vec<usize>,
    base_model: String,
    /// Called between the phases of a step (see [`Trainer::set_memory_release`]).
    release_memory: fn(),
}

impl<'a> Trainer<'a> {
    /// A trainer starting from `model`'s weights (or resuming from the
    /// checkpoint `resume`, whose weights `model` must hold), with the KL
    /// reference `reference` (the base model; `None` when β = 0).
    pub fn new(
        config: TrainConfig,
        model: &'a LoadedModel,
        reference: Option<&LoadedModel>,
        task: &'a dyn Task,
        prompts: Prompts,
        failures: Vec<MinedFailure>,
        resume: Option<&Path>,
    ) -> Result<Self> {
        if failures.is_empty() {
            return Err(TrainError::Invalid("the dataset of failures is empty: nothing to train on (did `r3 mine` find no failures?)".into()));
        }
        let context = model.config.max_position_embeddings;
        if config.max_completion_length + config.retry_max_tokens > context {
            return Err(TrainError::Config(format!(
                "'max_completion_length' ({}) + 'retry_max_tokens' ({}) exceed the model's context of {context} tokens",
                config.max_completion_length, config.retry_max_tokens
            )));
        }
        // Failures mined for another task would reach its verifier as
        // records it cannot read.
        for (i, f) in failures.iter().enumerate() {
            task.check_record(&f.record).map_err(|why| {
                TrainError::Invalid(format!(
                    "failure {} (record {}) does not fit the task '{}': {why}; \
                     was it mined with another task?",
                    i + 1,
                    f.index,
                    task.name()
                ))
            })?;
        }
        if config.failures_per_step > failures.len() {
            return Err(TrainError::Config(format!(
                "'failures_per_step' ({}) is larger than the dataset of failures ({})",
                config.failures_per_step,
                failures.len()
            )));
        }
        let (train_model, params) = Llama::trainable(&model.config, &model.weights)?;
        let reference = match (config.beta > 0.0, reference) {
            (true, Some(r)) => Some(Llama::new_compact(&r.config, &r.weights)?),
            (true, None) => {
                return Err(TrainError::Invalid(
                    "beta > 0 needs a reference model".into(),
                ))
            }
            (false, _) => None,
        };
        let mut optimizer = AdamW::new(
            params,
            config.adam_beta1,
            config.adam_beta2,
            config.adam_epsilon,
            config.weight_decay,
        )?;
        let (mut step, mut cursor) = (0, 0);
        let mut base_model = model.path.display().to_string();
        if let Some(dir) = resume {
            let state = checkpoint::read_state(dir)?;
            let changed = config.resume_differences(&state.config);
            if !changed.is_empty() {
                return Err(TrainError::Config(format!(
                    "{} was trained with other settings ({}); only {} may change on resume",
                    dir.display(),
                    changed.join("; "),
                    TrainConfig::CHANGEABLE_ON_RESUME.join(", ")
                )));
            }
            checkpoint::load_optimizer(dir, &mut optimizer)?;
            (step, cursor, base_model) = (state.step, state.cursor, state.base_model);
        }
        Ok(Self {
            grads: Gradients::new(&optimizer.params)?,
            config,
            model,
            task,
            prompts,
            failures,
            train_model,
            reference,
            optimizer,
            step,
            cursor,
            order_epoch: None,
            order: Vec::new(),
            base_model,
            release_memory: || {},
        })
    }

    /// Sets what returns freed memory to the OS between the phases of a
    /// step (generation, scoring, backward, update): an allocator that
    /// keeps freed memory for speed would otherwise hold every phase's
    /// leftovers at once. The binary owns the allocator, so it provides this.
    pub fn set_memory_release(&mut self, release: fn()) {
        self.release_memory = release;
    }

    /// The next B failures, in an order reshuffled (from the seed) every epoch.
    fn next_failures(&mut self) -> Vec<MinedFailure> {
        let n = self.failures.len();
        (0..self.config.failures_per_step)
            .map(|_| {
                let (epoch, offset) = (self.cursor / n, self.cursor % n);
                if self.order_epoch != Some(epoch) {
                    self.order = (0..n).collect();
                    let seed = self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9);
                    self.order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
                    self.order_epoch = Some(epoch);
                }
                self.cursor += 1;
                self.failures[self.order[offset]].clone()
            })
            .collect()
    }

    fn reflection_params(&self, batch: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.config.temperature,
            top_p: self.config.top_p,
            top_k: self.config.top_k,
            max_new_tokens: self.config.max_completion_length,
            stop_strings: Vec::new(),
            seed: self.config.seed.wrapping_mul(1_000_003).wrapping_add(batch),
        }
    }

    fn retry_params(&self, batch: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.config.retry_temperature,
            max_new_tokens: self.config.retry_max_tokens,
            ..self.reflection_params(batch)
        }
    }

    /// One optimizer step; returns its metrics and a few transcripts.
    pub fn train_step(&mut self) -> Result<(StepMetrics, Vec<serde_json::Value>)> {
        let c = self.config.clone();
        let started = Instant::now();
        let mut m = StepMetrics {
            step: self.step + 1,
            learning_rate: c.learning_rate_at(self.step),
            ..Default::default()
        };

        // 1. Rollouts with the current policy.
        let snapshot = self.train_model.for_generation()?;
        let policy = Policy::new(&snapshot, self.model);
        let mut groups = Vec::new();
        let mut samples = Vec::new();
        for accum in 0..c.gradient_accumulation_steps {
            let batch = (self.step * c.gradient_accumulation_steps + accum) as u64;
            let mined = self.next_failures();
            let failures: Vec<Failure<'_>> = mined
                .iter()
                .map(|f| Failure {
                    record: &f.record,
                    attempt_tokens: f.attempt_tokens.clone(),
                })
                .collect();
            let rollouts =
                Rollouts::new(&policy, self.task, &self.prompts, c.generation_batch_rows);
            let produced = rollouts.reflect_and_retry(
                &failures,
                c.num_generations,
                &self.reflection_params(batch),
                &self.retry_params(batch),
                0,
                &mut |_| {},
            )?;
            m.seconds_verification += rollouts.verify_seconds.get();
            for (f, group) in mined.iter().zip(produced) {
                for r in group
                    .iter()
                    .take(c.log_completions.saturating_sub(samples.len()))
                {
                    samples.push(serde_json::json!({
                        "step": self.step + 1, "record": f.record, "attempt": f.attempt,
                        "reflection": r.reflection_text, "retry": r.retry.text,
                        "reward": r.reward(), "reason": r.retry.verdict.reason,
                    }));
                }
                let rewards: Vec<f32> = group.iter().map(Rollout::reward).collect();
                groups.push(Group {
                    advantages: group_advantages(&rewards, c.scale_rewards),
                    rollouts: group,
                });
            }
        }
        drop(snapshot);
        (self.release_memory)();
        m.seconds_generation = started.elapsed().as_secs_f64() - m.seconds_verification;

        // 2. Rewards and advantages; groups without signal are skipped.
        let rewards: Vec<f64> = groups
            .iter()
            .flat_map(|g| g.rollouts.iter().map(|r| r.reward() as f64))
            .collect();
        m.reward_mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
        m.reward_std = (rewards
            .iter()
            .map(|r| (r - m.reward_mean).powi(2))
            .sum::<f64>()
            / rewards.len() as f64)
            .sqrt();
        m.retry_success = m.reward_mean;
        m.groups = groups.len();
        m.generated_tokens = groups
            .iter()
            .flat_map(|g| &g.rollouts)
            .map(|r| r.reflection.len() + r.retry.tokens.len())
            .sum();
        m.reflection_length = groups
            .iter()
            .flat_map(|g| &g.rollouts)
            .map(|r| r.reflection.len() as f64)
            .sum::<f64>()
            / rewards.len() as f64;
        groups.retain(|g| has_signal(&g.rollouts.iter().map(Rollout::reward).collect::<Vec<_>>()));
        m.zero_signal_groups = m.groups - groups.len();
        if groups.is_empty() {
            self.step += 1;
            m.seconds_step = started.elapsed().as_secs_f64();
            m.tokens_per_s = m.generated_tokens as f64 / m.seconds_step;
            return Ok((m, samples));
        }

        // 3. Reference (and old-policy) log-probs, without gradients.
        let lengths: Vec<usize> = groups
            .iter()
            .flat_map(|g| g.spans(c.train_on))
            .map(|(_, t)| t.len())
            .collect();
        let weights = token_weights(&lengths, c.loss_type, c.max_completion_length);
        let t_ref = Instant::now();
        let score_all = |model: &Llama| -> Result<Vec<Tensor>> {
            groups
                .iter()
                .map(|g| {
                    let spans = g.spans(c.train_on);
                    let prefixes: Vec<&[u32]> = spans.iter().map(|s| s.0).collect();
                    let tokens: Vec<&[u32]> = spans.iter().map(|s| s.1).collect();
                    span_logprobs(model, &prefixes, &tokens, false)
                })
                .collect()
        };
        let reference = match &self.reference {
            Some(r) => Some(score_all(r)?),
            None => None,
        };
        let old = if c.num_iterations > 1 {
            Some(score_all(&self.train_model.detached())?)
        } else {
            None
        };
        m.seconds_reference = t_ref.elapsed().as_secs_f64();
        m.trained_tokens = lengths.iter().sum();

        let objective = Objective {
            epsilon_low: c.epsilon,
            epsilon_high: c.epsilon_high.unwrap_or(c.epsilon),
            beta: c.beta,
        };
        for _ in 0..c.num_iterations {
            // 4. Forward + backward over the trained tokens, in micro-batches.
            let t_fb = Instant::now();
            let grads = &mut self.grads;
            grads.zero()?;
            let (mut loss_total, mut stats_total) = (0f64, LossStats::default());
            let mut sequence = 0;
            for (gi, g) in groups.iter().enumerate() {
                let spans = g.spans(c.train_on);
                let mut token_offset = 0;
                for rows in (0..spans.len())
                    .collect::<Vec<_>>()
                    .chunks(c.micro_batch_size)
                {
                    let prefixes: Vec<&[u32]> = rows.iter().map(|&i| spans[i].0).collect();
                    let tokens: Vec<&[u32]> = rows.iter().map(|&i| spans[i].1).collect();
                    let n: usize = tokens.iter().map(|t| t.len()).sum();
                    let forward = TrainingForward::new(
                        &self.train_model,
                        &prefixes,
                        &tokens,
                        c.gradient_checkpointing,
                    )?;
                    let logprobs = forward.logprobs();
                    let advantages: Vec<f32> = rows
                        .iter()
                        .flat_map(|&i| std::iter::repeat_n(g.advantages[i], spans[i].1.len()))
                        .collect();
                    let token_w: Vec<f32> = rows
                        .iter()
                        .flat_map(|&i| weights[sequence + i].iter().copied())
                        .collect();
                    let old_lp = match &old {
                        Some(o) => o[gi].narrow(0, token_offset, n)?,
                        None => logprobs.detach(),
                    };
                    let ref_lp = match &reference {
                        Some(r) => Some(r[gi].narrow(0, token_offset, n)?),
                        None => None,
                    };
                    let terms = TokenTerms {
                        logprobs,
                        old_logprobs: &old_lp,
                        ref_logprobs: ref_lp.as_ref(),
                        advantages: &advantages,
                        weights: &token_w,
                    };
                    let (loss, stats) = grpo_loss(&terms, &objective)?;
                    let value = loss.to_scalar::<f32>()? as f64;
                    if !value.is_finite() {
                        return Err(TrainError::Invalid(format!(
                            "non-finite loss at step {}; stopping (the last checkpoint is intact)",
                            self.step + 1
                        )));
                    }
                    loss_total += value;
                    stats_total.kl += stats.kl;
                    stats_total.clipped_tokens += stats.clipped_tokens;
                    stats_total.tokens += stats.tokens;
                    forward.backward(&loss, grads)?;
                    token_offset += n;
                }
                sequence += spans.len();
            }
            m.seconds_forward_backward += t_fb.elapsed().as_secs_f64();

            (self.release_memory)();
            // 5. Clip and update.
            let t_opt = Instant::now();
            let grads = self.grads.sums();
            let names: Vec<&str> = self
                .optimizer
                .params
                .iter()
                .map(|(n, _)| n.as_str())
                .collect();
            m.grad_norm = global_norm(&names, grads)?;
            let scale = clip_scale(m.grad_norm, c.max_grad_norm);
            self.optimizer.update(grads, m.learning_rate, scale)?;
            m.seconds_optimizer += t_opt.elapsed().as_secs_f64();
            m.loss = loss_total;
            m.kl = stats_total.kl;
            m.clip_fraction = stats_total.clipped_tokens as f64 / stats_total.tokens.max(1) as f64;
        }
        (self.release_memory)();
        self.step += 1;
        m.seconds_step = started.elapsed().as_secs_f64();
        m.tokens_per_s =
            (m.generated_tokens + m.trained_tokens * c.num_iterations) as f64 / m.seconds_step;
        Ok((m, samples))
    }

    /// Saves a checkpoint of the current step under the output directory.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = TrainerState {
            step: self.step,
            cursor: self.cursor,
            base_model: self.base_model.clone(),
            config: self.config.clone(),
        };
        checkpoint::save(
            &self.config.output_dir,
            self.model,
            self.train_model.hf_weights()?,
            &self.optimizer,
            &state,
        )
    }

    /// Runs to `max_steps`, appending to metrics.jsonl and samples.jsonl and
    /// checkpointing every `save_steps` and at the end. `on_step` sees each
    /// step's metrics (progress bars).
    pub fn run(&mut self, on_step: &mut dyn FnMut(&StepMetrics)) -> Result<PathBuf> {
        let dir = self.config.output_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| TrainError::Io {
                    path: path.display().to_string(),
                    source,
                })
        };
        // Lines past the checkpoint a resumed run starts from are redone.
        checkpoint::trim_logs(&dir, self.step)?;
        let (mut metrics, mut samples) = (open("metrics.jsonl")?, open("samples.jsonl")?);
        let mut last = None;
        while self.step < self.config.max_steps {
            let (m, transcripts) = self.train_step()?;
            let line = serde_json::to_string(&m).expect("serialisable");
            writeln!(metrics, "{line}")
                .and_then(|_| metrics.flush())
                .map_err(|source| TrainError::Io {
                    path: "metrics.jsonl".into(),
                    source,
                })?;
            for t in transcripts {
                writeln!(samples, "{t}").map_err(|source| TrainError::Io {
                    path: "samples.jsonl".into(),
                    source,
                })?;
            }
            on_step(&m);
            if self.config.save_steps > 0 && self.step.is_multiple_of(self.config.save_steps) {
                last = Some(self.save_checkpoint()?);
            }
        }
        match last {
            Some(path) if path.ends_with(format!("checkpoint-{}", self.step)) => Ok(path),
            _ => self.save_checkpoint(),
        }
    }
}
