//! The decoder's layers, one struct each with a plain `forward`: RMSNorm,
//! rotary embeddings, attention, the MLP, and the decoder layer that joins
//! them. Whether an op runs a fused kernel (cached attention: no backward
//! pass) or composes basic ops autograd records is the forward's [`Exec`],
//! chosen once per forward. RMSNorm, rope, attention's masked softmax and
//! the MLP's gate have fused kernels with a backward, used by both on the
//! CPU.

use candle_core::{DType, Device, Module, Tensor, D};
use r3_kernels::attention::{cached_attention, MAX_FUSED_TOKENS};
use r3_kernels::device_matmul::device_matmul;
use r3_kernels::rms_norm::rms_norm;
use r3_kernels::rope::rope;
use r3_kernels::softmax::masked_softmax;
use r3_kernels::swiglu::swiglu;

use super::linear::{
    cast_like, project_all, project_heads, Linear, ProjectionWeight, Projections, WeightLayout,
};
use super::ForwardInputs;
use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::exec::Exec;
use crate::lora::peft_names;
use crate::weights::Weights;

/// Whether `x` is what r3's own CPU kernels (`r3_kernels`) take: f32 on
/// the CPU. Elsewhere candle's kernels or composed ops run.
fn has_cpu_kernels(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    /// r3's fused kernel, which has a backward, for f32 on the CPU;
    /// candle's fused norm, or basic ops autograd records, elsewhere.
    pub(super) fn forward(&self, x: &Tensor, exec: Exec) -> candle_core::Result<Tensor> {
        let weight = cast_like(&self.weight, x)?;
        if has_cpu_kernels(x) {
            return rms_norm(x, &weight, self.eps as f32);
        }
        if exec.fused() && x.is_contiguous() {
            return candle_nn::ops::rms_norm(x, &weight, self.eps as f32);
        }
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (mean_square + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?.broadcast_mul(&weight)
    }
}

/// Attention's weights, `softmax(scores + mask)` over the last dimension:
/// r3's fused kernel, which has a backward, for f32 on the CPU; candle's
/// fused softmax, or basic ops autograd records, elsewhere.
fn attention_probs(scores: &Tensor, mask: &Tensor, exec: Exec) -> candle_core::Result<Tensor> {
    if has_cpu_kernels(scores) {
        return masked_softmax(scores, mask);
    }
    let x = scores.broadcast_add(mask)?;
    if exec.fused() {
        return candle_nn::ops::softmax_last_dim(&x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// cos/sin of every new token's rotary angles, `[batch, t, head_dim/2]`,
/// in the type of the activations they rotate.
pub(super) struct Rotary {
    pub(super) cos: Tensor,
    pub(super) sin: Tensor,
}

impl Rotary {
    pub(super) fn new(
        inv_freq: &[f32],
        positions: &[u32],
        batch: usize,
        t: usize,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (batch, t, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (batch, t, half), device)?.to_dtype(dtype)?,
        })
    }

    /// HF's rotate-half RoPE on `[batch, heads, t, head_dim]`: r3's fused
    /// kernel, which has a backward, for f32 on the CPU; candle's fused
    /// rope, or basic ops autograd records, elsewhere.
    pub(super) fn apply(&self, x: &Tensor, exec: Exec) -> candle_core::Result<Tensor> {
        if has_cpu_kernels(x) {
            return rope(x, &self.cos, &self.sin);
        }
        if exec.fused() {
            return candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin);
        }
        let half = x.dim(D::Minus1)? / 2;
        let cos = Tensor::cat(&[&self.cos, &self.cos], D::Minus1)?.unsqueeze(1)?;
        let sin = Tensor::cat(&[&self.sin, &self.sin], D::Minus1)?.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    /// q, k and v: one fused projection, or three (compact).
    pub(super) qkv: Projections<3>,
    pub(super) o_proj: Linear,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    pub(super) fn load(
        w: &Weights,
        prefix: &str,
        c: &ModelConfig,
        layout: WeightLayout,
    ) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let part = |name: &str, out| (format!("{prefix}.{name}"), out);
        let qkv = [part("q_proj", q), part("k_proj", kv), part("v_proj", kv)];
        let mut o_proj = Linear::load(w, &[part("o_proj", h)], q, false, layout)?;
        Ok(Self {
            qkv: Projections::load(w, &qkv, h, c.attention_bias, layout)?,
            o_proj: o_proj.remove(0),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        inputs: &ForwardInputs,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (rotary, mask, exec) = (&inputs.rotary, &inputs.mask, inputs.exec);
        let (b, t) = (inputs.batch, inputs.t);
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut qkv = project_heads(self.qkv.as_slice(), x, d, inputs)?.into_iter();
        let mut next = || qkv.next().expect("q, k and v");
        let (q, k, v) = (next(), next(), next());
        let q = rotary.apply(&q, exec)?;
        let k = rotary.apply(&k, exec)?;
        let (k, v) = cache.append_layer(layer, k.contiguous()?, v)?;
        let scale = 1.0 / (d as f64).sqrt();
        let kernel_fits = has_cpu_kernels(&q) && t <= MAX_FUSED_TOKENS;
        if exec.fused() && kernel_fits {
            let out = cached_attention(&q, &k, &v, mask, scale as f32)?;
            return Ok(self.o_proj.forward(&inputs.real_tokens(out)?)?);
        }
        let len = k.dim(2)?;
        // The query heads that share one kv head are stacked along the time
        // axis, so grouped-query attention needs no copy of the keys.
        let group = h / kvh;
        let q = (q * scale)?.reshape((b, kvh, group * t, d))?;
        let scores = device_matmul(&q, &k.t()?)?.reshape((b, kvh, group, t, len))?;
        let probs = attention_probs(&scores, mask, exec)?.reshape((b, kvh, group * t, len))?;
        let out = device_matmul(&probs, &v)?
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        Ok(self.o_proj.forward(&inputs.real_tokens(out)?)?)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    /// gate and up: one fused projection, or two (compact).
    pub(super) gate_up: Projections<2>,
    pub(super) down_proj: Linear,
}

impl Mlp {
    pub(super) fn load(
        w: &Weights,
        prefix: &str,
        c: &ModelConfig,
        layout: WeightLayout,
    ) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let part = |name: &str, out| (format!("{prefix}.{name}"), out);
        let gate_up = [part("gate_proj", i), part("up_proj", i)];
        let mut down_proj = Linear::load(w, &[part("down_proj", h)], i, false, layout)?;
        Ok(Self {
            gate_up: Projections::load(w, &gate_up, h, false, layout)?,
            down_proj: down_proj.remove(0),
        })
    }
}

impl Module for Mlp {
    /// `down(silu(gate) ⊙ up)`: the gate is r3's fused kernel (which has a
    /// backward) on a fused projection in f32 on the CPU, candle's ops
    /// elsewhere.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gated = match &self.gate_up {
            Projections::Fused(gate_up) if has_cpu_kernels(x) => swiglu(&gate_up.forward(x)?)?,
            projections => {
                let mut gate_up = project_all(projections.as_slice(), x)?.into_iter();
                let (gate, up) = (gate_up.next().expect("gate"), gate_up.next().expect("up"));
                (gate.silu()? * up)?
            }
        };
        self.down_proj.forward(&gated)
    }
}

#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    pub(super) input_layernorm: RmsNorm,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
}

