//! The model stage of r3: configs, weights in (HF safetensors, GGUF) and
//! out (safetensors), tokenizer, chat template, and the batched decoder with
//! its KV cache and differentiable per-token log-probabilities.
//!
//! It knows nothing about tasks or rewards.

// No unsafe code but the one map of a GGUF file (`formats::gguf`), which
// Rust cannot prove safe: its bytes could change under the map.
#![deny(unsafe_code)]

pub mod atomic;
pub mod cache;
pub mod chat;
pub mod config;
pub mod device;
pub mod error;
pub mod exec;
pub mod export;
pub mod formats;
pub mod llama;
pub mod loader;
pub mod logprob;
pub mod lora;
pub mod random;
#[cfg(feature = "test-support")]
pub mod tiny;
pub mod tokenizer;
pub mod weights;

pub use cache::KvCache;
pub use chat::{ChatTemplate, Message};
pub use config::{Architecture, ModelConfig, RopeScaling, MAX_PARAMETERS};
pub use device::{device_name, DeviceChoice, Precision};
pub use error::{ModelError, Result};
pub use exec::Exec;
pub use llama::{ForwardInputs, Llama};
pub use loader::{load, load_conversation, GenerationDefaults, LoadedModel, ModelFormat};
pub use r3_kernels::matmul::Activations;
pub use tokenizer::Tokenizer;
pub use weights::Weights;
