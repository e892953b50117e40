//! The Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Mistral): one
//! struct per layer, a plain `forward`, batched with per-row positions.
//!
//! Weights live in the layout the forward wants rather than HF's: every
//! projection transposed to `[in, out]` and contiguous (gemm reads it in
//! place, where a row-major weight is repacked on every call — the dominant
//! cost of batched decoding), and the projections of one input (q/k/v;
//! gate/up) side by side, so that one wider GEMM serves them. Training
//! updates this layout directly; [`Llama::hf_weights`] converts back. A
//! decoder built for inference keeps projections whose file encoding has a
//! packed kernel (Q4_0, Q4_1, Q8_0, F16, BF16) in that encoding instead
//! (see `packed.rs`): the same values at a fraction of the memory traffic.
//!
//! candle's fused kernels (rms-norm, softmax, rope) have no backward pass, so
//! each op below takes the fused kernel only when none of its inputs can need
//! a gradient, and otherwise composes basic ops that autograd records.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor, Var, D};

use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::logprob;
use crate::weights::Weights;
use r3_kernels::attention::{cached_attention, MAX_FUSED_TOKENS};
use r3_kernels::matmul::{matmul, packed_matmul};
use r3_kernels::packed::PackedMatrix;

/// How a decoder holds its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Packed in the file's encoding where a kernel reads it, fast
    /// otherwise: for generation.
    Packed,
    /// Transposed, fused f32 copies of the loaded weights: trainable.
    Fast,
    /// Packed where a kernel reads it, transposed views of the loaded
    /// weights otherwise: the least memory, for a model that only scores.
    Compact,
}

/// A projection's weight.
#[derive(Debug, Clone)]
enum ProjectionWeight {
    /// `[in, Σ out]` in f32: trainable.
    Dense(Tensor),
    /// One `[out_i, in]` matrix per part, in its file's encoding: inference
    /// only.
    Packed(Arc<[PackedMatrix]>),
}

/// Projections of one input, `x · W (+ b)` with `W` `[in, Σ out]`,
/// flattening the batch first so that one GEMM serves every row (a
/// broadcast batched matmul would re-read the weights once per row).
#[derive(Debug, Clone)]
struct Linear {
    weight: ProjectionWeight,
    bias: Option<Tensor>,
    /// HF name (without `.weight`) and output width of each part, in
    /// column order.
    parts: Vec<(String, usize)>,
}

impl Linear {
    /// The parts `(HF name, out)` of an input of width `inp`: packed, unless
    /// training or a part's encoding has no packed kernel; else fused into
    /// one contiguous copy (fast), or one transposed view each (compact).
    fn load(
        w: &Weights,
        parts: &[(String, usize)],
        inp: usize,
        bias: bool,
        layout: Layout,
    ) -> Result<Vec<Self>> {
        let load_bias = || -> Result<Option<Tensor>> {
            if !bias {
                return Ok(None);
            }
            let biases = parts
                .iter()
                .map(|(name, out)| w.get(&format!("{name}.bias"), &[*out]))
                .collect::<Result<Vec<_>>>()?;
            Ok(Some(Tensor::cat(&biases, 0)?))
        };
        if layout != Layout::Fast {
            let packed = parts
                .iter()
                .map(|(name, out)| w.packed(&format!("{name}.weight"), &[*out, inp]))
                .collect::<Result<Option<Vec<_>>>>()?;
            if let Some(packed) = packed {
                return Ok(vec![Self {
                    weight: ProjectionWeight::Packed(packed.into()),
                    bias: load_bias()?,
                    parts: parts.to_vec(),
                }]);
            }
        }
        let load_one = |(name, out): &(String, usize)| -> Result<(Tensor, Option<Tensor>)> {
            let weight = w.get(&format!("{name}.weight"), &[*out, inp])?;
            let b = match bias {
                true => Some(w.get(&format!("{name}.bias"), &[*out])?),
                false => None,
            };
            Ok((weight, b))
        };
        let loaded = parts.iter().map(load_one).collect::<Result<Vec<_>>>()?;
        if layout == Layout::Compact {
            return parts
                .iter()
                .zip(loaded)
                .map(|(part, (weight, bias))| {
                    Ok(Self {
                        weight: ProjectionWeight::Dense(weight.t()?),
                        bias,
                        parts: vec![part.clone()],
                    })
                })
                .collect();
        }
        let transposed = loaded
            .iter()
            .map(|(weight, _)| weight.t())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(vec![Self {
            weight: ProjectionWeight::Dense(Tensor::cat(&transposed, 1)?.contiguous()?),
            bias: load_bias()?,
            parts: parts.to_vec(),
        }])
    }

