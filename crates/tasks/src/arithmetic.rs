//! Two-number arithmetic as plain-answer records: the task the default
//! 135M model solves about a third of the time (BASELINES.md), so groups of
//! reflections see mixed rewards — what the demo needs.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

/// `n` records `{"prompt", "answer"}` like "What is 21 - 7? Reply with the
/// number only." with operands in `1..=max_operand`; `-` never goes below 0.
pub fn generate(n: usize, max_operand: u32, seed: u64) -> Vec<Value> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let (a, b) = (rng.random_range(1..=max_operand), rng.random_range(1..=max_operand));
            let (a, b, op, answer) = match rng.random_range(0..3) {
                0 => (a, b, '+', (a + b) as i64),
                1 => (a.max(b), a.min(b), '-', (a.max(b) - a.min(b)) as i64),
                _ => (a % 13, b % 13, '*', ((a % 13) * (b % 13)) as i64),
            };
            json!({"prompt": format!("What is {a} {op} {b}? Reply with the number only."), "answer": answer})
        })
        .collect()
}
