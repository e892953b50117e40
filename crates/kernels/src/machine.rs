//! The machine's two limits, measured in the same run as the work they
//! judge: the f32 GEMM rate r3's own gemm entry reaches with every thread,
//! and the rate at which memory is read when the data is far larger than
//! the caches. `r3 bench` reports each phase as a fraction of the limit
//! that binds it, so that a number means the same on a 3× slower machine.

use std::time::Instant;

use rayon::prelude::*;

use crate::gemm::{gemm, Mat, Out};

/// GFLOP/s (2 per multiply-add) of an `n × n × n` f32 product through
/// [`gemm`] on `threads` threads: the best of repeats over `seconds`.
pub fn gemm_gflops(n: usize, seconds: f64, threads: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
    let mut c = vec![0f32; n * n];
    let flops = 2.0 * (n * n * n) as f64;
    let mut best = 0f64;
    let started = Instant::now();
    while best == 0.0 || started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        gemm(
            (n, n, n),
            Out {
                data: &mut c,
                row_stride: n,
            },
            false,
            Mat::rows(&a, n),
            Mat::rows(&b, n),
            threads,
        );
        best = best.max(flops / t.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&c);
    best
}

/// GB/s of reading a `bytes`-long buffer of f32 on every rayon thread (each
/// summing its own chunks): the best of repeats over `seconds`.
pub fn read_gb_per_s(bytes: usize, seconds: f64) -> f64 {
    let values = vec![1f32; bytes / 4];
    let mut best = 0f64;
    let started = Instant::now();
    while best == 0.0 || started.elapsed().as_secs_f64() < seconds {
        let t = Instant::now();
        let sum: f32 = values.par_chunks(1 << 16).map(sum_lanes).sum();
        std::hint::black_box(sum);
        best = best.max((values.len() * 4) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// A sum with 16 independent accumulators, which the compiler keeps in
/// vector registers: the loop is bound by the loads, not by additions.
fn sum_lanes(chunk: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut blocks = chunk.chunks_exact(16);
    for block in &mut blocks {
        for (lane, v) in lanes.iter_mut().zip(block) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limits_are_measured_and_plausible() {
        let g = gemm_gflops(128, 0.05, 1);
        assert!(g.is_finite() && g > 0.1, "{g}");
        let r = read_gb_per_s(8 << 20, 0.05);
        assert!(r.is_finite() && r > 0.1, "{r}");
        assert_eq!(sum_lanes(&[1.0; 37]), 37.0);
    }
}
