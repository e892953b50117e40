//! The Llama-family decoder (Llama 2/3, SmolLM2, Qwen2/2.5, Mistral): one
//! struct per layer, a plain `forward`, batched with per-row positions.
//!
//! candle's fused kernels (rms-norm, softmax, rope) have no backward pass, so
//! each op below takes the fused kernel only when none of its inputs can need
//! a gradient, and otherwise composes basic ops that autograd records.

use candle_core::{Device, Module, Tensor, D};

use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::logprob;
use crate::weights::Weights;

/// A dense layer as `x · Wᵀ (+ b)`, flattening the batch first so that one
/// GEMM serves every row (a broadcast batched matmul would re-read the
/// weights once per row during decoding).
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    /// `weightᵀ` stored contiguously `[in, out]` for frozen weights: gemm
    /// then reads it in place, where the row-major weight would be repacked
    /// on every call (the dominant cost of batched decoding). Trainable
    /// weights use `weight.t()` so gradients reach them.
    frozen_t: Option<Tensor>,
    bias: Option<Tensor>,
}

/// The transposed contiguous copy of a weight that cannot need a gradient.
fn frozen_transpose(weight: &Tensor, wanted: bool) -> Result<Option<Tensor>> {
    if !wanted || weight.track_op() {
        return Ok(None);
    }
    Ok(Some(weight.t()?.contiguous()?))
}

impl Linear {
    fn load(
        w: &Weights,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
        transposed: bool,
    ) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out, inp])?;
        Ok(Self {
            frozen_t: frozen_transpose(&weight, transposed)?,
            weight,
            bias: if bias {
                Some(w.get(&format!("{prefix}.bias"), &[out])?)
            } else {
                None
            },
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, inp) = x.dims3()?;
        let x = x.reshape((b * t, inp))?;
        let y = match &self.frozen_t {
            Some(w_t) => x.matmul(w_t)?,
            None => x.matmul(&self.weight.t()?)?,
        };
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        y.reshape((b, t, ()))
    }
}

/// Frozen projections of one input computed as a single, wider GEMM
/// (q/k/v; gate/up): fewer calls, each reading a larger weight block.
#[derive(Debug, Clone)]
struct FusedLinear {
    /// `[in, Σ out]`, the parts' transposed weights side by side.
    weight_t: Tensor,
    bias: Option<Tensor>,
    widths: Vec<usize>,
}

impl FusedLinear {
    /// Takes over the parts' transposed copies; `None` (parts untouched)
    /// when any part is trainable or only some have biases.
    fn new(parts: &mut [&mut Linear]) -> Result<Option<Self>> {
        let with_bias = parts.iter().filter(|p| p.bias.is_some()).count();
        if parts.iter().any(|p| p.frozen_t.is_none())
            || (with_bias != 0 && with_bias != parts.len())
        {
            return Ok(None);
        }
        let transposed: Vec<Tensor> = parts
            .iter_mut()
            .map(|p| p.frozen_t.take().expect("checked"))
            .collect();
        let widths = transposed
            .iter()
            .map(|t| t.dim(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bias = if with_bias > 0 {
            let biases: Vec<&Tensor> = parts
                .iter()
                .map(|p| p.bias.as_ref().expect("checked"))
                .collect();
            Some(Tensor::cat(&biases, 0)?)
        } else {
            None
        };
        Ok(Some(Self {
            weight_t: Tensor::cat(&transposed, 1)?,
            bias,
            widths,
        }))
    }

    /// Each part's output `[b, t, out_i]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let (b, t, inp) = x.dims3()?;
        let mut y = x.reshape((b * t, inp))?.matmul(&self.weight_t)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let mut offset = 0;
        self.widths
            .iter()
            .map(|&w| {
                let part = y.narrow(1, offset, w)?.reshape((b, t, w));
                offset += w;
                part
            })
            .collect()
    }
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
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// q, k and v in one GEMM when the weights are frozen.
    qkv: Option<FusedLinear>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(w: &Weights, prefix: &str, c: &ModelConfig, t: bool) -> Result<Self> {
        let (h, q, kv) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let mut attention = Self {
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), q, h, c.attention_bias, t)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), kv, h, c.attention_bias, t)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), kv, h, c.attention_bias, t)?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), h, q, false, t)?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            qkv: None,
        };
        attention.qkv = FusedLinear::new(&mut [
            &mut attention.q_proj,
            &mut attention.k_proj,
            &mut attention.v_proj,
        ])?;
        Ok(attention)
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
        let heads = |y: Tensor, n: usize| -> candle_core::Result<Tensor> {
            y.reshape((b, t, n, d))?.transpose(1, 2)?.contiguous()
        };
        let (q, k, v) = match &self.qkv {
            Some(fused) => {
                let mut parts = fused.forward(x)?.into_iter();
                let mut next = || parts.next().expect("three parts");
                (next(), next(), next())
            }
            None => (
                self.q_proj.forward(x)?,
                self.k_proj.forward(x)?,
                self.v_proj.forward(x)?,
            ),
        };
        let q = rotary.apply(&heads(q, h)?)?;
        let k = rotary.apply(&heads(k, kvh)?)?;
        let v = heads(v, kvh)?;
        let (k, v) = cache.append_layer(layer, k.contiguous()?, v)?;
        let len = k.dim(2)?;
        // The query heads that share one kv head are stacked along the time
        // axis, so grouped-query attention needs no copy of the keys.
        let group = h / kvh;
        let q = (q * (1.0 / (d as f64).sqrt()))?.reshape((b, kvh, group * t, d))?;
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
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    /// gate and up in one GEMM when the weights are frozen.
    gate_up: Option<FusedLinear>,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, c: &ModelConfig, t: bool) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let mut mlp = Self {
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), i, h, false, t)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), i, h, false, t)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), h, i, false, t)?,
            gate_up: None,
        };
        mlp.gate_up = FusedLinear::new(&mut [&mut mlp.gate_proj, &mut mlp.up_proj])?;
        Ok(mlp)
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            Some(fused) => {
                let mut parts = fused.forward(x)?.into_iter();
                (parts.next().expect("gate"), parts.next().expect("up"))
            }
            None => (self.gate_proj.forward(x)?, self.up_proj.forward(x)?),
        };
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
    fn load(w: &Weights, i: usize, c: &ModelConfig, t: bool) -> Result<Self> {
        let prefix = format!("model.layers.{i}");
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: w.get(&format!("{prefix}.{name}.weight"), &[c.hidden_size])?,
                eps: c.rms_norm_eps,
            })
        };
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(w, &format!("{prefix}.self_attn"), c, t)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(w, &format!("{prefix}.mlp"), c, t)?,
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
}

