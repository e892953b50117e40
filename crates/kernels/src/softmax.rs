//! Attention's softmax, `softmax(scores + mask)` row by row, with its
//! backward: one pass over the rows each way.
//!
//! Composed of candle's basic ops, so that autograd records it, the masked
//! softmax of a training forward is six passes over the scores (add the
//! mask, max, subtract, exp, sum, divide) and about a dozen in the
//! backward, each allocating its output, with five score-sized tensors
//! kept alive per layer until the backward. The scores are the largest
//! activations of a long sequence (heads × t × len per row: 12 × 130 × 780
//! floats per layer for a reflection after a BFCL prompt on the 1.5B
//! model). Fused, the forward reads the scores and writes the
//! probabilities; the backward, `∂s = p ⊙ (∂p − Σ ∂p ⊙ p)`, reads the
//! probabilities and their gradient once.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::exp::exp;
use crate::level::with_vector_features;
use crate::reduce::{lanes_dot, lanes_max, lanes_sum};
use crate::storage::{f32_slice, with_f32_elements};

/// Rows handed to one task: enough work to outweigh the hand-off.
const ROWS_PER_TASK: usize = 16;

/// `softmax(scores + mask)` over the last dimension, differentiable in
/// `scores`. `scores` is `[batch, …, t, len]` in f32 on the CPU; `mask` is
/// additive, `batch · t · len` elements (`[batch, 1, …, t, len]`), shared by
/// the middle dimensions (the heads), and gets no gradient.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(MaskedSoftmax {
        mask: mask.contiguous()?.detach(),
    })
}

struct MaskedSoftmax {
    mask: Tensor,
}

/// `(rows per batch entry, t, len)` of scores shaped `[batch, …, t, len]`
/// (a row is one query of one head), checked against a mask of `batch · t ·
/// len` elements.
fn row_plan(shape: &Shape, mask: &Tensor) -> candle_core::Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 3 {
        candle_core::bail!("masked softmax: scores {dims:?} need [batch, …, t, len]")
    }
    let (batch, t, len) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
    if mask.elem_count() != batch * t * len {
        candle_core::bail!(
            "masked softmax: a mask of {:?} does not fit scores {dims:?}",
            mask.dims()
        )
    }
    Ok((shape.elem_count() / (batch * len).max(1), t, len))
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows_per_batch, t, len) = row_plan(layout.shape(), &self.mask)?;
        let scores = f32_slice(storage, layout)?;
        let mut out = vec![0f32; scores.len()];
        if len > 0 {
            with_f32_elements(&self.mask, |mask| {
                out.par_chunks_mut(len * ROWS_PER_TASK)
                    .zip(scores.par_chunks(len * ROWS_PER_TASK))
                    .enumerate()
                    .for_each(|(task, (out, scores))| {
                        let first = task * ROWS_PER_TASK;
                        for (i, (p, s)) in out.chunks_mut(len).zip(scores.chunks(len)).enumerate() {
                            // Row `first + i` is query `row % t` of batch
                            // entry `row / rows_per_batch`.
                            let row = first + i;
                            let at = ((row / rows_per_batch) * t + row % t) * len;
                            softmax_row(p, s, &mask[at..at + len]);
                        }
                    })
            })?;
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        probs: &Tensor,
        grad_probs: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = probs.apply_op2_no_bwd(&grad_probs.contiguous()?, &SoftmaxBackward)?;
        Ok(Some(grad))
    }
}

/// `p = softmax(s + m)`, written into `p`.
fn softmax_row(p: &mut [f32], s: &[f32], m: &[f32]) {
    with_vector_features!({
        for ((p, s), m) in p.iter_mut().zip(s).zip(m) {
            *p = s + m;
        }
        let max = lanes_max(p);
        for v in p.iter_mut() {
            *v = exp(*v - max);
        }
        let inv_sum = 1.0 / lanes_sum(p);
        for v in p.iter_mut() {
            *v *= inv_sum;
        }
    })
}

/// The gradient of the scores from the probabilities and theirs.
struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "masked-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        p_storage: &CpuStorage,
        p_layout: &Layout,
        g_storage: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = p_layout.shape();
        if shape != g_layout.shape() {
            candle_core::bail!(
                "masked softmax backward: {shape:?} against {:?}",
                g_layout.shape()
            )
        }
        let len = shape.dims().last().copied().unwrap_or(1);
        let (p, g) = (
            f32_slice(p_storage, p_layout)?,
            f32_slice(g_storage, g_layout)?,
        );
        let mut out = vec![0f32; p.len()];
        if len > 0 {
            out.par_chunks_mut(len * ROWS_PER_TASK)
                .zip(p.par_chunks(len * ROWS_PER_TASK))
                .zip(g.par_chunks(len * ROWS_PER_TASK))
                .for_each(|((out, p), g)| {
                    for ((out, p), g) in out.chunks_mut(len).zip(p.chunks(len)).zip(g.chunks(len)) {
                        softmax_backward_row(out, p, g);
                    }
                });
        }
        Ok((CpuStorage::F32(out), shape.clone()))
    }
}

