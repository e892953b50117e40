//! BFCL's AST checker, rule for rule, on JSON calls: the verdict the
//! Berkeley Function Calling Leaderboard gives a Python reply, so that
//! numbers from r3 compare with the leaderboard's. The rules, in the order
//! BFCL applies them (the first that fails is the reason):
//!
//! 1. as many calls as expected; each expected call matched by one call, in
//!    any order;
//! 2. the function's name;
//! 3. every required argument present;
//! 4. no argument the function or the answer does not know;
//! 5. each argument of its declared type (an int is taken for a float;
//!    array items checked one level deep); a value of the answer's own type
//!    where that differs from the declared one ("a variable") is compared
//!    as it is;
//! 6. the value among the acceptable ones: strings after standardisation,
//!    lists and dicts element by element;
//! 7. an expected argument may be left out only where `""` is acceptable.

use serde_json::{Map, Number, Value};

use crate::function_calling::Call;

/// A tool's declared parameters, as BFCL's `function` entries give them.
#[derive(Debug, Clone)]
pub struct Signature {
    pub name: String,
    pub properties: Map<String, Value>,
    pub required: Vec<String>,
}

/// One expected call: the function and, per argument, the acceptable values.
#[derive(Debug, Clone)]
pub struct ExpectedCall {
    pub name: String,
    pub arguments: Map<String, Value>,
}

/// A JSON value's type as Python sees the parsed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PyType {
    Str,
    Int,
    Float,
    Bool,
    List,
    Dict,
    None,
}

impl PyType {
    fn of(value: &Value) -> Self {
        match value {
            Value::String(_) => Self::Str,
            Value::Number(n) if n.is_f64() => Self::Float,
            Value::Number(_) => Self::Int,
            Value::Bool(_) => Self::Bool,
            Value::Array(_) => Self::List,
            Value::Object(_) => Self::Dict,
            Value::Null => Self::None,
        }
    }

