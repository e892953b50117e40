//! Verdicts per second of the built-in verifiers and of an external one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use r3_tasks::Task;
use serde_json::{json, Value};

use crate::{machine, BenchError, Result};

/// Which verifiers to time, and for how long each.
pub struct VerifyBench {
    /// Function-calling records to judge.
    pub data: PathBuf,
    /// An external verifier command to time as well.
    pub verifier: Option<String>,
    pub seconds: f64,
}

/// Judges (record, answer) pairs round-robin for about `seconds`; returns
/// verdicts per second and the fraction judged correct.
fn verdicts_per_second(
    task: &dyn Task,
    cases: &[(Value, String)],
    seconds: f64,
) -> Result<(f64, f64)> {
    let start = Instant::now();
    let (mut n, mut passed) = (0usize, 0usize);
    while start.elapsed().as_secs_f64() < seconds {
        for (record, answer) in cases {
            passed += task.verify(record, answer).success as usize;
            if let Some(why) = task.broken() {
                return Err(BenchError::Invalid(why));
            }
        }
        n += cases.len();
    }
    Ok((
        n as f64 / start.elapsed().as_secs_f64(),
        passed as f64 / n.max(1) as f64,
    ))
}

/// 500 Countdown puzzles, half answered right (the solver's equation) and
/// half wrong (the numbers summed).
fn countdown_cases() -> Result<Vec<(Value, String)>> {
    let difficulty = r3_tasks::countdown_data::Difficulty {
        count: 3..=4,
        max_number: 100,
        target: 1..=100,
    };
    let puzzles =
        r3_tasks::countdown_data::generate(500, &difficulty, 0).map_err(BenchError::Invalid)?;
    Ok(puzzles
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let answer = if i % 2 == 0 {
                p["solution"].as_str().unwrap_or_default().to_string()
            } else {
                let nums: Vec<String> = p["nums"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect();
                nums.join(" + ")
            };
            (p, format!("Let me think. <answer>{answer}</answer>"))
        })
        .collect())
}

/// Runs the bench and returns its report.
pub fn run(bench: &VerifyBench) -> Result<Value> {
    let countdown = r3_tasks::countdown::Countdown;
    let (countdown_rate, countdown_ok) =
        verdicts_per_second(&countdown, &countdown_cases()?, bench.seconds)?;

    let fc = r3_tasks::function_calling::FunctionCalling;
    let records = r3_tasks::read_records(&bench.data, &fc, false)?.records;
    let fc_cases: Vec<(Value, String)> = records
        .into_iter()
        .map(|r| {
            let answers = r.value["answers"].as_str().unwrap_or("[]").to_string();
            let answer = format!("Here are the calls:\n```json\n{answers}\n```");
            (r.value, answer)
        })
        .collect();
    let (fc_rate, fc_ok) = verdicts_per_second(&fc, &fc_cases, bench.seconds)?;

    let external = match &bench.verifier {
        None => Value::Null,
        Some(command) => {
            let v = r3_tasks::external::ExternalVerifier::new(command, Duration::from_secs(10));
            let cases = vec![(json!({"prompt": "p", "answer": "42"}), "42".to_string())];
            let (rate, ok) = verdicts_per_second(&v, &cases, bench.seconds)?;
            json!({"command": command, "calls_per_s": rate, "round_trip_us": 1e6 / rate, "fraction_correct": ok})
        }
    };
    Ok(json!({
        "bench": "verify",
        "machine": machine::describe(None),
        "countdown_verdicts_per_s": countdown_rate,
        "countdown_fraction_correct": countdown_ok,
        "function_calling_verdicts_per_s": fc_rate,
        "function_calling_fraction_correct": fc_ok,
        "function_calling_records": fc_cases.len(),
        "external": external,
        "threads": 1,
    }))
}
