//! The train stage of r3: GRPO on reflection tokens only, with the
//! reflection mask, a KL penalty to a frozen reference, AdamW, schedules,
//! checkpoints and exact resume. It never sees prompts as text.

pub mod checkpoint;
pub mod config;
pub mod grpo;
pub mod metrics;
pub mod optim;
pub mod score;
pub mod spans;
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
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
