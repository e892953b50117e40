//! Batched generation over the model's KV cache: prefill, then one token per
//! active row per step. Finished rows leave the batch at once, so they stop
//! costing compute; their keys and values stay in the cache, which can be
//! kept to continue every conversation.

use candle_core::{Device, Tensor, D};
use r3_kernels::storage::with_f32_elements;
use r3_model::{KvCache, Llama, Tokenizer};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::sampler::{Drawn, Sampler, SamplingParams};
use crate::{GenerateError, Result};

/// Columns prefilled per forward: bounds the attention scores' memory on
/// long prompts without changing any result.
const PREFILL_CHUNK: usize = 256;

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
    /// The reply text, without the end-of-sequence token or stop string.
    pub text: String,
    pub finish: FinishReason,
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
        let mut hidden = None;
        for start in (0..width).step_by(PREFILL_CHUNK) {
            let end = (start + PREFILL_CHUNK).min(width);
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
                    cause: source,
                }
            })?);
        }
        let hidden = hidden.ok_or_else(|| GenerateError::EmptyPrompt)?;
        self.model
            .last_logits(&hidden)
            .map_err(|source| GenerateError::Forward {
                step: format!("prefill's logits for {} rows", segments.len()),
                cause: source,
            })
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
        self.decode_observed(cache, logits, params, samplers, keep_cache, &mut |_, _| {})
    }

    /// [`Generator::decode`], calling `on_token(row, token)` as each token
    /// is sampled (a server streams them).
    pub fn decode_observed(
        &self,
        mut cache: KvCache,
        logits: Tensor,
        params: &SamplingParams,
        mut samplers: Vec<Sampler>,
        keep_cache: bool,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Decoded> {
        let n = cache.batch();
        let mut completions: Vec<Completion> = (0..n)
            .map(|_| Completion {
                tokens: Vec::with_capacity(params.max_new_tokens),
                logprobs: Some(Vec::with_capacity(params.max_new_tokens)),
                text: String::new(),
                finish: FinishReason::Length,
            })
            .collect();
        if params.max_new_tokens == 0 {
            return Ok(Decoded {
                completions,
                cache: keep_cache.then_some(cache),
            });
        }
        let stop_window = params
            .stop_strings
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
            + 2;
        // `active[slot]` is the row held in active cache slot `slot`, and
        // `samplers[slot]` its sampler: both follow the cache's slot moves.
        let mut active: Vec<usize> = (0..n).collect();
        let mut logits = logits;
        let mut finished = Vec::with_capacity(n);
        let mut sampled: Vec<Drawn> = Vec::with_capacity(n);
        let mut next_tokens: Vec<[u32; 1]> = Vec::with_capacity(n);
        loop {
            let vocab = logits.dim(1)?;
            if params.temperature <= 0.0 && !logits.device().is_cpu() {
                // Greedy on a GPU: the argmax there, and only the ids come
                // over (a [256, 152k] block of logits is 155 MB a step).
                let ids: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
                sampled.clear();
                sampled.extend(ids.into_iter().map(|token| Drawn {
                    token,
                    logprob: None,
                }));
            } else {
                // Rows sample in parallel, reading the logits where they
                // lie (copied over first from a GPU): each has its own RNG,
                // so the result does not depend on the threads.
                let on_cpu = logits.to_device(&Device::Cpu)?.contiguous()?;
                with_f32_elements(&on_cpu, |flat| {
                    samplers
                        .par_iter_mut()
                        .zip(flat.par_chunks(vocab))
                        .map(|(sampler, row_logits)| sampler.draw(row_logits))
                        .collect_into_vec(&mut sampled)
                })?;
            }
            finished.clear();
            for (slot, (&row, drawn)) in active.iter().zip(&sampled).enumerate() {
                let (token, completion) = (drawn.token, &mut completions[row]);
                completion.tokens.push(token);
                on_token(row, token);
                match (drawn.logprob, &mut completion.logprobs) {
                    (Some(logprob), Some(logprobs)) => logprobs.push(logprob),
                    (None, logprobs) => *logprobs = None,
                    (Some(_), None) => {}
                }
                let finish = if self.eos_token_ids.contains(&token) {
                    Some(FinishReason::Eos)
                } else if self.hits_stop_string(&completion.tokens, params, stop_window)? {
                    Some(FinishReason::Stop)
                } else if completion.tokens.len() >= params.max_new_tokens {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                if let Some(reason) = finish {
                    completion.finish = reason;
                    finished.push(slot);
                }
            }
            // Highest slot first: each trades places with the last active
            // slot, which is then never a finished one still to move.
            for &slot in finished.iter().rev() {
                cache.deactivate(slot)?;
                active.swap_remove(slot);
                samplers.swap_remove(slot);
            }
            if active.is_empty() {
                break;
            }
            next_tokens.clear();
            next_tokens.extend(
                active
                    .iter()
                    .map(|&row| [*completions[row].tokens.last().expect("sampled")]),
            );
            let segments: Vec<&[u32]> = next_tokens.iter().map(|t| t.as_slice()).collect();
            let (rows, columns) = (segments.len(), cache.len() + 1);
            let step = |source| GenerateError::Forward {
                step: format!("decode of {rows} rows over {columns} cache columns"),
                cause: source,
            };
            let hidden = self.model.forward(&segments, &mut cache).map_err(step)?;
            logits = self.model.last_logits(&hidden).map_err(step)?;
        }
        for completion in &mut completions {
            completion.text = self.reply_text(completion, params)?;
        }
        let cache = if keep_cache {
            cache.activate_all()?;
            Some(cache)
        } else {
            None
        };
        Ok(Decoded { completions, cache })
    }

    fn hits_stop_string(
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

    fn reply_text(&self, completion: &Completion, params: &SamplingParams) -> Result<String> {
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
