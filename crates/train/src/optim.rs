//! AdamW over named parameters, with the global gradient norm computed and
//! clipped by hand (candle-nn has neither clipping nor parameter groups).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

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

    /// One update with `grads` (one per parameter, in order) at rate `lr`.
    /// Norm and bias vectors are not decayed.
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        for (i, ((_, param), g)) in self.params.iter().zip(grads).enumerate() {
            let g = &g.detach();
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let step = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.eps)?)?;
            let p = param.as_tensor();
            let decayed = if self.weight_decay > 0.0 && p.rank() > 1 {
                (p * (1.0 - lr * self.weight_decay))?
            } else {
                p.clone()
            };
            param.set(&(decayed - (step * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Per-parameter sums of gradients over micro-batches (and over the layers
/// a recomputed backward replays one at a time), in the optimizer's order.
pub struct Gradients {
    index: HashMap<TensorId, usize>,
    sums: Vec<Option<Tensor>>,
}

impl Gradients {
    pub fn new(params: &[(String, Var)]) -> Self {
        Self {
            index: params
                .iter()
                .enumerate()
                .map(|(i, (_, v))| (v.as_tensor().id(), i))
                .collect(),
            sums: vec![None; params.len()],
        }
    }

    /// Adds every parameter gradient found in `store`. candle leaves a
    /// parameter's gradient attached to the graph that produced it (and so
    /// to every activation); the sums are detached so that graph is freed.
    pub fn add(&mut self, store: &GradStore) -> Result<()> {
        for id in store.get_ids() {
            if let (Some(&i), Some(g)) = (self.index.get(id), store.get_id(*id)) {
                let g = g.detach();
                self.sums[i] = Some(match self.sums[i].take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// The sums, zeros for parameters that received no gradient.
    pub fn into_tensors(self, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
        Ok(self
            .sums
            .into_iter()
            .zip(params)
            .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?)
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

/// Scales `grads` so their global norm is at most `max_norm` (0: no clip).
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(())
}
