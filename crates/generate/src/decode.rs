//! Batched generation over the model's KV cache: prefill, then one token per
//! active row per step. Finished rows leave the batch at once, so they stop
//! costing compute; their keys and values stay in the cache, which can be
//! kept to continue every conversation.

use candle_core::Tensor;
use r3_kernels::attention::MAX_FUSED_TOKENS;
use r3_model::{KvCache, Llama, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::sampler::{largest, Sampler, SamplingParams};
use crate::stream::DecodeStream;
use crate::{GenerateError, Result};

/// Columns prefilled per forward: bounds the attention scores' memory on
/// long prompts without changing any result.
pub(crate) const PREFILL_CHUNK: usize = 256;

/// Tokens (rows × columns) a prefill forward takes at most, so that a wide
/// batch's activations stay in the last-level cache between products.
const PREFILL_TOKENS: usize = 1024;

/// Columns a prefill forward over `rows` rows takes: `PREFILL_CHUNK`,
/// narrowed for wide batches to `PREFILL_TOKENS` in all, but never to the
/// few columns that take the fused decode attention (made for one new
/// token a row, not for prompts).
pub(crate) fn prefill_columns(rows: usize) -> usize {
    (PREFILL_TOKENS / rows.max(1)).clamp(2 * MAX_FUSED_TOKENS, PREFILL_CHUNK)
}

/// Why a row stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// It sampled an end-of-sequence token (kept as the last token).
    Eos,
    /// Its text reached a stop string (cut from `text`).
    Stop,
    /// It used its whole token budget.
    Length,
}

/// One row's output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// Exactly the sampled ids, the end-of-sequence token included.
    pub tokens: Vec<u32>,
    /// Each sampled id's log-prob under the distribution it was drawn from
    /// (see [`crate::Drawn`]); `None` where a step did not compute one
    /// (greedy rows that did not ask, or a GPU's on-device argmax).
    pub logprobs: Option<Vec<f32>>,
    /// Per sampled id, when asked for (see [`crate::Turn::alternatives`]):
    /// the most likely ids of the distribution it was drawn from, with
    /// their log-probs, most likely first. Empty otherwise.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alternatives: Vec<Vec<(u32, f32)>>,
    /// The reply text, without the end-of-sequence token or stop string.
    pub text: String,
    pub finish: FinishReason,
}

/// A prompt's own tokens scored ([`Generator::prompt_logprobs`]): entry
/// `i` is about token `i + 1`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPrompt {
    pub logprobs: Vec<f32>,
    /// Empty unless alternatives were asked for.
    pub alternatives: Vec<Vec<(u32, f32)>>,
}

impl Completion {
    /// What a budget of zero tokens gives: nothing, ended by length.
    pub fn empty() -> Self {
        Self {
            tokens: Vec::new(),
            logprobs: Some(Vec::new()),
            alternatives: Vec::new(),
            text: String::new(),
            finish: FinishReason::Length,
        }
    }
}

/// Generation outputs, and (when asked for) the cache with every row active
/// again, in order, each holding its prompt and every sampled token but the
/// last.
pub struct Decoded {
    pub completions: Vec<Completion>,
    pub cache: Option<KvCache>,
}

/// A model with what generation needs to know about its vocabulary.
pub struct Generator<'a> {
    pub model: &'a Llama,
    pub tokenizer: &'a Tokenizer,
    pub eos_token_ids: &'a [u32],
}

impl<'a> Generator<'a> {
    pub fn new(model: &'a Llama, tokenizer: &'a Tokenizer, eos_token_ids: &'a [u32]) -> Self {
        Self {
            model,
            tokenizer,
            eos_token_ids,
        }
    }

    /// Appends one non-empty segment per row to `cache` (in column chunks)
    /// and returns the logits `[batch, vocab]` of each row's last token.
    pub fn prefill(&self, cache: &mut KvCache, segments: &[&[u32]]) -> Result<Tensor> {
        let width = segments.iter().map(|s| s.len()).max().unwrap_or(0);
        let columns = prefill_columns(segments.len());
        let mut hidden = None;
        for start in (0..width).step_by(columns) {
            let end = (start + columns).min(width);
            let chunk: Vec<&[u32]> = segments
                .iter()
                .map(|s| {
                    let pad = width - s.len();
                    &s[start.max(pad) - pad..end.max(pad) - pad]
                })
                .collect();
            hidden = Some(self.model.forward(&chunk, cache).map_err(|source| {
                GenerateError::Forward {
                    step: format!("prefill of {} rows × {width} tokens", chunk.len()),
                    cause: Box::new(source),
                }
            })?);
        }
        let hidden = hidden.ok_or_else(|| GenerateError::EmptyPrompt)?;
        self.model
            .last_logits(&hidden)
            .map_err(|source| GenerateError::Forward {
                step: format!("prefill's logits for {} rows", segments.len()),
                cause: Box::new(source),
            })
    }

