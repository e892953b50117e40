//! Function calling in the xLAM/APIGen form: `query`, `tools` (a JSON
//! string of `{name, description, parameters}`) and `answers` (a JSON string
//! of the expected `{name, arguments}` calls). A reply is correct when its
//! calls equal the expected ones as a multiset.

use serde_json::{Map, Value};

use crate::{Task, Verdict};

/// Replies longer than this are not searched for JSON.
const MAX_REPLY_LEN: usize = 32 * 1024;
/// JSON start positions tried when looking for a bare list in prose.
const MAX_JSON_STARTS: usize = 64;

pub struct FunctionCalling;

/// One call: a function name and its arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// `tools` and `answers` are JSON strings in the xLAM data; accept them
/// already decoded too.
fn json_field(record: &Value, key: &str) -> Result<Value, String> {
    match record.get(key) {
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| format!("'{key}' is not valid JSON: {e}"))
        }
        Some(v @ Value::Array(_)) => Ok(v.clone()),
        _ => Err(format!("missing '{key}'")),
    }
}

/// Declared defaults: (tool name, parameter) → default value.
fn defaults(record: &Value) -> Result<Vec<(String, String, Value)>, String> {
    let tools = json_field(record, "tools")?;
    let tools = tools.as_array().ok_or("'tools' is not a list")?;
    let mut out = Vec::new();
    for tool in tools {
        let name = tool
            .get("name")
            .and_then(Value::as_str)
            .ok_or("a tool has no 'name'")?;
        if let Some(params) = tool.get("parameters").and_then(Value::as_object) {
            for (param, spec) in params {
                if let Some(default) = spec.get("default") {
                    out.push((name.to_string(), param.clone(), default.clone()));
                }
            }
        }
    }
    Ok(out)
}

fn call_from_json(v: &Value) -> Result<Call, String> {
    let obj = v
        .as_object()
        .ok_or_else(|| format!("a call is not an object: {}", short(v)))?;
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("a call has no 'name': {}", short(v)))?;
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => m,
            _ => return Err(format!("arguments of '{name}' are not an object")),
        },
        Some(other) => {
            return Err(format!(
                "arguments of '{name}' are not an object: {}",
                short(other)
            ))
        }
    };
    Ok(Call {
        name: name.to_string(),
        arguments,
    })
}

fn calls_from_json(v: &Value) -> Result<Vec<Call>, String> {
    match v {
        Value::Array(items) => items.iter().map(call_from_json).collect(),
        Value::Object(_) => Ok(vec![call_from_json(v)?]),
        _ => Err(format!("expected a list of calls, got {}", short(v))),
    }
}

fn expected_calls(record: &Value) -> Result<Vec<Call>, String> {
    calls_from_json(&json_field(record, "answers")?)
}

/// Finds the calls in a reply: every call it writes, inside `<tool_call>`
/// tags, in code fences, or as bare JSON in the text. A reply that writes
/// two calls as two blocks (two tags, two fences, two objects) makes two
/// calls; echoed tool definitions are passed over.
pub fn extract_calls(reply: &str) -> Result<Vec<Call>, String> {
    if reply.len() > MAX_REPLY_LEN {
        return Err(format!("reply is longer than {MAX_REPLY_LEN} bytes"));
    }
    if reply.contains("<tool_call>") {
        let mut calls = Vec::new();
        for part in reply.split("<tool_call>").skip(1) {
            let body = part.split("</tool_call>").next().unwrap_or(part).trim();
            let v: Value = serde_json::from_str(body)
                .map_err(|e| format!("<tool_call> holds invalid JSON: {e}"))?;
            calls.extend(calls_from_json(&v)?);
        }
        return Ok(calls);
    }
    let fenced = fenced_calls(reply);
    let values = match fenced.is_empty() {
        true => bare_calls(reply),
        false => fenced,
    };
    if values.is_empty() {
        return Err("no JSON list of calls in the reply".into());
    }
    let mut calls = Vec::new();
    for v in &values {
        calls.extend(calls_from_json(v)?);
    }
    Ok(calls)
}

/// Whether `v` reads as calls: an object with a `name`, or a list of
/// objects, none of them an echoed tool definition.
fn holds_calls(v: &Value) -> bool {
    match v {
        // An empty list is an answer too: no calls.
        Value::Array(items) => items
            .iter()
            .all(|item| item.is_object() && !is_tool_definition(item)),
        Value::Object(_) => v.get("name").is_some() && !is_tool_definition(v),
        _ => false,
    }
}

/// Every ``` fenced block that parses as JSON and holds calls, in order.
fn fenced_calls(reply: &str) -> Vec<Value> {
    reply
        .split("```")
        .skip(1)
        .step_by(2)
        .filter_map(|block| {
            let body = block
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .trim();
            serde_json::from_str::<Value>(body).ok()
        })
        .filter(holds_calls)
        .collect()
}

/// Every JSON value in the text that holds calls, left to right and not
/// overlapping (at most [`MAX_JSON_STARTS`] places tried).
fn bare_calls(reply: &str) -> Vec<Value> {
    let mut found = Vec::new();
    let mut from = 0;
    for _ in 0..MAX_JSON_STARTS {
        let Some(offset) = reply[from..].find(['[', '{']) else {
            break;
        };
        let start = from + offset;
        let mut stream = serde_json::Deserializer::from_str(&reply[start..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(v)) if holds_calls(&v) => {
                found.push(v);
                from = start + stream.byte_offset();
            }
            _ => from = start + 1,
        }
    }
    found
}

