//! `r3 eval`: first-try accuracy, and second-try accuracy after one
//! reflection and one retry per failure.

use std::path::Path;

use r3_generate::SamplingParams;
use r3_model::Activations;
use r3_tasks::Record;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::EvalConfig;
use crate::mine::{binding, differences};
use crate::rollout::{Attempt, Backend, Failure, Policy, Rollouts};
use crate::stats::Proportion;
use crate::{LoopError, Result};

/// The two files an evaluation leaves in its directory.
pub const SUMMARY_FILE: &str = "summary.json";
pub const TRANSCRIPTS_FILE: &str = "transcripts.jsonl";

/// Where an unfinished evaluation keeps its finished chunks, one file
/// each, and what they are bound to: a rerun continues after the last.
const PARTIAL_DIR: &str = "partial";
const BINDING_FILE: &str = "binding.json";

/// Runs the evaluation `config` asks for on `model` and writes
/// [`SUMMARY_FILE`] and [`TRANSCRIPTS_FILE`] into `config.out`, each
/// atomically: a stopped evaluation leaves no half-written summary for a
/// rerun (or an experiment script) to mistake for a finished one. Records
/// go in chunks of four batches, each kept under `out/partial/` as it
/// finishes, so a rerun after a stop continues where it was (a rerun with
/// other data or settings is refused, naming what changed). Each chunk
/// samples with the streams an unchunked run would give its rows, and on
/// the CPU a row does not depend on its batch: a resumed run writes what
/// an uninterrupted one does.
pub fn run(
    config: &EvalConfig,
    policy: &Policy<'_>,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<EvalSummary> {
    let out = &config.out;
    // An unwritable out fails now, not after the whole evaluation.
    std::fs::create_dir_all(out)
        .and_then(|_| tempfile_probe(out))
        .map_err(|cause| {
            LoopError::Invalid(format!(
                "cannot write into --out {}: {cause}",
                out.display()
            ))
        })?;
    let task = config.task.build()?;
    let records = config.data.records(task.as_ref())?;
    let prompts = config.data.prompts(task.as_ref())?;
    let rollouts = Rollouts::new(policy, task.as_ref(), &prompts, config.data.batch_rows);
    let turn = |max_new_tokens| SamplingParams {
        temperature: config.temperature,
        top_p: config.top_p,
        max_new_tokens,
        seed: config.seed,
        ..Default::default()
    };
    let answer_tokens = policy.within_context(config.max_new_tokens, "--max-new-tokens");
    let reflection_tokens =
        policy.within_context(config.reflection_max_tokens, "--reflection-max-tokens");
    let settings = EvalSettings {
        attempt: turn(answer_tokens),
        reflection: turn(reflection_tokens),
        retry: turn(answer_tokens),
    };
    let chunk = 4 * config.data.batch_rows;
    let text = |path: &Option<std::path::PathBuf>| path.as_ref().map(|p| p.display().to_string());
    let mut bound = serde_json::json!({
        "model": text(&config.model.path),
        "adapter": text(&config.model.adapter),
        "task": config.task.describe(),
        "prompts": text(&config.data.prompts),
        "settings": settings,
        "chunk_records": chunk,
    });
    if let Backend::Engines(engines) = policy.backend {
        bound["engines"] = serde_json::json!(engines.urls());
        bound["engine_model"] = engines.model.clone().into();
    }
    if let Some(name) = config.model.activations.name() {
        bound["activations"] = name.into();
    }
    let partial = out.join(PARTIAL_DIR);
    let mut transcripts = finished_chunks(&partial, &binding(&records, &bound), chunk)?;
    let mut failures = transcripts
        .iter()
        .filter(|t| !t.attempt.verdict.success)
        .count();
    for start in (transcripts.len()..records.len()).step_by(chunk) {
        let end = (start + chunk).min(records.len());
        let mut report = |phase: &str, n, total| {
            let phase = format!("{phase}, records {}–{end} of {}", start + 1, records.len());
            progress(&phase, n, total)
        };
        let done = evaluate(
            &rollouts,
            &records[start..end],
            &settings,
            [start, failures],
            &mut report,
        )?;
        failures += done.iter().filter(|t| !t.attempt.verdict.success).count();
        write(&partial.join(format!("{start:08}.jsonl")), &jsonl(&done))?;
        transcripts.extend(done);
    }
    let summary = summarize(&transcripts, &settings, config.model.activations);
    let json = serde_json::to_vec_pretty(&summary).expect("a summary serializes");
    write(&out.join(SUMMARY_FILE), &json)?;
    write(&out.join(TRANSCRIPTS_FILE), &jsonl(&transcripts))?;
    std::fs::remove_dir_all(&partial).map_err(|cause| LoopError::Io {
        path: partial.clone(),
        cause,
    })?;
    Ok(summary)
}

