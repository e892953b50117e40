//! r3's benchmark harnesses: batched generation, the packed products
//! alone, the verifiers, and a GRPO step, each returning one JSON object with the machine it ran on and
//! every phase as a fraction of the machine's measured limits. Kept out of
//! the user tool: the stand-in task, the fabricated failures and the
//! `/proc` probes are measuring instruments, not product.

#![forbid(unsafe_code)]

pub mod device_check;
pub mod generate;
pub mod kernels;
pub mod machine;
pub mod train;
pub mod verify;

use std::path::Path;

use r3_loop::model::{self, Model, ModelSpec};

/// What can stop a benchmark; each carries the stage's own error.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Loop(#[from] r3_loop::LoopError),
    #[error(transparent)]
    Train(#[from] r3_train::TrainError),
    #[error(transparent)]
    Model(#[from] r3_model::ModelError),
    #[error(transparent)]
    Generate(#[from] r3_generate::GenerateError),
    #[error(transparent)]
    Task(#[from] r3_tasks::TaskError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

/// The model a benchmark runs, with the file's tensors kept (benchmarks
/// build other decoders from them): `spec`, or random weights of the
/// `random_init` shape (an HF config.json) with `spec`'s tokenizer.
pub fn bench_model(spec: &ModelSpec, random_init: Option<&Path>) -> Result<Model> {
    Ok(match random_init {
        Some(shape) => {
            model::load_random_init(shape, spec.path.as_deref(), spec.device, spec.precision)?
        }
        None => model::load_with_weights(spec)?,
    })
}
