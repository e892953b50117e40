use std::path::PathBuf;

/// Everything that can go wrong between a path on disk and a runnable model.
/// Each variant names the file involved, because "invalid tensor" alone
/// never tells a user which of six files to look at.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        /// In the message, not `source()`: the binary prints the whole
        /// chain, which would repeat it.
        cause: std::io::Error,
    },
    #[error("{path}: invalid JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: unsupported architecture '{arch}' (supported: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM; GGUF: llama, qwen2, mistral)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: tensor '{name}': {message}")]
    Tensor {
        path: PathBuf,
        name: String,
        message: String,
    },
    #[error("{path}: chat template: {message}")]
    ChatTemplate { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A device that cannot be opened or does not fit the request.
    #[error("{0}")]
    Device(String),
    #[error("KV cache: {0}")]
    Cache(String),
    /// More memory asked for than the machine has: refused before allocating.
    #[error("{0}")]
    Memory(String),
    /// Tensors whose shapes do not fit together (a caller's mistake).
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn invalid(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        name: impl Into<String>,
        message: impl std::fmt::Display,
    ) -> Self {
        Self::Tensor {
            path: path.into(),
            name: name.into(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