/// The transcripts of the chunks an earlier run on the same `out` finished
/// (none for a new one), after checking that it was bound to `bound`;
/// writes the binding for a new run.
fn finished_chunks(
    partial: &Path,
    bound: &serde_json::Map<String, Value>,
    chunk: usize,
) -> Result<Vec<Transcript>> {
    let binding_file = partial.join(BINDING_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| LoopError::Io { path, cause }
    };
    match std::fs::read_to_string(&binding_file) {
        Ok(text) => {
            let was: serde_json::Map<String, Value> = serde_json::from_str(&text)
                .map_err(|e| LoopError::Invalid(format!("{}: {e}", binding_file.display())))?;
            let changed = differences(&was, bound);
            if !changed.is_empty() {
                return Err(LoopError::Invalid(format!(
                    "{} holds an unfinished evaluation with other data or settings ({}); \
                     remove it to start over, or use another --out",
                    partial.display(),
                    changed.join("; ")
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(partial).map_err(io(partial))?;
            let json = serde_json::to_vec(bound).expect("a binding serializes");
            write(&binding_file, &json)?;
            return Ok(Vec::new());
        }
        Err(e) => return Err(io(&binding_file)(e)),
    }
    let mut transcripts = Vec::new();
    loop {
        let file = partial.join(format!("{:08}.jsonl", transcripts.len()));
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(transcripts),
            Err(e) => return Err(io(&file)(e)),
        };
        let before = transcripts.len();
        for (i, line) in text.lines().enumerate() {
            let t: Transcript = serde_json::from_str(line)
                .map_err(|e| LoopError::Invalid(format!("{}:{}: {e}", file.display(), i + 1)))?;
            transcripts.push(t);
        }
        if transcripts.len() - before != chunk {
            // Only the last chunk is short, and a short one ends the run.
            return Ok(transcripts);
        }
    }
}

fn jsonl(transcripts: &[Transcript]) -> Vec<u8> {
    let mut lines = Vec::new();
    for t in transcripts {
        serde_json::to_writer(&mut lines, t).expect("a transcript serializes");
        lines.push(b'\n');
    }
    lines
}

/// Creates and drops an anonymous file in `dir`: can it be written?
fn tempfile_probe(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".r3-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    r3_model::atomic::write_atomic(path, bytes).map_err(|cause| LoopError::Io {
        path: path.to_path_buf(),
        cause,
    })
}

/// Sampling of each turn; greedy everywhere by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSettings {
    pub attempt: SamplingParams,
    pub reflection: SamplingParams,
    pub retry: SamplingParams,
}

/// What `summary.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSummary {
    pub n: usize,
    pub first_try_accuracy: f64,
    pub second_try_accuracy: f64,
    pub first_try: Proportion,
    pub second_try: Proportion,
    /// Failures whose retry succeeded.
    pub fixed_by_retry: usize,
    /// Whether decoding rounded its inputs to 8 bits (`--int8-decode`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub int8_decode: bool,
    /// Whether prefill ran bf16 products (`--bf16-products`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bf16_products: bool,
    pub settings: EvalSettings,
}

/// One line of `transcripts.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transcript {
    /// Line of the record in its file.
    pub line: usize,
    pub record: Value,
    pub attempt: Attempt,
    pub reflection: Option<String>,
    pub retry: Option<Attempt>,
}

/// Evaluates `records`; `progress(phase, done, phase_total)` reports each
/// batch. `[rows, failures]` are the records and the failed first attempts
/// before these: the sampling streams continue from them.
pub fn evaluate(
    rollouts: &Rollouts<'_>,
    records: &[Record],
    settings: &EvalSettings,
    [rows, failures_before]: [usize; 2],
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<Transcript>> {
    let values: Vec<&Value> = records.iter().map(|r| &r.value).collect();
    let attempts = rollouts.attempts(&values, 1, &settings.attempt, rows as u64, &mut |n| {
        progress("first attempts", n, values.len())
    })?;
    let mut transcripts: Vec<Transcript> = records
        .iter()
        .zip(attempts)
        .map(|(r, mut a)| Transcript {
            line: r.line,
            record: r.value.clone(),
            attempt: a.remove(0),
            reflection: None,
            retry: None,
        })
        .collect();
    let failed: Vec<usize> = (0..transcripts.len())
        .filter(|&i| !transcripts[i].attempt.verdict.success)
        .collect();
    let failures: Vec<Failure<'_>> = failed
        .iter()
        .map(|&i| Failure {
            record: &records[i].value,
            attempt_tokens: transcripts[i].attempt.tokens.clone(),
        })
        .collect();
    let total = failures.len();
    let groups = rollouts.reflect_and_retry(
        &failures,
        1,
        &settings.reflection,
        &settings.retry,
        failures_before as u64,
        &mut |n| progress("reflect + retry", n, total),
    )?;
    for (&i, mut group) in failed.iter().zip(groups) {
        let rollout = group.remove(0);
        transcripts[i].reflection = Some(rollout.reflection_text);
        transcripts[i].retry = Some(rollout.retry);
    }
    Ok(transcripts)
}

/// The paper's columns over `transcripts`.
fn summarize(
    transcripts: &[Transcript],
    settings: &EvalSettings,
    activations: Activations,
) -> EvalSummary {
    let n = transcripts.len();
    let first = transcripts
        .iter()
        .filter(|t| t.attempt.verdict.success)
        .count();
    let fixed = transcripts
        .iter()
        .filter(|t| t.retry.as_ref().is_some_and(|r| r.verdict.success))
        .count();
    let first_try = Proportion::new(first, n);
    let second_try = Proportion::new(first + fixed, n);
    EvalSummary {
        n,
        first_try_accuracy: first_try.accuracy,
        second_try_accuracy: second_try.accuracy,
        first_try,
        second_try,
        fixed_by_retry: fixed,
        int8_decode: activations.int8_decode,
        bf16_products: activations.bf16_products,
        settings: settings.clone(),
    }
}
