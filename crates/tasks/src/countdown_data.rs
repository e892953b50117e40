//! Countdown data: an exhaustive solver and a seeded generator that only
//! emits solvable puzzles, with the solver's equation as proof.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::countdown::{apply, Op, Rational};

/// A value reachable from some of the numbers, and one equation for it.
#[derive(Clone)]
struct Reached {
    value: Rational,
    text: String,
}

/// Every value (with one equation each) reachable by combining *all* of
/// `nums` with + − × ÷, each number used once. Exhaustive: pairs are
/// combined in every order until one value is left.
pub fn all_solutions(nums: &[u64]) -> BTreeMap<i128, String> {
    let start: Vec<Reached> = nums
        .iter()
        .map(|&n| Reached {
            value: Rational::from(n as i128),
            text: n.to_string(),
        })
        .collect();
    let mut out = BTreeMap::new();
    search(&start, &mut out);
    out
}

/// An equation over all of `nums` that equals `target`, if one exists.
pub fn solve(nums: &[u64], target: i64) -> Option<String> {
    all_solutions(nums).remove(&(target as i128))
}

fn search(items: &[Reached], out: &mut BTreeMap<i128, String>) {
    if items.len() == 1 {
        let only = &items[0];
        if only.value.is_integer() {
            out.entry(*only.value.numer())
                .or_insert_with(|| only.text.clone());
        }
        return;
    }
    for i in 0..items.len() {
        for j in 0..items.len() {
            if i == j {
                continue;
            }
            let (a, b) = (&items[i], &items[j]);
            for op in [Op::Add, Op::Sub, Op::Mul, Op::Div] {
                // + and × commute: try each unordered pair once.
                if matches!(op, Op::Add | Op::Mul) && i > j {
                    continue;
                }
                let Ok(value) = apply(op, a.value, b.value) else {
                    continue;
                };
                let mut rest: Vec<Reached> = items
                    .iter()
                    .enumerate()
                    .filter(|&(k, _)| k != i && k != j)
                    .map(|(_, r)| r.clone())
                    .collect();
                rest.push(Reached {
                    value,
                    text: format!("({} {} {})", a.text, op.symbol(), b.text),
                });
                search(&rest, out);
            }
        }
    }
}

/// How hard the generated puzzles are.
#[derive(Debug, Clone)]
pub struct Difficulty {
    /// How many numbers a puzzle gives (the paper's data: 3 to 4).
    pub count: RangeInclusive<usize>,
    /// Each number is drawn from 1..=max_number.
    pub max_number: u64,
    /// Targets are drawn from the reachable values in this range.
    pub target: RangeInclusive<i64>,
}

/// `n` solvable puzzles as JSONL-ready records `{"nums", "target",
/// "solution"}`; the same seed gives the same records.
pub fn generate(
    n: usize,
    difficulty: &Difficulty,
    seed: u64,
) -> Result<Vec<serde_json::Value>, String> {
    if difficulty.count.is_empty() || *difficulty.count.start() < 2 || *difficulty.count.end() > 6 {
        return Err("the count of numbers must lie within 2..=6".into());
    }
    if difficulty.max_number == 0 || difficulty.target.is_empty() {
        return Err("need max_number ≥ 1 and a non-empty target range".into());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    let mut attempts = 0usize;
    while out.len() < n {
        attempts += 1;
        if attempts > 1000 * (n + 10) {
            return Err(
                "could not find solvable puzzles for this difficulty; widen the target range"
                    .into(),
            );
        }
        let count = rng.random_range(difficulty.count.clone());
        let nums: Vec<u64> = (0..count)
            .map(|_| rng.random_range(1..=difficulty.max_number))
            .collect();
        let reachable: Vec<(i128, String)> = all_solutions(&nums)
            .into_iter()
            .filter(|(v, _)| difficulty.target.contains(&(*v as i64)))
            .collect();
        if reachable.is_empty() {
            continue;
        }
        let (target, solution) = reachable[rng.random_range(0..reachable.len())].clone();
        out.push(json!({"nums": nums, "target": target as i64, "solution": solution}));
    }
    Ok(out)
}
