//! The OpenAI-compatible request bodies `r3 serve` accepts, checked field
//! by field: a bad request gets an error naming the field and what is
//! wrong, never a panic and never a silently ignored setting.

use r3_generate::SamplingParams;
use serde_json::{json, Map, Value};

/// Most completions one request may ask for (prompts × n).
pub const MAX_ROWS: usize = 256;

/// Most choices per prompt.
pub const MAX_N: usize = 64;

/// Most alternatives per token (vLLM's default limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// An error as OpenAI's API reports one, with its HTTP status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// The offending field, when one is to blame.
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: format!("{param}: {}", message.into()),
            param: Some(param.to_string()),
        }
    }

    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }

    /// The JSON body OpenAI clients parse.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            404 => "not_found_error",
            413 => "request_too_large",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status,
        }})
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A prompt as a request gives it, before the chat template or the
/// tokenizer has been applied.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// One checked request: its prompts (or chat), how many choices each, and
/// how to sample them.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub model: Option<String>,
    pub prompts: Vec<Prompt>,
    pub n: usize,
    pub params: SamplingParams,
    /// Extra ids that end a choice, beside the model's end-of-turn ids.
    pub stop_token_ids: Vec<u32>,
    /// vLLM's `return_token_ids`: each choice carries its sampled ids.
    pub return_token_ids: bool,
    /// Each choice carries its sampled tokens' log-probs (completions'
    /// `logprobs: k`, chat's `logprobs: true`).
    pub logprobs: bool,
    /// And beside each, the `k` most likely tokens with theirs
    /// (completions' `logprobs: k`, chat's `top_logprobs: k`).
    pub top_logprobs: usize,
    /// The reply comes as server-sent events, text as it is sampled.
    pub stream: bool,
    /// Completions' `echo`: each choice starts with its prompt, whose
    /// tokens are scored too (with `logprobs`); `max_tokens: 0` scores
    /// without generating.
    pub echo: bool,
}

/// Fields OpenAI clients send with neutral values, accepted only with
/// those values: r3 does not implement them, so any other value is refused.
const NEUTRAL: &[(&str, &str)] = &[
    ("frequency_penalty", "0"),
    ("presence_penalty", "0"),
    ("repetition_penalty", "1"),
    ("best_of", "n"),
    ("echo", "false"),
    ("logit_bias", "null"),
    ("suffix", "null"),
];

/// Fields accepted whatever their value: they change nothing r3 returns.
const IGNORED: &[&str] = &[
    "user",
    "skip_special_tokens",
    "spaces_between_special_tokens",
];

/// Parses a `/v1/completions` body.
pub fn completion_request(body: &Value) -> ApiResult<Request> {
    let object = as_object(body)?;
    let prompts = match object.get("prompt") {
        Some(p) => prompts(p)?,
        None => return Err(ApiError::bad("prompt", "is required")),
    };
    request(object, prompts, &["prompt", "echo"], 16)
}

/// Parses a `/v1/chat/completions` body; returns the request (without
/// prompts: the caller renders `messages` with the model's template) and
/// the messages and tools.
pub fn chat_request(body: &Value) -> ApiResult<(Request, Vec<r3_model::Message>, Option<Value>)> {
    let object = as_object(body)?;
    let messages = match object.get("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| message(i, m))
            .collect::<ApiResult<Vec<_>>>()?,
        _ => return Err(ApiError::bad("messages", "must be a non-empty array")),
    };
    let tools = match object.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) => Some(Value::Array(tools.clone())),
        Some(_) => return Err(ApiError::bad("tools", "must be an array")),
    };
    let request = request(
        object,
        Vec::new(),
        &["messages", "tools", "max_completion_tokens"],
        usize::MAX,
    )?;
    Ok((request, messages, tools))
}

fn as_object(body: &Value) -> ApiResult<&Map<String, Value>> {
    body.as_object()
        .ok_or_else(|| ApiError::new(400, "the body must be a JSON object"))
}

fn message(i: usize, m: &Value) -> ApiResult<r3_model::Message> {
    let field = format!("messages[{i}]");
    let role = m["role"]
        .as_str()
        .ok_or_else(|| ApiError::bad(&field, "needs a string role"))?;
    let content = match &m["content"] {
        Value::String(s) => s.clone(),
        // OpenAI's content parts: only text ones.
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (&p["type"], &p["text"]) {
                (Value::String(t), Value::String(text)) if t == "text" => Ok(text.as_str()),
                _ => Err(ApiError::bad(&field, "content parts must be text parts")),
            })
            .collect::<ApiResult<Vec<_>>>()?
            .concat(),
        Value::Null => String::new(),
        _ => {
            return Err(ApiError::bad(
                &field,
                "content must be a string or text parts",
            ))
        }
    };
    Ok(r3_model::Message::new(role, content))
}

