//! RMSNorm, `x / rms(x) ⊙ w`, with its backward: one pass over the rows
//! forward, one for the input's gradient and one for the weight's.
//!
//! candle's fused RMSNorm has no backward, so a training forward composed
//! it of seven basic ops, and autograd ran about fifteen passes back
//! through them, twice a layer. Fused, with `x̂ = x / rms(x)`:
//! `∂x = (∂y ⊙ w − x̂ · mean(∂y ⊙ w ⊙ x̂)) / rms(x)` and `∂w = Σ_rows ∂y ⊙ x̂`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::level::with_vector_features;
use crate::reduce::lanes_dot;
use crate::storage::f32_slice;

/// Rows handed to one task: enough work to outweigh the hand-off.
const ROWS_PER_TASK: usize = 8;

/// RMSNorm over the last dimension of `x` with weight `w` `[n]`, f32 on the
/// CPU; differentiable in both (`w`'s gradient only when it is tracked).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps })
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    /// `1 / rms(x)` of one row.
    #[inline(always)]
    fn inv_rms(self, x: &[f32]) -> f32 {
        1.0 / (lanes_dot(x, x) / x.len() as f32 + self.eps).sqrt()
    }
}

/// The row width `n`, checked against the weight's.
fn width(x: &Layout, w: &Layout) -> candle_core::Result<usize> {
    let n = x.shape().dims().last().copied().unwrap_or(0);
    if w.shape().dims() != [n] || n == 0 {
        candle_core::bail!(
            "rms-norm: a weight of {:?} for rows of {:?}",
            w.shape().dims(),
            x.shape().dims()
        )
    }
    Ok(n)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = width(x_layout, w_layout)?;
        let (x, w) = (
            f32_slice(x_storage, x_layout)?,
            f32_slice(w_storage, w_layout)?,
        );
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .for_each(|(out, x)| {
                for (y, x) in out.chunks_mut(n).zip(x.chunks(n)) {
                    with_vector_features!({
                        let r = self.inv_rms(x);
                        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                            *y = x * r * w;
                        }
                    })
                }
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let grad_x = x.apply_op3_no_bwd(w, &grad_y, &InputGradient(*self))?;
        let grad_w = match w.track_op() {
            true => Some(x.apply_op2_no_bwd(&grad_y, &WeightGradient(*self))?),
            false => None,
        };
        Ok((Some(grad_x), grad_w))
    }
}

/// `∂x` from `x`, `w` and `∂y`.
struct InputGradient(RmsNorm);

