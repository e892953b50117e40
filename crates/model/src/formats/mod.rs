//! The files weights come in, GGUF and safetensors: every parser of a
//! model file's untrusted bytes lives here, apart from the [`Weights`]
//! store it fills.
//!
//! [`Weights`]: crate::weights::Weights

pub mod gguf;
mod gguf_header;
pub mod rope_rows;
pub mod safetensors;
