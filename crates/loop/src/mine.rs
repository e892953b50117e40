//! `r3 mine`: the dataset of failures. Each record gets K sampled first
//! attempts; records the model fails on are kept with one failed attempt
//! (its sampled ids, for token-in/token-out training) and the failure rate.
//! Resumable: a state file records the next record index, the bytes of
//! the failures file that cover it, and the data and settings it is bound to.

use std::io::Write;
use std::path::{Path, PathBuf};

use r3_generate::SamplingParams;
use r3_tasks::Record;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::MineConfig;
use crate::rollout::{Backend, Policy, Rollouts};
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

/// The sidecar file that makes a run resumable, written atomically after
/// each chunk: how far it got, how many bytes of the failures file that
/// covers, and what it is bound to.
#[derive(Serialize, Deserialize)]
struct MineState {
    next_index: usize,
    /// The failures file's length when `next_index` was reached: bytes
    /// past it are an unfinished chunk, cut on resume.
    bytes: u64,
    failures_kept: usize,
    /// The data's digest and the run's settings; a rerun with other ones
    /// is refused rather than mixing two runs in one file.
    settings: serde_json::Map<String, Value>,
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
    LoopError::Io {
        path: path.to_path_buf(),
        cause: e,
    }
}

/// What a mining run (or an evaluation) is bound to: `settings` (model, task, sampling) plus
/// the number of records and a digest of their contents, so that other
/// data under the same file name is noticed.
pub(crate) fn binding(records: &[Record], settings: &Value) -> serde_json::Map<String, Value> {
    let mut digest = Sha256::new();
    for record in records {
        digest.update(record.value.to_string().as_bytes());
        digest.update(b"\n");
    }
    let mut bound = settings.as_object().cloned().unwrap_or_default();
    bound.insert("data_records".into(), records.len().into());
    bound.insert(
        "data_sha256".into(),
        format!("{:x}", digest.finalize()).into(),
    );
    bound
}

/// The keys on which two bindings differ, `key: was → now`.
pub(crate) fn differences(
    was: &serde_json::Map<String, Value>,
    now: &serde_json::Map<String, Value>,
) -> Vec<String> {
    let mut keys: Vec<&String> = was.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| was.get(*k) != now.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("(none)".to_string(), Value::to_string);
            format!("{k}: {} → {}", show(was.get(k)), show(now.get(k)))
        })
        .collect()
}

/// Writes `state` to `path` so that a kill at any moment leaves the old or
/// the new state, never half of one.
fn save_state(path: &Path, state: &MineState) -> Result<()> {
    let json = serde_json::to_string(state).expect("serialisable");
    r3_model::atomic::write_atomic(path, json.as_bytes()).map_err(|e| io_err(path, e))
}

/// Reads a failures file (as written by [`mine`]).
pub fn read_failures(path: &Path) -> Result<Vec<MinedFailure>> {
    let mut out = Vec::new();
    r3_tasks::records::for_each_jsonl_line(path, |line, text| {
        let failure = text
            .and_then(|t| serde_json::from_str(t).map_err(|e| e.to_string()))
            .map_err(|e| {
                LoopError::Invalid(format!(
                    "{}:{line}: not a mined failure: {e}",
                    path.display()
                ))
            })?;
        out.push(failure);
        Ok::<(), LoopError>(())
    })?;
    Ok(out)
}

