//! The training loop. One optimizer step, top to bottom (`train_step`):
//! 1. take B failures; sample G reflections each and one retry per
//!    reflection with the current policy; verify → rewards → advantages
//!    within each group (`collect_groups`);
//! 2. groups whose rewards are all equal are counted and skipped;
//! 3. the mask: each rollout's trained tokens (`spans::trained_spans`);
//! 4. score them under the reference (and the old policy when
//!    num_iterations > 1), without gradients (`fixed_scores`);
//! 5. forward + backward on the trained tokens only, in micro-batches
//!    (`accumulate_gradients`);
//! 6. clip the global gradient norm and take an AdamW step (`apply_update`).
//!
//! Building a trainer (the run checked, its decoders, a resumed state) is
//! in `start.rs`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use r3_generate::SamplingParams;
use r3_loop::mine::MinedFailure;
use r3_loop::{Backend, Failure, Policy, Rollouts};
use r3_model::lora::LoraConfig;
use r3_model::{Llama, LoadedModel};
use r3_tasks::{Prompts, Task};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::{self, Trained, TrainerState};
use crate::config::TrainConfig;
use crate::crash::{self, CrashPoint};
use crate::grpo::{
    grpo_loss, importance_weights, Group, LossStats, Objective, SamplerGap, TokenTerms,
};
use crate::metrics::StepMetrics;
use crate::optim::{clip_scale, global_norm, AdamW, Gradients};
use crate::score::{span_logprobs, training_flops, LoraShape, TrainedShape, TrainingForward};
use crate::spans::{trained_spans, TrainedSpan};
use crate::tensorboard::EventWriter;
use crate::{Result, TrainError};

mod engines;
mod start;
pub use start::StartWeights;

/// A trained span with the log-probs of its tokens that stay fixed through
/// the step's updates: under the reference (for the KL) and under the
/// policy before its first update (with more than one iteration).
struct ScoredSpan<'g> {
    span: TrainedSpan<'g>,
    reference: Option<Tensor>,
    old: Option<Tensor>,
}

pub struct Trainer<'a> {
    pub config: TrainConfig,
    pub model: &'a LoadedModel,
    pub task: &'a dyn Task,
    pub prompts: Prompts,
    failures: Vec<MinedFailure>,
    /// The policy as trained: every weight a `Var`, or (LoRA) the
    /// adapters' on a frozen base.
    train_model: Llama,
    /// The adapters' shape when training LoRA.
    lora: Option<LoraConfig>,
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
    /// The engines that sample the rollouts, when the config names any.
    engines: Option<engines::EngineSync>,
}

impl<'a> Trainer<'a> {
    /// Sets what returns freed memory to the OS between the phases of a
    /// step (generation, scoring, backward, update): an allocator that
    /// keeps freed memory for speed would otherwise hold every phase's
    /// leftovers at once. The binary owns the allocator, so it provides this.
    pub fn set_memory_release(&mut self, release: fn()) {
        self.release_memory = release;
    }

    /// How many failures the run draws from (after `max_failure_rate`).
    pub fn failures_in_training(&self) -> usize {
        self.failures.len()
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
        // 1. B failures × G reflections, one retry each, verified; rewards
        //    become advantages within each group.
        let rollouts = format!(
            "{} failures × {} reflections, at most {} rows decoded at once",
            c.failures_per_step, c.num_generations, c.generation_batch_rows
        );
        let micro_batch = format!("micro_batch_size = {}", c.micro_batch_size);
        let (groups, samples) = self.collect_groups(&mut m).map_err(TrainError::in_phase(
            "generation (prefill and decode)",
            rollouts,
        ))?;
        m.record_rollouts(&groups);
        // 2. Groups whose rewards are all equal carry no signal.
        let groups: Vec<Group> = groups.into_iter().filter(Group::has_signal).collect();
        m.zero_signal_groups = m.groups - groups.len();
        if !groups.is_empty() {
            // 3. The mask: each rollout's trained tokens, advantage, weight.
            let spans = trained_spans(&groups, c.train_on, c.loss_type, c.max_completion_length);
            m.trained_tokens = spans.iter().flatten().map(|s| s.tokens.len()).sum();
            // 4. Reference (and old-policy) log-probs, without gradients.
            let scored = self
                .fixed_scores(&spans, &mut m)
                .map_err(TrainError::in_phase(
                    "reference scores",
                    micro_batch.clone(),
                ))?;
            for _ in 0..c.num_iterations {
                // 5. Forward + backward over the trained tokens.
                self.accumulate_gradients(&scored, &mut m)
                    .map_err(TrainError::in_phase(
                        "forward and backward",
                        micro_batch.clone(),
                    ))?;
                // 6. Clip and update.
                self.apply_update(&mut m)?;
            }
        }
        self.step += 1;
        m.seconds_step = started.elapsed().as_secs_f64();
        m.tokens_per_s =
            (m.generated_tokens + m.trained_tokens * c.num_iterations) as f64 / m.seconds_step;
        Ok((m, samples))
    }

