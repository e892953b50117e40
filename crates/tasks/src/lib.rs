//! The tasks stage of r3: task records, the prompts of the three turns,
//! answer extraction and verifiers — strict, fast and impossible to crash.
//! Reflect, Retry, Reward needs nothing from a task but a prompt and a
//! binary verdict. It knows nothing about tensors.

pub mod answer;
pub mod arithmetic;
pub mod bfcl;
pub mod countdown;
pub mod countdown_data;
pub mod external;
pub mod function_calling;
pub mod prompts;
pub mod records;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use prompts::{tools_in_system_turn, Prompts};
pub use records::{read_records, Record};

/// A binary verdict and, when it failed, a few words saying why: reasons
/// are logged, shown in reports and read by people debugging a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub success: bool,
    pub reason: String,
}

impl Verdict {
    pub fn pass() -> Self {
        Self {
            success: true,
            reason: "correct".into(),
        }
    }

    pub fn fail(reason: impl Into<String>) -> Self {
        Self {
            success: false,
            reason: reason.into(),
        }
    }
}

/// What went wrong reading task data or setting a task up.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{path}:{line}: {message}")]
    Record {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}: {cause}")]
    Io {
        path: String,
        /// In the message, not `source()`: the binary prints the whole
        /// chain, which would repeat it.
        cause: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = TaskError> = std::result::Result<T, E>;

/// A verifiable task: it turns a record into the first user turn and judges
/// an answer text. Records stay JSON so that extra fields travel along.
pub trait Task: Send + Sync {
    /// The name used on the command line.
    fn name(&self) -> &'static str;

    /// Checks that a record has what this task needs, so bad data is
    /// reported with its line number when it is read, not mid-run.
    fn check_record(&self, record: &Value) -> std::result::Result<(), String>;

    /// The user message of the first attempt (the retry resends it).
    fn user_prompt(&self, record: &Value) -> String;

    /// Judges the model's answer to `record`. Never panics, whatever the text.
    fn verify(&self, record: &Value, answer: &str) -> Verdict;

    /// Why this task can no longer give verdicts that mean anything (an
    /// external verifier whose replies cannot be matched to requests), so
    /// that a run stops with the reason instead of training on zero rewards.
    fn broken(&self) -> Option<String> {
        None
    }

    /// The tools a record offers, as OpenAI-style `{"type": "function",
    /// "function": {...}}` objects, for chat templates that present tools in
    /// the model's own format; `None` for tasks without tools.
    fn tools(&self, _record: &Value) -> Option<Value> {
        None
    }

    /// The default reflection instruction for this task (the paper's wording).
    fn reflection_instruction(&self) -> &'static str {
        prompts::GENERIC_REFLECTION
    }
}

/// The tasks named on the command line.
pub const BUILTIN_TASKS: [&str; 4] = ["countdown", "function-calling", "bfcl", "answer"];

/// The task called `name` on the command line (one of [`BUILTIN_TASKS`]).
pub fn builtin(name: &str) -> Result<Box<dyn Task>> {
    match name {
        "countdown" => Ok(Box::new(countdown::Countdown)),
        "function-calling" => Ok(Box::new(function_calling::FunctionCalling)),
        "bfcl" => Ok(Box::new(bfcl::Bfcl)),
        "answer" => Ok(Box::new(answer::PlainAnswer)),
        other => Err(TaskError::Invalid(format!(
            "unknown task '{other}' ({}; or --verifier CMD)",
            BUILTIN_TASKS.join(", ")
        ))),
    }
}
