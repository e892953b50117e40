//! `r3 device-check`: flags become an r3-bench device check, whose report
//! is printed as one JSON line; a disagreement is an error.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::ModelArgs;

#[derive(Args)]
pub struct DeviceCheckArgs {
    /// The model, and with --device the device under test (against the CPU)
    #[command(flatten)]
    model: ModelArgs,
    /// A model of this shape with random weights (the tokenizer of --model)
    #[arg(long, conflicts_with = "adapter")]
    random_init: Option<PathBuf>,
    /// Prompts in the batch, each longer than the one before
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Greedy tokens compared per prompt
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Reflections sampled per failure in the compared rollouts and step
    #[arg(long, default_value_t = 4)]
    group: usize,
    /// Most tokens sampled per turn (attempt, reflection, retry) in the
    /// compared rollouts and step
    #[arg(long, default_value_t = 12)]
    rollout_tokens: usize,
    /// Leave out the training step (a model too large to train on the CPU)
    #[arg(long)]
    no_train: bool,
    /// Largest difference allowed between the two devices' logits (times
    /// the largest logit, when that is above 1)
    #[arg(long, default_value_t = 1e-4)]
    logits_tolerance: f64,
    /// Largest difference allowed between the two devices' weight updates
    /// (after one step at AdamW ε = 1, where an update is the learning
    /// rate times the gradient), relative to the largest update, beyond
    /// an ulp of the largest weight (each device rounds its new weights)
    #[arg(long, default_value_t = 2e-3)]
    update_tolerance: f64,
    /// Largest difference allowed between the device's bf16 logits and the
    /// CPU's f32 ones, relative to the largest f32 logit (bf16 keeps 8 bits
    /// of mantissa, so its error grows with the logits' scale)
    #[arg(long, default_value_t = 5e-2)]
    bf16_tolerance: f64,
}

pub fn device_check(args: DeviceCheckArgs) -> Result<()> {
    let check = r3_bench::device_check::DeviceCheck {
        model: args.model.spec(),
        random_init: args.random_init,
        batch: args.batch,
        new_tokens: args.new_tokens,
        group: args.group,
        rollout_tokens: args.rollout_tokens,
        train: !args.no_train,
        logits_tolerance: args.logits_tolerance,
        update_tolerance: args.update_tolerance,
        bf16_tolerance: args.bf16_tolerance,
    };
    let report = r3_bench::device_check::run(&check)?;
    writeln!(std::io::stdout(), "{report}")?;
    if report["ok"] != true {
        bail!(
            "{} disagrees with the CPU (see the JSON line)",
            report["device"]
        );
    }
    Ok(())
}
