//! The generate stage of r3: sampling (temperature, top-p, top-k, seed),
//! stop rules and batched decoding over the model's KV cache, including
//! prefix sharing through cache forking. It knows nothing about tasks.

pub mod decode;
pub mod sampler;

pub use decode::{Completion, Decoded, FinishReason, Generator};
pub use sampler::{argmax, Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot generate from an empty prompt")]
    EmptyPrompt,
    #[error(transparent)]
    Model(#[from] r3_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = GenerateError> = std::result::Result<T, E>;