    /// The parameter name: the first part's HF name, then the last path
    /// component of each other part (`…q_proj+k_proj+v_proj`).
    fn name(&self) -> String {
        let mut name = self.parts[0].0.clone();
        for (part, _) in &self.parts[1..] {
            name.push('+');
            name.push_str(part.rsplit('.').next().unwrap_or(part));
        }
        name
    }

    /// The parts' outputs side by side, `[b, t, Σ out_i]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, inp) = x.dims3()?;
        let rows = x.reshape((b * t, inp))?;
        let mut y = match &self.weight {
            ProjectionWeight::Dense(weight_t) => matmul(&rows, weight_t)?,
            ProjectionWeight::Packed(parts) => packed_matmul(&rows, parts)?,
        };
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        y.reshape((b, t, ()))
    }

    /// Each part's weight (and bias) back in HF's layout and names.
    fn hf_weights(&self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let mut offset = 0;
        for (i, (name, width)) in self.parts.iter().enumerate() {
            let weight = match &self.weight {
                ProjectionWeight::Dense(weight_t) => {
                    weight_t.narrow(1, offset, *width)?.t()?.contiguous()?
                }
                ProjectionWeight::Packed(parts) => parts[i].to_f32()?,
            };
            out.insert(format!("{name}.weight"), weight);
            if let Some(bias) = &self.bias {
                out.insert(
                    format!("{name}.bias"),
                    bias.narrow(0, offset, *width)?.contiguous()?,
                );
            }
            offset += width;
        }
        Ok(())
    }
}

/// The output of every part of `linears`, in order, as `[b, t, out_i]`
/// views of the fused products (no copies).
fn project_all(linears: &[Linear], x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
    let mut outputs = Vec::with_capacity(3);
    for linear in linears {
        let y = linear.forward(x)?;
        let mut offset = 0;
        for (_, width) in &linear.parts {
            outputs.push(y.narrow(2, offset, *width)?);
            offset += width;
        }
    }
    Ok(outputs)
}

/// The output of every part of `linears`, in order, split into heads of
/// `head_dim`: `[b, heads_i, t, head_dim]`, contiguous. Each part is one
/// copy out of the fused product.
fn project_heads(
    linears: &[Linear],
    x: &Tensor,
    head_dim: usize,
) -> candle_core::Result<Vec<Tensor>> {
    let mut outputs = Vec::with_capacity(3);
    for linear in linears {
        let y = linear.forward(x)?;
        let (b, t, total) = y.dims3()?;
        let heads = y.reshape((b, t, total / head_dim, head_dim))?;
        let mut offset = 0;
        for (_, width) in &linear.parts {
            let part = heads.narrow(2, offset / head_dim, width / head_dim)?;
            outputs.push(part.transpose(1, 2)?.contiguous()?);
            offset += width;
        }
    }
    Ok(outputs)
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.track_op() && !self.weight.track_op() && x.is_contiguous() {
            return candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32);
        }
        let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_rms = (mean_square + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&inv_rms)?.broadcast_mul(&self.weight)
    }
}

fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
}