    /// The Python type of a declared BFCL type name; `None` if unknown.
    pub fn declared(name: &str) -> Option<Self> {
        Some(match name {
            "string" | "any" => Self::Str,
            "integer" => Self::Int,
            "float" => Self::Float,
            "boolean" => Self::Bool,
            "array" | "tuple" => Self::List,
            "dict" => Self::Dict,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Str => "str",
            Self::Int => "int",
            Self::Float => "float",
            Self::Bool => "bool",
            Self::List => "list",
            Self::Dict => "dict",
            Self::None => "None",
        }
    }
}

/// Judges `calls` against the expected ones.
pub fn check(
    signatures: &[Signature],
    calls: &[Call],
    expected: &[ExpectedCall],
) -> Result<(), String> {
    if calls.len() != expected.len() {
        return Err(format!(
            "expected {} call(s), got {}",
            expected.len(),
            calls.len()
        ));
    }
    let mut used = vec![false; calls.len()];
    for want in expected {
        let Some(signature) = signatures.iter().find(|s| s.name == want.name) else {
            return Err(format!("bad record: no tool named '{}'", want.name));
        };
        let mut errors = Vec::new();
        let matched = (0..calls.len()).filter(|&i| !used[i]).find(|&i| {
            match check_call(signature, &calls[i], want) {
                Ok(()) => true,
                Err(e) => {
                    errors.push((calls[i].name == want.name, e));
                    false
                }
            }
        });
        match matched {
            Some(i) => used[i] = true,
            // The most telling reason: a call to the right function, if any.
            None => {
                let (_, reason) = errors
                    .iter()
                    .find(|(same_name, _)| *same_name)
                    .or(errors.first())
                    .cloned()
                    .unwrap_or_default();
                return Err(reason);
            }
        }
    }
    Ok(())
}

/// One call against one expected call (BFCL's `simple_function_checker`).
fn check_call(signature: &Signature, call: &Call, want: &ExpectedCall) -> Result<(), String> {
    if call.name != want.name {
        return Err(format!(
            "expected a call to '{}', got '{}'",
            want.name, call.name
        ));
    }
    if let Some(missing) = signature
        .required
        .iter()
        .find(|p| !call.arguments.contains_key(*p))
    {
        return Err(format!(
            "'{}' is missing required argument '{missing}'",
            call.name
        ));
    }
    for (param, value) in &call.arguments {
        let (Some(spec), Some(acceptable)) =
            (signature.properties.get(param), want.arguments.get(param))
        else {
            return Err(format!("'{}' has unexpected argument '{param}'", call.name));
        };
        let acceptable = acceptable.as_array().map(Vec::as_slice).unwrap_or_default();
        check_argument(param, value, spec, acceptable)?;
    }
    for (param, acceptable) in &want.arguments {
        let optional = acceptable
            .as_array()
            .is_some_and(|a| a.iter().any(is_empty_string));
        if !call.arguments.contains_key(param) && !optional {
            return Err(format!(
                "'{}' is missing argument '{param}', which is not optional",
                call.name
            ));
        }
    }
    Ok(())
}

fn check_argument(
    param: &str,
    value: &Value,
    spec: &Value,
    acceptable: &[Value],
) -> Result<(), String> {
    let type_name = spec.get("type").and_then(Value::as_str).unwrap_or_default();
    let declared = PyType::declared(type_name)
        .ok_or_else(|| format!("bad record: '{param}' has unknown type '{type_name}'"))?;
    let nested = match declared {
        PyType::List => spec
            .pointer("/items/type")
            .and_then(Value::as_str)
            .and_then(PyType::declared),
        _ => None,
    };
    // Python converts an int to a float where a float is declared.
    let converted;
    let value = match (type_name, value) {
        ("float", Value::Number(n)) if !n.is_f64() => {
            converted = n
                .as_f64()
                .and_then(Number::from_f64)
                .map(Value::Number)
                .unwrap_or(Value::Null);
            &converted
        }
        _ => value,
    };
    let is_variable = type_check(param, value, acceptable, declared, type_name, nested)?;
    if !is_variable {
        let checked = match (declared, value) {
            (PyType::Dict, Value::Object(map)) => Some(dict_check(map, acceptable)),
            (PyType::List, Value::Array(items)) if nested == Some(PyType::Dict) => {
                Some(list_of_dicts_check(items, acceptable))
            }
            (PyType::Str, Value::String(s)) => Some(string_check(s, acceptable)),
            (PyType::List, Value::Array(items)) => Some(list_check(items, acceptable)),
            _ => None,
        };
        if let Some(ok) = checked {
            return ok
                .then_some(())
                .ok_or_else(|| invalid_value(param, value, acceptable));
        }
    }
    if acceptable.iter().any(|a| py_eq(value, a)) {
        Ok(())
    } else {
        Err(invalid_value(param, value, acceptable))
    }
}

fn invalid_value(param: &str, value: &Value, acceptable: &[Value]) -> String {
    format!(
        "argument '{param}' is {}, expected one of {}",
        short(value),
        short(&Value::Array(acceptable.to_vec()))
    )
}

/// BFCL's `type_checker`: `Ok(is_variable)` when the type is acceptable.
fn type_check(
    param: &str,
    value: &Value,
    acceptable: &[Value],
    declared: PyType,
    type_name: &str,
    nested: Option<PyType>,
) -> Result<bool, String> {
    let answer_type = acceptable
        .iter()
        .find(|a| !is_empty_string(a))
        .map(PyType::of);
    let is_variable = answer_type.is_some_and(|t| t != declared);
    let actual = PyType::of(value);
    if actual == declared {
        let Some(inner) = nested else {
            return Ok(is_variable);
        };
        let items = value.as_array().map(Vec::as_slice).unwrap_or_default();
        // Each item typed as declared, against at least one acceptable list.
        let fits = acceptable.iter().any(|answer| match answer {
            Value::Array(answer_items) => items.iter().all(|item| {
                type_check(param, item, answer_items, inner, inner.name(), None).is_ok()
            }),
            _ => true,
        });
        if fits {
            return Ok(is_variable);
        }
        return Err(format!(
            "argument '{param}' should be a {type_name} of {} items, got {}",
            inner.name(),
            short(value)
        ));
    }
    if answer_type == Some(actual) {
        return Ok(true);
    }
    Err(format!(
        "argument '{param}' should be of type {type_name}, got {} {}",
        actual.name(),
        short(value)
    ))
}

/// BFCL's string standardisation: no spaces or `,./-_*^`, lower case,
/// single quotes as double quotes.
pub fn standardize(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | ',' | '.' | '/' | '-' | '_' | '*' | '^'))
        .collect::<String>()
        .to_lowercase()
        .replace('\'', "\"")
}

