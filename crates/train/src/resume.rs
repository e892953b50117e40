//! The one resume path: what `--resume` (a checkpoint directory, `last` or
//! `auto`) means for a run's output directory, and which weights the run
//! then starts from. The CLI asks here; the trainer checks nothing twice.

use std::path::{Path, PathBuf};

use crate::checkpoint;
use crate::config::TrainConfig;
use crate::{Result, TrainError};

/// Where a run starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// From the base model, step 0.
    Fresh,
    /// From this checkpoint, whose settings `config` may continue.
    Resume(PathBuf),
    /// Nothing to do: `auto` found this checkpoint already at `max_steps`.
    Finished(PathBuf),
}

/// What `resume` asks for in `config.output_dir`: a directory as given;
/// `last` its newest checkpoint (an error if there is none); `auto` the
/// same, or a fresh start when a kill came before the first checkpoint
/// (whose logs are discarded), or [`Start::Finished`] for a finished run,
/// so that rerunning an experiment is idempotent. A checkpoint whose
/// settings `config` may not continue is refused here, naming them.
pub fn resolve(config: &TrainConfig, resume: Option<&Path>) -> Result<Start> {
    let word = resume.and_then(Path::to_str);
    let dir = match word {
        Some("last" | "auto") => match checkpoint::last_checkpoint(&config.output_dir)? {
            Some(dir) => dir,
            None if word == Some("last") => {
                return Err(TrainError::Invalid(format!(
                    "--resume last: {} holds no checkpoint yet",
                    config.output_dir.display()
                )))
            }
            None => {
                checkpoint::discard_logs_without_checkpoints(&config.output_dir)?;
                return Ok(Start::Fresh);
            }
        },
        Some(_) | None => match resume {
            Some(dir) => dir.to_path_buf(),
            None => return Ok(Start::Fresh),
        },
    };
    let state = checkpoint::resumable_state(&dir, config)?;
    if word == Some("auto") && state.step >= config.max_steps {
        return Ok(Start::Finished(dir));
    }
    Ok(Start::Resume(dir))
}

/// The files a run loads: the policy's starting weights and the base they
/// came from (the KL reference, and what a LoRA checkpoint names).
#[derive(Debug, Clone, PartialEq)]
pub struct StartFiles {
    pub policy: PathBuf,
    pub base: PathBuf,
}

impl StartFiles {
    /// A fresh run: `model` is both.
    pub fn fresh(model: &Path) -> Self {
        Self {
            policy: model.to_path_buf(),
            base: model.to_path_buf(),
        }
    }

    /// A resumed full fine-tune continues from its checkpoint's weights,
    /// against the base it began from; a resumed LoRA run from its base
    /// (the adapters come from the checkpoint).
    pub fn resumed(config: &TrainConfig, checkpoint: &Path) -> Result<Self> {
        let base = PathBuf::from(checkpoint::read_state(checkpoint)?.base_model);
        Ok(Self {
            policy: match config.use_peft {
                true => base.clone(),
                false => checkpoint.to_path_buf(),
            },
            base,
        })
    }
}
