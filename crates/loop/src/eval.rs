//! `r3 eval`: first-try accuracy, and second-try accuracy after one
//! reflection and one retry per failure.

use r3_generate::SamplingParams;
use r3_tasks::Record;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rollout::{Attempt, Failure, Rollouts};
use crate::stats::Proportion;
use crate::Result;

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
