//! The three user turns of the loop: the task prompt, the reflection
//! instruction and the retry turn. The last two can be overridden from a
//! TOML file.

use serde::Deserialize;

use crate::{Result, Task, TaskError};

pub(crate) const GENERIC_REFLECTION: &str = "You tried the task above but failed. Reflect on what went wrong and write a short explanation that will help you do better next time.";

/// The system turn that lists a record's tools for a chat template that
/// has no place for them: the tools as JSON and the reply format that
/// `--task function-calling` and `--task bfcl` read.
pub fn tools_in_system_turn(tools: &serde_json::Value) -> String {
    format!(
        "You have access to the following tools:\n{}\n\nTo call tools, reply with only a JSON list of the calls, like [{{\"name\": \"tool_name\", \"arguments\": {{\"argument\": \"value\"}}}}].",
        serde_json::to_string_pretty(tools).unwrap_or_default()
    )
}

/// The prompt set of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompts {
    /// A system message put first, if any.
    pub system: Option<String>,
    /// The user turn that asks for a self-reflection after a failure.
    pub reflection: String,
    /// The user turn that asks for the retry; `None` resends the original
    /// task prompt, as the paper does.
    pub retry: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromptsFile {
    system: Option<String>,
    reflection: Option<String>,
    retry: Option<String>,
}

impl Prompts {
    /// The paper's defaults for `task`.
    pub fn for_task(task: &dyn Task) -> Self {
        Self {
            system: None,
            reflection: task.reflection_instruction().to_string(),
            retry: None,
        }
    }

    /// The defaults with whatever `path` (TOML: `system`, `reflection`,
    /// `retry`) overrides.
    pub fn from_file(task: &dyn Task, path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TaskError::Io {
            path: path.display().to_string(),
            cause: source,
        })?;
        let file: PromptsFile = toml::from_str(&text)
            .map_err(|e| TaskError::Invalid(format!("{}: {e}", path.display())))?;
        let mut prompts = Self::for_task(task);
        prompts.system = file.system.or(prompts.system);
        if let Some(reflection) = file.reflection {
            prompts.reflection = reflection;
        }
        prompts.retry = file.retry;
        Ok(prompts)
    }

    /// The retry turn's text for a record whose task prompt is `original`.
    pub fn retry_text<'a>(&'a self, original: &'a str) -> &'a str {
        self.retry.as_deref().unwrap_or(original)
    }
}
