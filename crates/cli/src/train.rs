//! `r3 train`: GRPO on reflection tokens, from a TOML config whose keys
//! follow TRL's GRPOConfig; `--set key=value` overrides any key.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use r3_tasks::external::ExternalVerifier;
use r3_tasks::{Prompts, Task};
use r3_train::config::TrainConfig;
use r3_train::resume::{self, Start, StartFiles};
use r3_train::trainer::{StartWeights, Trainer};

use crate::progress::bar;

#[derive(Args)]
pub struct TrainArgs {
    /// A TOML file of training settings (docs/config.md); the command
    /// line's --set and flags win
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. --set learning_rate=1e-6 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from a checkpoint directory written by a previous run;
    /// `last` takes output_dir's newest one, `auto` too if there is one
    /// (else starts fresh; a run already at max_steps stays as it is)
    #[arg(long, value_name = "DIR|last|auto")]
    pub resume: Option<PathBuf>,
    /// Start fresh in an output_dir that holds another run, deleting it
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// auto, cpu, cuda or cuda:N (the config key `device`)
    #[arg(long)]
    pub device: Option<r3_model::DeviceChoice>,
    /// Engine base URLs that sample the rollouts, comma separated (the
    /// config key `engines`; LoRA only)
    #[arg(long, value_delimiter = ',')]
    pub engine: Vec<String>,
    #[command(flatten)]
    pub lora: LoraArgs,
}

/// LoRA on the frozen base, by PEFT's and TRL's names; each flag is the
/// config key of the same name.
#[derive(Args, Clone, Default)]
pub struct LoraArgs {
    /// Train LoRA adapters on the frozen base instead of every weight
    #[arg(long)]
    pub use_peft: bool,
    /// Adapter rank [config default: 16]
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// Adapter scale numerator (the update is scaled by alpha / r) [config default: 32]
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// all-linear, or a comma-separated list of q_proj, k_proj, v_proj,
    /// o_proj, gate_proj, up_proj, down_proj [config default: all-linear]
    #[arg(long, value_delimiter = ',')]
    pub lora_target_modules: Option<Vec<String>>,
}

impl LoraArgs {
    /// The flags as `key=value` config overrides.
    pub fn overrides(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.use_peft {
            out.push("use_peft=true".to_string());
        }
        if let Some(r) = self.lora_r {
            out.push(format!("lora_r={r}"));
        }
        if let Some(alpha) = self.lora_alpha {
            out.push(format!("lora_alpha={alpha:?}"));
        }
        if let Some(modules) = &self.lora_target_modules {
            let quoted: Vec<String> = modules.iter().map(|m| format!("{m:?}")).collect();
            out.push(format!("lora_target_modules=[{}]", quoted.join(", ")));
        }
        out
    }
}

pub fn train(args: TrainArgs) -> Result<()> {
    let device = args.device.map(|d| format!("device={:?}", d.to_string()));
    let engines = (!args.engine.is_empty()).then(|| format!("engines={:?}", args.engine));
    // `--config`'s settings came in as the first `--set`s (config_file.rs);
    // the flags come last, so that the command line wins.
    let overrides = [
        args.set.clone(),
        args.lora.overrides(),
        device.into_iter().collect(),
        engines.into_iter().collect(),
    ]
    .concat();
    let config = TrainConfig::load(None, &overrides)?;
    let start = resume::resolve(&config, args.resume.as_deref())?;
    match &start {
        Start::Finished(dir) => {
            eprintln!("already trained to max_steps = {}", config.max_steps);
            eprintln!("final checkpoint: {}", dir.display());
            return Ok(());
        }
        Start::Resume(dir) => eprintln!("resuming from {}", dir.display()),
        Start::Fresh => {}
    }
    let resuming = matches!(start, Start::Resume(_));
    r3_train::checkpoint::prepare_output_dir(&config.output_dir, resuming, args.overwrite)?;
    let checkpoint = run_train(config, &start)?;
    eprintln!("final checkpoint: {}", checkpoint.display());
    Ok(())
}

fn task_of(config: &TrainConfig) -> Result<Box<dyn Task>> {
    Ok(match &config.verifier {
        Some(command) => Box::new(ExternalVerifier::new(
            command,
            r3_tasks::external::timeout_from_seconds(config.verifier_timeout)
                .map_err(|e| anyhow::anyhow!("verifier_timeout: {e}"))?,
        )),
        None => r3_tasks::builtin(&config.task)?,
    })
}

