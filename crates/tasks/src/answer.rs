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
    /// The reply's number equals the answer's exactly (or within the
    /// record's `tolerance`).
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
        None if Number::parse(answer.trim()).is_some() => Match::Numeric,
        None => Match::Normalized,
    };
    if mode == Match::Numeric && Number::parse(answer.trim()).is_none() {
        return Err(format!("answer '{answer}' is not a number"));
    }
    if let Some(t) = record.get("tolerance") {
        if mode != Match::Numeric || !t.as_f64().is_some_and(|t| t >= 0.0) {
            return Err(format!(
                "'tolerance' is {t}: it must be a non-negative number, for numeric answers"
            ));
        }
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

/// A number as written in decimal, compared exactly at any length: its
/// sign, integer digits without leading zeros and fraction digits without
/// trailing zeros. "1,000.50" and "1000.5" are one number; 123456789100
/// and 123456789012 are two (an f64 with a relative tolerance took them for
/// one, and could not hold a 400-digit answer at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Number {
    negative: bool,
    integer: String,
    fraction: String,
}

impl Number {
    /// A number written with optional sign, thousands commas and decimals.
    pub fn parse(text: &str) -> Option<Self> {
        let cleaned: String = text.chars().filter(|&c| c != ',').collect();
        let cleaned = cleaned.strip_suffix('.').unwrap_or(&cleaned);
        let (negative, unsigned) = match cleaned.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, cleaned),
        };
        let (integer, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if integer.len() + fraction.len() == 0 || !digits(integer) || !digits(fraction) {
            return None;
        }
        let integer = integer.trim_start_matches('0');
        let fraction = fraction.trim_end_matches('0');
        let zero = integer.is_empty() && fraction.is_empty();
        Some(Self {
            negative: negative && !zero,
            integer: if integer.is_empty() { "0" } else { integer }.to_string(),
            fraction: fraction.to_string(),
        })
    }

    /// The nearest f64, for records that ask for a tolerance.
    pub fn to_f64(&self) -> f64 {
        self.to_string().parse().unwrap_or(f64::NAN)
    }
}

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.negative { "-" } else { "" };
        match self.fraction.is_empty() {
            true => write!(f, "{sign}{}", self.integer),
            false => write!(f, "{sign}{}.{}", self.integer, self.fraction),
        }
    }
}

/// Every number in the text, in order.
pub fn numbers_in(text: &str) -> Vec<Number> {
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
        if let Some(n) = Number::parse(&text[start..i]) {
            out.push(n);
        }
    }
    out
}

/// The reply's answer number: after the last `####`, else its last number.
pub fn reply_number(reply: &str) -> Option<Number> {
    let tail = match reply.rfind("####") {
        Some(i) => &reply[i + 4..],
        None => reply,
    };
    let numbers = numbers_in(tail);
    match reply.rfind("####") {
        Some(_) => numbers.into_iter().next(),
        None => numbers.into_iter().last(),
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
                let Some(want) = Number::parse(answer.trim()) else {
                    return Verdict::fail(format!("bad record: answer '{answer}' is not a number"));
                };
                // Exact, unless the record allows an absolute tolerance.
                let tolerance = record.get("tolerance").and_then(Value::as_f64);
                match reply_number(reply) {
                    None => return Verdict::fail("no number in the reply"),
                    Some(got) if got == want => true,
                    Some(got)
                        if tolerance.is_some_and(|t| (got.to_f64() - want.to_f64()).abs() <= t) =>
                    {
                        true
                    }
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
