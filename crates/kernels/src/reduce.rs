//! Reductions of a row (max, sum, dot product), shared by the kernels, in a form the compiler
//! vectorizes: `LANES` independent partial results, which a loop over
//! `f32`s carried in one accumulator cannot have (the additions' order is
//! fixed). Inlined into the callers' `with_vector_features!` bodies.

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