/// `∂s = p ⊙ (∂p − Σ ∂p ⊙ p)`, written into `out`.
fn softmax_backward_row(out: &mut [f32], p: &[f32], g: &[f32]) {
    with_vector_features!({
        let dot = lanes_dot(p, g);
        for ((out, p), g) in out.iter_mut().zip(p).zip(g) {
            *out = p * (g - dot);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_relative_difference, random};
    use candle_core::{Device, Var, D};

    /// A causal mask `[batch, 1, 1, t, len]` over a cache of `len − t`
    /// earlier columns, with row 1's first column hidden too (a hole).
    fn causal_mask(batch: usize, t: usize, len: usize) -> Tensor {
        let mut mask = vec![0f32; batch * t * len];
        for b in 0..batch {
            for i in 0..t {
                for j in 0..len {
                    let hidden = j > len - t + i || (b == 1 && j == 0);
                    if hidden {
                        mask[(b * t + i) * len + j] = -1e9;
                    }
                }
            }
        }
        Tensor::from_vec(mask, (batch, 1, 1, t, len), &Device::Cpu).unwrap()
    }

    /// The same softmax composed of candle's basic ops, as autograd sees it.
    fn composed(scores: &Tensor, mask: &Tensor) -> Tensor {
        let x = scores.broadcast_add(mask).unwrap();
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let exp = x.broadcast_sub(&max).unwrap().exp().unwrap();
        exp.broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
            .unwrap()
    }

    /// Shapes with rows shorter and longer than the lanes, tails that are
    /// not a multiple of them, and a row count that is not a multiple of a
    /// task's.
    const SHAPES: [(usize, usize, usize, usize, usize); 3] =
        [(2, 3, 2, 5, 7), (2, 2, 1, 9, 37), (1, 1, 3, 16, 48)];

    #[test]
    fn probabilities_match_the_composed_softmax() {
        for (seed, (b, kvh, group, t, len)) in SHAPES.into_iter().enumerate() {
            let scores = random(&[b, kvh, group, t, len], seed as u64, 4.0);
            let mask = causal_mask(b, t, len);
            let fused = masked_softmax(&scores, &mask).unwrap();
            let difference = max_relative_difference(&fused, &composed(&scores, &mask));
            assert!(difference < 1e-6, "{:?}: {difference}", scores.dims());
            // Hidden columns get exactly nothing.
            let hidden = mask.broadcast_as(scores.shape()).unwrap().lt(-1e8).unwrap();
            let leaked = hidden
                .where_cond(&fused, &fused.zeros_like().unwrap())
                .unwrap();
            assert_eq!(
                leaked
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }

    #[test]
    fn gradient_matches_the_composed_softmax() {
        for (seed, (b, kvh, group, t, len)) in SHAPES.into_iter().enumerate() {
            let dims = [b, kvh, group, t, len];
            let mask = causal_mask(b, t, len);
            let upstream = random(&dims, 100 + seed as u64, 4.0);
            let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                let scores = Var::from_tensor(&random(&dims, seed as u64, 4.0)).unwrap();
                let loss = (f(scores.as_tensor()) * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                loss.backward().unwrap().get(&scores).unwrap().clone()
            };
            let fused = grad(&|s| masked_softmax(s, &mask).unwrap());
            let reference = grad(&|s| composed(s, &mask));
            let difference = max_relative_difference(&fused, &reference);
            assert!(difference < 1e-6, "{dims:?}: {difference}");
        }
    }

    /// Central differences in f64 of `Σ upstream ⊙ softmax(s + m)`.
    #[test]
    fn gradient_matches_finite_differences() {
        let (b, heads, t, len) = (2, 2, 3, 20);
        let mask = causal_mask(b, t, len);
        let upstream = random(&[b, heads, t, len], 7, 4.0);
        let scores = random(&[b, heads, t, len], 8, 4.0);
        let var = Var::from_tensor(&scores).unwrap();
        let loss = (masked_softmax(var.as_tensor(), &mask).unwrap() * &upstream).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let grad: Vec<f32> = grads
            .get(&var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (s, m, u): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            scores.flatten_all().unwrap().to_vec1().unwrap(),
            mask.flatten_all().unwrap().to_vec1().unwrap(),
            upstream.flatten_all().unwrap().to_vec1().unwrap(),
        );
        let loss_at = |s: &[f64]| -> f64 {
            let mut total = 0.0;
            for (r, row) in s.chunks(len).enumerate() {
                let mask_row = &m[((r / (heads * t)) * t + r % t) * len..][..len];
                let x: Vec<f64> = row
                    .iter()
                    .zip(mask_row)
                    .map(|(s, m)| s + *m as f64)
                    .collect();
                let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = x.iter().map(|v| (v - max).exp()).sum();
                for (j, v) in x.iter().enumerate() {
                    total += (v - max).exp() / sum * u[r * len + j] as f64;
                }
            }
            total
        };
        let s64: Vec<f64> = s.iter().map(|v| *v as f64).collect();
        let h = 1e-4;
        for i in (0..s64.len()).step_by(7) {
            let (mut up, mut down) = (s64.clone(), s64.clone());
            up[i] += h;
            down[i] -= h;
            let numeric = (loss_at(&up) - loss_at(&down)) / (2.0 * h);
            assert!(
                (numeric - grad[i] as f64).abs() < 1e-4,
                "element {i}: {numeric} against {}",
                grad[i]
            );
        }
    }

    #[test]
    fn a_mask_of_the_wrong_size_is_an_error() {
        let scores = random(&[2, 3, 4, 5], 1, 4.0);
        let mask = causal_mask(1, 4, 5);
        let error = masked_softmax(&scores, &mask).unwrap_err().to_string();
        assert!(error.contains("does not fit"), "{error}");
    }
}
