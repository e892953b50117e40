//! Log-probabilities of the trained spans (the reflections, or the
//! retries): the spans' contexts share a prefix (the task's prompt, and
//! for a group's reflections everything before them), which is run once
//! and forked; log-probs are computed only at the trained positions — the
//! training forward stops at the end of each span.
//!
//! The differentiable forward comes in two forms. The plain one keeps every
//! activation for autograd. The recomputed one ("gradient checkpointing")
//! keeps only each layer's input and replays one layer at a time during the
//! backward pass: one extra forward, and the memory of one layer's
//! activations instead of all of them. Both run the same ops, so they give
//! the same log-probs and gradients to the last bit.

use candle_core::{Tensor, Var};
use r3_model::{ForwardInputs, KvCache, Llama};

use crate::optim::Gradients;
use crate::spans::TrainedSpan;
use crate::Result;

/// A batch of spans laid out for the decoder: a head pass over the
/// contexts' longest common prefix (once, when there is one), a fork to one
/// cache row per span, and a tail pass whose outputs predict exactly the
/// trained ids. Under retry credit each context ends in its own reflection,
/// so a head of identical contexts only would run the shared prompt once
/// per row.
struct ScoringBatch<'a> {
    /// The contexts' longest common prefix, short of every context's last
    /// id (a tail's first input predicts its first trained id).
    head: &'a [u32],
    /// Per row: the rest of its context, then its trained ids but the last.
    tails: Vec<Vec<u32>>,
    /// The trained ids, row after row.
    targets: Vec<u32>,
    /// Trained ids per row.
    lengths: Vec<usize>,
    /// The temperature the trained ids were sampled at.
    temperature: f64,
}

