//! What the kernels' tests share.

use candle_core::{Device, Tensor};

/// A tensor of `dims` with values spread over ±`amplitude`, the same for
/// the same `seed` (xorshift: no dependency, no global state).
pub fn random(dims: &[usize], seed: u64, amplitude: f32) -> Tensor {
    let count: usize = dims.iter().product();
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amplitude
        })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).expect("a shape of count elements")
}

/// The largest `|a − b|`, relative to the largest `|b|` (at least 1e-6).
pub fn max_relative_difference(a: &Tensor, b: &Tensor) -> f32 {
    let largest = |t: &Tensor| -> f32 {
        let max = t.abs().and_then(|t| t.flatten_all()).and_then(|t| t.max(0));
        max.and_then(|m| m.to_scalar::<f32>())
            .expect("a non-empty f32 tensor")
    };
    let difference = (a - b).expect("tensors of one shape");
    largest(&difference) / largest(b).max(1e-6)
}

/// [`random`]'s values as a plain vector.
pub fn random_values(dims: &[usize], seed: u64, amplitude: f32) -> Vec<f32> {
    let t = random(dims, seed, amplitude);
    t.flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("an f32 tensor")
}