/// Runs the mining `config` asks for, sampled by `policy`, into
/// `config.out`. The failures file is bound to the model's file
/// (`model_file`), the adapter, the engines when they sample, the task and
/// the sampling settings (with the data's digest): a rerun with other
/// settings is refused instead of mixing two runs. `progress("mining",
/// done, total)` reports each chunk, as evaluation's phases do.
pub fn run(
    config: &MineConfig,
    policy: &Policy<'_>,
    model_file: &Path,
    adapter: Option<&Path>,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<MineSummary> {
    let task = config.task.build()?;
    let records = config.data.records(task.as_ref())?;
    let prompts = config.data.prompts(task.as_ref())?;
    let rollouts = Rollouts::new(policy, task.as_ref(), &prompts, config.data.batch_rows);
    let params = SamplingParams {
        temperature: config.temperature,
        max_new_tokens: policy.within_context(config.max_new_tokens, "--max-new-tokens"),
        seed: config.seed,
        ..Default::default()
    };
    let mut settings = serde_json::json!({
        "model": model_file.display().to_string(),
        "task": config.task.describe(),
        "adapter": adapter.map(|a| a.display().to_string()),
        "samples": config.samples,
        "temperature": config.temperature,
        "seed": config.seed,
        "max_new_tokens": config.max_new_tokens,
    });
    // Only when engines sample: a local run's binding stays as it was.
    if let Backend::Engines(engines) = policy.backend {
        settings["engines"] = serde_json::json!(engines.urls());
        settings["engine_model"] = engines.model.clone().into();
    }
    // Only when decoding rounds its inputs, likewise.
    if let Some(name) = config.model.activations.name() {
        settings["activations"] = name.into();
    }
    mine(
        &rollouts,
        &records,
        config.samples,
        &params,
        &settings,
        &config.out,
        &mut |n| progress("mining", n, records.len()),
    )
}

/// Mines `records` into `out`, `samples` attempts each, continuing where a
/// previous run on the same `out` stopped. `settings` (model, task,
/// sampling) are bound to the run with the data's digest: a rerun with
/// others is refused, naming what changed. What was kept is never lost: a
/// rerun only appends, after cutting an unfinished chunk.
pub fn mine(
    rollouts: &Rollouts<'_>,
    records: &[Record],
    samples: usize,
    params: &SamplingParams,
    settings: &Value,
    out: &Path,
    progress: &mut dyn FnMut(usize),
) -> Result<MineSummary> {
    let state_file = state_path(out);
    let bound = binding(records, settings);
    let existing = match std::fs::metadata(out) {
        Ok(m) => Some(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err(out, e)),
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|e| io_err(out, e))?;
    // One miner per output: a second would interleave its lines with ours.
    // The lock lasts as long as `file`, and the system drops it if r3 dies.
    file.try_lock().map_err(|e| match e {
        std::fs::TryLockError::WouldBlock => LoopError::Invalid(format!(
            "{} is being written by another r3 mine; wait for it or choose another --out",
            out.display()
        )),
        std::fs::TryLockError::Error(e) => io_err(out, e),
    })?;
    let mut state = match std::fs::read_to_string(&state_file) {
        Ok(text) => serde_json::from_str::<MineState>(&text).map_err(|e| {
            LoopError::Invalid(format!("{}: not a mining state: {e}", state_file.display()))
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if existing.is_some_and(|len| len > 0) {
                return Err(LoopError::Invalid(format!(
                    "{} exists but {} does not: it is not a mining run r3 can continue; \
                     choose another --out or remove it",
                    out.display(),
                    state_file.display()
                )));
            }
            MineState {
                next_index: 0,
                bytes: 0,
                failures_kept: 0,
                settings: bound.clone(),
            }
        }
        Err(e) => return Err(io_err(&state_file, e)),
    };
    let changed = differences(&state.settings, &bound);
    if !changed.is_empty() {
        return Err(LoopError::Invalid(format!(
            "{} was mined with other data or settings ({}); use another --out to mine these",
            out.display(),
            changed.join("; ")
        )));
    }
    let length = existing.unwrap_or(0);
    if length < state.bytes {
        return Err(LoopError::Invalid(format!(
            "{} holds {length} bytes but {} vouches for {}: it was cut outside r3 mine; \
             refusing to continue",
            out.display(),
            state_file.display(),
            state.bytes
        )));
    }
    // Bytes past the state's are a chunk a kill interrupted: it is mined
    // again below.
    file.set_len(state.bytes).map_err(|e| io_err(out, e))?;
    save_state(&state_file, &state)?;
    let resumed_from = state.next_index;
    let mut failures_kept = state.failures_kept;
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
        file.flush()
            .and_then(|_| file.sync_data())
            .map_err(|e| io_err(out, e))?;
        state.next_index = end;
        state.bytes = file.metadata().map_err(|e| io_err(out, e))?.len();
        state.failures_kept = failures_kept;
        save_state(&state_file, &state)?;
        progress(end - index);
        index = end;
    }
    Ok(MineSummary {
        records_done: records.len(),
        failures_kept,
        resumed_from,
    })
}
