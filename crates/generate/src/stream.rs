//! Continuous batching: one running batch over one KV cache, which rows
//! join and leave between forwards. Each forward feeds every live row
//! either the next chunk of its pending ids (a prompt, or a conversation's
//! next turn) or the token it sampled last, so a row that finishes one turn
//! can start its next at the next step while the others decode, and a
//! request that arrives mid-way joins without waiting for the batch to end.
//! Beside decoding rows, pending ids are fed a few at a time (the most the
//! fused attention of a decode step takes), so joining costs the decoding
//! rows little; with no row decoding, they go in prefill-sized chunks.
//! Rows of different lengths share the cache's columns as they always do
//! (shorter segments are padded with holes no query attends to), so a
//! row's output is the one it would have alone.

use candle_core::{DType, Device, Tensor, D};
use r3_kernels::attention::MAX_FUSED_TOKENS;
use r3_kernels::storage::with_f32_elements;
use r3_model::KvCache;
use rayon::prelude::*;

use crate::decode::{prefill_columns, Completion, FinishReason, Generator};
use crate::sampler::{Drawn, Sampler, SamplingParams};
use crate::{GenerateError, Result};

/// Work for one row: ids to feed, then tokens to sample.
pub struct Turn {
    /// The caller's name for the row, returned with its completion.
    pub key: usize,
    /// Ids fed before sampling: a prompt, or (continuing a kept row) the
    /// next turn's ids.
    pub ids: Vec<u32>,
    pub params: SamplingParams,
    pub sampler: Sampler,
    /// Keep the row's keys and values once it finishes, so that it can
    /// continue with another turn ([`DecodeStream::resume`]).
    pub keep: bool,
    /// How many of the most likely ids to report beside each sampled one
    /// ([`Completion::alternatives`]); 0 for none.
    pub alternatives: usize,
}

/// Sees each token as it is sampled: the row's key, the draw (its
/// log-prob under the distribution it was drawn from) and the most likely
/// ids beside it (empty unless the row asked for them). A server streams
/// them.
pub type OnToken<'a> = dyn FnMut(usize, &Drawn, &[(u32, f32)]) + 'a;

/// A row that finished its turn.
#[derive(Debug)]
pub struct Finished {
    pub key: usize,
    pub completion: Completion,
}

/// A live row: feeding its pending ids, then sampling.
struct Live {
    key: usize,
    pending: Vec<u32>,
    /// How many of `pending` the cache has seen.
    fed: usize,
    params: SamplingParams,
    sampler: Sampler,
    completion: Completion,
    keep: bool,
    alternatives: usize,
    /// Tokens of text a stop string can span, plus slack.
    stop_window: usize,
}

/// What each cache row holds; `rows[i]` is cache row `i`, the live ones
/// first, exactly as the cache orders its active and set-aside rows.
enum Row {
    Live(Box<Live>),
    /// Finished and kept: `unfed` is its last sampled token, which the
    /// cache has not seen yet.
    Kept {
        key: usize,
        unfed: u32,
    },
    /// Finished; its columns are freed at the next compaction.
    Dead,
}

/// A running batch (see the module doc).
pub struct DecodeStream<'g> {
    generator: &'g Generator<'g>,
    cache: KvCache,
    rows: Vec<Row>,
    /// Rows `0..live` of `rows` (and of the cache) are live.
    live: usize,
}

impl<'g> DecodeStream<'g> {
    /// An empty stream whose cache allocates `capacity` columns at first.
    pub fn new(generator: &'g Generator<'g>, capacity: usize) -> Self {
        Self {
            generator,
            cache: KvCache::new(&generator.model.config, 0, capacity),
            rows: Vec::new(),
            live: 0,
        }
    }

    /// A stream over a prefilled cache whose rows are all about to sample
    /// from `logits` (row `r` of the cache has key `r`); returns it with
    /// the rows that finished at their first token.
    pub fn prefilled(
        generator: &'g Generator<'g>,
        cache: KvCache,
        logits: Tensor,
        params: &SamplingParams,
        samplers: Vec<Sampler>,
        keep: bool,
        on_token: &mut OnToken,
    ) -> Result<(Self, Vec<Finished>)> {
        let rows: Vec<Row> = samplers
            .into_iter()
            .enumerate()
            .map(|(key, sampler)| {
                let live = Live::new(key, Vec::new(), params.clone(), sampler, keep, 0);
                Row::Live(Box::new(live))
            })
            .collect();
        let mut stream = Self {
            generator,
            live: rows.len(),
            cache,
            rows,
        };
        let finished = stream.sample(logits, on_token)?;
        Ok((stream, finished))
    }

    /// No row is feeding or sampling.
    pub fn is_idle(&self) -> bool {
        self.live == 0
    }

    /// Live rows: the batch of the next forward.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Starts new rows; their ids are fed from the next step on.
    pub fn join(&mut self, turns: Vec<Turn>) -> Result<()> {
        if turns.iter().any(|t| t.ids.is_empty()) {
            return Err(GenerateError::EmptyPrompt);
        }
        self.cache.add_rows(turns.len())?;
        for turn in turns {
            self.rows
                .push(Row::Live(Box::new(Live::from_turn(turn, Vec::new()))));
            let last = self.rows.len() - 1;
            self.rows.swap(self.live, last);
            self.live += 1;
        }
        Ok(())
    }