/// Whether `v` is a tool's definition rather than a call to it: models
/// often echo the tools they were given (`<tools>…</tools>`, a JSON list)
/// before calling one. A definition has no `arguments`, and has a
/// `description` or JSON-schema `parameters` (`type` and `properties`).
fn is_tool_definition(v: &Value) -> bool {
    let schema = v
        .get("parameters")
        .is_some_and(|p| p.get("type").is_some() && p.get("properties").is_some());
    v.get("arguments").is_none() && (v.get("description").is_some() || schema)
}

/// JSON equality where numbers compare by value (`5 == 5.0`) and object key
/// order does not matter.
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_equal(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

fn short(v: &Value) -> String {
    let text = match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    };
    if text.chars().count() > 60 {
        format!("{}…", text.chars().take(60).collect::<String>())
    } else {
        text
    }
}

/// Drops arguments whose value is the tool's declared default: passing a
/// default explicitly is the same call as leaving it out.
fn without_defaults(mut call: Call, defaults: &[(String, String, Value)]) -> Call {
    call.arguments.retain(|param, value| {
        !defaults
            .iter()
            .any(|(tool, p, d)| tool == &call.name && p == param && json_equal(d, value))
    });
    call
}

/// Why `got` is not `want` (same function name assumed).
fn difference(got: &Call, want: &Call) -> String {
    for (param, value) in &want.arguments {
        match got.arguments.get(param) {
            None => return format!("'{}' is missing argument '{param}'", want.name),
            Some(v) if !json_equal(v, value) => {
                return format!(
                    "argument '{param}' is {}, expected {}",
                    short(v),
                    short(value)
                )
            }
            _ => {}
        }
    }
    match got
        .arguments
        .keys()
        .find(|k| !want.arguments.contains_key(*k))
    {
        Some(extra) => format!("'{}' has unexpected argument '{extra}'", got.name),
        None => "calls differ".into(),
    }
}

/// Judges predicted calls against expected calls as multisets.
pub fn compare(
    predicted: Vec<Call>,
    expected: Vec<Call>,
    defaults: &[(String, String, Value)],
) -> Verdict {
    let predicted: Vec<Call> = predicted
        .into_iter()
        .map(|c| without_defaults(c, defaults))
        .collect();
    let expected: Vec<Call> = expected
        .into_iter()
        .map(|c| without_defaults(c, defaults))
        .collect();
    if predicted.len() != expected.len() {
        return Verdict::fail(format!(
            "expected {} call(s), got {}",
            expected.len(),
            predicted.len()
        ));
    }
    let same = |a: &Call, b: &Call| {
        a.name == b.name
            && json_equal(
                &Value::Object(a.arguments.clone()),
                &Value::Object(b.arguments.clone()),
            )
    };
    let mut used = vec![false; predicted.len()];
    let mut unmatched = Vec::new();
    for want in &expected {
        match (0..predicted.len()).find(|&i| !used[i] && same(&predicted[i], want)) {
            Some(i) => used[i] = true,
            None => unmatched.push(want),
        }
    }
    let Some(want) = unmatched.first() else {
        return Verdict::pass();
    };
    let leftovers: Vec<&Call> = (0..predicted.len())
        .filter(|&i| !used[i])
        .map(|i| &predicted[i])
        .collect();
    match leftovers.iter().find(|c| c.name == want.name) {
        Some(got) => Verdict::fail(difference(got, want)),
        None => Verdict::fail(format!(
            "expected a call to '{}', got '{}'",
            want.name,
            leftovers.first().map_or("nothing", |c| c.name.as_str())
        )),
    }
}

impl Task for FunctionCalling {
    fn name(&self) -> &'static str {
        "function-calling"
    }

    fn check_record(&self, record: &Value) -> Result<(), String> {
        record
            .get("query")
            .and_then(Value::as_str)
            .ok_or("missing 'query' (a string)")?;
        defaults(record)?;
        expected_calls(record)?;
        Ok(())
    }

    fn user_prompt(&self, record: &Value) -> String {
        let tools = json_field(record, "tools").unwrap_or(Value::Null);
        let query = record.get("query").and_then(Value::as_str).unwrap_or("");
        format!(
            "You have access to the following tools:\n{}\n\nAnswer the request below by calling these tools. Reply with only a JSON list of the calls, like [{{\"name\": \"tool_name\", \"arguments\": {{\"argument\": \"value\"}}}}].\n\nRequest: {query}",
            serde_json::to_string_pretty(&tools).unwrap_or_default()
        )
    }

    fn verify(&self, record: &Value, answer: &str) -> Verdict {
        let (defaults, expected) = match (defaults(record), expected_calls(record)) {
            (Ok(d), Ok(e)) => (d, e),
            (Err(e), _) | (_, Err(e)) => return Verdict::fail(format!("bad record: {e}")),
        };
        match extract_calls(answer) {
            Ok(predicted) => compare(predicted, expected, &defaults),
            Err(reason) => Verdict::fail(reason),
        }
    }

    fn reflection_instruction(&self) -> &'static str {
        "You tried the task above but failed to produce the correct tool call. Reflect on what went wrong and write a short explanation that will help you do better next time."
    }
}