/// A causal language model of the Llama family.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The output projection `[vocab, hidden]`; the embedding itself when tied.
    lm_head: Tensor,
    /// `lm_headᵀ` `[hidden, vocab]` when frozen (see [`Linear`]).
    lm_head_frozen_t: Option<Tensor>,
    inv_freq: Vec<f32>,
}

impl Llama {
    /// Builds the decoder from HF-named weights, checking every shape.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, true)
    }

    /// The decoder without transposed copies of frozen weights: half the
    /// memory, slower decoding. For a reference model that only scores.
    pub fn new_compact(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, false)
    }

    fn build(config: &ModelConfig, weights: &Weights, transposed: bool) -> Result<Self> {
        let c = config;
        let embed_tokens =
            weights.get("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let lm_head = if weights.contains("lm_head.weight") {
            weights.get("lm_head.weight", &[c.vocab_size, c.hidden_size])?
        } else if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            return Err(ModelError::tensor(
                &weights.source,
                "lm_head.weight",
                "missing and the embeddings are not tied",
            ));
        };
        let layers = (0..c.num_layers)
            .map(|i| DecoderLayer::load(weights, i, c, transposed))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: c.clone(),
            embed_tokens,
            layers,
            norm: RmsNorm {
                weight: weights.get("model.norm.weight", &[c.hidden_size])?,
                eps: c.rms_norm_eps,
            },
            lm_head_frozen_t: frozen_transpose(&lm_head, transposed)?,
            lm_head,
            inv_freq: c.inv_freq(),
        })
    }

    /// Runs one segment of new tokens per cache row through the decoder,
    /// appending their keys and values to `cache`. Returns the final hidden
    /// states `[batch, t, hidden]`, right-aligned like the cache (the last
    /// column holds every row's newest token).
    pub fn forward(&self, segments: &[&[u32]], cache: &mut KvCache) -> Result<Tensor> {
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
            return Err(ModelError::Tokenizer(format!(
                "{} segments for a cache of {} rows",
                segments.len(),
                cache.batch()
            )));
        }
        let plan = cache.plan_append(segments);
        let (b, t) = (segments.len(), plan.t);
        let total = cache.len();
        let tokens = Tensor::from_vec(plan.tokens, b * t, &Device::Cpu)?;
        let mask = Tensor::from_vec(plan.mask, (b, 1, 1, t, total), &Device::Cpu)?;
        let rotary = Rotary::new(&self.inv_freq, &plan.positions, b, t)?;
        let mut x = self
            .embed_tokens
            .index_select(&tokens, 0)?
            .reshape((b, t, ()))?;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &rotary, &mask, cache, i)?;
        }
        Ok(self.norm.forward(&x)?)
    }

    /// Logits `[batch, vocab]` of the last column of `hidden`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.project(&last)
    }

    fn project(&self, rows: &Tensor) -> Result<Tensor> {
        Ok(match &self.lm_head_frozen_t {
            Some(w_t) => rows.matmul(w_t)?,
            None => rows.matmul(&self.lm_head.t()?)?,
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
        logprob::token_logprobs(hidden, &self.lm_head, targets)
    }

    /// Every parameter under its HF name, for optimizers and export. The
    /// output projection is listed only when it is not tied.
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        )];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.self_attn;
            let linears = [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &l.mlp.gate_proj),
                ("mlp.up_proj", &l.mlp.up_proj),
                ("mlp.down_proj", &l.mlp.down_proj),
            ];
            for (name, lin) in linears {
                out.push((format!("{p}.{name}.weight"), lin.weight.clone()));
                if let Some(b) = &lin.bias {
                    out.push((format!("{p}.{name}.bias"), b.clone()));
                }
            }
            out.push((
                format!("{p}.input_layernorm.weight"),
                l.input_layernorm.weight.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.clone(),
            ));
        }
        out.push(("model.norm.weight".to_string(), self.norm.weight.clone()));
        if self.lm_head.id() != self.embed_tokens.id() {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        out
    }
}
