//! The generate stage of r3: sampling (temperature, top-p, top-k, seed),
//! stop rules and batched decoding over the model's KV cache, including
//! prefix sharing through cache forking. It knows nothing about tasks.

#![forbid(unsafe_code)]

pub mod decode;
pub mod sampler;
pub mod stream;

pub use decode::{Completion, Decoded, FinishReason, Generator, ScoredPrompt};
pub use sampler::{argmax, Drawn, Sampler, SamplingParams};
pub use stream::{DecodeStream, Finished, OnToken, Turn};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("cannot generate from an empty prompt")]
    EmptyPrompt,
    /// A forward of the decoder failed: which step, on how large a batch,
    /// so that an out-of-memory says what to make smaller.
    #[error("{step}: {cause}")]
    Forward {
        step: String,
        /// In the message, not `source()`: the binary prints the whole
        /// chain, which would repeat it. Boxed: errors travel by value
        /// through every `Result`, so the largest variant sets their size.
        cause: Box<r3_model::ModelError>,
    },
    /// A continuous batch was asked for a row it does not hold.
    #[error("{0}")]
    Stream(String),
    #[error(transparent)]
    Model(#[from] r3_model::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = GenerateError> = std::result::Result<T, E>;
