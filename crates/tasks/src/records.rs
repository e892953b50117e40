//! Task records from JSONL files, streamed line by line so that a 60k-line
//! file is never read into one string; from a JSON array of records (as
//! xLAM ships its 60k), streamed element by element; or from a parquet file
//! (TinyZero's Countdown, HF datasets' cache), streamed row by row.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde_json::Value;

use crate::{Task, TaskError};

/// One record and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line in a JSONL file, or element of a JSON array.
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

/// Reads the records of `path` that the task accepts: a parquet file (a
/// `.parquet` name), a JSONL file (one object a line), or a JSON array of
/// objects (a file whose first character is `[`). A bad record is an error
/// naming the file and its line, element or row, or, with `skip_invalid`,
/// is skipped and counted.
pub fn read_records(path: &Path, task: &dyn Task, skip_invalid: bool) -> crate::Result<Records> {
    let mut records = Vec::new();
    let mut skipped = 0;
    let mut take = |line: usize, text: Result<Value, String>| -> crate::Result<()> {
        let checked = text
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
    };
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
    {
        for_each_parquet_row(path, |row, value| take(row, Ok(value)))?;
    } else if starts_with_bracket(path)? {
        for_each_array_element(path, |element, value| take(element, Ok(value)))?;
    } else {
        for_each_jsonl_line(path, |line, text| {
            let value = text.and_then(|t| {
                serde_json::from_str::<Value>(t).map_err(|e| format!("invalid JSON: {e}"))
            });
            take(line, value)
        })?;
    }
    Ok(Records { records, skipped })
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> TaskError + '_ {
    move |source| TaskError::Io {
        path: path.display().to_string(),
        cause: source,
    }
}

/// Whether the file's first non-blank byte is `[`: a JSON array.
fn starts_with_bracket(path: &Path) -> crate::Result<bool> {
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    for byte in BufReader::new(file).bytes() {
        match byte.map_err(io_error(path))? {
            b' ' | b'\t' | b'\r' | b'\n' => continue,
            first => return Ok(first == b'['),
        }
    }
    Ok(false)
}

/// Calls `each(row, value)` for every row of the parquet file `path`
/// (1-based), each as a JSON object keyed by column (lists as arrays), read
/// a row group at a time so that the file is never held whole.
pub fn for_each_parquet_row(
    path: &Path,
    mut each: impl FnMut(usize, Value) -> crate::Result<()>,
) -> crate::Result<()> {
    use parquet::file::reader::SerializedFileReader;
    let invalid = |row: usize, e: parquet::errors::ParquetError| TaskError::Record {
        path: path.display().to_string(),
        line: row,
        message: format!("not a parquet file r3 can read: {e}"),
    };
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let reader = SerializedFileReader::new(file).map_err(|e| invalid(0, e))?;
    for (index, row) in reader.into_iter().enumerate() {
        let row = row.map_err(|e| invalid(index + 1, e))?;
        each(index + 1, row.to_json_value())?;
    }
    Ok(())
}

/// Calls `each(element, value)` for every element of the JSON array in
/// `path` (1-based), deserialising one element at a time so that the array
/// is never held whole. Malformed JSON is an error naming the element it
/// stopped in; `each`'s first error stops the walk.
pub fn for_each_array_element(
    path: &Path,
    each: impl FnMut(usize, Value) -> crate::Result<()>,
) -> crate::Result<()> {
    struct Elements<F> {
        each: F,
        done: usize,
        failed: Option<TaskError>,
    }
    impl<'de, F: FnMut(usize, Value) -> crate::Result<()>> Visitor<'de> for &mut Elements<F> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of records")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(value) = seq.next_element::<Value>()? {
                self.done += 1;
                if let Err(e) = (self.each)(self.done, value) {
                    self.failed = Some(e);
                    return Ok(());
                }
            }
            Ok(())
        }
    }
    let file = std::fs::File::open(path).map_err(io_error(path))?;
    let mut reader = serde_json::Deserializer::from_reader(BufReader::new(file));
    let mut elements = Elements {
        each,
        done: 0,
        failed: None,
    };
    let walked = (&mut reader).deserialize_seq(&mut elements);
    if let Some(failed) = elements.failed {
        return Err(failed);
    }
    walked
        .and_then(|_| reader.end())
        .map_err(|e| TaskError::Record {
            path: path.display().to_string(),
            line: elements.done + 1,
            message: format!(
                "invalid JSON in the array (element {}): {e}",
                elements.done + 1
            ),
        })
}

/// The `prompt` string of a plain record (answer tasks, external verifiers).
pub fn prompt_field(record: &Value) -> Result<&str, String> {
    record
        .get("prompt")
        .and_then(Value::as_str)
        .ok_or_else(|| "missing 'prompt' (a string)".to_string())
}
