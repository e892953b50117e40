//! Rotary position embeddings (HF's rotate-half RoPE) with their backward:
//! one pass over the heads each way.
//!
//! candle's fused rope has no backward, so a training forward composed it
//! of basic ops autograd records: two narrows, a negation, three
//! concatenations and two broadcast products, each a pass that allocates
//! its output, for q and for k in every layer, and as many again backward.
//! A rotation's backward is the rotation by the opposite angle, so one
//! kernel serves both ways.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::level::with_vector_features;
use crate::storage::{f32_slice, with_f32_elements};

/// `x` rotated by its positions' angles: `x` is `[batch, heads, t,
/// head_dim]` in f32 on the CPU, `cos` and `sin` are `[batch, t,
/// head_dim / 2]` (each row's own positions) and get no gradient.
/// Differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Rope {
        cos: cos.contiguous()?.detach(),
        sin: sin.contiguous()?.detach(),
        backward: false,
    })
}

/// The rotation, or (`backward`) the rotation by the opposite angles.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    backward: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        if self.backward {
            "rope-backward"
        } else {
            "rope"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, heads, t, d) = layout.shape().dims4()?;
        let half = d / 2;
        let angles = batch * t * half;
        if d % 2 != 0 || self.cos.elem_count() != angles || self.sin.elem_count() != angles {
            candle_core::bail!(
                "rope: cos {:?} and sin {:?} do not fit x {:?} (they need [batch, t, head_dim/2])",
                self.cos.dims(),
                self.sin.dims(),
                layout.dims()
            )
        }
        let x = f32_slice(storage, layout)?;
        let mut out = vec![0f32; x.len()];
        // The backward rotates by −θ: sin changes sign.
        let sign = if self.backward { -1.0 } else { 1.0 };
        if half > 0 {
            with_f32_elements(&self.cos, |cos| {
                with_f32_elements(&self.sin, |sin| {
                    out.par_chunks_mut(t * d)
                        .zip(x.par_chunks(t * d))
                        .enumerate()
                        .for_each(|(head, (out, x))| {
                            // One head of one batch entry: its t rows share
                            // the entry's angles.
                            let at = (head / heads) * t * half;
                            let angles = (&cos[at..at + t * half], &sin[at..at + t * half]);
                            rotate_head(out, x, angles, half, sign);
                        })
                })
            })??;
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _rotated: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            backward: !self.backward,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin` (with `sin` times `sign`)
/// for each of a head's rows, `x₁` and `x₂` its two halves.
fn rotate_head(out: &mut [f32], x: &[f32], (cos, sin): (&[f32], &[f32]), half: usize, sign: f32) {
    with_vector_features!({
        let rows = out.chunks_mut(2 * half).zip(x.chunks(2 * half));
        let angles = cos.chunks(half).zip(sin.chunks(half));
        for ((y, x), (cos, sin)) in rows.zip(angles) {
            let (y1, y2) = y.split_at_mut(half);
            let (x1, x2) = x.split_at(half);
            for i in 0..half {
                let s = sign * sin[i];
                y1[i] = x1[i] * cos[i] - x2[i] * s;
                y2[i] = x2[i] * cos[i] + x1[i] * s;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_relative_difference, random};
    use candle_core::{Var, D};

    /// The rotation composed of candle's basic ops, as autograd sees it.
    fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let full = |c: &Tensor| {
            Tensor::cat(&[c, c], D::Minus1)
                .unwrap()
                .unsqueeze(1)
                .unwrap()
        };
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(&full(cos)).unwrap() + rotated.broadcast_mul(&full(sin)).unwrap()).unwrap()
    }

    /// cos and sin of angles spread over several turns.
    fn angles(batch: usize, t: usize, half: usize, seed: u64) -> (Tensor, Tensor) {
        let theta = random(&[batch, t, half], seed, 10.0);
        (theta.cos().unwrap(), theta.sin().unwrap())
    }

    /// Heads narrower and wider than the lanes, with odd halves.
    const SHAPES: [(usize, usize, usize, usize); 3] = [(2, 3, 5, 6), (1, 2, 7, 64), (3, 1, 2, 34)];

    #[test]
    fn rotation_matches_the_composed_ops() {
        for (seed, (b, h, t, d)) in SHAPES.into_iter().enumerate() {
            let x = random(&[b, h, t, d], seed as u64, 2.0);
            let (cos, sin) = angles(b, t, d / 2, 50 + seed as u64);
            let fused = rope(&x, &cos, &sin).unwrap();
            let difference = max_relative_difference(&fused, &composed(&x, &cos, &sin));
            assert!(difference < 1e-6, "{:?}: {difference}", x.dims());
        }
    }

    #[test]
    fn gradient_matches_the_composed_ops() {
        for (seed, (b, h, t, d)) in SHAPES.into_iter().enumerate() {
            let (cos, sin) = angles(b, t, d / 2, 50 + seed as u64);
            let upstream = random(&[b, h, t, d], 100 + seed as u64, 2.0);
            let grad = |f: &dyn Fn(&Tensor) -> Tensor| {
                let x = Var::from_tensor(&random(&[b, h, t, d], seed as u64, 2.0)).unwrap();
                let loss = (f(x.as_tensor()) * &upstream).unwrap().sum_all().unwrap();
                loss.backward().unwrap().get(&x).unwrap().clone()
            };
            let fused = grad(&|x| rope(x, &cos, &sin).unwrap());
            let reference = grad(&|x| composed(x, &cos, &sin));
            let difference = max_relative_difference(&fused, &reference);
            assert!(difference < 1e-6, "{:?}: {difference}", [b, h, t, d]);
        }
    }

    /// The loss is linear in x, so its central difference is exact up to
    /// rounding: `∂/∂x Σ u ⊙ rope(x)` read off one element at a time, in f64.
    #[test]
    fn gradient_matches_finite_differences() {
        let (b, h, t, d) = (2, 2, 3, 8);
        let half = d / 2;
        let (cos, sin) = angles(b, t, half, 9);
        let x = random(&[b, h, t, d], 10, 2.0);
        let upstream = random(&[b, h, t, d], 11, 2.0);
        let var = Var::from_tensor(&x).unwrap();
        let loss = (rope(var.as_tensor(), &cos, &sin).unwrap() * &upstream).unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let flat = |t: &Tensor| -> Vec<f64> {
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.into_iter().map(f64::from).collect()
        };
        let grad = flat(grads.get(&var).unwrap());
        let (c, s, u, x64) = (flat(&cos), flat(&sin), flat(&upstream), flat(&x));
        let loss_at = |x: &[f64]| -> f64 {
            let mut total = 0.0;
            for (row, xr) in x.chunks(d).enumerate() {
                let at = ((row / (h * t)) * t + row % t) * half;
                for i in 0..half {
                    let (c, s) = (c[at + i], s[at + i]);
                    total += u[row * d + i] * (xr[i] * c - xr[i + half] * s);
                    total += u[row * d + i + half] * (xr[i + half] * c + xr[i] * s);
                }
            }
            total
        };
        let step = 1e-3;
        for i in 0..x64.len() {
            let (mut up, mut down) = (x64.clone(), x64.clone());
            up[i] += step;
            down[i] -= step;
            let numeric = (loss_at(&up) - loss_at(&down)) / (2.0 * step);
            assert!(
                (numeric - grad[i]).abs() < 1e-5,
                "element {i}: {numeric} against {}",
                grad[i]
            );
        }
    }

    #[test]
    fn angles_of_the_wrong_shape_are_an_error() {
        let x = random(&[1, 2, 3, 8], 1, 1.0);
        let (cos, sin) = angles(1, 4, 4, 2);
        let error = rope(&x, &cos, &sin).unwrap_err().to_string();
        assert!(error.contains("do not fit"), "{error}");
    }
}