/// The sampling fields shared by both routes. `default_max_tokens` is
/// OpenAI's default for the route (16 for completions; the context for
/// chat).
fn request(
    object: &Map<String, Value>,
    prompts: Vec<Prompt>,
    route_fields: &[&str],
    default_max_tokens: usize,
) -> ApiResult<Request> {
    for (key, value) in object {
        let known = route_fields.contains(&key.as_str())
            || IGNORED.contains(&key.as_str())
            || matches!(
                key.as_str(),
                "model"
                    | "n"
                    | "max_tokens"
                    | "temperature"
                    | "top_p"
                    | "top_k"
                    | "seed"
                    | "stop"
                    | "stop_token_ids"
                    | "return_token_ids"
                    | "logprobs"
                    | "top_logprobs"
                    | "stream"
            );
        if known {
            continue;
        }
        match NEUTRAL.iter().find(|(k, _)| k == key) {
            Some((_, neutral)) => check_neutral(object, key, value, neutral)?,
            None => return Err(ApiError::bad(key, "is not a field r3 serve knows")),
        }
    }
    let n = match object.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => count(v, "n", 1, MAX_N)?,
    };
    let max_tokens = ["max_tokens", "max_completion_tokens"]
        .iter()
        .find_map(|k| object.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)));
    let echo = match object.get("echo") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("echo", "must be true or false")),
    };
    // Only an echo may generate nothing: it scores the prompt.
    let max_new_tokens = match max_tokens {
        None => default_max_tokens,
        Some((key, v)) => count(v, key, if echo { 0 } else { 1 }, usize::MAX)?,
    };
    let temperature = number(object, "temperature", 1.0)?;
    if !(0.0..=100.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", "must be between 0 and 100"));
    }
    let top_p = number(object, "top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", "must be in (0, 1]"));
    }
    let top_k = match object.get("top_k") {
        None | Some(Value::Null) => 0,
        // vLLM's "no limit".
        Some(v) if v.as_i64() == Some(-1) || v.as_i64() == Some(0) => 0,
        Some(v) => count(v, "top_k", 1, usize::MAX)?,
    };
    let seed = match object.get("seed") {
        None | Some(Value::Null) => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|s| s as u64))
            .ok_or_else(|| ApiError::bad("seed", "must be an integer"))?,
    };
    let stop_strings = match object.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad("stop", "must be a string or an array of strings"))?,
        Some(_) => {
            return Err(ApiError::bad(
                "stop",
                "must be a string or an array of strings",
            ))
        }
    };
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "stop",
            "an empty stop string would end every choice at once",
        ));
    }
    let stop_token_ids = match object.get("stop_token_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(v) => token_ids(v, "stop_token_ids")?,
    };
    let return_token_ids = match object.get("return_token_ids") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("return_token_ids", "must be true or false")),
    };
    // Completions: `logprobs: k` (alternatives per token); chat:
    // `logprobs: true` and `top_logprobs: k`.
    let (logprobs, mut top_logprobs) = match object.get("logprobs") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => (false, 0),
        Some(Value::Bool(true)) => (true, 0),
        Some(v) => (true, count(v, "logprobs", 0, MAX_TOP_LOGPROBS)?),
    };
    match object.get("top_logprobs") {
        None | Some(Value::Null) => {}
        Some(v) => {
            top_logprobs = count(v, "top_logprobs", 0, MAX_TOP_LOGPROBS)?;
            if top_logprobs > 0 && !logprobs {
                return Err(ApiError::bad("top_logprobs", "needs logprobs: true"));
            }
        }
    }
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad("stream", "must be true or false")),
    };
    if stream && echo {
        return Err(ApiError::bad("echo", "is not streamed; ask without stream"));
    }
    let model = match object.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::bad("model", "must be a string")),
    };
    Ok(Request {
        model,
        prompts,
        n,
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            max_new_tokens,
            stop_strings,
            seed,
        },
        stop_token_ids,
        return_token_ids,
        logprobs,
        top_logprobs,
        stream,
        echo,
    })
}

/// Refuses a value of an unimplemented field other than its neutral one.
fn check_neutral(
    object: &Map<String, Value>,
    key: &str,
    value: &Value,
    neutral: &str,
) -> ApiResult<()> {
    let ok = match neutral {
        "null" => value.is_null() || *value == Value::Bool(false) || value.as_u64() == Some(0),
        "false" => value.is_null() || *value == Value::Bool(false),
        "n" => value.is_null() || value.as_u64() == Some(1) || *value == object["n"],
        number => value.is_null() || value.as_f64() == number.parse().ok(),
    };
    if ok {
        return Ok(());
    }
    Err(ApiError::bad(
        key,
        format!("r3 serve does not support it yet (only {neutral} is accepted)"),
    ))
}

fn count(v: &Value, key: &str, low: usize, high: usize) -> ApiResult<usize> {
    match v.as_u64().and_then(|n| usize::try_from(n).ok()) {
        Some(n) if (low..=high).contains(&n) => Ok(n),
        _ if high == usize::MAX => Err(ApiError::bad(key, format!("must be an integer ≥ {low}"))),
        _ => Err(ApiError::bad(
            key,
            format!("must be an integer in {low}..={high}"),
        )),
    }
}

