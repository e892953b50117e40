//! `r3 mine`: the dataset of failures. Each record gets K sampled first
//! attempts; records the model fails on are kept with one failed attempt
//! (its sampled ids, for token-in/token-out training) and the failure rate.
//! Resumable: a state file records the next record index.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use r3_generate::SamplingParams;
use r3_tasks::Record;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rollout::Rollouts;
use crate::{LoopError, Result};

/// One line of `failures.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinedFailure {
    /// Index of the record among the data's records.
    pub index: usize,
    pub record: Value,
    /// The first failed attempt's text, ids and verdict reason.
    pub attempt: String,
    pub attempt_tokens: Vec<u32>,
    pub reason: String,
    pub samples: usize,
    pub failures: usize,
    pub failure_rate: f64,
}

#[derive(Serialize, Deserialize)]
struct MineState {
    next_index: usize,
}

/// Counts of a mining run.
#[derive(Debug, Clone, Serialize)]
pub struct MineSummary {
    pub records_done: usize,
    pub failures_kept: usize,
    pub resumed_from: usize,
}

fn state_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

fn io_err(path: &Path, e: std::io::Error) -> LoopError {
    LoopError::Invalid(format!("{}: {e}", path.display()))
}

/// Reads a failures file (as written by [`mine`]).
pub fn read_failures(path: &Path) -> Result<Vec<MinedFailure>> {
    let file = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| io_err(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let failure = serde_json::from_str(&line).map_err(|e| {
            LoopError::Invalid(format!(
                "{}:{}: not a mined failure: {e}",
                path.display(),
                i + 1
            ))
        })?;
        out.push(failure);
    }
    Ok(out)
}

/// Mines `records` into `out`, `samples` attempts each, continuing where a
/// previous run on the same `out` stopped.
pub fn mine(
    rollouts: &Rollouts<'_>,
    records: &[Record],
    samples: usize,
    params: &SamplingParams,
    out: &Path,
    progress: &mut dyn FnMut(usize),
) -> Result<MineSummary> {
    let state_file = state_path(out);
    let resumed_from = match std::fs::read_to_string(&state_file) {
        Ok(text) => {
            serde_json::from_str::<MineState>(&text)
                .map_err(|e| LoopError::Invalid(format!("{}: {e}", state_file.display())))?
                .next_index
        }
        Err(_) => 0,
    };
    // Keep only failures from before the resume point: a run killed after
    // writing failures but before saving its state leaves no duplicates.
    let kept: Vec<MinedFailure> = if resumed_from > 0 && out.exists() {
        read_failures(out)?
            .into_iter()
            .filter(|f| f.index < resumed_from)
            .collect()
    } else {
        Vec::new()
    };
    let mut file = std::fs::File::create(out).map_err(|e| io_err(out, e))?;
    for f in &kept {
        writeln!(file, "{}", serde_json::to_string(f).expect("serialisable"))
            .map_err(|e| io_err(out, e))?;
    }
    let mut failures_kept = kept.len();
    progress(resumed_from.min(records.len()));
    let per_chunk = (rollouts.max_rows / samples.max(1)).max(1);
    let mut index = resumed_from;
    while index < records.len() {
        let end = (index + per_chunk).min(records.len());
        let values: Vec<&Value> = records[index..end].iter().map(|r| &r.value).collect();
        let stream = (index * samples) as u64;
        let attempts = rollouts.attempts(&values, samples, params, stream, &mut |_| {})?;
        for (offset, attempts) in attempts.into_iter().enumerate() {
            let failed: Vec<_> = attempts.iter().filter(|a| !a.verdict.success).collect();
            let Some(first) = failed.first() else {
                continue;
            };
            let failure = MinedFailure {
                index: index + offset,
                record: records[index + offset].value.clone(),
                attempt: first.text.clone(),
                attempt_tokens: first.tokens.clone(),
                reason: first.verdict.reason.clone(),
                samples,
                failures: failed.len(),
                failure_rate: failed.len() as f64 / samples as f64,
            };
            writeln!(
                file,
                "{}",
                serde_json::to_string(&failure).expect("serialisable")
            )
            .map_err(|e| io_err(out, e))?;
            failures_kept += 1;
        }
        file.flush().map_err(|e| io_err(out, e))?;
        let tmp = state_file.with_extension("state.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_string(&MineState { next_index: end }).expect("serialisable"),
        )
        .and_then(|_| std::fs::rename(&tmp, &state_file))
        .map_err(|e| io_err(&state_file, e))?;
        progress(end - index);
        index = end;
    }
    Ok(MineSummary {
        records_done: records.len(),
        failures_kept,
        resumed_from,
    })
}
