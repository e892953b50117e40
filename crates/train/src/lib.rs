//! The train stage of r3: GRPO on reflection tokens only, with the
//! reflection mask, a KL penalty to a frozen reference, AdamW, schedules,
//! checkpoints and exact resume. It never sees prompts as text.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod crash;
pub mod grpo;
pub mod metrics;
pub mod optim;
pub mod report;
pub mod resume;
pub mod score;
pub mod spans;
pub mod tensorboard;
pub mod trainer;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Model(#[from] r3_model::ModelError),
    #[error(transparent)]
    Loop(#[from] r3_loop::LoopError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {cause}")]
    Io {
        path: String,
        /// In the message, not `source()`: the binary prints the whole
        /// chain, which would repeat it.
        cause: std::io::Error,
    },
    /// A training step's failure, with the phase and batch it ran.
    #[error("{phase} ({batch}): {cause}{hint}")]
    Phase {
        phase: &'static str,
        batch: String,
        cause: Box<TrainError>,
        /// What to lower, when the device ran out of memory.
        hint: &'static str,
    },
}

impl TrainError {
    /// Wraps a failure of `phase` run on `batch`; an out-of-memory error
    /// (CUDA's or the allocator's) also says which settings to lower.
    pub fn in_phase(phase: &'static str, batch: String) -> impl FnOnce(TrainError) -> TrainError {
        move |e| {
            let text = e.to_string().to_lowercase();
            let out_of_memory = text.contains("out of memory") || text.contains("out_of_memory");
            TrainError::Phase {
                phase,
                batch,
                cause: Box::new(e),
                hint: match out_of_memory {
                    true => {
                        "; the device ran out of memory: lower micro_batch_size \
                             (or generation_batch_rows, failures_per_step, num_generations)"
                    }
                    false => "",
                },
            }
        }
    }
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A step's failure names its phase and batch; running out of memory
    /// (as CUDA reports it) also says what to lower, other failures do not.
    #[test]
    fn phase_errors_name_the_phase_and_suggest_a_smaller_batch_on_oom() {
        let wrap = TrainError::in_phase("forward and backward", "micro_batch_size = 8".into());
        let oom = wrap(TrainError::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        )))
        .to_string();
        assert!(
            oom.starts_with("forward and backward (micro_batch_size = 8): "),
            "{oom}"
        );
        assert!(oom.contains("lower micro_batch_size"), "{oom}");
        let wrap = TrainError::in_phase("reference scores", "micro_batch_size = 8".into());
        let other = wrap(TrainError::Invalid("bad token".into())).to_string();
        assert_eq!(other, "reference scores (micro_batch_size = 8): bad token");
    }
}