impl CustomOp3 for InputGradient {
    fn name(&self) -> &'static str {
        "rms-norm-input-gradient"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
        g_storage: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = width(x_layout, w_layout)?;
        let x = f32_slice(x_storage, x_layout)?;
        let (w, g) = (
            f32_slice(w_storage, w_layout)?,
            f32_slice(g_storage, g_layout)?,
        );
        if g.len() != x.len() {
            candle_core::bail!(
                "rms-norm backward: gradient of {:?}",
                g_layout.shape().dims()
            )
        }
        let norm = self.0;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(n * ROWS_PER_TASK)
            .zip(x.par_chunks(n * ROWS_PER_TASK))
            .zip(g.par_chunks(n * ROWS_PER_TASK))
            .for_each(|((out, x), g)| {
                for ((out, x), g) in out.chunks_mut(n).zip(x.chunks(n)).zip(g.chunks(n)) {
                    with_vector_features!({
                        let r = norm.inv_rms(x);
                        // out holds ∂y ⊙ w until the last loop.
                        for ((o, g), w) in out.iter_mut().zip(g).zip(w) {
                            *o = g * w;
                        }
                        let mean = lanes_dot(out, x) * r / n as f32;
                        for (o, x) in out.iter_mut().zip(x) {
                            *o = (*o - x * r * mean) * r;
                        }
                    })
                }
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

/// `∂w` from `x` and `∂y`: per-task partial sums over the rows, then added.
struct WeightGradient(RmsNorm);

impl CustomOp2 for WeightGradient {
    fn name(&self) -> &'static str {
        "rms-norm-weight-gradient"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        g_storage: &CpuStorage,
        g_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = x_layout.shape().dims().last().copied().unwrap_or(0);
        let (x, g) = (
            f32_slice(x_storage, x_layout)?,
            f32_slice(g_storage, g_layout)?,
        );
        if g.len() != x.len() || n == 0 {
            candle_core::bail!("rms-norm weight gradient: {:?}", g_layout.shape().dims())
        }
        let norm = self.0;
        let sum = crate::pool::fold_in_order(
            x.par_chunks(n * ROWS_PER_TASK)
                .zip(g.par_chunks(n * ROWS_PER_TASK)),
            || vec![0f32; n],
            |mut sum, (x, g)| {
                for (x, g) in x.chunks(n).zip(g.chunks(n)) {
                    with_vector_features!({
                        let r = norm.inv_rms(x);
                        for ((s, x), g) in sum.iter_mut().zip(x).zip(g) {
                            *s += g * x * r;
                        }
                    })
                }
                sum
            },
            crate::pool::add_vectors,
        );
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_relative_difference, random};
    use candle_core::{Var, D};

    const EPS: f32 = 1e-5;

    /// The norm as the training forward composed it of candle's ops.
    fn composed(x: &Tensor, w: &Tensor) -> Tensor {
        let mean_square = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let inv_rms = (mean_square + EPS as f64)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        x.broadcast_mul(&inv_rms).unwrap().broadcast_mul(w).unwrap()
    }

    /// Rows narrower and wider than a vector, tails, and a row count that
    /// is not a multiple of a task's.
    const SHAPES: [&[usize]; 3] = [&[3, 7], &[2, 5, 40], &[1, 19, 576]];

    #[test]
    fn output_matches_the_composed_norm() {
        for (seed, dims) in SHAPES.into_iter().enumerate() {
            let x = random(dims, seed as u64, 3.0);
            let w = random(&dims[dims.len() - 1..], 10 + seed as u64, 2.0);
            let difference =
                max_relative_difference(&rms_norm(&x, &w, EPS).unwrap(), &composed(&x, &w));
            assert!(difference < 1e-6, "{dims:?}: {difference}");
        }
    }

    #[test]
    fn gradients_match_the_composed_norm() {
        for (seed, dims) in SHAPES.into_iter().enumerate() {
            let upstream = random(dims, 20 + seed as u64, 1.0);
            let grads = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
                let x = Var::from_tensor(&random(dims, seed as u64, 3.0)).unwrap();
                let w = Var::from_tensor(&random(&dims[dims.len() - 1..], 10 + seed as u64, 2.0))
                    .unwrap();
                let loss = (f(x.as_tensor(), w.as_tensor()) * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let grads = loss.backward().unwrap();
                (
                    grads.get(&x).unwrap().clone(),
                    grads.get(&w).unwrap().clone(),
                )
            };
            let (fused_x, fused_w) = grads(&|x, w| rms_norm(x, w, EPS).unwrap());
            let (reference_x, reference_w) = grads(&composed);
            let dx = max_relative_difference(&fused_x, &reference_x);
            let dw = max_relative_difference(&fused_w, &reference_w);
            assert!(dx < 1e-5 && dw < 1e-5, "{dims:?}: ∂x {dx}, ∂w {dw}");
        }
    }

    /// Central differences in f64 of `Σ upstream ⊙ rms_norm(x, w)`, in
    /// every element of `x` and `w`.
    #[test]
    fn gradients_match_finite_differences() {
        let (rows, n) = (3, 18);
        let (x, w) = (random(&[rows, n], 1, 3.0), random(&[n], 2, 2.0));
        let upstream = random(&[rows, n], 3, 1.0);
        let (x_var, w_var) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let loss =
            (rms_norm(x_var.as_tensor(), w_var.as_tensor(), EPS).unwrap() * &upstream).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| *v as f64)
                .collect()
        };
        let (grad_x, grad_w) = (
            flat(grads.get(&x_var).unwrap()),
            flat(grads.get(&w_var).unwrap()),
        );
        let u = flat(&upstream);
        let loss_at = |x: &[f64], w: &[f64]| -> f64 {
            let mut total = 0.0;
            for (r, row) in x.chunks(n).enumerate() {
                let mean_square = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
                let inv_rms = 1.0 / (mean_square + EPS as f64).sqrt();
                for j in 0..n {
                    total += row[j] * inv_rms * w[j] * u[r * n + j];
                }
            }
            total
        };
        let (x64, w64) = (flat(&x), flat(&w));
        let h = 1e-4;
        let check = |name: &str, k: usize, numeric: f64, analytic: f64| {
            assert!(
                (numeric - analytic).abs() / numeric.abs().max(1.0) < 1e-4,
                "∂{name}[{k}]: {numeric} against {analytic}"
            );
        };
        for k in 0..x64.len() {
            let (mut up, mut down) = (x64.clone(), x64.clone());
            up[k] += h;
            down[k] -= h;
            check(
                "x",
                k,
                (loss_at(&up, &w64) - loss_at(&down, &w64)) / (2.0 * h),
                grad_x[k],
            );
        }
        for k in 0..w64.len() {
            let (mut up, mut down) = (w64.clone(), w64.clone());
            up[k] += h;
            down[k] -= h;
            check(
                "w",
                k,
                (loss_at(&x64, &up) - loss_at(&x64, &down)) / (2.0 * h),
                grad_w[k],
            );
        }
    }

    /// A frozen weight (LoRA's base) gets no gradient, and the input's is
    /// the same.
    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let (x, w) = (random(&[4, 33], 5, 3.0), random(&[33], 6, 2.0));
        let x_var = Var::from_tensor(&x).unwrap();
        let loss = rms_norm(x_var.as_tensor(), &w, EPS)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(&w).is_none());
        let reference = composed(x_var.as_tensor(), &w)
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        let reference = reference.backward().unwrap();
        let difference =
            max_relative_difference(grads.get(&x_var).unwrap(), reference.get(&x_var).unwrap());
        assert!(difference < 1e-5, "{difference}");
    }

    #[test]
    fn a_weight_of_the_wrong_width_is_an_error() {
        let error = rms_norm(&random(&[2, 8], 1, 1.0), &random(&[7], 2, 1.0), EPS)
            .unwrap_err()
            .to_string();
        assert!(error.contains("weight of [7]"), "{error}");
    }
}
