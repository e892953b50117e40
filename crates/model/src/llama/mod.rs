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
//! `linear.rs` holds the projections and their layouts, `vocab.rs` the
//! embedding and output tables (packed too when frozen), `layers.rs` one
//! struct per layer; this file the model: loading, the forward, and the
//! weights back in HF's names.

mod adapters;
mod layers;
mod linear;
mod names;
mod vocab;

use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

use crate::exec::Exec;
use r3_kernels::matmul::Activations;
use r3_kernels::packed::PackedMatrix;

use crate::cache::KvCache;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights::Weights;
use layers::{DecoderLayer, RmsNorm, Rotary};
use linear::{ProjectionWeight, WeightLayout};
use vocab::VocabTable;

/// What every layer of one forward shares, planned against the cache: the
/// new tokens, their additive attention mask and rotary angles.
pub struct ForwardInputs {
    /// The ids of the grid's slots, or of the real ones alone when ragged.
    tokens: Vec<u32>,
    mask: Tensor,
    rotary: Rotary,
    batch: usize,
    t: usize,
    /// Fused kernels or autograd ops, for every layer of this forward.
    exec: Exec,
    /// The real tokens' slots of the `[batch, t]` grid when some slots are
    /// padding: then the residual stream holds those tokens alone, `[1, n,
    /// hidden]`, and only attention, which reads the cache row by row, sees
    /// the grid. A row joining a decoding batch, prompts of different
    /// lengths, or a training micro-batch of reflections of different
    /// lengths cost the projections and the MLP their own tokens, not the
    /// grid's.
    real_slots: Option<Tensor>,
}

impl ForwardInputs {
    /// `y` `[1, n, c]` of the real tokens laid out on the grid `[batch, t,
    /// c]`, zeros in padding slots (unchanged when the forward is not ragged):
    /// for a caller that runs the layers itself and reads rows by position.
    pub fn to_grid(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let Some(slots) = &self.real_slots else {
            return Ok(y);
        };
        let (_, n, c) = y.dims3()?;
        let grid = Tensor::zeros((self.batch * self.t, c), y.dtype(), y.device())?;
        grid.index_add(slots, &y.reshape((n, c))?, 0)?
            .reshape((self.batch, self.t, c))
    }

    /// The real tokens `[1, n, c]` of `y` laid out on the grid `[batch, t,
    /// c]` (unchanged when the forward is not ragged).
    fn real_tokens(&self, y: Tensor) -> candle_core::Result<Tensor> {
        let Some(slots) = &self.real_slots else {
            return Ok(y);
        };
        let c = y.dim(2)?;
        y.reshape((self.batch * self.t, c))?
            .index_select(slots, 0)?
            .unsqueeze(0)
    }
}

/// A causal language model of the Llama family.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    embed_tokens: VocabTable,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// The output projection `[vocab, hidden]`; `None` when tied to the
    /// embeddings.
    lm_head: Option<VocabTable>,
    /// A dense output projection transposed `[hidden, vocab]` and
    /// contiguous, for fast logits when generating (see the module doc).
    lm_head_t: Option<Tensor>,
    inv_freq: Vec<f32>,
    /// Where every weight lives and every forward runs.
    device: Device,
    /// The type of weights and activations (f32, or bf16); logits and
    /// log-probs are f32 whatever it is.
    dtype: DType,
    /// How packed weights' decode products take their inputs
    /// ([`Llama::with_activations`]).
    activations: Activations,
}