    /// Continues the kept row `turn.key` with `turn.ids` (fed after the
    /// token it sampled last).
    pub fn resume(&mut self, turn: Turn) -> Result<()> {
        let (slot, unfed) = self.kept(turn.key)?;
        let slot_now = self.cache.reactivate(slot)?;
        self.rows.swap(slot, slot_now);
        self.rows[slot_now] = Row::Live(Box::new(Live::from_turn(turn, vec![unfed])));
        self.live += 1;
        Ok(())
    }

    /// Frees the kept row `key`: it will not continue.
    pub fn release(&mut self, key: usize) -> Result<()> {
        let (slot, _) = self.kept(key)?;
        self.rows[slot] = Row::Dead;
        Ok(())
    }

    fn kept(&self, key: usize) -> Result<(usize, u32)> {
        self.rows
            .iter()
            .enumerate()
            .find_map(|(slot, row)| match row {
                Row::Kept { key: k, unfed } if *k == key => Some((slot, *unfed)),
                _ => None,
            })
            .ok_or_else(|| GenerateError::Stream(format!("row {key} is not a kept, finished row")))
    }

    /// One forward over every live row, and a token sampled for each row
    /// that has fed all its ids; `on_token` sees each. Returns
    /// the rows that finished.
    pub fn step(&mut self, on_token: &mut OnToken) -> Result<Vec<Finished>> {
        if self.live == 0 {
            return Ok(Vec::new());
        }
        // Beside rows that decode, pending ids go in small chunks, so the
        // step keeps the fused attention that one-token steps take (a wide
        // segment would widen every row's); alone, in prefill-sized ones.
        let decoding = self.rows[..self.live]
            .iter()
            .any(|row| matches!(row, Row::Live(live) if live.is_ready()));
        let chunk = match decoding {
            true => MAX_FUSED_TOKENS,
            false => prefill_columns(self.live),
        };
        let mut segments: Vec<&[u32]> = Vec::with_capacity(self.live);
        for row in &mut self.rows[..self.live] {
            let Row::Live(live) = row else {
                unreachable!("the first rows are live")
            };
            segments.push(live.next_segment(chunk));
        }
        let (rows, width, columns) = (
            segments.len(),
            segments.iter().map(|s| s.len()).max().unwrap_or(0),
            self.cache.len(),
        );
        let step = |source| GenerateError::Forward {
            step: format!("step of {rows} rows × {width} tokens over {columns} cache columns"),
            cause: Box::new(source),
        };
        let model = self.generator.model;
        let hidden = model.forward(&segments, &mut self.cache).map_err(step)?;
        let logits = model.last_logits(&hidden).map_err(step)?;
        let finished = self.sample(logits, on_token)?;
        self.compact()?;
        Ok(finished)
    }

    /// Samples a token for every live row that has fed all its ids (the
    /// others are mid-way through a long prompt), records it and sets
    /// finished rows aside.
    fn sample(&mut self, logits: Tensor, on_token: &mut OnToken) -> Result<Vec<Finished>> {
        let vocab = logits.dim(1)?;
        let live: Vec<&mut Live> = self.rows[..self.live]
            .iter_mut()
            .map(|row| match row {
                Row::Live(live) => live.as_mut(),
                _ => unreachable!("the first rows are live"),
            })
            .collect();
        let greedy = live
            .iter()
            .all(|l| (l.params.temperature <= 0.0 && l.alternatives == 0) || !l.is_ready());
        type Sampled = Option<(Drawn, Vec<(u32, f32)>)>;
        let drawn: Vec<Sampled> = if greedy && !logits.device().is_cpu() {
            // Greedy on a GPU: the argmax there, and only the ids come
            // over (a [256, 152k] block of logits is 155 MB a step); so do
            // the argmax's log-probs, -ln Σ exp(l - max), where a row asks.
            let ids: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
            let logprobs: Option<Vec<f32>> = if live.iter().any(|l| l.sampler.greedy_logprobs()) {
                let logits = logits.to_dtype(DType::F32)?;
                let max = logits.max_keepdim(D::Minus1)?;
                let sum = logits.broadcast_sub(&max)?.exp()?.sum(D::Minus1)?;
                Some(sum.log()?.neg()?.to_vec1()?)
            } else {
                None
            };
            live.iter()
                .zip(ids)
                .enumerate()
                .map(|(i, (l, token))| {
                    let logprob = match &logprobs {
                        Some(all) if l.sampler.greedy_logprobs() => Some(all[i]),
                        _ => None,
                    };
                    let drawn = Drawn { token, logprob };
                    l.is_ready().then_some((drawn, Vec::new()))
                })
                .collect()
        } else {
            // Rows sample in parallel, reading the logits where they lie
            // (copied over first from a GPU): each has its own RNG, so the
            // result does not depend on the threads.
            let on_cpu = logits.to_device(&Device::Cpu)?.contiguous()?;
            let mut live = live;
            with_f32_elements(&on_cpu, |flat| {
                live.par_iter_mut()
                    .zip(flat.par_chunks(vocab))
                    .map(|(l, row_logits)| {
                        l.is_ready().then(|| {
                            let drawn = l.sampler.draw(row_logits);
                            (drawn, l.sampler.alternatives(row_logits, l.alternatives))
                        })
                    })
                    .collect()
            })?
        };
        let mut finished = Vec::new();
        let mut finished_slots = Vec::new();
        for (slot, drawn) in drawn.into_iter().enumerate() {
            let Some((drawn, alternatives)) = drawn else {
                continue;
            };
            let Row::Live(live) = &mut self.rows[slot] else {
                unreachable!("the first rows are live")
            };
            on_token(live.key, &drawn, &alternatives);
            if live.alternatives > 0 {
                live.completion.alternatives.push(alternatives);
            }
            if let Some(reason) = live.push(drawn, self.generator)? {
                live.completion.finish = reason;
                finished_slots.push(slot);
            }
        }
        // Highest slot first: each trades places with the last live slot,
        // which is then never a finished one still to move.
        for &slot in finished_slots.iter().rev() {
            self.cache.deactivate(slot)?;
            self.live -= 1;
            self.rows.swap(slot, self.live);
            let Row::Live(live) = std::mem::replace(&mut self.rows[self.live], Row::Dead) else {
                unreachable!("a finished row was live")
            };
            let mut live = *live;
            live.completion.text = self.generator.reply_text(&live.completion, &live.params)?;
            let unfed = *live
                .completion
                .tokens
                .last()
                .expect("a finished row sampled");
            if live.keep {
                self.rows[self.live] = Row::Kept {
                    key: live.key,
                    unfed,
                };
            }
            finished.push(Finished {
                key: live.key,
                completion: live.completion,
            });
        }
        Ok(finished)
    }

