//! r3's artifacts read back, typed (a renamed or missing field is an error
//! naming the file and line, never a silent 0), and the paper's four
//! columns: two evaluations of the same records side by side, with
//! intervals and the paired test.

use std::collections::BTreeMap;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::eval::{EvalSummary, Transcript, SUMMARY_FILE, TRANSCRIPTS_FILE};
use crate::stats::{mcnemar_exact, Proportion};
use crate::{LoopError, Result};

/// A JSON artifact read as the type that wrote it: a missing or renamed
/// field is an error naming the file, never a silent 0.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|cause| LoopError::Io {
        path: path.to_path_buf(),
        cause,
    })?;
    serde_json::from_str(&text).map_err(|e| not_ours(path, None, e))
}

/// An artifact that does not parse as what r3 writes, with where.
fn not_ours(path: &Path, line: Option<usize>, why: impl std::fmt::Display) -> LoopError {
    let at = line.map(|l| format!(":{l}")).unwrap_or_default();
    LoopError::Invalid(format!(
        "{}{at}: not what r3 writes ({why})",
        path.display()
    ))
}

/// The rows of a JSON-lines artifact, typed, each error naming `file:line`
/// (read by the project's one JSONL reader, streaming).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    r3_tasks::records::for_each_jsonl_line(path, |line, text| -> Result<()> {
        let text = text.map_err(|e| not_ours(path, Some(line), e))?;
        rows.push(serde_json::from_str(text).map_err(|e| not_ours(path, Some(line), e))?);
        Ok(())
    })?;
    Ok(rows)
}

/// Markdown comparing two evaluations of the same records: each column's
/// accuracy with its 95% interval, and for each row the exact McNemar test
/// on the records where exactly one of the two succeeded.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let (sa, sb): (EvalSummary, EvalSummary) = (
        read_json(&a.join(SUMMARY_FILE))?,
        read_json(&b.join(SUMMARY_FILE))?,
    );
    let (ta, tb) = (outcomes(a)?, outcomes(b)?);
    if ta.keys().ne(tb.keys()) {
        return Err(LoopError::Invalid(format!(
            "{} and {} evaluated different records: a paired comparison needs the same data",
            a.display(),
            b.display()
        )));
    }
    let cell = |p: &Proportion| {
        format!(
            "{:.1}% ({}/{}) [{:.1}, {:.1}]",
            p.accuracy * 100.0,
            p.correct,
            p.n,
            p.low * 100.0,
            p.high * 100.0
        )
    };
    let mut out = format!(
        "| | {} | {} | only A / only B | McNemar p |\n|---|---|---|---|---|\n",
        a.display(),
        b.display()
    );
    for (label, (pa, pb), pick) in [
        ("first try", (&sa.first_try, &sb.first_try), 0usize),
        ("second try", (&sa.second_try, &sb.second_try), 1),
    ] {
        let only_a = ta.iter().filter(|(l, o)| o[pick] && !tb[l][pick]).count();
        let only_b = tb.iter().filter(|(l, o)| o[pick] && !ta[l][pick]).count();
        let p = mcnemar_exact(only_a, only_b);
        let p = if p < 1e-3 {
            format!("{p:.1e}")
        } else {
            format!("{p:.3}")
        };
        out.push_str(&format!(
            "| {label} | {} | {} | {only_a} / {only_b} | {p} |\n",
            cell(pa),
            cell(pb),
        ));
    }
    out.push_str(&format!(
        "| fixed by the retry | {} | {} | | |\n",
        sa.fixed_by_retry, sb.fixed_by_retry
    ));
    Ok(out)
}

/// Per record line of an eval's transcripts: [first try, second try] succeeded.
fn outcomes(dir: &Path) -> Result<BTreeMap<u64, [bool; 2]>> {
    let rows: Vec<Transcript> = read_jsonl(&dir.join(TRANSCRIPTS_FILE))?;
    Ok(rows
        .iter()
        .map(|t| {
            let first = t.attempt.verdict.success;
            let retried = t.retry.as_ref().is_some_and(|r| r.verdict.success);
            (t.line as u64, [first, first || retried])
        })
        .collect())
}