/// cos/sin of every new token's rotary angles, `[batch, t, head_dim/2]`.
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(inv_freq: &[f32], positions: &[u32], batch: usize, t: usize) -> Result<Self> {
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
            cos: Tensor::from_vec(cos, (batch, t, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (batch, t, half), &Device::Cpu)?,
        })
    }

    /// HF's rotate-half RoPE on `[batch, heads, t, head_dim]`.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if !x.track_op() {
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
struct Attention {
    /// q, k and v: one fused projection, or three (compact).
    qkv: Vec<Linear>,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, c: &ModelConfig, layout: Layout) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let part = |name: &str, out| (format!("{prefix}.{name}"), out);
        let qkv = [part("q_proj", q), part("k_proj", kv), part("v_proj", kv)];
        let mut o_proj = Linear::load(w, &[part("o_proj", h)], q, false, layout)?;
        Ok(Self {
            qkv: Linear::load(w, &qkv, h, c.attention_bias, layout)?,
            o_proj: o_proj.remove(0),
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let mut qkv = project_heads(&self.qkv, x, d)?.into_iter();
        let mut next = || qkv.next().expect("q, k and v");
        let (q, k, v) = (next(), next(), next());
        let q = rotary.apply(&q)?;
        let k = rotary.apply(&k)?;
        let (k, v) = cache.append_layer(layer, k.contiguous()?, v)?;
        let scale = 1.0 / (d as f64).sqrt();
        let needs_grad = q.track_op() || k.track_op() || v.track_op();
        if t <= MAX_FUSED_TOKENS && !needs_grad && q.device().is_cpu() {
            let out = cached_attention(&q, &k, &v, mask, scale as f32)?;
            return Ok(self.o_proj.forward(&out)?);
        }
        let len = k.dim(2)?;
        // The query heads that share one kv head are stacked along the time
        // axis, so grouped-query attention needs no copy of the keys.
        let group = h / kvh;
        let q = (q * scale)?.reshape((b, kvh, group * t, d))?;
        let scores = q
            .matmul(&k.t()?)?
            .reshape((b, kvh, group, t, len))?
            .broadcast_add(mask)?;
        let probs = softmax_last_dim(&scores)?.reshape((b, kvh, group * t, len))?;
        let out = probs
            .matmul(&v)?
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    /// gate and up: one fused projection, or two (compact).
    gate_up: Vec<Linear>,
    down_proj: Linear,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, c: &ModelConfig, layout: Layout) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let part = |name: &str, out| (format!("{prefix}.{name}"), out);
        let gate_up = [part("gate_proj", i), part("up_proj", i)];
        let mut down_proj = Linear::load(w, &[part("down_proj", h)], i, false, layout)?;
        Ok(Self {
            gate_up: Linear::load(w, &gate_up, h, false, layout)?,
            down_proj: down_proj.remove(0),
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut gate_up = project_all(&self.gate_up, x)?.into_iter();
        let (gate, up) = (gate_up.next().expect("gate"), gate_up.next().expect("up"));
        self.down_proj.forward(&(gate.silu()? * up)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(w: &Weights, i: usize, c: &ModelConfig, layout: Layout) -> Result<Self> {
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

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        mask: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let attn = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            rotary,
            mask,
            cache,
            layer,
        )?;
        let x = (x + attn)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        Ok((x + mlp)?)
    }

    /// Every projection of the layer, in a fixed order.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        let (attn, mlp) = (&self.self_attn, &self.mlp);
        attn.qkv
            .iter()
            .chain([&attn.o_proj])
            .chain(&mlp.gate_up)
            .chain([&mlp.down_proj])
    }

    /// Every parameter of the layer with its name, mutably.
    fn tensors_mut(&mut self, prefix: &str) -> Vec<(String, &mut Tensor)> {
        let mut out = vec![
            (
                format!("{prefix}.input_layernorm.weight"),
                &mut self.input_layernorm.weight,
            ),
            (
                format!("{prefix}.post_attention_layernorm.weight"),
                &mut self.post_attention_layernorm.weight,
            ),
        ];
        let linears = self
            .self_attn
            .qkv
            .iter_mut()
            .chain(std::iter::once(&mut self.self_attn.o_proj))
            .chain(self.mlp.gate_up.iter_mut())
            .chain(std::iter::once(&mut self.mlp.down_proj));
        for linear in linears {
            let name = linear.name();
            if let ProjectionWeight::Dense(weight_t) = &mut linear.weight {
                out.push((format!("{name}.weight_t"), weight_t));
            }
            if let Some(bias) = &mut linear.bias {
                out.push((format!("{name}.bias"), bias));
            }
        }
        out
    }
}

/// What every layer of one forward shares, planned against the cache: the
/// new tokens, their additive attention mask and rotary angles.
pub struct ForwardInputs {
    tokens: Tensor,
    mask: Tensor,
    rotary: Rotary,
    batch: usize,
    t: usize,
}

/// A causal language model of the Llama family.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The output projection `[vocab, hidden]`; `None` when tied to the
    /// embeddings.
    lm_head: Option<Tensor>,
    /// The output projection transposed `[hidden, vocab]` and contiguous,
    /// for fast logits when generating (see the module doc).
    lm_head_t: Option<Tensor>,
    /// The output projection packed, for inference; replaces `lm_head_t`.
    lm_head_packed: Option<Arc<[PackedMatrix]>>,
    inv_freq: Vec<f32>,
}