    /// Frees the cache rows of finished rows once they are at least half of
    /// it: a copy of the rest, paid for rarely.
    fn compact(&mut self) -> Result<()> {
        let dead = self.rows.iter().filter(|r| matches!(r, Row::Dead)).count();
        if dead == 0 || dead < self.rows.len() - dead {
            return Ok(());
        }
        let keep: Vec<usize> = (0..self.rows.len())
            .filter(|&r| !matches!(self.rows[r], Row::Dead))
            .collect();
        self.cache.retain_rows(&keep)?;
        self.rows.retain(|r| !matches!(r, Row::Dead));
        Ok(())
    }

    /// The cache, every kept row active again in the order rows were first
    /// given (for a stream made by [`Self::prefilled`] with `keep`, whose
    /// rows all finished).
    pub fn into_cache(mut self) -> Result<KvCache> {
        self.cache.activate_all()?;
        Ok(self.cache)
    }
}

impl Live {
    fn new(
        key: usize,
        pending: Vec<u32>,
        params: SamplingParams,
        sampler: Sampler,
        keep: bool,
        alternatives: usize,
    ) -> Self {
        let stop_window = params
            .stop_strings
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
            + 2;
        Self {
            key,
            fed: 0,
            completion: Completion {
                tokens: Vec::with_capacity(params.max_new_tokens),
                logprobs: Some(Vec::with_capacity(params.max_new_tokens)),
                alternatives: Vec::new(),
                text: String::new(),
                finish: FinishReason::Length,
            },
            pending,
            params,
            sampler,
            keep,
            alternatives,
            stop_window,
        }
    }

    /// A row for `turn`, fed `before` (a kept row's unfed token) first.
    fn from_turn(turn: Turn, mut before: Vec<u32>) -> Self {
        before.extend(turn.ids);
        Self::new(
            turn.key,
            before,
            turn.params,
            turn.sampler,
            turn.keep,
            turn.alternatives,
        )
    }

    /// Whether the row samples after this step: all its ids are fed.
    fn is_ready(&self) -> bool {
        self.fed == self.pending.len()
    }

    /// The ids this step feeds: the next `chunk` pending ids, or the token
    /// sampled last.
    fn next_segment(&mut self, chunk: usize) -> &[u32] {
        if self.fed < self.pending.len() {
            let start = self.fed;
            self.fed = (start + chunk).min(self.pending.len());
            return &self.pending[start..self.fed];
        }
        let last = self.completion.tokens.len() - 1;
        &self.completion.tokens[last..]
    }

    /// Records a sampled token; returns why the row finished, if it did.
    fn push(&mut self, drawn: Drawn, generator: &Generator<'_>) -> Result<Option<FinishReason>> {
        let completion = &mut self.completion;
        completion.tokens.push(drawn.token);
        match (drawn.logprob, &mut completion.logprobs) {
            (Some(logprob), Some(logprobs)) => logprobs.push(logprob),
            (None, logprobs) => *logprobs = None,
            (Some(_), None) => {}
        }
        Ok(if generator.eos_token_ids.contains(&drawn.token) {
            Some(FinishReason::Eos)
        } else if generator.hits_stop_string(&completion.tokens, &self.params, self.stop_window)? {
            Some(FinishReason::Stop)
        } else if completion.tokens.len() >= self.params.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        })
    }
}
