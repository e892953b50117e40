//! `r3 eval`: first-try accuracy, and second-try accuracy after one
//! reflection and one retry per failure.

use std::path::Path;

use r3_generate::SamplingParams;
use r3_tasks::Record;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::EvalConfig;
use crate::rollout::{Attempt, Failure, Policy, Rollouts};
use crate::stats::Proportion;
use crate::{LoopError, Result};

/// The two files an evaluation leaves in its directory.
pub const SUMMARY_FILE: &str = "summary.json";
pub const TRANSCRIPTS_FILE: &str = "transcripts.jsonl";

/// Runs the evaluation `config` asks for on `model` and writes
/// [`SUMMARY_FILE`] and [`TRANSCRIPTS_FILE`] into `config.out`, each
/// atomically: a stopped evaluation leaves no half-written summary for a
/// rerun (or an experiment script) to mistake for a finished one.
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
    let (summary, transcripts) = evaluate(&rollouts, &records, &settings, progress)?;
    let json = serde_json::to_vec_pretty(&summary).expect("a summary serializes");
    write(&out.join(SUMMARY_FILE), &json)?;
    let mut lines = Vec::new();
    for t in &transcripts {
        serde_json::to_writer(&mut lines, t).expect("a transcript serializes");
        lines.push(b'\n');
    }
    write(&out.join(TRANSCRIPTS_FILE), &lines)?;
    Ok(summary)
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

/// Evaluates `records`; `progress(phase, done, phase_total)` reports each batch.
pub fn evaluate(
    rollouts: &Rollouts<'_>,
    records: &[Record],
    settings: &EvalSettings,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(EvalSummary, Vec<Transcript>)> {
    let values: Vec<&Value> = records.iter().map(|r| &r.value).collect();
    let attempts = rollouts.attempts(&values, 1, &settings.attempt, 0, &mut |n| {
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
        0,
        &mut |n| progress("reflect + retry", n, total),
    )?;
    for (&i, mut group) in failed.iter().zip(groups) {
        let rollout = group.remove(0);
        transcripts[i].reflection = Some(rollout.reflection_text);
        transcripts[i].retry = Some(rollout.retry);
    }
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
    Ok((
        EvalSummary {
            n,
            first_try_accuracy: first_try.accuracy,
            second_try_accuracy: second_try.accuracy,
            first_try,
            second_try,
            fixed_by_retry: fixed,
            settings: settings.clone(),
        },
        transcripts,
    ))
}
