//! `r3 train`'s configuration: a TOML file whose names follow TRL's
//! GRPOConfig where the idea is the same, overridable key by key from the
//! command line, and checked before any work starts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use r3_model::lora::LoraConfig;
use r3_model::{DeviceChoice, Precision};

use crate::grpo::{ImportanceSampling, LossType};
use crate::{Result, TrainError};

/// How the learning rate moves after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

/// Which tokens carry the loss. `reflection` is Reflect, Retry, Reward;
/// `retry` is the ablation that rewards the retry's tokens instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainOn {
    Reflection,
    Retry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// HF directory or GGUF file; empty for the default model.
    pub model: String,
    /// One of `r3_tasks::BUILTIN_TASKS` (ignored with `verifier`).
    pub task: String,
    /// External verifier command (JSON lines), replacing `task`'s verifier.
    pub verifier: Option<String>,
    pub verifier_timeout: f64,
    /// The dataset of failures written by `r3 mine`.
    pub failures: PathBuf,
    /// Trains only on failures whose mined failure rate is at most this
    /// (1 = all): records the model sometimes solves are where a reflection
    /// can turn a retry right; ones it never solves mostly give groups
    /// without signal.
    pub max_failure_rate: f64,
    /// TOML file overriding the reflection/retry prompts.
    pub prompts: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub seed: u64,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Failures per rollout batch (B); each gets `num_generations` reflections.
    pub failures_per_step: usize,
    /// Reflections per failure (G).
    pub num_generations: usize,
    /// Reflection sampling.
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    /// Longest reflection, in tokens.
    pub max_completion_length: usize,
    /// Retry sampling: its own knobs, greedy by default.
    pub retry_temperature: f64,
    pub retry_max_tokens: usize,
    pub beta: f64,
    pub epsilon: f64,
    /// Upper clipping bound; `epsilon` when unset.
    pub epsilon_high: Option<f64>,
    pub num_iterations: usize,
    pub loss_type: LossType,
    pub scale_rewards: bool,
    /// Correction for the gap between the sampler's log-probs and the
    /// trainer's (TRL's `vllm_importance_sampling_mode`, or `"none"`): an
    /// engine in bf16 or another kernel samples from a slightly different
    /// distribution than the one trained.
    pub importance_sampling: ImportanceSampling,
    /// Ratios above this are cut to it (`*_truncate`) or zeroed (`*_mask`).
    pub importance_sampling_cap: f64,
    pub learning_rate: f64,
    pub lr_scheduler_type: Schedule,
    pub warmup_steps: usize,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub max_grad_norm: f64,
    pub gradient_accumulation_steps: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub save_steps: usize,
    /// Full transcripts written to samples.jsonl per step.
    pub log_completions: usize,
    /// Reflections per forward/backward pass: the memory knob. A group's
    /// shared prefix runs once per micro-batch, so larger is faster: 8 (a
    /// whole group at the default G, TRL's default too) against 4 cut the
    /// default model's forward + backward by a sixth for 50 MB more.
    pub micro_batch_size: usize,
    /// Keep only each layer's input during the forward and recompute its
    /// activations in the backward pass: one more forward, a fraction of
    /// the memory.
    pub gradient_checkpointing: bool,
    /// Most rows decoded at once during rollouts.
    pub generation_batch_rows: usize,
    /// Rollouts decode (and, where the CPU has AVX-512 VNNI and VBMI,
    /// prefill) with each block of 32 inputs rounded to 8 bits
    /// (`r3_kernels::int8`, `r3_kernels::int8_tile`): faster on CPUs; the
    /// importance weights correct the gap to the exact policy, as for an
    /// engine's.
    pub int8_decode: bool,
    /// The frozen packed base's products of many rows (the training
    /// forward and its input gradient, reference scores, the rollouts'
    /// prefill) in bf16 arithmetic with f32 sums, where the CPU has
    /// AVX512_BF16 (`r3_kernels::bf16`): mixed precision as TRL's `bf16`
    /// runs it, for LoRA on a packed base (GGUF) in f32; products stay f32
    /// on other CPUs.
    pub bf16_products: bool,
    /// The tokens that learn (an ablation knob; keep `reflection`).
    pub train_on: TrainOn,
    /// Train LoRA adapters on the frozen base instead of every weight
    /// (PEFT's settings follow, by PEFT's and TRL's names).
    pub use_peft: bool,
    pub lora_r: usize,
    pub lora_alpha: f64,
    /// Only 0 is implemented: dropout would make the log-probs of one
    /// sequence differ between the old-policy and the policy forward.
    pub lora_dropout: f64,
    /// `"all-linear"` or a list of `q_proj`, `k_proj`, `v_proj`, `o_proj`,
    /// `gate_proj`, `up_proj`, `down_proj`.
    #[serde(deserialize_with = "one_or_many")]
    pub lora_target_modules: Vec<String>,
    /// A PEFT adapter directory to continue training from (LoRA only).
    pub adapter: Option<PathBuf>,
    /// Where to train: `auto` (the first GPU of a CUDA build, else the
    /// CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceChoice,
    /// The type the model computes in: `f32`, or `bf16` for mixed
    /// precision as TRL's `bf16 = true`: bf16 weights and activations in
    /// every product, f32 master weights and AdamW moments (LoRA: a bf16
    /// frozen base, f32 adapters).
    pub dtype: Precision,
    /// Where live curves go besides `metrics.jsonl` (TRL's key): `"none"`
    /// or `"tensorboard"` (event files under `output_dir/runs/`).
    #[serde(deserialize_with = "one_or_many")]
    pub report_to: Vec<String>,
    /// OpenAI-compatible engines (vLLM, SGLang, `r3 serve`: base URLs)
    /// that sample the rollouts instead of r3's own decoder; LoRA only.
    #[serde(deserialize_with = "one_or_many")]
    pub engines: Vec<String>,
    /// The base model's name on the engines (default: the first engine's
    /// `/v1/models`).
    pub engine_model: Option<String>,
    /// Where each step's adapter is written for the engines to load: a
    /// path they can read (default: `output_dir/engine-adapters`).
    pub engine_adapter_dir: Option<PathBuf>,
}

