//! Building a trainer: the run's settings and failures checked against
//! the model and the task, the policy and reference decoders, the
//! optimizer, and a resumed run's step, data cursor and moments.

use std::path::Path;

use candle_core::DType;
use r3_loop::mine::MinedFailure;
use r3_model::lora::{Adapter, LoraConfig};
use r3_model::{Llama, LoadedModel, Weights};
use r3_tasks::{Prompts, Task};

use super::Trainer;
use crate::checkpoint;
use crate::config::TrainConfig;
use crate::optim::{AdamW, Gradients};
use crate::{Result, TrainError};

/// The weights a trainer builds its decoders from. [`Trainer::new`]
/// consumes them, so that once the decoders exist nothing holds the file's
/// tensors (for a GGUF base, as much memory again as the packed model).
pub struct StartWeights {
    /// The policy's starting weights: the model's, or a resumed full
    /// fine-tune's checkpoint.
    pub policy: Weights,
    /// Full fine-tuning's KL reference where it is not `policy` (a resumed
    /// run's base); `None`: `policy` itself.
    pub reference: Option<Weights>,
}

impl StartWeights {
    /// `model`'s weights (shared, not copied), as policy and reference.
    pub fn of(model: &LoadedModel) -> Self {
        Self {
            policy: model.weights.clone(),
            reference: None,
        }
    }
}

impl<'a> Trainer<'a> {
    /// A trainer for `model` (tokenizer, template, config) starting from
    /// `weights` (when resuming from the checkpoint `resume`, the weights
    /// it continues).
    pub fn new(
        config: TrainConfig,
        model: &'a LoadedModel,
        weights: StartWeights,
        task: &'a dyn Task,
        prompts: Prompts,
        failures: Vec<MinedFailure>,
        resume: Option<&Path>,
    ) -> Result<Self> {
        let failures = select_failures(failures, config.max_failure_rate)?;
        check_run(&config, model, task, &failures)?;
        let lora = config.lora()?;
        let compute = config.dtype.dtype();
        let StartWeights {
            mut policy,
            reference,
        } = weights;
        // Trained weights are f32 masters whatever the compute type; a frozen
        // LoRA base is stored in the type it computes in.
        policy.set_dtype(match lora {
            Some(_) => compute,
            None => DType::F32,
        })?;
        let (train_model, params) = match &lora {
            Some(lora) => {
                // A resumed run continues its checkpoint's adapter.
                let start = match resume.or(config.adapter.as_deref()) {
                    Some(dir) => Some(starting_adapter(dir, lora)?),
                    None => None,
                };
                let start = start.as_ref().map(|a| &a.weights);
                Llama::with_lora(&model.config, &policy, lora, start, config.seed)?
            }
            None => Llama::trainable(&model.config, &policy)?,
        };
        let train_model = match config.bf16_products {
            true => train_model.with_activations(r3_model::Activations {
                bf16_products: true,
                ..r3_model::Activations::EXACT
            }),
            false => train_model,
        }
        .computing_in(compute);
        // LoRA's reference is its own base with the adapters off: the same
        // weights, no second model.
        let mut base = reference.unwrap_or(policy);
        let reference = match (config.beta > 0.0, &lora) {
            (false, _) => None,
            (true, Some(_)) => Some(train_model.without_adapters()),
            (true, None) => {
                base.set_dtype(compute)?;
                Some(Llama::new_compact(&model.config, &base)?)
            }
        };
        // The file's tensors go before the optimizer's moments come.
        drop(base);
        let mut optimizer = AdamW::new(
            params,
            config.adam_beta1,
            config.adam_beta2,
            config.adam_epsilon,
            config.weight_decay,
        )?;
        let (mut step, mut cursor) = (0, 0);
        // A checkpoint names its base for loading from anywhere: by its hub
        // id when it came from the hub (as transformers and PEFT do), else
        // by its absolute path.
        let hub_id = r3_fetch::hub::HubId::parse(&config.model)
            .filter(|_| !std::path::Path::new(&config.model).exists());
        let mut base_model = match hub_id {
            Some(_) => config.model.clone(),
            None => std::fs::canonicalize(&model.path)
                .unwrap_or_else(|_| model.path.clone())
                .display()
                .to_string(),
        };
        if let Some(dir) = resume {
            let state = checkpoint::resumable_state(dir, &config)?;
            checkpoint::load_optimizer(dir, &mut optimizer)?;
            (step, cursor, base_model) = (state.step, state.cursor, state.base_model);
        }
        let engines = super::engines::EngineSync::connect(&config)?;
        Ok(Self {
            grads: Gradients::new(&optimizer.params)?,
            config,
            model,
            task,
            prompts,
            failures,
            train_model,
            lora,
            reference,
            optimizer,
            step,
            cursor,
            order_epoch: None,
            order: Vec::new(),
            base_model,
            release_memory: || {},
            engines,
        })
    }
}

/// The adapter in `dir` to start from, which must have this run's shape.
fn starting_adapter(dir: &Path, lora: &LoraConfig) -> Result<Adapter> {
    let adapter = Adapter::load(dir)?;
    if &adapter.config != lora {
        return Err(TrainError::Config(format!(
            "{} holds an adapter of r = {}, alpha = {}, targets {:?}; this run asks for r = {}, alpha = {}, targets {:?}",
            dir.display(),
            adapter.config.r,
            adapter.config.alpha,
            adapter.config.target_modules,
            lora.r,
            lora.alpha,
            lora.target_modules
        )));
    }
    Ok(adapter)
}

/// The failures the run trains on: those failed at most `max_rate` of
/// their mined samples (all, at 1).
fn select_failures(failures: Vec<MinedFailure>, max_rate: f64) -> Result<Vec<MinedFailure>> {
    let mined = failures.len();
    let kept: Vec<MinedFailure> = failures
        .into_iter()
        .filter(|f| f.failure_rate <= max_rate)
        .collect();
    if kept.is_empty() && mined > 0 {
        return Err(TrainError::Config(format!(
            "'max_failure_rate' = {max_rate} keeps none of the {mined} failures: every one failed more often"
        )));
    }
    Ok(kept)
}

/// Refuses a run that cannot start: no failures, a token budget past the
/// model's context, failures mined for another task, or more failures per
/// step than the dataset holds.
fn check_run(
    config: &TrainConfig,
    model: &LoadedModel,
    task: &dyn Task,
    failures: &[MinedFailure],
) -> Result<()> {
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
    Ok(())
}
