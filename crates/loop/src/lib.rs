//! The r3 loop: conversations built turn by turn from sampled ids,
//! rollouts (attempt → reflect × G → retry), evaluation and the dataset of
//! failures. It knows nothing of optimizers.

#![forbid(unsafe_code)]

pub mod config;
pub mod conversation;
pub mod engine;
pub mod eval;
pub mod mine;
pub mod model;
pub mod report;
pub mod rollout;
pub mod stats;

pub use conversation::ChatEncoder;
pub use rollout::{Attempt, Backend, Failure, Policy, Rollout, Rollouts, SampledLogprobs};

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("chat template: {0}")]
    Template(String),
    #[error(transparent)]
    Model(#[from] r3_model::ModelError),
    /// A model that would not load or build, with what was being done.
    #[error("{what}: {cause}")]
    Load {
        what: String,
        /// Boxed, as `GenerateError::Forward`'s: it sets the error's size.
        cause: Box<r3_model::ModelError>,
    },
    #[error(transparent)]
    Fetch(#[from] r3_fetch::FetchError),
    #[error(transparent)]
    Generate(#[from] r3_generate::GenerateError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {cause}")]
    Io {
        path: std::path::PathBuf,
        /// In the message, not `source()`: the binary prints the whole
        /// chain, which would repeat it.
        cause: std::io::Error,
    },
    #[error(transparent)]
    Task(#[from] r3_tasks::TaskError),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = LoopError> = std::result::Result<T, E>;