/// A string or a list of strings, as PEFT's `target_modules` accepts.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            task: "answer".into(),
            verifier: None,
            verifier_timeout: 10.0,
            failures: PathBuf::from("failures.jsonl"),
            max_failure_rate: 1.0,
            prompts: None,
            output_dir: PathBuf::from("runs/train"),
            seed: 0,
            max_steps: 100,
            failures_per_step: 4,
            num_generations: 8,
            temperature: 0.9,
            top_p: 1.0,
            top_k: 0,
            max_completion_length: 128,
            retry_temperature: 0.0,
            retry_max_tokens: 128,
            beta: 0.001,
            epsilon: 0.2,
            epsilon_high: None,
            num_iterations: 1,
            loss_type: LossType::Grpo,
            scale_rewards: true,
            importance_sampling: ImportanceSampling::SequenceMask,
            importance_sampling_cap: 3.0,
            learning_rate: 5e-7,
            lr_scheduler_type: Schedule::Constant,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            max_grad_norm: 1.0,
            gradient_accumulation_steps: 1,
            save_steps: 50,
            log_completions: 2,
            micro_batch_size: 8,
            gradient_checkpointing: true,
            generation_batch_rows: 32,
            int8_decode: false,
            bf16_products: false,
            train_on: TrainOn::Reflection,
            use_peft: false,
            lora_r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            lora_target_modules: vec!["all-linear".into()],
            adapter: None,
            device: DeviceChoice::Auto,
            dtype: Precision::F32,
            report_to: vec!["none".into()],
            engines: Vec::new(),
            engine_model: None,
            engine_adapter_dir: None,
        }
    }
}

impl TrainConfig {
    /// Whether `key = value` is a setting this config has, with a value of
    /// its type (the other keys at their defaults; the settings together
    /// are checked by [`TrainConfig::validate`]): a file's settings checked
    /// one by one, so that an error names the file and the key.
    pub fn check_setting(key: &str, value: &toml::Value) -> Result<()> {
        let table = toml::Table::from_iter([(key.to_string(), value.clone())]);
        toml::Value::Table(table)
            .try_into::<Self>()
            .map(|_| ())
            .map_err(|e| TrainError::Config(e.to_string().trim().to_string()))
    }