impl<'a> ScoringBatch<'a> {
    fn new(spans: &[TrainedSpan<'a>], temperature: f64) -> Self {
        let first = spans.first().map_or(&[][..], |s| s.context);
        let shared = spans
            .iter()
            .map(|s| {
                let common = first.iter().zip(s.context).take_while(|(a, b)| a == b);
                common.count().min(s.context.len() - 1)
            })
            .min()
            .unwrap_or(0);
        Self {
            head: &first[..shared],
            tails: spans
                .iter()
                .map(|s| {
                    let trained = &s.tokens[..s.tokens.len() - 1];
                    [&s.context[shared..], trained].concat()
                })
                .collect(),
            targets: spans
                .iter()
                .flat_map(|s| s.tokens.iter().copied())
                .collect(),
            lengths: spans.iter().map(|s| s.tokens.len()).collect(),
            temperature,
        }
    }

    fn has_head(&self) -> bool {
        !self.head.is_empty()
    }

    fn longest_tail(&self) -> usize {
        self.tails.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// The cache the first pass writes: one row for the head, or one per
    /// span when there is none; with room for that pass (a fork allocates
    /// its own).
    fn cache(&self, config: &r3_model::ModelConfig, differentiable: bool) -> KvCache {
        let (rows, capacity) = match self.has_head() {
            true => (1, self.head.len()),
            false => (self.tails.len(), self.longest_tail()),
        };
        match differentiable {
            true => KvCache::differentiable(config, rows),
            false => KvCache::new(config, rows, capacity),
        }
    }

    fn head_refs(&self) -> [&[u32]; 1] {
        [self.head]
    }

    fn tail_refs(&self) -> Vec<&[u32]> {
        self.tails.iter().map(Vec::as_slice).collect()
    }

    /// The cache after the head pass, with one row per span and room for
    /// the tail pass.
    fn fork(&self, cache: KvCache) -> Result<KvCache> {
        Ok(match self.has_head() {
            true => {
                let rows = vec![0; self.tails.len()];
                cache.select_rows(&rows, cache.len() + self.longest_tail())?
            }
            false => cache,
        })
    }

    /// **Where a token's log-prob is computed**: log p of the trained ids
    /// from the tail pass's final hidden states `[rows, width, hidden]`
    /// (right-aligned: each row's span ends last), under the distribution
    /// that sampled them, `softmax(logits / T)`. The logits are linear in
    /// the hidden state, so dividing it by T is the same and costs a
    /// vocabulary-sized pass less.
    fn logprobs(&self, model: &Llama, hidden: &Tensor) -> Result<Tensor> {
        let (rows, width, size) = hidden.dims3()?;
        let positions: Vec<u32> = self
            .lengths
            .iter()
            .enumerate()
            .flat_map(|(row, &n)| (width - n..width).map(move |col| (row * width + col) as u32))
            .collect();
        let n = positions.len();
        let positions = Tensor::from_vec(positions, n, hidden.device())?;
        let mut picked = hidden
            .reshape((rows * width, size))?
            .index_select(&positions, 0)?;
        if self.temperature != 1.0 {
            picked = (picked * (1.0 / self.temperature))?;
        }
        Ok(model.token_logprobs(&picked, &self.targets)?)
    }
}

/// log p of every trained token at `temperature` (the one it was sampled
/// at), concatenated span after span: span `i` scores its `tokens`
/// following its `context`. The contexts' common prefix (the G rollouts of
/// one failure share the prompt at least) is computed once and forked. With `differentiable` the result stays in the autograd graph
/// (the plain training forward); without, it is computed on the fast path
/// (reference, old policy).
pub fn span_logprobs(
    model: &Llama,
    spans: &[TrainedSpan<'_>],
    temperature: f64,
    differentiable: bool,
) -> Result<Tensor> {
    let layout = ScoringBatch::new(spans, temperature);
    let mut cache = layout.cache(&model.config, differentiable);
    if layout.has_head() {
        model.forward(&layout.head_refs(), &mut cache)?;
    }
    let mut cache = layout.fork(cache)?;
    let hidden = model.forward(&layout.tail_refs(), &mut cache)?;
    layout.logprobs(model, &hidden)
}

/// What the model being trained is, for counting a pass's FLOPs.
#[derive(Debug, Clone, Copy)]
pub struct TrainedShape {
    /// LoRA on a frozen base: the base's backward gives inputs' gradients
    /// only; otherwise every weight's gradient too.
    pub lora: Option<LoraShape>,
    /// Each layer's activations replayed in the backward (one more forward).
    pub recompute: bool,
}

/// Rank and targeted projections' `in + out` summed over one layer.
#[derive(Debug, Clone, Copy)]
pub struct LoraShape {
    pub rank: usize,
    pub sides_per_layer: usize,
}

/// The matrix-product FLOPs (2 per multiply-add) one micro-batch's forward
/// and backward need, counted as [`ScoringBatch`] lays the spans out (the
/// common prefix once, each row's tail at its own positions; no padding). Per
/// token at context `c`: dense `D = layers·(2h(q+2kv) + 2qh + 6h·mlp)`,
/// attention `A(c) = layers·4qc`; per trained position the output head `H
/// = 2h·vocab`. Forward `F = Σ(D + A) + n·H` (plus LoRA's `2r·(in+out)` per
/// targeted projection and token). Backward: full fine-tuning `2·F` (inputs'
/// and weights' gradients); LoRA `Σ(D + 2A) + n·H` (inputs' gradients
/// through the frozen base, both of attention's) plus `4r·(in+out)` for the
/// adapters. Gradient checkpointing adds `Σ(D + A)`, the layers replayed.
pub fn training_flops(
    config: &r3_model::ModelConfig,
    spans: &[TrainedSpan<'_>],
    trained: TrainedShape,
) -> f64 {
    let layout = ScoringBatch::new(spans, 1.0);
    let dense = config.token_flops(0);
    let attention = |c: usize| config.token_flops(c) - dense;
    // Every position that runs through the layers, with its context.
    let mut contexts: Vec<usize> = Vec::new();
    let start = layout.head.len();
    contexts.extend(1..=start);
    for tail in &layout.tails {
        contexts.extend((1..=tail.len()).map(|j| start + j));
    }
    let positions = contexts.len() as f64;
    let attention_sum: f64 = contexts.iter().map(|&c| attention(c)).sum();
    let head = layout.targets.len() as f64 * config.head_flops();
    let layers = config.num_layers as f64;
    let adapters = |per: f64| match trained.lora {
        Some(l) => per * (l.rank * l.sides_per_layer) as f64 * layers * positions,
        None => 0.0,
    };
    let forward = positions * dense + attention_sum + head + adapters(2.0);
    let backward = match trained.lora {
        None => 2.0 * forward,
        Some(_) => positions * dense + 2.0 * attention_sum + head + adapters(4.0),
    };
    let replay = match trained.recompute {
        true => positions * dense + attention_sum,
        false => 0.0,
    };
    forward + backward + replay
}

/// The differentiable forward of one micro-batch, and its backward pass.
pub struct TrainingForward<'m, 'a> {
    logprobs: Tensor,
    recompute: Option<Recompute<'m, 'a>>,
}

impl<'m, 'a> TrainingForward<'m, 'a> {
    /// `recompute` chooses gradient checkpointing (see the module doc);
    /// `temperature` is the one the spans were sampled at.
    pub fn new(
        model: &'m Llama,
        spans: &[TrainedSpan<'a>],
        temperature: f64,
        recompute: bool,
    ) -> Result<Self> {
        if !recompute {
            return Ok(Self {
                logprobs: span_logprobs(model, spans, temperature, true)?,
                recompute: None,
            });
        }
        let layout = ScoringBatch::new(spans, temperature);
        let (recompute, logprobs) = Recompute::forward(model, layout)?;
        Ok(Self {
            logprobs,
            recompute: Some(recompute),
        })
    }

    /// log p of the trained tokens, as [`span_logprobs`] lays them out.
    pub fn logprobs(&self) -> &Tensor {
        &self.logprobs
    }

    /// Back-propagates `loss` (computed from [`Self::logprobs`]) to every
    /// parameter, adding the gradients into `grads`.
    pub fn backward(self, loss: &Tensor, grads: &mut Gradients) -> Result<()> {
        let store = loss.backward()?;
        grads.add(&store)?;
        match self.recompute {
            Some(recompute) => {
                let top = store.get(recompute.top.as_tensor()).cloned();
                drop(store);
                recompute.backward(top, grads)
            }
            None => Ok(()),
        }
    }
}

/// What the recomputed forward keeps: each layer's inputs and the last
/// layer's output as a leaf of the loss graph.
struct Recompute<'m, 'a> {
    model: &'m Llama,
    layout: ScoringBatch<'a>,
    /// Per layer: its input in the head pass (when there is one) and in the
    /// tail pass, detached.
    inputs: Vec<(Option<Tensor>, Tensor)>,
    top: Var,
}

impl<'m, 'a> Recompute<'m, 'a> {
    /// The forward through the same differentiable ops as the plain one and
    /// the replay (so its values are theirs, bit for bit), each layer's
    /// graph dropped as soon as its output is known; keeps each layer's
    /// inputs and returns the log-probs, differentiable from the last
    /// layer's output up.
    fn forward(model: &'m Llama, layout: ScoringBatch<'a>) -> Result<(Self, Tensor)> {
        let layers = model.num_layers();
        let mut cache = layout.cache(&model.config, true);
        let mut head_inputs = Vec::with_capacity(layers);
        if layout.has_head() {
            let planned = model.plan(&layout.head_refs(), &mut cache)?;
            let mut x = model.embed(&planned)?.detach();
            for layer in 0..layers {
                let next = model.layer_forward(layer, &x, &planned, &mut cache)?;
                cache.detach_layer(layer);
                head_inputs.push(x);
                x = next.detach();
            }
        }
        let mut cache = layout.fork(cache)?;
        let planned = model.plan(&layout.tail_refs(), &mut cache)?;
        let mut x = model.embed(&planned)?.detach();
        let mut inputs = Vec::with_capacity(layers);
        let mut head_inputs = head_inputs.into_iter();
        for layer in 0..layers {
            let next = model.layer_forward(layer, &x, &planned, &mut cache)?;
            cache.detach_layer(layer);
            inputs.push((head_inputs.next(), x));
            x = next.detach();
        }
        drop(cache);
        let top = Var::from_tensor(&x)?;
        let normed = model.final_norm(top.as_tensor(), r3_model::Exec::Train)?;
        let logprobs = layout.logprobs(model, &planned.to_grid(normed)?)?;
        Ok((
            Self {
                model,
                layout,
                inputs,
                top,
            },
            logprobs,
        ))
    }

    /// From the gradient at the last layer's output down to the embeddings,
    /// one layer replayed at a time.
    fn backward(self, top: Option<Tensor>, grads: &mut Gradients) -> Result<()> {
        let Some(mut tail_grad) = top else {
            return Ok(());
        };
        let mut head_grad = None;
        for layer in (0..self.inputs.len()).rev() {
            (head_grad, tail_grad) = self.replay(Some(layer), head_grad, tail_grad, grads)?;
        }
        self.replay(None, head_grad, tail_grad, grads)?;
        Ok(())
    }

    /// Re-runs one stage of the forward with autograd on — decoder layer
    /// `Some(layer)`, or the embedding lookup — and back-propagates the
    /// gradients at its outputs: into `grads` for the parameters, returned
    /// for its inputs (head pass, tail pass).
    fn replay(
        &self,
        layer: Option<usize>,
        head_grad: Option<Tensor>,
        tail_grad: Tensor,
        grads: &mut Gradients,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let model = self.model;
        let (head_input, tail_input) = match layer {
            Some(l) => {
                let (head, tail) = &self.inputs[l];
                (
                    head.as_ref().map(Var::from_tensor).transpose()?,
                    Some(Var::from_tensor(tail)?),
                )
            }
            None => (None, None),
        };
        let run =
            |input: Option<&Var>, planned: &ForwardInputs, cache: &mut KvCache| -> Result<Tensor> {
                Ok(match (layer, input) {
                    (Some(l), Some(x)) => model.layer_forward(l, x.as_tensor(), planned, cache)?,
                    _ => model.embed(planned)?,
                })
            };
        let mut cache = self.layout.cache(&model.config, true);
        let mut surrogate = None;
        if self.layout.has_head() {
            let planned = model.plan(&self.layout.head_refs(), &mut cache)?;
            let out = run(head_input.as_ref(), &planned, &mut cache)?;
            if let Some(g) = &head_grad {
                surrogate = Some((out * g)?.sum_all()?);
            }
        }
        let mut cache = self.layout.fork(cache)?;
        let planned = model.plan(&self.layout.tail_refs(), &mut cache)?;
        let out = run(tail_input.as_ref(), &planned, &mut cache)?;
        let tail_term = (out * &tail_grad)?.sum_all()?;
        let surrogate = match surrogate {
            Some(head_term) => (head_term + tail_term)?,
            None => tail_term,
        };
        let store = surrogate.backward()?;
        grads.add(&store)?;
        let head_grad = head_input.and_then(|x| store.get(x.as_tensor()).cloned());
        let tail_grad = match tail_input.and_then(|x| store.get(x.as_tensor()).cloned()) {
            Some(g) => g,
            None => tail_grad.zeros_like()?,
        };
        Ok((head_grad, tail_grad))
    }
}
