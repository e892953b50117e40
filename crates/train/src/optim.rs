//! AdamW over named parameters, with the global gradient norm computed and
//! clipped by hand (candle-nn has neither clipping nor parameter groups).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor, TensorId, Var};
use r3_kernels::storage::{f32_slice, f32_slice_mut};

use crate::{Result, TrainError};

/// Adam moments and step count, kept beside the parameters they update.
pub struct AdamW {
    pub params: Vec<(String, Var)>,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub step: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(
        params: Vec<(String, Var)>,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let zeros = |p: &Var| p.as_tensor().zeros_like();
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            beta1,
            beta2,
            eps,
            weight_decay,
        })
    }

    /// One update with `grads` (one per parameter, in order) multiplied by
    /// `grad_scale` (gradient clipping), at rate `lr`. Norm and bias vectors
    /// are not decayed. Moments and parameters are updated in place: no
    /// allocation per parameter.
    pub fn update(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        for (i, ((_, param), g)) in self.params.iter().zip(grads).enumerate() {
            let g = g.detach().contiguous()?;
            let moments = Moments {
                beta1: self.beta1 as f32,
                beta2: self.beta2 as f32,
                grad_scale: grad_scale as f32,
                second: false,
            };
            self.m[i].inplace_op2(&g, &moments)?;
            self.v[i].inplace_op2(
                &g,
                &Moments {
                    second: true,
                    ..moments
                },
            )?;
            let decay = if param.as_tensor().rank() > 1 {
                self.weight_decay
            } else {
                0.0
            };
            let step = AdamStep {
                lr: lr as f32,
                bias1: (1.0 - self.beta1.powi(t)) as f32,
                bias2: (1.0 - self.beta2.powi(t)) as f32,
                eps: self.eps as f32,
                decay: (lr * decay) as f32,
            };
            param
                .as_tensor()
                .inplace_op3(&self.m[i], &self.v[i], &step)?;
        }
        Ok(())
    }
}

/// `sum ← sum + g`.
struct AddInPlace;

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(
        &self,
        sum: &mut CpuStorage,
        sum_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let sum = f32_slice_mut(sum, sum_layout)?;
        for (s, g) in sum.iter_mut().zip(f32_slice(grad, grad_layout)?) {
            *s += g;
        }
        Ok(())
    }
}

/// `m ← β1·m + (1−β1)·g`, or with `second`, `v ← β2·v + (1−β2)·g²`, where
/// `g` is the gradient times `grad_scale`.
struct Moments {
    beta1: f32,
    beta2: f32,
    grad_scale: f32,
    second: bool,
}

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "adam-moments"
    }

    fn cpu_fwd(
        &self,
        moment: &mut CpuStorage,
        moment_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> candle_core::Result<()> {
        let moment = f32_slice_mut(moment, moment_layout)?;
        let grad = f32_slice(grad, grad_layout)?;
        let s = self.grad_scale;
        if self.second {
            for (v, g) in moment.iter_mut().zip(grad) {
                *v = self.beta2 * *v + (1.0 - self.beta2) * (g * s) * (g * s);
            }
        } else {
            for (m, g) in moment.iter_mut().zip(grad) {
                *m = self.beta1 * *m + (1.0 - self.beta1) * g * s;
            }
        }
        Ok(())
    }
}

/// `p ← p·(1 − lr·λ) − lr·m̂/(√v̂ + ε)` with bias-corrected moments.
struct AdamStep {
    lr: f32,
    bias1: f32,
    bias2: f32,
    eps: f32,
    /// `lr × weight_decay`.
    decay: f32,
}

impl InplaceOp3 for AdamStep {
    fn name(&self) -> &'static str {
        "adamw-step"
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        param_layout: &Layout,
        m: &CpuStorage,
        m_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        let param = f32_slice_mut(param, param_layout)?;
        let (m, v) = (f32_slice(m, m_layout)?, f32_slice(v, v_layout)?);
        for ((p, m), v) in param.iter_mut().zip(m).zip(v) {
            let update = (m / self.bias1) / ((v / self.bias2).sqrt() + self.eps);
            *p = *p * (1.0 - self.decay) - self.lr * update;
        }
        Ok(())
    }
}

/// Per-parameter sums of gradients over micro-batches (and over the layers
/// a recomputed backward replays one at a time), in the optimizer's order.
/// Allocated once and reused every step, so that these long-lived buffers
/// do not fragment the memory of each step's short-lived activations.
pub struct Gradients {
    index: HashMap<TensorId, usize>,
    sums: Vec<Tensor>,
}

impl Gradients {
    pub fn new(params: &[(String, Var)]) -> Result<Self> {
        Ok(Self {
            index: params
                .iter()
                .enumerate()
                .map(|(i, (_, v))| (v.as_tensor().id(), i))
                .collect(),
            sums: params
                .iter()
                .map(|(_, v)| v.as_tensor().zeros_like())
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// Adds every parameter gradient found in `store`, in place (candle
    /// leaves a parameter's gradient attached to the graph that produced
    /// it; nothing here keeps that graph alive).
    pub fn add(&mut self, store: &GradStore) -> Result<()> {
        for id in store.get_ids() {
            if let (Some(&i), Some(g)) = (self.index.get(id), store.get_id(*id)) {
                self.sums[i].inplace_op2(&g.contiguous()?, &AddInPlace)?;
            }
        }
        Ok(())
    }

    /// The sums, one per parameter.
    pub fn sums(&self) -> &[Tensor] {
        &self.sums
    }

    /// Every sum back to zero, for the next step.
    pub fn zero(&mut self) -> Result<()> {
        for sum in &self.sums {
            sum.inplace_op1(&Zero)?;
        }
        Ok(())
    }
}

/// `x ← 0`.
struct Zero;

impl candle_core::InplaceOp1 for Zero {
    fn name(&self) -> &'static str {
        "zero"
    }

    fn cpu_fwd(&self, x: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        f32_slice_mut(x, layout)?.fill(0.0);
        Ok(())
    }
}

/// The global L2 norm of `grads`; fails on a non-finite value, naming the
/// parameter, so a run stops before a bad update.
pub fn global_norm(names: &[&str], grads: &[Tensor]) -> Result<f64> {
    let mut total = 0f64;
    for (name, g) in names.iter().zip(grads) {
        let sq = g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        if !sq.is_finite() {
            return Err(TrainError::Invalid(format!(
                "non-finite gradient in '{name}'; stopping (the last checkpoint is intact)"
            )));
        }
        total += sq;
    }
    Ok(total.sqrt())
}

/// The factor that brings a global gradient norm down to `max_norm`
/// (1 when it is below, or when `max_norm` is 0: no clipping).
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}