    /// Scores a prompt's own tokens (OpenAI's `echo`): the log-prob of each
    /// token after the ones before it (the first has none), and, for
    /// `k > 0`, the `k` most likely tokens at each of those positions, most
    /// likely first. Plain log-softmax of the logits: no temperature.
    pub fn prompt_logprobs(&self, prompt: &[u32], k: usize) -> Result<ScoredPrompt> {
        let mut scored = ScoredPrompt {
            logprobs: Vec::with_capacity(prompt.len().saturating_sub(1)),
            alternatives: Vec::new(),
        };
        let mut cache = KvCache::new(&self.model.config, 1, prompt.len());
        for (c, chunk) in prompt.chunks(PREFILL_CHUNK).enumerate() {
            let step = |source| GenerateError::Forward {
                step: format!("scoring a prompt of {} tokens", prompt.len()),
                cause: Box::new(source),
            };
            let hidden = self.model.forward(&[chunk], &mut cache).map_err(step)?;
            let logits = self.model.all_logits(&hidden).map_err(step)?;
            let logits = logits.squeeze(0)?.to_device(&candle_core::Device::Cpu)?;
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            for (i, row) in rows.iter().enumerate() {
                let Some(&next) = prompt.get(c * PREFILL_CHUNK + i + 1) else {
                    break;
                };
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let norm = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
                scored.logprobs.push(row[next as usize] - norm);
                if k > 0 {
                    let top = largest(k, row.iter().enumerate().map(|(t, &l)| (l, t as u32)));
                    scored
                        .alternatives
                        .push(top.into_iter().map(|(l, t)| (t, l - norm)).collect());
                }
            }
        }
        Ok(scored)
    }

    /// Completes every prompt (token ids of rendered chats).
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        params: &SamplingParams,
    ) -> Result<Vec<Completion>> {
        if prompts.iter().any(|p| p.is_empty()) {
            return Err(crate::GenerateError::EmptyPrompt);
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = KvCache::new(
            &self.model.config,
            prompts.len(),
            longest + params.max_new_tokens,
        );
        let segments: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
        let logits = self.prefill(&mut cache, &segments)?;
        let samplers = (0..prompts.len() as u64)
            .map(|row| Sampler::new(params, row))
            .collect();
        Ok(self
            .decode(cache, logits, params, samplers, false)?
            .completions)
    }

    /// Samples continuations for every row of `cache`, starting from the
    /// logits of its last token, with one sampler per row (in row order).
    pub fn decode(
        &self,
        cache: KvCache,
        logits: Tensor,
        params: &SamplingParams,
        samplers: Vec<Sampler>,
        keep_cache: bool,
    ) -> Result<Decoded> {
        let n = cache.batch();
        if params.max_new_tokens == 0 {
            let empty = Completion::empty();
            return Ok(Decoded {
                completions: vec![empty; n],
                cache: keep_cache.then_some(cache),
            });
        }
        let mut completions: Vec<Option<Completion>> = vec![None; n];
        let (mut stream, mut finished) = DecodeStream::prefilled(
            self,
            cache,
            logits,
            params,
            samplers,
            keep_cache,
            &mut |_, _, _| {},
        )?;
        loop {
            for f in finished {
                completions[f.key] = Some(f.completion);
            }
            if stream.is_idle() {
                break;
            }
            finished = stream.step(&mut |_, _, _| {})?;
        }
        Ok(Decoded {
            completions: completions
                .into_iter()
                .map(|c| c.expect("every row finishes"))
                .collect(),
            cache: keep_cache.then(|| stream.into_cache()).transpose()?,
        })
    }

    pub(crate) fn hits_stop_string(
        &self,
        tokens: &[u32],
        params: &SamplingParams,
        window: usize,
    ) -> Result<bool> {
        if params.stop_strings.is_empty() {
            return Ok(false);
        }
        let tail = self
            .tokenizer
            .decode(&tokens[tokens.len().saturating_sub(window)..])?;
        Ok(params
            .stop_strings
            .iter()
            .any(|s| tail.contains(s.as_str())))
    }

    pub(crate) fn reply_text(
        &self,
        completion: &Completion,
        params: &SamplingParams,
    ) -> Result<String> {
        let tokens = match completion.finish {
            FinishReason::Eos => &completion.tokens[..completion.tokens.len() - 1],
            _ => &completion.tokens[..],
        };
        let mut text = self.tokenizer.decode(tokens)?;
        if completion.finish == FinishReason::Stop {
            if let Some(cut) = params
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
            }
        }
        Ok(text)
    }
}
