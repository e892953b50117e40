//! Chat templates: the model's own Jinja template rendered with minijinja,
//! with the helpers HF templates call.

use std::path::{Path, PathBuf};

use minijinja::value::Kwargs;
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value};
use serde::{Deserialize, Serialize};
use serde_json::ser::{Formatter, PrettyFormatter, Serializer};

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
    /// Whether the template reads a `tools` variable (Qwen2.5's, Llama
    /// 3.1's): those present tools in the model's own format.
    accepts_tools: bool,
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
        env.add_filter("tojson", tojson);
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
            accepts_tools: template.contains("tools"),
        })
    }

    /// Whether tools given to [`Self::render_with_tools`] reach the prompt.
    pub fn accepts_tools(&self) -> bool {
        self.accepts_tools
    }

    /// The prompt text for `messages`; with `add_generation_prompt` it ends
    /// with the header of the assistant turn the model is to write.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// [`Self::render`] with the tools the model may call, as HF's
    /// `apply_chat_template(tools=...)` passes them (a list of
    /// `{"type": "function", "function": {...}}`).
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| self.error(e))?;
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
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

/// transformers' `tojson` filter, which chat templates use to print tools:
/// Python's `json.dumps(ensure_ascii=False)`, so `", "` and `": "` between
/// items, keys in their order and no HTML escaping (minijinja's own filter
/// escapes `'`, `<`, `>` and `&` and drops the spaces), and `indent=N` as
/// in Python. The prompt then holds the text transformers would give it.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        None => value.serialize(&mut Serializer::with_formatter(&mut out, PythonSeparators)),
        Some(n) => {
            let spaces = vec![b' '; n];
            value.serialize(&mut Serializer::with_formatter(
                &mut out,
                PrettyFormatter::with_indent(&spaces),
            ))
        }
    };
    written.map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).expect("serde_json writes UTF-8");
    Ok(Value::from_safe_string(text))
}

/// Python's default JSON separators, `", "` and `": "`.
struct PythonSeparators;

impl Formatter for PythonSeparators {
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.begin_array_value(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }
}
