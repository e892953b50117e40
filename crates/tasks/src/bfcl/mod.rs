//! The Berkeley Function Calling Leaderboard's records, read as they are
//! (`id`, `question`, `function`, `ground_truth`; `data/bfcl`),
//! judged by BFCL's AST checker ([`checker`]). Replies are read as
//! `--task function-calling` reads them: bare JSON, a code fence or
//! `<tool_call>` tags holding `{"name", "arguments"}` objects.

pub mod checker;

use serde_json::{json, Map, Value};

use crate::function_calling::extract_calls;
use crate::{Task, Verdict};
use checker::{ExpectedCall, PyType, Signature};

pub struct Bfcl;

/// A record's tools and expected calls, checked once.
struct Parsed {
    signatures: Vec<Signature>,
    expected: Vec<ExpectedCall>,
}

fn parse(record: &Value) -> Result<Parsed, String> {
    let functions = record
        .get("function")
        .and_then(Value::as_array)
        .ok_or("missing 'function' (a list of tools)")?;
    let signatures = functions
        .iter()
        .map(signature)
        .collect::<Result<Vec<_>, _>>()?;
    let truth = record
        .get("ground_truth")
        .and_then(Value::as_array)
        .ok_or("missing 'ground_truth' (a list of expected calls)")?;
    let expected = truth
        .iter()
        .map(|call| {
            let object = call.as_object().filter(|o| o.len() == 1).ok_or_else(|| {
                format!("a 'ground_truth' entry is not {{\"function\": {{...}}}}: {call}")
            })?;
            let (name, arguments) = object.iter().next().expect("one entry");
            let arguments = arguments.as_object().ok_or_else(|| {
                format!("the arguments of '{name}' in 'ground_truth' are not an object")
            })?;
            if let Some((param, _)) = arguments.iter().find(|(_, v)| !v.is_array()) {
                return Err(format!(
                    "'ground_truth' of '{name}': '{param}' is not a list of acceptable values"
                ));
            }
            if !signatures.iter().any(|s| &s.name == name) {
                return Err(format!(
                    "'ground_truth' calls '{name}', which is not among the tools"
                ));
            }
            Ok(ExpectedCall {
                name: name.clone(),
                arguments: arguments.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Parsed {
        signatures,
        expected,
    })
}

fn signature(tool: &Value) -> Result<Signature, String> {
    let name = tool
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a tool has no 'name'")?;
    let parameters = tool
        .get("parameters")
        .ok_or_else(|| format!("tool '{name}' has no 'parameters'"))?;
    // Absent means no parameters; anything but an object (`[]`) is a record
    // that no answer could pass.
    let properties = match parameters.get("properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p.clone(),
        Some(other) => {
            return Err(format!(
                "tool '{name}': 'properties' must be an object of parameters, not {other}"
            ))
        }
    };
    for (param, spec) in &properties {
        let declared = spec.get("type").and_then(Value::as_str).unwrap_or_default();
        if PyType::declared(declared).is_none() {
            return Err(format!(
                "tool '{name}': parameter '{param}' has unknown type '{declared}'"
            ));
        }
    }
    let required = match parameters.get("required") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("tool '{name}': 'required' is not a list of names"))?,
        Some(_) => return Err(format!("tool '{name}': 'required' is not a list")),
    };
    if let Some(undeclared) = required.iter().find(|p| !properties.contains_key(*p)) {
        return Err(format!(
            "tool '{name}': required parameter '{undeclared}' is not among its properties, so no call could pass"
        ));
    }
    Ok(Signature {
        name: name.to_string(),
        properties,
        required,
    })
}

/// The question: the user messages of the record's one turn.
fn question(record: &Value) -> Result<String, String> {
    let turns = record
        .get("question")
        .and_then(Value::as_array)
        .ok_or("missing 'question' (a list of turns)")?;
    let [turn] = turns.as_slice() else {
        return Err(format!(
            "'question' has {} turns; only single-turn categories are supported",
            turns.len()
        ));
    };
    let messages = turn
        .as_array()
        .ok_or("a 'question' turn is not a list of messages")?;
    let texts: Vec<&str> = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| {
            m.get("content")
                .and_then(Value::as_str)
                .ok_or("a message has no 'content'")
        })
        .collect::<Result<_, _>>()?;
    if texts.is_empty() {
        return Err("'question' has no user message".into());
    }
    Ok(texts.join("\n"))
}

/// BFCL's type names as JSON Schema names, the form chat templates and
/// tool-calling models know ("dict" → "object", "float" → "number").
fn json_schema(spec: &Value) -> Value {
    match spec {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| {
                    let value = match (key.as_str(), value.as_str()) {
                        ("type", Some(name)) => Value::String(
                            match name {
                                "dict" => "object",
                                "float" => "number",
                                "tuple" => "array",
                                "any" => "string",
                                other => other,
                            }
                            .to_string(),
                        ),
                        _ => json_schema(value),
                    };
                    (key.clone(), value)
                })
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(json_schema).collect()),
        other => other.clone(),
    }
}

impl Task for Bfcl {
    fn name(&self) -> &'static str {
        "bfcl"
    }

    fn check_record(&self, record: &Value) -> Result<(), String> {
        question(record)?;
        parse(record)?;
        Ok(())
    }

    fn user_prompt(&self, record: &Value) -> String {
        question(record).unwrap_or_default()
    }

    fn tools(&self, record: &Value) -> Option<Value> {
        let functions = record.get("function")?.as_array()?;
        Some(Value::Array(
            functions
                .iter()
                .map(|f| json!({"type": "function", "function": json_schema(f)}))
                .collect(),
        ))
    }

    fn verify(&self, record: &Value, answer: &str) -> Verdict {
        let parsed = match parse(record) {
            Ok(parsed) => parsed,
            Err(e) => return Verdict::fail(format!("bad record: {e}")),
        };
        let calls = match extract_calls(answer) {
            Ok(calls) => calls,
            Err(reason) => return Verdict::fail(reason),
        };
        match checker::check(&parsed.signatures, &calls, &parsed.expected) {
            Ok(()) => Verdict::pass(),
            Err(reason) => Verdict::fail(reason),
        }
    }

    fn reflection_instruction(&self) -> &'static str {
        "You tried the task above but failed to produce the correct tool call. Reflect on what went wrong and write a short explanation that will help you do better next time."
    }
}
