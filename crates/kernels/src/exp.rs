//! `exp` for softmax, in a form the compiler vectorizes.
//!
//! Sampling exponentiates a whole vocabulary per row and decode attention
//! every score; as libm calls those were ~5% of a batch-32 decode step,
//! one value at a time. This is Cephes' `expf` (range reduction by ln 2,
//! a degree-6 polynomial; within 2 ulp of the true value over the range
//! softmax uses) written without branches, so that a loop over it becomes
//! vector code.

use crate::level::with_vector_features;

/// Below this, `exp` is 0 (as libm's is, past f32's smallest normal).
const MIN_INPUT: f32 = -87.336_54;
/// Above this, `exp` is +∞ (libm's is finite up to 88.72; softmax never
/// gets near either).
const MAX_INPUT: f32 = 88.0;

/// `eˣ`, within 2 ulp; 0 below −87.34 (including −∞), +∞ above 88.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(MIN_INPUT, MAX_INPUT);
    let n = (clamped * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts, so that n · ln 2 is subtracted without rounding.
    let r = clamped - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let poly = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5;
    let y = poly * r * r + r + 1.0;
    let two_to_n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let value = y * two_to_n;
    if x < MIN_INPUT {
        0.0
    } else if x > MAX_INPUT {
        f32::INFINITY
    } else {
        value
    }
}

/// `values[i] = exp((values[i] − shift) · scale)`, with the widest vector
/// instructions the CPU has: the unnormalised softmax of a row of logits.
pub fn exp_shifted(values: &mut [f32], shift: f32, scale: f32) {
    with_vector_features!(for v in values.iter_mut() {
        *v = exp((*v - shift) * scale);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place, for finite positives.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn within_two_ulp_of_libm_where_softmax_looks() {
        let mut worst = 0;
        let mut x = MIN_INPUT;
        while x < MAX_INPUT {
            let (got, want) = (exp(x), x.exp());
            if want.is_normal() {
                worst = worst.max(ulps(got, want));
            }
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
    }

    #[test]
    fn the_slice_form_matches_the_scalar_one() {
        let logits: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        let mut values = logits.clone();
        exp_shifted(&mut values, 30.0, 1.0 / 0.9);
        for (v, l) in values.iter().zip(&logits) {
            assert_eq!(*v, exp((l - 30.0) * (1.0 / 0.9)));
        }
    }
}