fn standardized(value: &Value) -> Value {
    match value {
        Value::String(s) => Value::String(standardize(s)),
        other => other.clone(),
    }
}

fn string_check(value: &str, acceptable: &[Value]) -> bool {
    let value = standardize(value);
    acceptable
        .iter()
        .any(|a| a.as_str().is_some_and(|a| standardize(a) == value))
}

/// A list whose string items are standardised equals an acceptable list.
fn list_check(items: &[Value], acceptable: &[Value]) -> bool {
    let items: Vec<Value> = items.iter().map(standardized).collect();
    acceptable.iter().any(|answer| {
        let answer: Vec<Value> = as_list(answer).iter().map(standardized).collect();
        py_eq_lists(&items, &answer)
    })
}

/// A dict matches an acceptable one key by key (BFCL's `dict_checker`).
fn dict_check(map: &Map<String, Value>, acceptable: &[Value]) -> bool {
    acceptable
        .iter()
        .filter(|a| !is_empty_string(a))
        .any(|answer| {
            let Some(answer) = answer.as_object() else {
                return false;
            };
            let values_fit = map.iter().all(|(key, value)| {
                answer.get(key).is_some_and(|allowed| {
                    let value = standardized(value);
                    as_list(allowed)
                        .iter()
                        .any(|a| py_eq(&value, &standardized(a)))
                })
            });
            let keys_present = answer.iter().all(|(key, allowed)| {
                map.contains_key(key) || as_list(allowed).iter().any(is_empty_string)
            });
            values_fit && keys_present
        })
}

/// A list of dicts matches an acceptable list dict by dict, in order.
fn list_of_dicts_check(items: &[Value], acceptable: &[Value]) -> bool {
    acceptable.iter().any(|answer| {
        let answer = as_list(answer);
        answer.len() == items.len()
            && items
                .iter()
                .zip(answer)
                .all(|(item, want)| match item.as_object() {
                    Some(map) => dict_check(map, std::slice::from_ref(want)),
                    None => false,
                })
    })
}

/// An acceptable value read as a list: `""` (optional) is the empty list,
/// as Python's `len("")` makes it.
fn as_list(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        _ => &[],
    }
}

fn is_empty_string(value: &Value) -> bool {
    value.as_str() == Some("")
}

/// Python's `==` on parsed JSON: numbers by value (`5 == 5.0`, `True == 1`),
/// lists item by item, dicts key by key.
pub fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Array(x), Value::Array(y)) => py_eq_lists(x, y),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| py_eq(v, w)))
        }
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Null, Value::Null) => true,
        _ => match (numeric(a), numeric(b)) {
            (Some(Numeric::Int(x)), Some(Numeric::Int(y))) => x == y,
            (Some(x), Some(y)) => x.as_f64() == y.as_f64(),
            _ => false,
        },
    }
}

fn py_eq_lists(x: &[Value], y: &[Value]) -> bool {
    x.len() == y.len() && x.iter().zip(y).all(|(a, b)| py_eq(a, b))
}

#[derive(Clone, Copy)]
enum Numeric {
    Int(i128),
    Float(f64),
}

impl Numeric {
    fn as_f64(self) -> f64 {
        match self {
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }
}

fn numeric(value: &Value) -> Option<Numeric> {
    match value {
        Value::Bool(b) => Some(Numeric::Int(*b as i128)),
        Value::Number(n) => n
            .as_i64()
            .map(|i| Numeric::Int(i as i128))
            .or_else(|| n.as_u64().map(|u| Numeric::Int(u as i128)))
            .or_else(|| n.as_f64().map(Numeric::Float)),
        _ => None,
    }
}

fn short(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 80 {
        format!("{}…", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}