impl DecoderLayer {
    pub(super) fn load(
        w: &Weights,
        i: usize,
        c: &ModelConfig,
        layout: WeightLayout,
    ) -> Result<Self> {
        let prefix = format!("model.layers.{i}");
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(&format!("{prefix}.{name}.weight"), &[c.hidden_size])?,
                eps: c.rms_norm_eps,
            })
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(w, &format!("{prefix}.self_attn"), c, layout)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(w, &format!("{prefix}.mlp"), c, layout)?,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        inputs: &ForwardInputs,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let normed = self.input_layernorm.forward(x, inputs.exec)?;
        let attn = self.self_attn.forward(&normed, inputs, cache, layer)?;
        let x = (x + attn)?;
        let normed = self.post_attention_layernorm.forward(&x, inputs.exec)?;
        let mlp = self.mlp.forward(&normed)?;
        Ok((x + mlp)?)
    }

    /// Every projection of the layer, in a fixed order.
    pub(super) fn linears(&self) -> impl Iterator<Item = &Linear> {
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        attn.qkv
            .as_slice()
            .iter()
            .chain([&attn.o_proj])
            .chain(mlp.gate_up.as_slice())
            .chain([&mlp.down_proj])
    }

    pub(super) fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        projections_mut(&mut self.self_attn, &mut self.mlp)
    }

    /// Every parameter of the layer with its name, mutably.
    pub(super) fn tensors_mut(&mut self, prefix: &str) -> Vec<(String, &mut Tensor)> {
        let Self {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
        } = self;
        let mut out = vec![
            (
                format!("{prefix}.input_layernorm.weight"),
                &mut input_layernorm.weight,
            ),
            (
                format!("{prefix}.post_attention_layernorm.weight"),
                &mut post_attention_layernorm.weight,
            ),
        ];
        for linear in projections_mut(self_attn, mlp) {
            let name = linear.name();
            if let ProjectionWeight::Dense(weight_t) = &mut linear.weight {
                out.push((format!("{name}.weight_t"), weight_t));
            }
            if let Some(bias) = &mut linear.bias {
                out.push((format!("{name}.bias"), bias));
            }
            for ((part, _), adapter) in linear.parts.iter().zip(&mut linear.adapters) {
                if let Some(adapter) = adapter {
                    let [a, b] = peft_names(part);
                    out.push((a, &mut adapter.a));
                    out.push((b, &mut adapter.b));
                }
            }
        }
        out
    }
}

/// A layer's projections in order (q/k/v, o; gate/up, down), mutably:
/// taking the two halves apart lets callers borrow the norms beside them.
fn projections_mut<'a>(
    attn: &'a mut Attention,
    mlp: &'a mut Mlp,
) -> impl Iterator<Item = &'a mut Linear> {
    attn.qkv
        .as_mut_slice()
        .iter_mut()
        .chain([&mut attn.o_proj])
        .chain(mlp.gate_up.as_mut_slice().iter_mut())
        .chain([&mut mlp.down_proj])
}