    /// Rollouts with the current policy: G reflections and retries for
    /// each of the step's failures (over the accumulation batches), grouped
    /// with their advantages; and the first few as transcripts.
    fn collect_groups(
        &mut self,
        m: &mut StepMetrics,
    ) -> Result<(Vec<Group>, Vec<serde_json::Value>)> {
        let c = self.config.clone();
        let started = Instant::now();
        // Engines sample from the adapter as it stands now; r3's decoder
        // from a snapshot of the policy.
        let mut engines = self.engines.take();
        if let (Some(sync), Some(lora)) = (&mut engines, &self.lora) {
            let weights = self.train_model.adapter_weights();
            sync.serve(self.step, lora, &self.base_model, &weights)?;
        }
        let snapshot = match &engines {
            Some(_) => None,
            None => Some(self.train_model.for_generation()?.with_activations(
                r3_model::Activations {
                    int8_decode: c.int8_decode,
                    bf16_products: c.bf16_products,
                },
            )),
        };
        let policy = match (&engines, &snapshot) {
            (Some(sync), _) => Policy::with_backend(Backend::Engines(&sync.engines), self.model),
            (None, Some(snapshot)) => Policy::new(snapshot, self.model),
            (None, None) => unreachable!("a snapshot without engines"),
        };
        let version = engines.as_ref().map(|sync| sync.engines.model.clone());
        let (mut groups, mut samples) = (Vec::new(), Vec::new());
        let mut occupancy = Vec::new();
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
            occupancy.extend(rollouts.batch_occupancy());
            for (f, rollouts) in mined.iter().zip(produced) {
                let group = Group::new(rollouts, c.scale_rewards);
                let room = c.log_completions.saturating_sub(samples.len());
                let logged = group.rollouts.iter().zip(&group.rewards).take(room);
                samples.extend(logged.map(|(r, reward)| {
                    serde_json::json!({
                        "step": self.step + 1, "record": f.record, "attempt": f.attempt,
                        "reflection": r.reflection_text, "retry": r.retry.text,
                        "reward": reward, "reason": r.retry.verdict.reason,
                        "adapter": version,
                    })
                }));
                groups.push(group);
            }
        }
        drop(snapshot);
        self.engines = engines;
        (self.release_memory)();
        m.seconds_generation = started.elapsed().as_secs_f64() - m.seconds_verification;
        m.generation_batch_occupancy =
            occupancy.iter().sum::<f64>() / occupancy.len().max(1) as f64;
        Ok((groups, samples))
    }

    /// Each group's spans with their fixed log-probs: under the frozen
    /// reference (for the KL) and, with more than one iteration, under the
    /// policy before its first update. A group is scored at once (its
    /// shared prefix runs once), then cut span by span.
    fn fixed_scores<'g>(
        &self,
        spans: &[Vec<TrainedSpan<'g>>],
        m: &mut StepMetrics,
    ) -> Result<Vec<Vec<ScoredSpan<'g>>>> {
        let started = Instant::now();
        let old_policy = (self.config.num_iterations > 1).then(|| self.train_model.detached());
        let temperature = self.config.scoring_temperature();
        let per_span =
            |model: Option<&Llama>, group: &[TrainedSpan<'_>]| -> Result<Vec<Option<Tensor>>> {
                let Some(model) = model else {
                    return Ok(vec![None; group.len()]);
                };
                let all = span_logprobs(model, group, temperature, false)?;
                let mut start = 0;
                let mut out = Vec::with_capacity(group.len());
                for span in group {
                    out.push(Some(all.narrow(0, start, span.tokens.len())?));
                    start += span.tokens.len();
                }
                Ok(out)
            };
        let scored = spans
            .iter()
            .map(|group| {
                let reference = per_span(self.reference.as_ref(), group)?;
                let old = per_span(old_policy.as_ref(), group)?;
                Ok(group
                    .iter()
                    .zip(reference.into_iter().zip(old))
                    .map(|(&span, (reference, old))| ScoredSpan {
                        span,
                        reference,
                        old,
                    })
                    .collect())
            })
            .collect::<Result<_>>()?;
        m.seconds_reference = started.elapsed().as_secs_f64();
        Ok(scored)
    }

    /// Sums the gradient of the GRPO loss over every trained span, a
    /// micro-batch of spans at a time; records loss, KL and clipping.
    fn accumulate_gradients(
        &mut self,
        scored: &[Vec<ScoredSpan<'_>>],
        m: &mut StepMetrics,
    ) -> Result<()> {
        let c = &self.config;
        let started = Instant::now();
        let objective = Objective {
            epsilon_low: c.epsilon,
            epsilon_high: c.epsilon_high.unwrap_or(c.epsilon),
            beta: c.beta,
        };
        let temperature = c.scoring_temperature();
        self.grads.zero()?;
        let (mut loss_total, mut stats) = (0f64, LossStats::default());
        let mut gap = SamplerGap::default();
        for group in scored {
            for batch in group.chunks(c.micro_batch_size) {
                let spans: Vec<TrainedSpan<'_>> = batch.iter().map(|s| s.span).collect();
                let per_token = |f: fn(&TrainedSpan<'_>) -> f32| -> Vec<f32> {
                    let each = spans
                        .iter()
                        .map(|s| std::iter::repeat_n(f(s), s.tokens.len()));
                    each.flatten().collect()
                };
                m.forward_backward_flops +=
                    training_flops(&self.model.config, &spans, self.trained_shape());
                let forward = TrainingForward::new(
                    &self.train_model,
                    &spans,
                    temperature,
                    c.gradient_checkpointing,
                )?;
                let logprobs = forward.logprobs();
                let old = joined(batch.iter().map(|s| s.old.as_ref()))?
                    .unwrap_or_else(|| logprobs.detach());
                let reference = joined(batch.iter().map(|s| s.reference.as_ref()))?;
                // The sampler–trainer gap, measured and corrected against
                // the policy as it sampled (before this step's updates).
                let (importance, batch_gap) = importance_weights(
                    &old.to_dtype(candle_core::DType::F32)?.to_vec1()?,
                    &spans.iter().map(|s| s.tokens.len()).collect::<Vec<_>>(),
                    &spans.iter().map(|s| s.sampled).collect::<Vec<_>>(),
                    c.importance_sampling,
                    c.importance_sampling_cap,
                );
                gap.add(&batch_gap);
                let terms = TokenTerms {
                    logprobs,
                    old_logprobs: &old,
                    ref_logprobs: reference.as_ref(),
                    advantages: &per_token(|s| s.advantage),
                    weights: &per_token(|s| s.weight),
                    importance: &importance,
                };
                let (loss, batch_stats) = grpo_loss(&terms, &objective)?;
                let value = loss.to_scalar::<f32>()? as f64;
                if !value.is_finite() {
                    return Err(TrainError::Invalid(format!(
                        "non-finite loss at step {}; stopping (the last checkpoint is intact)",
                        self.step + 1
                    )));
                }
                loss_total += value;
                stats.add(&batch_stats);
                forward.backward(&loss, &mut self.grads)?;
            }
        }
        m.seconds_forward_backward += started.elapsed().as_secs_f64();
        m.loss = loss_total;
        m.kl = stats.kl;
        m.clip_fraction = stats.clipped_tokens as f64 / stats.tokens.max(1) as f64;
        m.record_gap(&gap);
        (self.release_memory)();
        Ok(())
    }

    /// What is trained, for counting FLOPs: LoRA's rank and the sides of
    /// the projections it targets, and whether layers are replayed.
    fn trained_shape(&self) -> TrainedShape {
        let c = &self.model.config;
        let (h, mlp) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let lora = self.lora.as_ref().map(|l| LoraShape {
            rank: l.r,
            sides_per_layer: l
                .target_modules
                .iter()
                .map(|m| match m.as_str() {
                    "q_proj" | "o_proj" => h + q,
                    "k_proj" | "v_proj" => h + kv,
                    _ => h + mlp,
                })
                .sum(),
        });
        TrainedShape {
            lora,
            recompute: self.config.gradient_checkpointing,
        }
    }

    /// Clips the summed gradient's global norm and takes an AdamW step.
    fn apply_update(&mut self, m: &mut StepMetrics) -> Result<()> {
        let started = Instant::now();
        let grads = self.grads.sums();
        let names: Vec<&str> = self
            .optimizer
            .params
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        m.grad_norm = global_norm(&names, grads)?;
        let scale = clip_scale(m.grad_norm, self.config.max_grad_norm);
        self.optimizer.update(grads, m.learning_rate, scale)?;
        m.seconds_optimizer += started.elapsed().as_secs_f64();
        (self.release_memory)();
        Ok(())
    }

    /// The trained weights by name (every weight, or the adapters'): what
    /// a step changes, for comparing one step across devices.
    pub fn trained_parameters(&self) -> &[(String, candle_core::Var)] {
        &self.optimizer.params
    }

    /// Saves a checkpoint of the current step under the output directory.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let state = TrainerState {
            step: self.step,
            cursor: self.cursor,
            base_model: self.base_model.clone(),
            config: self.config.clone(),
        };
        let weights = match &self.lora {
            Some(lora) => Trained::Adapter(lora, self.train_model.adapter_weights()),
            None => Trained::Model(self.train_model.hf_weights()?),
        };
        checkpoint::save(
            &self.config.output_dir,
            self.model,
            weights,
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
            cause: source,
        })?;
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| TrainError::Io {
                    path: path.display().to_string(),
                    cause: source,
                })
        };
        // Lines past the checkpoint a resumed run starts from are redone.
        checkpoint::trim_logs(&dir, self.step)?;
        let (mut metrics, mut samples) = (open("metrics.jsonl")?, open("samples.jsonl")?);
        let mut tensorboard = match self.config.report_to.iter().any(|r| r == "tensorboard") {
            true => Some(EventWriter::create(
                &dir.join("runs"),
                (self.step > 0).then_some(self.step),
            )?),
            false => None,
        };
        let mut last = None;
        while self.step < self.config.max_steps {
            let (m, transcripts) = self.train_step()?;
            if let Some(events) = &mut tensorboard {
                events.step(&m)?;
            }
            let line = serde_json::to_string(&m).expect("serialisable");
            writeln!(metrics, "{line}")
                .and_then(|_| metrics.flush())
                .map_err(|source| TrainError::Io {
                    path: "metrics.jsonl".into(),
                    cause: source,
                })?;
            for t in transcripts {
                writeln!(samples, "{t}").map_err(|source| TrainError::Io {
                    path: "samples.jsonl".into(),
                    cause: source,
                })?;
            }
            crash::maybe_crash(CrashPoint::StepLogged, self.step);
            on_step(&m);
            if self.config.save_steps > 0 && self.step.is_multiple_of(self.config.save_steps) {
                last = Some(self.save_checkpoint()?);
            }
        }
        // The engines end serving the trained adapter, to evaluate it there.
        if let (Some(sync), Some(lora)) = (&mut self.engines, &self.lora) {
            let weights = self.train_model.adapter_weights();
            sync.serve(self.step, lora, &self.base_model, &weights)?;
        }
        match last {
            Some(path) if path.ends_with(format!("checkpoint-{}", self.step)) => Ok(path),
            _ => self.save_checkpoint(),
        }
    }
}

/// A micro-batch's fixed log-probs, joined in its order; `None` where they
/// were not scored (no reference, or a single iteration).
fn joined<'s>(parts: impl Iterator<Item = Option<&'s Tensor>>) -> Result<Option<Tensor>> {
    let parts: Option<Vec<&Tensor>> = parts.collect();
    Ok(match parts {
        Some(parts) => Some(Tensor::cat(&parts, 0)?),
        None => None,
    })
}