impl Llama {
    /// Builds the decoder for inference from HF-named weights, checking
    /// every shape. Projections stay in their file's encoding where a
    /// packed kernel reads it; such a decoder cannot be trained.
    pub fn new(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, WeightLayout::Packed)
    }

    /// The decoder in the least memory: projections packed where the file
    /// allows, otherwise views of `weights` without transposed copies
    /// (slower GEMMs). For a reference model that only scores.
    pub fn new_compact(config: &ModelConfig, weights: &Weights) -> Result<Self> {
        Self::build(config, weights, WeightLayout::Compact)
    }

    /// The decoder with every parameter a `Var` (in the decoder's own
    /// layout, named as [`Llama::parameters`] names them): what training
    /// updates in place.
    pub fn trainable(
        config: &ModelConfig,
        weights: &Weights,
    ) -> Result<(Self, Vec<(String, Var)>)> {
        let mut model = Self::build(config, weights, WeightLayout::Fast)?;
        let mut vars = Vec::new();
        for (name, tensor) in model.tensors_mut() {
            let var = Var::from_tensor(tensor)?;
            *tensor = var.as_tensor().clone();
            vars.push((name, var));
        }
        Ok((model, vars))
    }

    fn build(config: &ModelConfig, weights: &Weights, layout: WeightLayout) -> Result<Self> {
        let c = config;
        let shape = [c.vocab_size, c.hidden_size];
        // Every table and layer is converted on its own, on every core:
        // packing Qwen2.5-Coder-1.5B's tensors one after another kept one
        // core of two busy for most of a 27 s load (docs/performance.md,
        // "The R3 step's profile on a Zen 3").
        let ((embed_tokens, lm_head), layers) = rayon::join(
            || {
                rayon::join(
                    || VocabTable::load(weights, "model.embed_tokens.weight", shape, layout),
                    || Self::load_lm_head(c, weights, shape, layout),
                )
            },
            || {
                (0..c.num_layers)
                    .into_par_iter()
                    .map(|i| DecoderLayer::load(weights, i, c, layout))
                    .collect::<Result<Vec<_>>>()
            },
        );
        let (embed_tokens, lm_head, layers) = (embed_tokens?, lm_head?, layers?);
        let lm_head_t = match (layout, lm_head.as_ref().unwrap_or(&embed_tokens)) {
            (WeightLayout::Packed, VocabTable::Dense(w)) => Some(w.t()?.contiguous()?),
            _ => None,
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
            inv_freq: c.inv_freq(),
            device: weights.device().clone(),
            dtype: weights.dtype(),
            activations: Activations::EXACT,
        })
    }

    /// The output projection's own table, `None` where it is the
    /// embeddings'.
    fn load_lm_head(
        c: &ModelConfig,
        weights: &Weights,
        shape: [usize; 2],
        layout: WeightLayout,
    ) -> Result<Option<VocabTable>> {
        if weights.contains("lm_head.weight") {
            VocabTable::load(weights, "lm_head.weight", shape, layout).map(Some)
        } else if c.tie_word_embeddings {
            Ok(None)
        } else {
            Err(ModelError::tensor(
                &weights.source,
                "lm_head.weight",
                "missing and the embeddings are not tied",
            ))
        }
    }

    /// The output projection `[vocab, hidden]`.
    fn output(&self) -> &VocabTable {
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
    /// generation wants (a copy, when the model has none) and its adapters
    /// stacked: a snapshot, which does not follow later updates of the
    /// adapters.
    pub fn for_generation(&self) -> Result<Self> {
        let mut view = self.detached();
        if let (None, VocabTable::Dense(w)) = (&view.lm_head_t, view.output()) {
            view.lm_head_t = Some(w.t()?.contiguous()?);
        }
        view.stack_adapters()?;
        Ok(view)
    }

    /// The same model with its packed weights' products taking
    /// `activations`: `int8_decode` rounds the inputs of decode products
    /// (a few rows, in registers) to 8 bits, for a model that only samples
    /// and samples faster so (`r3_kernels::int8`), never for one that
    /// scores; `bf16_products` runs products of many rows in bf16 with f32
    /// sums, mixed precision for training too (`r3_kernels::bf16`).
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        for linear in self.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            linear.activations = activations;
        }
        self
    }

    /// Every projection's adapters as two products (`Linear::stack_adapters`).
    fn stack_adapters(&mut self) -> Result<()> {
        for linear in self.layers.iter_mut().flat_map(|l| l.linears_mut()) {
            linear.stack_adapters()?;
        }
        Ok(())
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
        Ok(inputs.to_grid(self.final_norm(&x, inputs.exec)?)?)
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
        let exec = Exec::of(cache);
        let plan = cache.plan_append(segments);
        let (b, t) = (segments.len(), plan.t);
        let total = cache.len();
        let real: usize = segments.iter().map(|s| s.len()).sum();
        let (tokens, real_slots) = match real < b * t {
            false => (plan.tokens, None),
            true => {
                let slots: Vec<u32> = segments
                    .iter()
                    .enumerate()
                    .flat_map(|(r, s)| (r * t + t - s.len()..(r + 1) * t).map(|i| i as u32))
                    .collect();
                let tokens = slots.iter().map(|&i| plan.tokens[i as usize]).collect();
                (tokens, Some(Tensor::from_vec(slots, real, &self.device)?))
            }
        };
        Ok(ForwardInputs {
            tokens,
            mask: Tensor::from_vec(plan.mask, (b, 1, 1, t, total), &self.device)?
                .to_dtype(self.dtype)?,
            rotary: Rotary::new(
                &self.inv_freq,
                &plan.positions,
                b,
                t,
                &self.device,
                self.dtype,
            )?,
            batch: b,
            t,
            exec,
            real_slots,
        })
    }

    /// The token embeddings `[batch, t, hidden]` of a planned forward
    /// (`[1, n, hidden]`, its real tokens, when it is ragged).
    pub fn embed(&self, inputs: &ForwardInputs) -> Result<Tensor> {
        let (b, t) = match &inputs.real_slots {
            None => (inputs.batch, inputs.t),
            Some(_) => (1, inputs.tokens.len()),
        };
        Ok(self
            .embed_tokens
            .lookup(&inputs.tokens)?
            .to_dtype(self.dtype)?
            .reshape((b, t, ()))?)
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
        self.layers[layer].forward(x, inputs, cache, layer)
    }

    /// The last RMSNorm, applied to the last layer's output, run as
    /// `exec` says.
    pub fn final_norm(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        Ok(self.norm.forward(x, exec)?)
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
        let ends = match &self.lm_head {
            Some(lm_head) => self.embed_tokens.packed_weights() + lm_head.packed_weights(),
            None => self.embed_tokens.packed_weights(),
        };
        layers + ends
    }

    /// Bytes of weights one decode step reads, whatever the batch: every
    /// projection in the encoding it is kept in, and the output head (an
    /// embedding lookup reads one row, nothing to count). The numerator of
    /// decoding's fraction of the memory bandwidth.
    pub fn weight_bytes_per_step(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .flat_map(DecoderLayer::linears)
            .map(|linear| match &linear.weight {
                ProjectionWeight::Packed(parts) => parts.iter().map(|p| p.bytes()).sum(),
                ProjectionWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            })
            .sum();
        let head = match (&self.lm_head_t, &self.lm_head) {
            (Some(t), _) => t.elem_count() * t.dtype().size_in_bytes(),
            (None, Some(head)) => head.bytes(),
            (None, None) => self.embed_tokens.bytes(),
        };
        layers + head
    }

    /// The device the decoder runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The type the decoder computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The decoder computing in `dtype` whatever type its weights are
    /// stored in: each op casts its weights to its input's type, so that
    /// bf16 compute over f32 weights is mixed-precision training (the
    /// gradients reach the f32 weights, which AdamW updates in f32).
    pub fn computing_in(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
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

    /// Logits of `rows`, in f32 whatever the decoder's type.
    fn project(&self, rows: &Tensor) -> Result<Tensor> {
        let logits = self
            .output()
            .project(rows, self.lm_head_t.as_ref(), self.activations)?;
        Ok(logits.to_dtype(DType::F32)?)
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
        self.output().token_logprobs(hidden, targets)
    }
}
