//! The statistics an evaluation reports: a proportion with its 95% interval,
//! and the exact McNemar test that compares two models on the same records.

use serde::{Deserialize, Serialize};

/// A proportion with its 95% Wilson score interval (sound for small n and
/// for proportions near 0 or 1, where the normal interval is not).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    pub correct: usize,
    pub n: usize,
    pub accuracy: f64,
    pub low: f64,
    pub high: f64,
}

impl Proportion {
    pub fn new(correct: usize, n: usize) -> Self {
        if n == 0 {
            return Self {
                correct,
                n,
                accuracy: 0.0,
                low: 0.0,
                high: 0.0,
            };
        }
        let (p, nf, z) = (correct as f64 / n as f64, n as f64, 1.96f64);
        let denom = 1.0 + z * z / nf;
        let center = (p + z * z / (2.0 * nf)) / denom;
        let half = z * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt() / denom;
        Self {
            correct,
            n,
            accuracy: p,
            low: (center - half).max(0.0),
            high: (center + half).min(1.0),
        }
    }
}

/// Two-sided p-value of the exact McNemar test: `only_a` records solved by
/// model A alone, `only_b` by model B alone. Records both solve, or neither,
/// carry no information about which is better; under "no difference" each
/// discordant record is a fair coin, so the p-value is a binomial tail.
pub fn mcnemar_exact(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    let k = only_a.min(only_b);
    // ln C(n, i) built term by term; in log space so that n in the
    // thousands does not underflow 0.5^n.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_choose = 0.0f64;
    let mut tail = 0.0f64;
    for i in 0..=k {
        if i > 0 {
            ln_choose += ((n - i + 1) as f64 / i as f64).ln();
        }
        tail += (ln_choose + ln_half_n).exp();
    }
    (2.0 * tail).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_interval_matches_hand_computed_values() {
        // 89/200: p = .445; Wilson bounds from the closed form by hand.
        let p = Proportion::new(89, 200);
        assert!((p.low - 0.37778).abs() < 1e-4, "{p:?}");
        assert!((p.high - 0.51433).abs() < 1e-4, "{p:?}");
        // 0/10: the lower bound is 0, the upper 1.96² / (10 + 1.96²).
        let zero = Proportion::new(0, 10);
        assert_eq!(zero.low, 0.0);
        assert!((zero.high - 3.8416 / 13.8416).abs() < 1e-9);
        assert_eq!(Proportion::new(0, 0).high, 0.0);
    }

    #[test]
    fn mcnemar_is_the_binomial_tail() {
        // 1 against 9: 2 · (C(10,0) + C(10,1)) / 2^10.
        assert!((mcnemar_exact(1, 9) - 22.0 / 1024.0).abs() < 1e-12);
        assert!((mcnemar_exact(9, 1) - 22.0 / 1024.0).abs() < 1e-12);
        // 0 against 5: 2 / 32.
        assert!((mcnemar_exact(0, 5) - 0.0625).abs() < 1e-12);
        assert_eq!(mcnemar_exact(0, 0), 1.0);
        assert_eq!(mcnemar_exact(7, 7), 1.0);
        // Large n stays finite and tiny: 0 against 1000 is 2^-999.
        let p = mcnemar_exact(0, 1000);
        assert!(p > 0.0 && p < 1e-300, "{p}");
        // 1000 against 1100: the exact tail, from Python's integer binomials.
        let p = mcnemar_exact(1000, 1100);
        assert!((p - 0.030_720_707_864).abs() < 1e-9, "{p}");
    }
}