fn number(object: &Map<String, Value>, key: &str, default: f64) -> ApiResult<f64> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| ApiError::bad(key, "must be a number")),
    }
}

fn token_ids(v: &Value, key: &str) -> ApiResult<Vec<u32>> {
    v.as_array()
        .and_then(|items| {
            items
                .iter()
                .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| ApiError::bad(key, "must be an array of token ids"))
}

/// `prompt`: a string, an array of strings, an array of ids, or an array
/// of arrays of ids.
fn prompts(v: &Value) -> ApiResult<Vec<Prompt>> {
    let bad = || {
        ApiError::bad("prompt", "must be a string, an array of strings, an array of token ids, or an array of arrays of token ids")
    };
    let out = match v {
        Value::String(s) => vec![Prompt::Text(s.clone())],
        Value::Array(items) if items.is_empty() => return Err(ApiError::bad("prompt", "is empty")),
        Value::Array(items) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|s| s.as_str().map(|s| Prompt::Text(s.to_string())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?,
            Value::Number(_) => vec![Prompt::Ids(token_ids(v, "prompt")?)],
            Value::Array(_) => items
                .iter()
                .map(|ids| token_ids(ids, "prompt").map(Prompt::Ids))
                .collect::<ApiResult<Vec<_>>>()?,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    if out
        .iter()
        .any(|p| matches!(p, Prompt::Ids(ids) if ids.is_empty()))
    {
        return Err(ApiError::bad("prompt", "a prompt of no tokens"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_request_reads_every_field() {
        let r = completion_request(&json!({
            "model": "m", "prompt": [[1, 2], [3]], "n": 2, "max_tokens": 5,
            "temperature": 0.7, "top_p": 0.9, "top_k": 4, "seed": 9, "stop": "x",
            "stop_token_ids": [7], "return_token_ids": true, "user": "u",
            "frequency_penalty": 0, "echo": false, "logprobs": 0,
        }))
        .unwrap();
        assert!(r.logprobs);
        assert_eq!(
            r.prompts,
            vec![Prompt::Ids(vec![1, 2]), Prompt::Ids(vec![3])]
        );
        assert_eq!((r.n, r.params.max_new_tokens, r.params.top_k), (2, 5, 4));
        assert_eq!(
            (r.params.temperature, r.params.top_p, r.params.seed),
            (0.7, 0.9, 9)
        );
        assert_eq!(r.params.stop_strings, vec!["x"]);
        assert_eq!(r.stop_token_ids, vec![7]);
        assert!(r.return_token_ids);
        assert_eq!(r.model.as_deref(), Some("m"));
    }

    #[test]
    fn bad_requests_name_their_field() {
        for (body, field) in [
            (json!([1]), None),
            (json!({}), Some("prompt")),
            (json!({"prompt": []}), Some("prompt")),
            (json!({"prompt": [[]]}), Some("prompt")),
            (json!({"prompt": [1.5]}), Some("prompt")),
            (json!({"prompt": [-1]}), Some("prompt")),
            (json!({"prompt": "a", "max_tokens": -1}), Some("max_tokens")),
            (json!({"prompt": "a", "max_tokens": 0}), Some("max_tokens")),
            (json!({"prompt": "a", "n": 0}), Some("n")),
            (json!({"prompt": "a", "n": 1000}), Some("n")),
            (
                json!({"prompt": "a", "temperature": "hot"}),
                Some("temperature"),
            ),
            (
                json!({"prompt": "a", "temperature": -1}),
                Some("temperature"),
            ),
            (json!({"prompt": "a", "top_p": 0}), Some("top_p")),
            (json!({"prompt": "a", "stop": [1]}), Some("stop")),
            (json!({"prompt": "a", "stop": ""}), Some("stop")),
            (json!({"prompt": "a", "frobnicate": 1}), Some("frobnicate")),
            (json!({"prompt": "a", "stream": "yes"}), Some("stream")),
            (json!({"prompt": "a", "logprobs": 21}), Some("logprobs")),
            (json!({"prompt": "a", "logprobs": -1}), Some("logprobs")),
            (
                json!({"prompt": "a", "top_logprobs": 3}),
                Some("top_logprobs"),
            ),
            (
                json!({"prompt": "a", "presence_penalty": 0.5}),
                Some("presence_penalty"),
            ),
        ] {
            let e = completion_request(&body).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), field, "{body}: {}", e.message);
        }
    }

    #[test]
    fn a_chat_request_reads_messages_and_tools() {
        let (r, messages, tools) = chat_request(&json!({
            "messages": [{"role": "system", "content": "s"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "tools": [{"type": "function"}], "max_completion_tokens": 3,
        }))
        .unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[1].content, "hi");
        assert!(tools.is_some());
        assert_eq!(r.params.max_new_tokens, 3);
        let e = chat_request(&json!({"messages": [{"content": "x"}]})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0]"));
    }
}
