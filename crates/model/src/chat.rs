//! Chat templates: the model's own Jinja template rendered with minijinja,
//! with the helpers HF templates call.

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// One turn of a conversation, as HF chat templates expect it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// A compiled chat template plus the special-token strings it refers to.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// File the template came from, for error messages.
    source: PathBuf,
    bos_token: String,
    eos_token: String,
}

/// Instructions one rendering may execute.
const CHAT_TEMPLATE_FUEL: u64 = 10_000_000;

impl ChatTemplate {
    /// Compiles `template`; `source` names where it came from in errors.
    pub fn new(template: &str, bos_token: &str, eos_token: &str, source: &Path) -> Result<Self> {
        let mut env = Environment::new();
        // A template that loops forever runs out of fuel instead; real ones
        // use a few thousand units per conversation.
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", |format: String| {
            chrono::Local::now().format(&format).to_string()
        });
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| ModelError::ChatTemplate {
                path: source.into(),
                message: format!("does not compile: {e}"),
            })?;
        Ok(Self {
            env,
            source: source.into(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends
    /// with the header of the assistant turn the model is to write.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| self.error(e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: JinjaError) -> ModelError {
        if e.kind() == ErrorKind::OutOfFuel {
            return ModelError::ChatTemplate {
                path: self.source.clone(),
                message: format!(
                    "stopped after {CHAT_TEMPLATE_FUEL} instructions: does it loop forever?"
                ),
            };
        }
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(inner) = source {
            message.push_str(&format!(": {inner}"));
            source = inner.source();
        }
        ModelError::ChatTemplate {
            path: self.source.clone(),
            message: format!("failed to render: {message}"),
        }
    }
}
