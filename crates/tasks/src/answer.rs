//! Plain answers: `{"prompt": .., "answer": ..}` records judged by exact,
//! normalised or numeric match. Numeric answers follow GSM8K's `#### 42`
//! convention and fall back to the last number in the reply.

use serde_json::Value;

use crate::{Task, Verdict};

pub struct PlainAnswer;

/// How a reply is compared with the expected answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// The trimmed reply equals the answer.
    Exact,
    /// Equal after lower-casing, dropping punctuation and collapsing spaces.
    Normalized,
    /// The reply's number equals the answer's.
    Numeric,
}

fn expected(record: &Value) -> Result<(String, Match), String> {
    let answer = match record.get("answer") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return Err("missing 'answer' (a string or number)".into()),
    };
    let mode = match record.get("match").and_then(Value::as_str) {
        Some("exact") => Match::Exact,
        Some("normalized") => Match::Normalized,
        Some("numeric") => Match::Numeric,
        Some(other) => {
            return Err(format!(
                "'match' is '{other}' (exact, normalized or numeric)"
            ))
        }
        None if parse_number(answer.trim()).is_some() => Match::Numeric,
        None => Match::Normalized,
    };
    if mode == Match::Numeric && parse_number(answer.trim()).is_none() {
        return Err(format!("answer '{answer}' is not a number"));
    }
    Ok((answer, mode))
}

/// Lower case, punctuation removed, whitespace collapsed.
pub fn normalize(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_ascii_punctuation())
        .flat_map(char::to_lowercase)
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A number written with optional sign, thousands commas and decimals.
fn parse_number(text: &str) -> Option<f64> {
    let cleaned: String = text.chars().filter(|&c| c != ',').collect();
    let cleaned = cleaned.strip_suffix('.').unwrap_or(&cleaned);
    if cleaned.is_empty() || !cleaned.chars().any(|c| c.is_ascii_digit()) {
        return None;
    }
    if !cleaned
        .chars()
        .enumerate()
        .all(|(i, c)| c.is_ascii_digit() || c == '.' || (c == '-' && i == 0))
    {
        return None;
    }
    cleaned.parse().ok()
}

/// Every number in the text, in order.
pub fn numbers_in(text: &str) -> Vec<f64> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts_number = bytes[i].is_ascii_digit()
            || (bytes[i] == b'-'
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
                && (i == 0 || !bytes[i - 1].is_ascii_alphanumeric()));
        if !starts_number {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        while i < bytes.len() {
            let b = bytes[i];
            let grouped =
                (b == b',' || b == b'.') && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
            if b.is_ascii_digit() || grouped {
                i += 1;
            } else {
                break;
            }
        }
        if let Some(n) = parse_number(&text[start..i]) {
            out.push(n);
        }
    }
    out
}

/// The reply's answer number: after the last `####`, else its last number.
pub fn reply_number(reply: &str) -> Option<f64> {
    let tail = match reply.rfind("####") {
        Some(i) => &reply[i + 4..],
        None => reply,
    };
    let numbers = numbers_in(tail);
    match reply.rfind("####") {
        Some(_) => numbers.first().copied(),
        None => numbers.last().copied(),
    }
}

impl Task for PlainAnswer {
    fn name(&self) -> &'static str {
        "answer"
    }

    fn check_record(&self, record: &Value) -> Result<(), String> {
        crate::records::prompt_field(record)?;
        expected(record).map(|_| ())
    }

    fn user_prompt(&self, record: &Value) -> String {
        crate::records::prompt_field(record)
            .unwrap_or_default()
            .to_string()
    }

    fn verify(&self, record: &Value, reply: &str) -> Verdict {
        let (answer, mode) = match expected(record) {
            Ok(x) => x,
            Err(e) => return Verdict::fail(format!("bad record: {e}")),
        };
        let ok = match mode {
            Match::Exact => reply.trim() == answer.trim(),
            Match::Normalized => normalize(reply) == normalize(&answer),
            Match::Numeric => {
                let want = parse_number(answer.trim()).expect("checked in expected()");
                match reply_number(reply) {
                    None => return Verdict::fail("no number in the reply"),
                    Some(got) if (got - want).abs() <= 1e-9 * want.abs().max(1.0) => true,
                    Some(got) => return Verdict::fail(format!("answered {got}, expected {want}")),
                }
            }
        };
        if ok {
            Verdict::pass()
        } else {
            let shown: String = reply.trim().chars().take(60).collect();
            Verdict::fail(format!("answered '{shown}', expected '{}'", answer.trim()))
        }
    }
}
