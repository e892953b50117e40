//! The model's weights by name: the decoder's own names (fused
//! projections, `…q_proj+k_proj+v_proj.weight_t`) for optimizers, and HF's
//! names and shapes for checkpoints that r3 and transformers both load.

use std::collections::HashMap;

use candle_core::Tensor;

use super::vocab::VocabTable;
use super::Llama;
use crate::error::Result;

impl Llama {
    /// Every parameter with its name, mutably, in a fixed order. Projection
    /// names follow the decoder's layout (`…q_proj+k_proj+v_proj.weight_t`);
    /// the others are HF's.
    pub(super) fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        if let Some(embed) = self.embed_tokens.dense_mut() {
            out.push(("model.embed_tokens.weight".to_string(), embed));
        }
        for (i, layer) in self.layers.iter_mut().enumerate() {
            out.extend(layer.tensors_mut(&format!("model.layers.{i}")));
        }
        out.push(("model.norm.weight".to_string(), &mut self.norm.weight));
        if let Some(lm_head) = self.lm_head.as_mut().and_then(VocabTable::dense_mut) {
            out.push(("lm_head.weight".to_string(), lm_head));
        }
        out
    }

    /// Every parameter under the decoder's names, for optimizers.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.clone()
            .tensors_mut()
            .into_iter()
            .map(|(name, t)| (name, t.clone()))
            .collect()
    }

    /// Every weight back under its HF name and shape: what a checkpoint
    /// saves, for r3 and transformers alike.
    pub fn hf_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.to_f32()?,
        );
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.insert(
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.weight.detach(),
            );
            out.insert(
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.weight.detach(),
            );
            for linear in layer.linears() {
                linear.hf_weights(&mut out)?;
            }
        }
        out.insert("model.norm.weight".to_string(), self.norm.weight.detach());
        if let Some(lm_head) = &self.lm_head {
            out.insert("lm_head.weight".to_string(), lm_head.to_f32()?);
        }
        Ok(out)
    }
}