    /// Reads `path` (if any), applies `key=value` overrides (values in TOML
    /// syntax; bare words are strings) and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| TrainError::Io {
                    path: p.display().to_string(),
                    cause: source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| TrainError::Config(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        let file_table = table.clone();
        let mut parsed_overrides = Vec::with_capacity(overrides.len());
        for item in overrides {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| TrainError::Config(format!("override '{item}' is not key=value")))?;
            let value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            parsed_overrides.push((item, key.trim().to_string(), value.clone()));
            table.insert(key.trim().to_string(), value);
        }
        let parse = |table: toml::Table| -> std::result::Result<Self, toml::de::Error> {
            toml::Value::Table(table).try_into()
        };
        let config = match parse(table) {
            Ok(config) => config,
            Err(e) => {
                // Blame the override without which the settings parse,
                // else the file.
                let culprit = parsed_overrides.iter().enumerate().find(|(i, _)| {
                    let mut others = file_table.clone();
                    for (_, key, value) in parsed_overrides.iter().take(*i) {
                        others.insert(key.clone(), value.clone());
                    }
                    for (_, key, value) in parsed_overrides.iter().skip(i + 1) {
                        others.insert(key.clone(), value.clone());
                    }
                    parse(others).is_ok()
                });
                let culprit = culprit.map(|(_, c)| c);
                let where_ = match (culprit, path) {
                    (Some((item, _, _)), _) => format!("--set {item}"),
                    (None, Some(p)) => p.display().to_string(),
                    (None, None) => "flags".into(),
                };
                return Err(TrainError::Config(format!("{where_}: {e}")));
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects impossible values, naming the key. The comparisons are
    /// negated on purpose: a NaN fails every one of them.
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, why: &str| Err(TrainError::Config(format!("'{key}' {why}")));
        if self.num_generations < 2 {
            return bad(
                "num_generations",
                "must be at least 2: a group of one has no advantage",
            );
        }
        if self.int8_decode && !self.engines.is_empty() {
            return bad(
                "int8_decode",
                "is for r3's own decoder; with 'engines' the engines sample",
            );
        }
        if self.bf16_products && (!self.use_peft || self.dtype != Precision::F32) {
            return bad(
                "bf16_products",
                "is for LoRA (use_peft = true) on a packed base computing in f32 (dtype = \"f32\")",
            );
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad("learning_rate", "must be a positive number");
        }
        if !(self.max_failure_rate > 0.0 && self.max_failure_rate <= 1.0) {
            return bad(
                "max_failure_rate",
                "must be in (0, 1]: a failure's rate is its failed share of the mined samples",
            );
        }
        if let Some(other) = self
            .report_to
            .iter()
            .find(|r| !matches!(r.as_str(), "none" | "tensorboard"))
        {
            return Err(TrainError::Config(format!(
                "'report_to' = {other:?}: r3 reports to \"tensorboard\" (event files under output_dir/runs/) or \"none\"; metrics.jsonl is always written"
            )));
        }
        if self.max_steps == 0 {
            return bad("max_steps", "must be at least 1");
        }
        if self.failures_per_step == 0 {
            return bad("failures_per_step", "must be at least 1");
        }
        if self.max_completion_length == 0 || self.retry_max_tokens == 0 {
            return bad(
                "max_completion_length/retry_max_tokens",
                "must be at least 1",
            );
        }
        if !(self.temperature >= 0.0) || !(self.retry_temperature >= 0.0) {
            return bad("temperature", "must be ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(self.beta >= 0.0) {
            return bad("beta", "must be ≥ 0");
        }
        if !(self.importance_sampling_cap >= 1.0 && self.importance_sampling_cap.is_finite()) {
            return bad(
                "importance_sampling_cap",
                "must be a number ≥ 1: a cap below 1 would cut or drop rollouts that sampler and trainer agree on",
            );
        }
        if !(self.epsilon > 0.0) || self.epsilon_high.is_some_and(|e| !(e > 0.0)) {
            return bad("epsilon", "must be positive");
        }
        if self.num_iterations == 0 || self.gradient_accumulation_steps == 0 {
            return bad(
                "num_iterations/gradient_accumulation_steps",
                "must be at least 1",
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad("warmup_ratio", "must be in [0, 1)");
        }
        if !(self.weight_decay >= 0.0) || !(self.max_grad_norm >= 0.0) {
            return bad("weight_decay/max_grad_norm", "must be ≥ 0");
        }
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return bad("adam_beta1/adam_beta2", "must be in [0, 1)");
        }
        if self.micro_batch_size == 0 || self.generation_batch_rows == 0 {
            return bad(
                "micro_batch_size/generation_batch_rows",
                "must be at least 1",
            );
        }
        if let Err(why) = r3_tasks::external::timeout_from_seconds(self.verifier_timeout) {
            return Err(TrainError::Config(format!("'verifier_timeout': {why}")));
        }
        if self.verifier.is_none() && !r3_tasks::BUILTIN_TASKS.contains(&self.task.as_str()) {
            return bad(
                "task",
                &format!(
                    "must be one of {} (or set verifier)",
                    r3_tasks::BUILTIN_TASKS.join(", ")
                ),
            );
        }
        if self.lora_dropout != 0.0 {
            return bad(
                "lora_dropout",
                "must be 0: dropout would give one sequence different log-probs in the policy and old-policy forwards (not implemented)",
            );
        }
        if !self.use_peft && self.adapter.is_some() {
            return bad("adapter", "needs use_peft = true");
        }
        if !self.engines.is_empty() && !self.use_peft {
            // Decided: engines get each step's weights as a LoRA adapter
            // (a few MB); full weights would be gigabytes a step.
            return bad(
                "engines",
                "need use_peft = true: r3 pushes each step's LoRA adapter to the engines; full fine-tuning with engines is not supported",
            );
        }
        self.lora()?;
        Ok(())
    }

    /// Settings a resumed run may change: how long it runs, what it writes
    /// where, and on which device. Any other change would continue another run than the
    /// one checkpointed.
    pub const CHANGEABLE_ON_RESUME: [&'static str; 6] = [
        "max_steps",
        "save_steps",
        "log_completions",
        "output_dir",
        "device",
        "report_to",
    ];

    /// The settings, other than [`Self::CHANGEABLE_ON_RESUME`], on which
    /// this config differs from the `saved` one, as `key: saved → now`.
    pub fn resume_differences(&self, saved: &TrainConfig) -> Vec<String> {
        let as_map = |c: &TrainConfig| match serde_json::to_value(c) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => Default::default(),
        };
        let (now, was) = (as_map(self), as_map(saved));
        now.iter()
            .filter(|(k, _)| !Self::CHANGEABLE_ON_RESUME.contains(&k.as_str()))
            .filter(|(k, v)| was.get(*k) != Some(v))
            .map(|(k, v)| {
                let before = was.get(k).map_or("(none)".to_string(), |w| w.to_string());
                format!("{k}: {before} → {v}")
            })
            .collect()
    }

    /// The adapters' shape when training LoRA (`use_peft`), else `None`.
    pub fn lora(&self) -> Result<Option<LoraConfig>> {
        if !self.use_peft {
            return Ok(None);
        }
        LoraConfig::new(self.lora_r, self.lora_alpha, &self.lora_target_modules)
            .map(Some)
            .map_err(TrainError::Config)
    }

    /// The temperature the trained tokens were sampled at, which the
    /// trainer scores them at too (as TRL does): the reflections', or the
    /// retries' for `train_on = "retry"`; 1 for greedy ones.
    pub fn scoring_temperature(&self) -> f64 {
        let sampled = match self.train_on {
            TrainOn::Reflection => self.temperature,
            TrainOn::Retry => self.retry_temperature,
        };
        if sampled > 0.0 {
            sampled
        } else {
            1.0
        }
    }

    /// Warm-up steps, from `warmup_steps` or `warmup_ratio`.
    pub fn warmup(&self) -> usize {
        self.warmup_steps
            .max((self.warmup_ratio * self.max_steps as f64).round() as usize)
    }

    /// The learning rate at optimizer step `step` (0-based).
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        let warmup = self.warmup();
        if step < warmup {
            return self.learning_rate * (step + 1) as f64 / warmup as f64;
        }
        let progress = (step - warmup) as f64 / (self.max_steps - warmup).max(1) as f64;
        match self.lr_scheduler_type {
            Schedule::Constant => self.learning_rate,
            Schedule::Linear => self.learning_rate * (1.0 - progress),
            Schedule::Cosine => {
                self.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}
