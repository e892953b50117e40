//! The decoder with LoRA adapters on its frozen projections: built to
//! train them (from scratch or from an adapter directory), with them for
//! inference, without them (the KL reference: the same weights, no second
//! model), and merged into plain weights for export.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::linear::{LoraPair, WeightLayout};
use super::Llama;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::lora::{peft_names, LoraConfig, MAX_ADAPTER_WEIGHT};
use crate::weights::Weights;

impl Llama {
    /// The decoder for training adapters: the base as for inference (packed
    /// where a kernel reads it) and frozen, and an adapter on every targeted
    /// projection, each a `Var` named by PEFT's name. With `start`, the
    /// adapters begin from its tensors (PEFT names, shapes checked);
    /// otherwise as PEFT initialises them: A uniform in ±1/√in (Kaiming),
    /// B zero, so the model starts as the base.
    pub fn with_lora(
        config: &ModelConfig,
        weights: &Weights,
        lora: &LoraConfig,
        start: Option<&Weights>,
        seed: u64,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let mut model = Self::build(config, weights, WeightLayout::Packed)?;
        let vars = model.attach_lora(lora, start, seed)?;
        Ok((model, vars))
    }

    /// Puts an adapter on every projection `lora` targets: `start`'s
    /// tensors (PEFT names, shapes and values checked, every one used), or
    /// PEFT's initialisation from `seed`. Returns the adapters as `Var`s.
    fn attach_lora(
        &mut self,
        lora: &LoraConfig,
        start: Option<&Weights>,
        seed: u64,
    ) -> Result<Vec<(String, Var)>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = Vec::new();
        let mut used = 0;
        let device = self.device().clone();
        let device = &device;
        for linear in self.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            let inp = linear.input_width();
            for ((name, out), adapter) in linear.parts.iter().zip(&mut linear.adapters) {
                if !lora.targets(name) {
                    continue;
                }
                if lora.r > inp.min(*out) {
                    return Err(ModelError::Shape(format!(
                        "lora_r {} is larger than {name}'s smaller side ({inp} in, {out} out)",
                        lora.r
                    )));
                }
                let [a_name, b_name] = peft_names(name);
                let (a, b) = match start {
                    Some(w) => {
                        used += 2;
                        let a = w.get(&a_name, &[lora.r, inp])?;
                        let b = w.get(&b_name, &[*out, lora.r])?;
                        check_adapter_values(&w.source, &a_name, &a)?;
                        check_adapter_values(&w.source, &b_name, &b)?;
                        (a.to_device(device)?, b.to_device(device)?)
                    }
                    None => {
                        let bound = 1.0 / (inp as f32).sqrt();
                        let a: Vec<f32> = (0..lora.r * inp)
                            .map(|_| rng.random_range(-bound..bound))
                            .collect();
                        (
                            Tensor::from_vec(a, (lora.r, inp), device)?,
                            Tensor::zeros((*out, lora.r), DType::F32, device)?,
                        )
                    }
                };
                // f32 whatever the base's type: the adapters are what
                // trains (cast where used, see `linear::cast_like`).
                let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
                let (a, b) = (Var::from_tensor(&a)?, Var::from_tensor(&b)?);
                *adapter = Some(LoraPair {
                    a: a.as_tensor().clone(),
                    b: b.as_tensor().clone(),
                    scale: lora.scale(),
                });
                vars.push((a_name, a));
                vars.push((b_name, b));
            }
        }
        if let Some(w) = start {
            let total = w.names().count();
            if total != used {
                let extra = w
                    .names()
                    .find(|n| !vars.iter().any(|(v, _)| v == *n))
                    .cloned()
                    .unwrap_or_default();
                return Err(ModelError::tensor(
                    &w.source,
                    extra,
                    "is not an adapter of a targeted projection of this model",
                ));
            }
        }
        Ok(vars)
    }

    /// This decoder's base, sharing every base weight, with the adapter
    /// `adapter` (tensors under PEFT names) applied, for inference
    /// (`Llama::new(…)?.with_adapter(…)`): a server holding many adapters
    /// pays for each one's own tensors only.
    pub fn with_adapter(&self, lora: &LoraConfig, adapter: &Weights) -> Result<Self> {
        let mut model = self.without_adapters();
        model.attach_lora(lora, Some(adapter), 0)?;
        let mut model = model.detached();
        model.stack_adapters()?;
        Ok(model)
    }

    /// The same decoder without its adapters, sharing every base weight:
    /// the KL reference of LoRA training, at no memory cost.
    pub fn without_adapters(&self) -> Self {
        let mut view = self.detached();
        for linear in view.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            linear.adapters.iter_mut().for_each(|a| *a = None);
            linear.stacked = None;
        }
        view
    }

    /// The adapters' tensors under PEFT's names (empty without adapters).
    pub fn adapter_weights(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for linear in self.layers.iter().flat_map(|l| l.linears()) {
            for ((name, _), adapter) in linear.parts.iter().zip(&linear.adapters) {
                if let Some(pair) = adapter {
                    let [a, b] = peft_names(name);
                    out.insert(a, pair.a.detach());
                    out.insert(b, pair.b.detach());
                }
            }
        }
        out
    }

    /// Every weight under its HF name with the adapters merged in,
    /// `W + scale · B·A`: a plain model that any loader reads.
    pub fn merged_hf_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.hf_weights()?;
        for linear in self.layers.iter().flat_map(|l| l.linears()) {
            for ((name, _), adapter) in linear.parts.iter().zip(&linear.adapters) {
                if let Some(pair) = adapter {
                    let key = format!("{name}.weight");
                    let base = out.remove(&key).expect("hf_weights has every projection");
                    let update = (pair.b.detach().matmul(&pair.a.detach())? * pair.scale)?;
                    out.insert(key, (base + update)?);
                }
            }
        }
        Ok(out)
    }
}

/// Refuses an adapter tensor holding NaN, an infinity or a value no
/// training produces, naming it: such an adapter turned every logit NaN
/// while `generate`, `merge` and `train` went on.
fn check_adapter_values(source: &std::path::Path, name: &str, t: &Tensor) -> Result<()> {
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    if let Some(bad) = values
        .iter()
        .find(|v| !v.is_finite() || v.abs() > MAX_ADAPTER_WEIGHT)
    {
        return Err(ModelError::tensor(
            source,
            name,
            format!("holds {bad}: NaN, an infinity or a value over {MAX_ADAPTER_WEIGHT} in magnitude is not a trained adapter"),
        ));
    }
    Ok(())
}
