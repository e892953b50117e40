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
//! packed kernel (Q4_0, Q4_1, Q8_0, F16, BF16; K-quants re-cut to 32-input
//! blocks) in that encoding instead (see r3-kernels' `packed.rs`): the same
//! values at a fraction of the memory traffic.
//!
//! `linear.rs` holds the projections and their layouts, `layers.rs` one
//! struct per layer; this file the model: loading, the forward, and the
//! weights back in HF's names.

mod adapters;
mod layers;
mod linear;
mod names;

use std::sync::Arc;

use candle_core::{Device, Module, Tensor, Var};
use r3_kernels::matmul::{matmul, packed_matmul};
use r3_kernels::packed::PackedMatrix;

use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::logprob;
use crate::weights::Weights;
use layers::{DecoderLayer, RmsNorm, Rotary};
use linear::{Layout, ProjectionWeight};

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
    /// rather than as f32: zero means no packed kernel applied (an f32
    /// file, or a trainable decoder).
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
