//! Conversations as token ids, turn by turn, token-in/token-out.
//!
//! The model's own template decides what goes between turns. To continue a
//! conversation whose last assistant turn was *sampled*, we render the chat
//! with a sentinel as that turn's content and take the text after the
//! sentinel: the turn's closing markers, the next user turn and the next
//! assistant header. The sampled ids stay exactly as sampled; only that
//! in-between text is encoded. A test pins that the ids decode to exactly the
//! template's rendering of the whole conversation.

use r3_model::{ChatTemplate, Message, Tokenizer};
use serde_json::Value;

use crate::{LoopError, Result};

/// Stands in for a sampled assistant turn while rendering; private-use
/// characters no model writes.
const SENTINEL: &str = "\u{E000}r3-sampled-turn\u{E001}";

/// Renders and encodes chat turns with a model's template and tokenizer.
pub struct ChatEncoder<'a> {
    pub template: &'a ChatTemplate,
    pub tokenizer: &'a Tokenizer,
    /// The end-of-turn token's text, which a sampled turn may end with.
    pub eos_text: &'a str,
}

impl<'a> ChatEncoder<'a> {
    pub fn new(template: &'a ChatTemplate, tokenizer: &'a Tokenizer, eos_text: &'a str) -> Self {
        Self {
            template,
            tokenizer,
            eos_text,
        }
    }

    /// Ids of `messages` followed by the assistant header: a first prompt.
    /// `tools` reach templates that present them (see [`crate::Rollouts::tools`]).
    pub fn prompt(&self, messages: &[Message], tools: Option<&Value>) -> Result<Vec<u32>> {
        let text = self.template.render_with_tools(messages, tools, true)?;
        Ok(self.tokenizer.encode(&text)?)
    }

    /// Ids that follow a sampled assistant turn to open the next one: the
    /// turn's closing text (less the end-of-turn token when the model sampled
    /// it), `user` as a new user turn, and the assistant header.
    /// `history` ends with the user turn the sampled reply answered.
    pub fn next_turn(
        &self,
        history: &[Message],
        tools: Option<&Value>,
        user: &str,
        sampled_eos: bool,
    ) -> Result<Vec<u32>> {
        let mut messages = history.to_vec();
        let head = self.template.render_with_tools(&messages, tools, true)?;
        messages.push(Message::new("assistant", SENTINEL));
        messages.push(Message::new("user", user));
        let full = self.template.render_with_tools(&messages, tools, true)?;
        let after = match full.strip_prefix(head.as_str()).and_then(|rest| rest.split_once(SENTINEL)) {
            Some(("", after)) => after,
            _ => {
                return Err(LoopError::Template(
                    "the chat template does not render a conversation as its earlier turns followed by the new ones, so turns cannot be continued token-in/token-out".into(),
                ))
            }
        };
        let rest = match (sampled_eos, after.strip_prefix(self.eos_text)) {
            (true, Some(rest)) => rest,
            (true, None) => {
                return Err(LoopError::Template(format!(
                    "the template does not close an assistant turn with the end-of-turn token '{}'",
                    self.eos_text
                )))
            }
            (false, _) => after,
        };
        Ok(self.tokenizer.encode(rest)?)
    }
}
