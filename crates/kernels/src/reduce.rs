//! Reductions of a row (max, sum, dot product), shared by the kernels and
//! the optimizer's clipping norm, in a form the compiler vectorizes:
//! `LANES` independent partial results, which a loop over `f32`s carried
//! in one accumulator cannot have (the additions' order is fixed).
//! Inlined into the callers' `with_vector_features!` bodies.

/// One AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// The largest element (−∞ for none), in `LANES` running maxima.
#[inline(always)]
pub(crate) fn lanes_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(*v);
        }
    }
    tail.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, b| a.max(*b))
}

/// The sum of the elements, in `LANES` running sums.
#[inline(always)]
pub(crate) fn lanes_sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `Σ a ⊙ b`, in `LANES` running sums.
#[inline(always)]
pub(crate) fn lanes_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ x²` of a vector of any length (a parameter's gradient, for its
/// clipping norm), at the machine's vector level: runs of 4,096 summed by
/// [`lanes_dot`], the runs added in f64 so that a long vector keeps its
/// precision.
pub fn sum_of_squares(x: &[f32]) -> f64 {
    crate::level::with_vector_features!(x
        .chunks(4096)
        .map(|run| lanes_dot(run, run) as f64)
        .sum::<f64>())
}

/// `Σ a ⊙ b` in 512-bit vectors, the lanes summed by shuffle halvings.
///
/// # Safety
/// The CPU must have AVX-512F; `a` and `b` must be as long, a multiple of
/// 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(16));
    let mut sum = _mm512_setzero_ps();
    for (a, b) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        // SAFETY: each chunk holds 16 values.
        sum = unsafe {
            _mm512_fmadd_ps(
                _mm512_loadu_ps(a.as_ptr()),
                _mm512_loadu_ps(b.as_ptr()),
                sum,
            )
        };
    }
    _mm512_reduce_add_ps(sum)
}

/// `Σ a ⊙ b` in 256-bit vectors, the lanes summed by shuffle halvings.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `a` and `b` must be as long, a
/// multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    debug_assert!(a.len() == b.len() && a.len().is_multiple_of(8));
    let mut sum = _mm256_setzero_ps();
    for (a, b) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        // SAFETY: each chunk holds 8 values.
        sum = unsafe {
            _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr()),
                _mm256_loadu_ps(b.as_ptr()),
                sum,
            )
        };
    }
    let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
    let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
    _mm_cvtss_f32(_mm_add_ss(pairs, _mm_movehdup_ps(pairs)))
}