impl Llama {
    /// Builds the decoder for inference from HF-named weights, checking
    /// every shape. Projections stay in their file's encoding where a
    /// packed kernel reads it; such a decoder cannot be trained.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, Layout::Packed)
    }

    /// The decoder in the least memory: projections packed where the file
    /// allows, otherwise views of `weights` without transposed copies
    /// (slower GEMMs). For a reference model that only scores.
    pub fn new_compact(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, Layout::Compact)
    }

    /// The decoder with every parameter a `Var` (in the decoder's own
    /// layout, named as [`Llama::parameters`] names them): what training
    /// updates in place.
    pub fn trainable(
        config: &ModelConfig,
        weights: &Weights,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let mut model = Self::build(config, weights, Layout::Fast)?;
        model.lm_head_t = None;
        let mut vars = Vec::new();
        for (name, tensor) in model.tensors_mut() {
            let var = Var::from_tensor(tensor)?;
            *tensor = var.as_tensor().clone();
            vars.push((name, var));
        }
        Ok((model, vars))
    }

    fn build(config: &ModelConfig, weights: &Weights, layout: Layout) -> Result<Self> {
        let c = config;
        let embed_tokens =
            weights.get("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let lm_head = if weights.contains("lm_head.weight") {
            Some(weights.get("lm_head.weight", &[c.vocab_size, c.hidden_size])?)
        } else if c.tie_word_embeddings {
            None
        } else {
            return Err(ModelError::tensor(
                &weights.source,
                "lm_head.weight",
                "missing and the embeddings are not tied",
            ));
        };
        let layers = (0..c.num_layers)
            .map(|i| DecoderLayer::load(weights, i, c, layout))
            .collect::<Result<Vec<_>>>()?;
        let output_name = match &lm_head {
            Some(_) => "lm_head.weight",
            None => "model.embed_tokens.weight",
        };
        let lm_head_packed = match layout {
            Layout::Packed | Layout::Compact => weights
                .packed(output_name, &[c.vocab_size, c.hidden_size])?
                .map(|packed| Arc::from(vec![packed])),
            _ => None,
        };
        let output = lm_head.as_ref().unwrap_or(&embed_tokens);
        let lm_head_t = match layout {
            Layout::Packed if lm_head_packed.is_none() => Some(output.t()?.contiguous()?),
            Layout::Fast => Some(output.t()?.contiguous()?),
            Layout::Packed | Layout::Compact => None,
        };
        Ok(Self {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm {
                weight: weights.get("model.norm.weight", &[c.hidden_size])?,
                eps: c.rms_norm_eps,
            },
            lm_head,
            lm_head_t,
            lm_head_packed,
            inv_freq: c.inv_freq(),
        })
    }

    /// The output projection `[vocab, hidden]`.
    fn output_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Every parameter with its name, mutably, in a fixed order. Projection
    /// names follow the decoder's layout (`…q_proj+k_proj+v_proj.weight_t`);
    /// the others are HF's.
    fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            &mut self.embed_tokens,
        )];
        for (i, layer) in self.layers.iter_mut().enumerate() {
            out.extend(layer.tensors_mut(&format!("model.layers.{i}")));
        }
        out.push(("model.norm.weight".to_string(), &mut self.norm.weight));
        if let Some(lm_head) = &mut self.lm_head {
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
            self.embed_tokens.detach(),
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
            out.insert("lm_head.weight".to_string(), lm_head.detach());
        }
        Ok(out)
    }

    /// The same model with every weight detached from autograd, sharing
    /// storage (so it follows in-place updates): fused kernels and no graph,
    /// for forwards whose gradient is not wanted.
    pub fn detached(&self) -> Self {
        let mut view = self.clone();
        for (_, tensor) in view.tensors_mut() {
            *tensor = tensor.detach();
        }
        view.lm_head_t = view.lm_head_t.as_ref().map(Tensor::detach);
        view
    }

    /// [`Llama::detached`] with the transposed output projection that fast
    /// generation wants (a copy, when the model has none).
    pub fn for_generation(&self) -> Result<Self> {
        let mut view = self.detached();
        if view.lm_head_t.is_none() && view.lm_head_packed.is_none() {
            view.lm_head_t = Some(view.output_weight().t()?.contiguous()?);
        }
        Ok(view)
    }

    /// Runs one segment of new tokens per cache row through the decoder,
    /// appending their keys and values to `cache`. Returns the final hidden
    /// states `[batch, t, hidden]`, right-aligned like the cache (the last
    /// column holds every row's newest token).
    pub fn forward(&self, segments: &[&[u32]], cache: &mut KvCache) -> Result<Tensor> {
        let inputs = self.plan(segments, cache)?;
        let mut x = self.embed(&inputs)?;
        for layer in 0..self.layers.len() {
            x = self.layer_forward(layer, &x, &inputs, cache)?;
        }
        self.final_norm(&x)
    }

    /// Registers one segment of new tokens per cache row and prepares what
    /// every layer of that forward shares. [`Llama::forward`] is `plan`,
    /// `embed`, each `layer_forward`, `final_norm`; they are public so that
    /// training can recompute one layer at a time.
    pub fn plan(&self, segments: &[&[u32]], cache: &mut KvCache) -> Result<ForwardInputs> {
        let vocab = self.config.vocab_size as u32;
        if let Some(&bad) = segments
            .iter()
            .flat_map(|s| s.iter())
            .find(|&&id| id >= vocab)
        {
            return Err(ModelError::Tokenizer(format!(
                "token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        if segments.len() != cache.batch() {
            return Err(ModelError::Cache(format!(
                "{} segments for a cache of {} active rows",
                segments.len(),
                cache.batch()
            )));
        }
        let plan = cache.plan_append(segments);
        let (b, t) = (segments.len(), plan.t);
        let total = cache.len();
        Ok(ForwardInputs {
            tokens: Tensor::from_vec(plan.tokens, b * t, &Device::Cpu)?,
            mask: Tensor::from_vec(plan.mask, (b, 1, 1, t, total), &Device::Cpu)?,
            rotary: Rotary::new(&self.inv_freq, &plan.positions, b, t)?,
            batch: b,
            t,
        })
    }

    /// The token embeddings `[batch, t, hidden]` of a planned forward.
    pub fn embed(&self, inputs: &ForwardInputs) -> Result<Tensor> {
        Ok(self
            .embed_tokens
            .index_select(&inputs.tokens, 0)?
            .reshape((inputs.batch, inputs.t, ()))?)
    }

    /// Decoder layer `layer` on `x` `[batch, t, hidden]`, appending its keys
    /// and values to `cache`.
    pub fn layer_forward(
        &self,
        layer: usize,
        x: &Tensor,
        inputs: &ForwardInputs,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.layers[layer].forward(x, &inputs.rotary, &inputs.mask, cache, layer)
    }

    /// The last RMSNorm, applied to the last layer's output.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.norm.forward(x)?)
    }

    /// How many weights the decoder reads in their file's compact encoding
    /// rather than as f32: zero means no packed kernel applied (an f32 or
    /// K-quant file, or a trainable decoder).
    pub fn packed_weights(&self) -> usize {
        let count =
            |parts: &[PackedMatrix]| -> usize { parts.iter().map(|p| p.rows() * p.cols()).sum() };
        let layers: usize = self
            .layers
            .iter()
            .flat_map(DecoderLayer::linears)
            .map(|linear| match &linear.weight {
                ProjectionWeight::Packed(parts) => count(parts),
                ProjectionWeight::Dense(_) => 0,
            })
            .sum();
        layers + self.lm_head_packed.as_deref().map_or(0, count)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Logits `[batch, vocab]` of the last column of `hidden`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.project(&last)
    }

    fn project(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(match (&self.lm_head_packed, &self.lm_head_t) {
            (Some(packed), _) => packed_matmul(rows, packed)?,
            (None, Some(w_t)) => matmul(rows, w_t)?,
            (None, None) => rows.matmul(&self.output_weight().t()?)?,
        })
    }

    /// Logits `[batch, t, vocab]` at every position; for inspection only —
    /// training uses [`Llama::token_logprobs`], which never materialises them.
    pub fn all_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        Ok(self
            .project(&hidden.reshape((b * t, h))?)?
            .reshape((b, t, ()))?)
    }

    /// log p(target | context) for each row of `hidden` `[n, hidden]` — the
    /// one place a token's log-probability is computed. Differentiable; the
    /// vocabulary is processed in chunks.
    pub fn token_logprobs(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        logprob::token_logprobs(hidden, self.output_weight(), targets)
    }
}