fn model_path(spec: &str) -> Result<PathBuf> {
    let path = (!spec.is_empty()).then(|| PathBuf::from(spec));
    Ok(r3_fetch::resolve_model(path.as_deref())?)
}

/// Trains to `config.max_steps` from `start` and returns the final checkpoint.
pub fn run_train(config: TrainConfig, start: &Start) -> Result<PathBuf> {
    let resume = match start {
        Start::Resume(dir) => Some(dir.as_path()),
        Start::Fresh | Start::Finished(_) => None,
    };
    let task = task_of(&config)?;
    let prompts = match &config.prompts {
        Some(path) => Prompts::from_file(task.as_ref(), path)?,
        None => Prompts::for_task(task.as_ref()),
    };
    let failures = r3_loop::mine::read_failures(&config.failures).with_context(|| {
        format!(
            "cannot read the dataset of failures {}",
            config.failures.display()
        )
    })?;
    let files = match resume {
        Some(dir) => StartFiles::resumed(&config, dir)?,
        None => StartFiles::fresh(&model_path(&config.model)?),
    };
    // A base recorded by its hub id is found in the HF cache again.
    let policy_path = r3_fetch::resolve_model(Some(&files.policy))?;
    let base_path = r3_fetch::resolve_model(Some(&files.base))?;
    let device = crate::model::open_device(config.device)?;
    let mut loaded = r3_model::load(&policy_path)
        .with_context(|| format!("cannot load model {}", policy_path.display()))?;
    loaded.weights.set_device(device.clone());
    // Full fine-tuning scores the KL against a frozen copy of the base (a
    // resumed run's base is another file); LoRA against its own base with
    // the adapters off.
    let reference = match (config.beta > 0.0 && !config.use_peft, resume) {
        (true, Some(_)) => {
            let mut base = r3_model::load(&base_path)
                .with_context(|| {
                    format!("cannot load the reference model {}", base_path.display())
                })?
                .weights;
            base.set_device(device);
            Some(base)
        }
        _ => None,
    };
    // The trainer consumes the file's tensors once its decoders are built.
    let weights = StartWeights {
        policy: std::mem::take(&mut loaded.weights),
        reference,
    };
    std::fs::create_dir_all(&config.output_dir)
        .with_context(|| format!("cannot create {}", config.output_dir.display()))?;
    let max_steps = config.max_steps;
    if config.bf16_products && !r3_kernels::bf16::available() {
        eprintln!(
            "bf16_products: this CPU has no AVX512_BF16 (or R3_CPU is below avx512), so products stay f32"
        );
    }
    let (mined, max_failure_rate) = (failures.len(), config.max_failure_rate);
    let mut trainer = Trainer::new(
        config,
        &loaded,
        weights,
        task.as_ref(),
        prompts,
        failures,
        resume,
    )?;
    trainer.set_memory_release(crate::release_freed_memory);
    if trainer.failures_in_training() < mined {
        eprintln!(
            "training on {} of {mined} mined failures (max_failure_rate = {max_failure_rate})",
            trainer.failures_in_training()
        );
    }
    if trainer.step >= max_steps {
        bail!(
            "the checkpoint is already at step {} of max_steps = {max_steps}",
            trainer.step
        );
    }
    let progress = bar("training", max_steps);
    progress.set_position(trainer.step as u64);
    let mut silent_steps = 0;
    let checkpoint =
        trainer.run(&mut |m| {
            progress.set_position(m.step as u64);
            progress.set_message(format!(
                "reward {:.2} kl {:.4} {:.0} tok/s",
                m.reward_mean, m.kl, m.tokens_per_s
            ));
            if m.zero_signal_groups == m.groups {
                silent_steps += 1;
                if silent_steps == 3 && m.step == 3 {
                    progress.suspend(|| {
                        eprintln!(
                        "warning: for 3 steps every group's retries all {} — no learning signal. \
                         {}",
                        if m.reward_mean == 0.0 { "failed" } else { "succeeded" },
                        if m.reward_mean == 0.0 {
                            "Check the task/verifier, or use a task the model sometimes solves."
                        } else {
                            "The failures are too easy on a retry; mine harder ones."
                        }
                    )
                    });
                }
            }
        })?;
    progress.finish();
    Ok(checkpoint)
}
