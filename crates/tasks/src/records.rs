//! Task records from JSONL files, streamed line by line so that a 60k-line
//! file is never read into one string.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::Value;

use crate::{Task, TaskError};

/// One record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line in the file.
    pub line: usize,
    pub value: Value,
}

/// What reading a file found: the records, and how many bad lines were
/// skipped (only with `skip_invalid`).
#[derive(Debug)]
pub struct Records {
    pub records: Vec<Record>,
    pub skipped: usize,
}

/// Calls `each(line_number, line)` for every non-blank line of the JSONL
/// file `path` (1-based numbers), the line being its text or why it is not
/// text (not UTF-8): the one JSONL reader, streaming so that a 60k-line
/// file is never held whole. Stops at `each`'s first error.
pub fn for_each_jsonl_line<E: From<TaskError>>(
    path: &Path,
    mut each: impl FnMut(usize, Result<&str, String>) -> Result<(), E>,
) -> Result<(), E> {
    let io = |source| TaskError::Io {
        path: path.display().to_string(),
        cause: source,
    };
    let reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
    // Lines as bytes, so that one that is not UTF-8 is a bad line with its
    // number rather than an I/O error about the whole file.
    for (index, line) in reader.split(b'\n').enumerate() {
        let bytes = line.map_err(io)?;
        let text = std::str::from_utf8(&bytes).map_err(|e| format!("not UTF-8: {e}"));
        if text.as_ref().is_ok_and(|t| t.trim().is_empty()) {
            continue;
        }
        each(index + 1, text)?;
    }
    Ok(())
}

/// Reads every non-blank line of `path` as a JSON object the task accepts.
/// A bad line is an error naming the file and line, or, with
/// `skip_invalid`, is skipped and counted.
pub fn read_records(path: &Path, task: &dyn Task, skip_invalid: bool) -> crate::Result<Records> {
    let mut records = Vec::new();
    let mut skipped = 0;
    for_each_jsonl_line(path, |line, text| {
        let checked = text
            .and_then(|t| {
                serde_json::from_str::<Value>(t).map_err(|e| format!("invalid JSON: {e}"))
            })
            .and_then(|value| match value.is_object() {
                true => Ok(value),
                false => Err("expected a JSON object".to_string()),
            })
            .and_then(|value| task.check_record(&value).map(|_| value));
        match checked {
            Ok(value) => records.push(Record { line, value }),
            Err(_) if skip_invalid => skipped += 1,
            Err(message) => {
                return Err(TaskError::Record {
                    path: path.display().to_string(),
                    line,
                    message,
                })
            }
        }
        Ok(())
    })?;
    Ok(Records { records, skipped })
}

/// The `prompt` string of a plain record (answer tasks, external verifiers).
pub fn prompt_field(record: &Value) -> Result<&str, String> {
    record
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing 'prompt' (a string)".to_string())
}
