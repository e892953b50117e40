//! The MLP's gate, `silu(gate) ⊙ up`, read straight from the fused
//! gate/up projection, with its backward: one pass over the rows each way.
//!
//! The intermediate activations are the widest of a layer (8,960 floats a
//! token on Qwen2.5-1.5B, six times the hidden size). Composed of candle's
//! ops, the gate reads two strided halves of the projection, and its
//! backward runs silu's derivative as half a dozen passes, then writes each
//! half's gradient into a zero-padded copy of the whole projection and adds
//! the two. Fused, the backward writes both halves' gradients once, in the
//! projection's own layout.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::exp::exp;
use crate::level::with_vector_features;
use crate::storage::f32_slice;

/// Rows handed to one task: enough work to outweigh the hand-off.
const ROWS_PER_TASK: usize = 4;

/// `silu(gate) ⊙ up` of `gate_up` `[…, 2·i]` (gate the first `i` columns,
/// up the last `i`, as the fused projection lays them out), f32 on the
/// CPU; differentiable. Returns `[…, i]`.
pub fn swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    gate_up.contiguous()?.apply_op1(SwiGlu)
}

struct SwiGlu;

/// The width `i` of each half of `[…, 2·i]`.
fn half_width(shape: &Shape) -> candle_core::Result<usize> {
    match shape.dims().last() {
        Some(width) if width % 2 == 0 => Ok(width / 2),
        _ => candle_core::bail!("swiglu: {:?} is not [.., 2·i]", shape.dims()),
    }
}

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let i = half_width(layout.shape())?;
        let gate_up = f32_slice(storage, layout)?;
        let mut out = vec![0f32; gate_up.len() / 2];
        let mut dims = layout.shape().dims().to_vec();
        *dims.last_mut().expect("checked") = i;
        if i > 0 {
            out.par_chunks_mut(i * ROWS_PER_TASK)
                .zip(gate_up.par_chunks(2 * i * ROWS_PER_TASK))
                .for_each(|(out, gate_up)| {
                    for (out, row) in out.chunks_mut(i).zip(gate_up.chunks(2 * i)) {
                        let (gate, up) = row.split_at(i);
                        swiglu_row(out, gate, up);
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        gate_up: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = gate_up.apply_op2_no_bwd(&grad_out.contiguous()?, &SwiGluBackward)?;
        Ok(Some(grad))
    }
}

/// `out = silu(gate) ⊙ up`.
fn swiglu_row(out: &mut [f32], gate: &[f32], up: &[f32]) {
    with_vector_features!({
        for ((out, a), u) in out.iter_mut().zip(gate).zip(up) {
            *out = a / (1.0 + exp(-a)) * u;
        }
    })
}

/// The gradient of `gate_up` from the output's.
struct SwiGluBackward;

impl CustomOp2 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        g_storage: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let i = half_width(x_layout.shape())?;
        let (gate_up, grad) = (
            f32_slice(x_storage, x_layout)?,
            f32_slice(g_storage, g_layout)?,
        );
        if grad.len() * 2 != gate_up.len() {
            candle_core::bail!(
                "swiglu backward: {:?} against {:?}",
                x_layout.shape().dims(),
                g_layout.shape().dims()
            )
        }
        let mut out = vec![0f32; gate_up.len()];
        if i > 0 {
            out.par_chunks_mut(2 * i * ROWS_PER_TASK)
                .zip(gate_up.par_chunks(2 * i * ROWS_PER_TASK))
                .zip(grad.par_chunks(i * ROWS_PER_TASK))
                .for_each(|((out, gate_up), grad)| {
                    let rows = out.chunks_mut(2 * i).zip(gate_up.chunks(2 * i));
                    for ((out, row), g) in rows.zip(grad.chunks(i)) {
                        let (grad_gate, grad_up) = out.split_at_mut(i);
                        let (gate, up) = row.split_at(i);
                        swiglu_backward_row(grad_gate, grad_up, gate, up, g);
                    }
                });
        }
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// With `s = σ(a)`: `∂up = g ⊙ a·s` and `∂gate = g ⊙ up ⊙ s·(1 + a·(1 − s))`.
fn swiglu_backward_row(
    grad_gate: &mut [f32],
    grad_up: &mut [f32],
    gate: &[f32],
    up: &[f32],
    grad: &[f32],
) {
    with_vector_features!({
        let rows = grad_gate.iter_mut().zip(grad_up.iter_mut());
        for ((((grad_gate, grad_up), a), u), g) in rows.zip(gate).zip(up).zip(grad) {
            let s = 1.0 / (1.0 + exp(-a));
            *grad_up = g * a * s;
            *grad_gate = g * u * s * (1.0 + a * (1.0 - s));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_relative_difference, random};
    use candle_core::{Var, D};

    /// candle's ops on the two halves, as the MLP composed them.
    fn composed(gate_up: &Tensor) -> Tensor {
        let i = gate_up.dim(D::Minus1).unwrap() / 2;
        let gate = gate_up.narrow(D::Minus1, 0, i).unwrap();
        let up = gate_up.narrow(D::Minus1, i, i).unwrap();
        (gate.silu().unwrap() * up).unwrap()
    }

    /// Widths shorter and longer than a vector, and a row count that is not
    /// a multiple of a task's; values to ±6, where σ saturates.
    const SHAPES: [&[usize]; 3] = [&[3, 14], &[2, 5, 70], &[1, 9, 2 * 96]];

    #[test]
    fn output_matches_the_composed_gate() {
        for (seed, dims) in SHAPES.into_iter().enumerate() {
            let gate_up = random(dims, seed as u64, 6.0);
            let difference =
                max_relative_difference(&swiglu(&gate_up).unwrap(), &composed(&gate_up));
            assert!(difference < 1e-6, "{dims:?}: {difference}");
        }
    }

    #[test]
    fn gradient_matches_the_composed_gate() {
        for (seed, dims) in SHAPES.into_iter().enumerate() {
            let out_dims: Vec<usize> = dims
                .iter()
                .enumerate()
                .map(|(d, n)| if d + 1 == dims.len() { n / 2 } else { *n })
                .collect();
            let upstream = random(&out_dims, 50 + seed as u64, 6.0);
            let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                let x = Var::from_tensor(&random(dims, seed as u64, 6.0)).unwrap();
                let loss = (f(x.as_tensor()) * &upstream).unwrap().sum_all().unwrap();
                loss.backward().unwrap().get(&x).unwrap().clone()
            };
            let difference =
                max_relative_difference(&grad(&|x| swiglu(x).unwrap()), &grad(&composed));
            assert!(difference < 1e-5, "{dims:?}: {difference}");
        }
    }

    /// Central differences in f64 of `Σ upstream ⊙ silu(gate) ⊙ up`.
    #[test]
    fn gradient_matches_finite_differences() {
        let (rows, i) = (3, 21);
        let x = random(&[rows, 2 * i], 3, 6.0);
        let upstream = random(&[rows, i], 4, 6.0);
        let var = Var::from_tensor(&x).unwrap();
        let loss = (swiglu(var.as_tensor()).unwrap() * &upstream).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let grad: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let u: Vec<f32> = upstream.flatten_all().unwrap().to_vec1().unwrap();
        let loss_at = |x: &[f64]| -> f64 {
            let mut total = 0.0;
            for (r, row) in x.chunks(2 * i).enumerate() {
                for j in 0..i {
                    let (a, up) = (row[j], row[i + j]);
                    total += a / (1.0 + (-a).exp()) * up * u[r * i + j] as f64;
                }
            }
            total
        };
        let x64: Vec<f64> = x
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| *v as f64)
            .collect();
        let h = 1e-4;
        for k in 0..x64.len() {
            let (mut up, mut down) = (x64.clone(), x64.clone());
            up[k] += h;
            down[k] -= h;
            let numeric = (loss_at(&up) - loss_at(&down)) / (2.0 * h);
            let scale = numeric.abs().max(1.0);
            assert!(
                (numeric - grad[k] as f64).abs() / scale < 1e-4,
                "element {k}: {numeric} against {}",
                grad[k]
            );
        }
    }

    #[test]
    fn an_odd_width_is_an_error() {
        let error = swiglu(&random(&[2, 7], 1, 6.0)).unwrap_err().to_string();
        assert!(error.contains("2·i"), "{error}");
    }
}
