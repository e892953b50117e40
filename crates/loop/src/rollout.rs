//! Rollouts: first attempts, then for each failure G reflections sampled
//! from one shared prefix (prefilled once, the cache forked G ways), and one
//! retry per reflection continuing that reflection's own cache (the
//! retries prefilled together once the reflections are done). With
//! engines instead of the local decoder, the same conversations go out as
//! token ids and the sampled ids come back (the engine's prefix cache does
//! the sharing).

use std::ops::Range;

use candle_core::Tensor;
use r3_generate::{
    Completion, DecodeStream, FinishReason, Finished, Generator, Sampler, SamplingParams, Turn,
};
use r3_model::{KvCache, Llama, LoadedModel, Message, Tokenizer};
use r3_tasks::{tools_in_system_turn, Prompts, Task, Verdict};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conversation::ChatEncoder;
use crate::engine::Engines;
use crate::{LoopError, Result};

/// Where a policy's samples come from.
pub enum Backend<'a> {
    /// r3's own decoder, in this process.
    Local(&'a Llama),
    /// OpenAI-compatible engines serving the same model.
    Engines(&'a Engines),
}

/// A model with everything needed to hold a conversation with it.
pub struct Policy<'a> {
    pub backend: Backend<'a>,
    pub tokenizer: &'a Tokenizer,
    pub chat: ChatEncoder<'a>,
    pub eos_token_ids: &'a [u32],
    /// The model's context length: no budget goes past it.
    pub context: usize,
}

impl<'a> Policy<'a> {
    /// The policy of a decoder built from `loaded`'s weights (or weights
    /// derived from them, as during training).
    pub fn new(model: &'a Llama, loaded: &'a LoadedModel) -> Self {
        Self::with_backend(Backend::Local(model), loaded)
    }

    /// `loaded`'s conversations (tokenizer, chat template, end-of-turn ids),
    /// sampled by `backend`.
    pub fn with_backend(backend: Backend<'a>, loaded: &'a LoadedModel) -> Self {
        Self {
            backend,
            tokenizer: &loaded.tokenizer,
            chat: ChatEncoder::new(&loaded.chat_template, &loaded.tokenizer, &loaded.eos_token),
            eos_token_ids: &loaded.eos_token_ids,
            context: loaded.config.max_position_embeddings,
        }
    }

    /// `requested` new tokens for `flag`, at most the model's context
    /// length: a budget past it cannot be used, and would be allocated.
    pub fn within_context(&self, requested: usize, flag: &str) -> usize {
        if requested > self.context {
            eprintln!(
                "note: {flag} {requested} is past the model's context of {} tokens; using {}",
                self.context, self.context
            );
        }
        requested.min(self.context)
    }
}

/// The loop's view of a run: a policy, a task and the prompt set.
pub struct Rollouts<'a> {
    pub policy: &'a Policy<'a>,
    pub task: &'a dyn Task,
    pub prompts: &'a Prompts,
    /// Most rows decoded at once; bounds the KV cache's memory.
    pub max_rows: usize,
    /// Seconds spent in the verifier so far (for per-phase timings).
    pub verify_seconds: std::cell::Cell<f64>,
    /// Forwards of the reflect-and-retry stream so far, and the sum of the
    /// fraction of rows live in each (see [`Rollouts::batch_occupancy`]).
    occupancy: std::cell::Cell<(usize, f64)>,
}

/// One sampled answer and its verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub verdict: Verdict,
}

/// A failed first attempt to reflect on.
#[derive(Debug, Clone)]
pub struct Failure<'r> {
    pub record: &'r Value,
    /// The attempt's sampled ids (its end-of-turn token included).
    pub attempt_tokens: Vec<u32>,
}

/// One reflect-and-retry rollout of a failure.
#[derive(Debug, Clone, Serialize)]
pub struct Rollout {
    /// The whole conversation as ids: prompt, attempt, reflection request,
    /// reflection, retry request, retry — sampled ids exactly as sampled.
    pub ids: Vec<u32>,
    /// Where the reflection's ids (end-of-turn token included) lie in `ids`:
    /// the only tokens GRPO trains.
    pub reflection: Range<usize>,
    pub reflection_text: String,
    pub reflection_finish: FinishReason,
    pub retry: Attempt,
    /// The sampler's log-prob of each reflection id, then of each retry id,
    /// under the distribution it drew them from (after temperature and
    /// top-p): what the trainer's own log-probs are checked against (the
    /// sampler–trainer gap) and corrected with. `None` where the sampler
    /// reported none (greedy rows).
    #[serde(skip)]
    pub sampled_logprobs: SampledLogprobs,
}

/// A rollout's sampled log-probs, part by part (see
/// [`Rollout::sampled_logprobs`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampledLogprobs {
    pub reflection: Option<Vec<f32>>,
    pub retry: Option<Vec<f32>>,
}

impl Rollout {
    /// Where the retry's sampled ids lie in `ids`.
    pub fn retry_span(&self) -> Range<usize> {
        self.ids.len() - self.retry.tokens.len()..self.ids.len()
    }

    /// The binary reward: 1 when the retry was verified correct.
    pub fn reward(&self) -> f32 {
        if self.retry.verdict.success {
            1.0
        } else {
            0.0
        }
    }
}

impl<'a> Rollouts<'a> {
    pub fn new(
        policy: &'a Policy<'a>,
        task: &'a dyn Task,
        prompts: &'a Prompts,
        max_rows: usize,
    ) -> Self {
        Self {
            policy,
            task,
            prompts,
            max_rows,
            verify_seconds: Default::default(),
            occupancy: Default::default(),
        }
    }

    /// The tools a record offers, for a chat template that presents them in
    /// the model's own format; other templates get them from
    /// [`Self::first_messages`] as JSON in the system turn.
    pub fn tools(&self, record: &Value) -> Option<Value> {
        if self.policy.chat.template.accepts_tools() {
            self.task.tools(record)
        } else {
            None
        }
    }

    /// The first-attempt conversation of a record.
    pub fn first_messages(&self, record: &Value) -> Vec<Message> {
        let mut system = self.prompts.system.clone();
        if !self.policy.chat.template.accepts_tools() {
            if let Some(tools) = self.task.tools(record) {
                let listed = tools_in_system_turn(&tools);
                system = Some(match system {
                    Some(system) => format!("{system}\n\n{listed}"),
                    None => listed,
                });
            }
        }
        let mut messages = Vec::with_capacity(2);
        if let Some(system) = system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", self.task.user_prompt(record)));
        messages
    }

    /// The local decoder's generator; `None` when engines sample.
    fn generator(&self) -> Option<Generator<'_>> {
        match self.policy.backend {
            Backend::Local(model) => Some(Generator::new(
                model,
                self.policy.tokenizer,
                self.policy.eos_token_ids,
            )),
            Backend::Engines(_) => None,
        }
    }

    /// `copies` completions of every prompt from the engines; row `r`
    /// samples with stream `first_row + r`.
    fn engine_complete(
        &self,
        engines: &Engines,
        prompts: &[Vec<u32>],
        copies: usize,
        params: &SamplingParams,
        first_row: u64,
    ) -> Result<Vec<Completion>> {
        engines.complete(
            prompts,
            copies,
            params,
            first_row,
            self.policy.tokenizer,
            self.policy.eos_token_ids,
        )
    }

    /// Where every reward of the loop comes from: the task's verdict on one
    /// completion. A task that can no longer judge stops the run.
    fn judge(&self, record: &Value, completion: Completion) -> Result<Attempt> {
        let started = std::time::Instant::now();
        let verdict = self.task.verify(record, &completion.text);
        self.verify_seconds
            .set(self.verify_seconds.get() + started.elapsed().as_secs_f64());
        if let Some(why) = self.task.broken() {
            return Err(LoopError::Invalid(why));
        }
        Ok(Attempt {
            tokens: completion.tokens,
            text: completion.text,
            finish: completion.finish,
            verdict,
        })
    }

    /// Prefills one prefix per entry once, then forks each `copies` times
    /// into a cache with room for `extra` more columns: returns the forked
    /// cache and the logits of every row's last token.
    fn prefill_forked(
        &self,
        generator: &Generator<'_>,
        prefixes: &[Vec<u32>],
        copies: usize,
        extra: usize,
    ) -> Result<(KvCache, Tensor)> {
        let longest = prefixes.iter().map(Vec::len).max().unwrap_or(0);
        let mut cache = KvCache::new(&generator.model.config, prefixes.len(), longest);
        let segments: Vec<&[u32]> = prefixes.iter().map(Vec::as_slice).collect();
        let logits = generator.prefill(&mut cache, &segments)?;
        let rows: Vec<usize> = (0..prefixes.len())
            .flat_map(|p| std::iter::repeat_n(p, copies))
            .collect();
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            logits.device(),
        )?;
        Ok((
            cache.select_rows(&rows, longest + extra)?,
            logits.index_select(&index, 0)?,
        ))
    }

    /// `samples` first attempts at every record, each prompt prefilled once.
    /// Row `r` of the whole call samples with stream `stream_offset + r`.
    pub fn attempts(
        &self,
        records: &[&Value],
        samples: usize,
        params: &SamplingParams,
        stream_offset: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<Attempt>>> {
        let per_chunk = (self.max_rows / samples.max(1)).max(1);
        let mut out = Vec::with_capacity(records.len());
        for (c, chunk) in records.chunks(per_chunk).enumerate() {
            let prompts = chunk
                .iter()
                .map(|r| {
                    let tools = self.tools(r);
                    self.policy
                        .chat
                        .prompt(&self.first_messages(r), tools.as_ref())
                })
                .collect::<Result<Vec<_>>>()?;
            let first_row = stream_offset + (c * per_chunk * samples) as u64;
            let completions = match self.generator() {
                Some(generator) => {
                    let (cache, logits) =
                        self.prefill_forked(&generator, &prompts, samples, params.max_new_tokens)?;
                    let samplers = (0..(chunk.len() * samples) as u64)
                        .map(|r| Sampler::new(params, first_row + r))
                        .collect();
                    generator
                        .decode(cache, logits, params, samplers, false)?
                        .completions
                }
                None => {
                    self.engine_complete(self.engines(), &prompts, samples, params, first_row)?
                }
            };
            let mut completions = completions.into_iter();
            for record in chunk {
                let attempts = (0..samples)
                    .map(|_| {
                        self.judge(record, completions.next().expect("one completion per row"))
                    })
                    .collect::<Result<_>>()?;
                out.push(attempts);
            }
            progress(chunk.len());
        }
        Ok(out)
    }

    /// For each failure, `group` reflections sampled from its shared prefix
    /// and one retry per reflection, verified. Failure `f`'s reflection `g`
    /// samples with stream `stream_offset + f * group + g`.
    pub fn reflect_and_retry(
        &self,
        failures: &[Failure<'_>],
        group: usize,
        reflect: &SamplingParams,
        retry: &SamplingParams,
        stream_offset: u64,
        progress: &mut dyn FnMut(usize),
    ) -> Result<Vec<Vec<Rollout>>> {
        let per_chunk = (self.max_rows / group.max(1)).max(1);
        let mut out = Vec::with_capacity(failures.len());
        for (c, chunk) in failures.chunks(per_chunk).enumerate() {
            let first_row = stream_offset + (c * per_chunk * group) as u64;
            out.extend(self.reflect_and_retry_chunk(chunk, group, reflect, retry, first_row)?);
            progress(chunk.len());
        }
        Ok(out)
    }

    /// One chunk of failures, in four steps: the conversations up to the
    /// reflection request, G reflections each from a forked prefix, each
    /// reflection's cache continued with the retry, and the rollouts.
    fn reflect_and_retry_chunk(
        &self,
        failures: &[Failure<'_>],
        group: usize,
        reflect: &SamplingParams,
        retry: &SamplingParams,
        first_row: u64,
    ) -> Result<Vec<Vec<Rollout>>> {
        if reflect.max_new_tokens == 0 {
            return Err(LoopError::Invalid(
                "a reflection needs a budget of at least one token".into(),
            ));
        }
        let turns = self.reflection_turns(failures)?;
        let second_turns = match self.generator() {
            Some(generator) => {
                self.reflect_then_retry(&generator, &turns, group, reflect, retry, first_row)?
            }
            None => self.reflect_and_retry_on_engines(&turns, group, reflect, retry, first_row)?,
        };
        self.assemble(failures, group, &turns, second_turns)
    }

    fn engines(&self) -> &Engines {
        match self.policy.backend {
            Backend::Engines(engines) => engines,
            Backend::Local(_) => unreachable!("called only when engines sample"),
        }
    }

    /// Steps 2 and 3 on engines: `group` reflections of every prefix, then
    /// each row's retry from its whole conversation so far (the engine's
    /// prefix cache finds the shared part).
    fn reflect_and_retry_on_engines(
        &self,
        turns: &ReflectionTurns,
        group: usize,
        reflect: &SamplingParams,
        retry: &SamplingParams,
        first_row: u64,
    ) -> Result<SecondTurns> {
        let engines = self.engines();
        let reflections =
            self.engine_complete(engines, &turns.prefixes, group, reflect, first_row)?;
        let continuations: Vec<Vec<u32>> = reflections
            .iter()
            .enumerate()
            .map(|(row, reflection)| self.continuation(reflection, turns, row / group))
            .collect();
        let conversations: Vec<Vec<u32>> = continuations
            .iter()
            .zip(&reflections)
            .enumerate()
            .map(|(row, (continuation, reflection))| {
                let prefix = &turns.prefixes[row / group];
                let mut ids =
                    Vec::with_capacity(prefix.len() + reflection.tokens.len() + continuation.len());
                ids.extend(prefix);
                ids.extend(&reflection.tokens);
                ids.extend(&continuation[1..]);
                ids
            })
            .collect();
        // One retry per row: row r samples with stream first_row + r, as
        // on the local decoder.
        let retries = self.engine_complete(engines, &conversations, 1, retry, first_row)?;
        Ok(SecondTurns {
            reflections,
            continuations,
            retries,
        })
    }

    /// Step 1: each failure's ids up to its reflection request (prompt,
    /// the failed attempt as sampled, the request), and the retry request
    /// that follows a reflection ended with or without the end-of-turn
    /// token: both known before any reflection is.
    fn reflection_turns(&self, failures: &[Failure<'_>]) -> Result<ReflectionTurns> {
        let chat = &self.policy.chat;
        let eos = self.policy.eos_token_ids;
        let mut turns = ReflectionTurns {
            prefixes: Vec::with_capacity(failures.len()),
            retry_requests: Vec::with_capacity(failures.len()),
        };
        for f in failures {
            let mut history = self.first_messages(f.record);
            let tools = self.tools(f.record);
            let mut ids = chat.prompt(&history, tools.as_ref())?;
            let ended_eos = f.attempt_tokens.last().is_some_and(|t| eos.contains(t));
            ids.extend(&f.attempt_tokens);
            ids.extend(chat.next_turn(
                &history,
                tools.as_ref(),
                &self.prompts.reflection,
                ended_eos,
            )?);
            let attempt_text = self
                .policy
                .tokenizer
                .decode(strip_eos(&f.attempt_tokens, eos))?;
            history.push(Message::new("assistant", attempt_text));
            history.push(Message::new("user", self.prompts.reflection.as_str()));
            let original = self.task.user_prompt(f.record);
            let retry_text = self.prompts.retry_text(&original);
            turns.retry_requests.push([
                chat.next_turn(&history, tools.as_ref(), retry_text, false)?,
                chat.next_turn(&history, tools.as_ref(), retry_text, true)?,
            ]);
            turns.prefixes.push(ids);
        }
        Ok(turns)
    }

    /// Steps 2 and 3 on r3's decoder, on one stream: each prefix is
    /// prefilled once and forked `group` ways into a cache with room for
    /// the whole second turn; every row samples a reflection and keeps its
    /// cache; once no reflection is decoding, every row's retry request is
    /// fed into its own cache in one prefill and the retries are sampled.
    /// Returns each row's reflection, continuation and retry.
    fn reflect_then_retry(
        &self,
        generator: &Generator<'_>,
        turns: &ReflectionTurns,
        group: usize,
        reflect: &SamplingParams,
        retry: &SamplingParams,
        first_row: u64,
    ) -> Result<SecondTurns> {
        let longest_request = turns.retry_requests.iter().flatten().map(Vec::len).max();
        // Room for the reflection, the retry request (after the
        // reflection's last token) and the retry.
        let room = reflect.max_new_tokens + 1 + longest_request.unwrap_or(0) + retry.max_new_tokens;
        let (cache, logits) = self.prefill_forked(generator, &turns.prefixes, group, room)?;
        let rows = turns.prefixes.len() * group;
        let samplers = (0..rows as u64)
            .map(|r| Sampler::new(reflect, first_row + r))
            .collect();
        let (mut stream, mut finished) = DecodeStream::prefilled(
            generator,
            cache,
            logits,
            reflect,
            samplers,
            true,
            &mut |_, _, _| {},
        )?;
        let mut reflections: Vec<Option<Completion>> = vec![None; rows];
        let mut continuations = vec![Vec::new(); rows];
        let mut retries: Vec<Option<Completion>> = vec![None; rows];
        // Rows whose reflection has ended, their retries not yet started.
        let mut waiting: Vec<usize> = Vec::new();
        loop {
            for Finished {
                key: row,
                completion,
            } in finished
            {
                if reflections[row].is_some() {
                    retries[row] = Some(completion);
                    continue;
                }
                continuations[row] = self.continuation(&completion, turns, row / group);
                reflections[row] = Some(completion);
                waiting.push(row);
            }
            // Retries start together once no reflection is decoding, as
            // one prefill. Started each at the step after its reflection
            // (a join costs only its own tokens now), `r3 bench train`
            // measured generation 7-20% slower (2026-12-04,
            // docs/performance.md): the requests go in a few tokens a step
            // and the reflections end close together.
            if stream.is_idle() {
                for row in waiting.drain(..) {
                    stream.resume(Turn {
                        key: row,
                        // The stream feeds the reflection's last token itself.
                        ids: continuations[row][1..].to_vec(),
                        params: retry.clone(),
                        sampler: Sampler::new(retry, first_row + row as u64),
                        keep: false,
                        alternatives: 0,
                    })?;
                }
            }
            if stream.is_idle() {
                break;
            }
            self.record_occupancy(stream.live(), rows);
            finished = stream.step(&mut |_, _, _| {})?;
        }
        let done = |c: Vec<Option<Completion>>| -> Vec<Completion> {
            c.into_iter()
                .map(|c| c.expect("every row finished"))
                .collect()
        };
        Ok(SecondTurns {
            reflections: done(reflections),
            continuations,
            retries: done(retries),
        })
    }

    /// Adds one forward's live rows, out of `rows`, to the occupancy.
    fn record_occupancy(&self, live: usize, rows: usize) {
        let (steps, sum) = self.occupancy.get();
        self.occupancy
            .set((steps + 1, sum + live as f64 / rows as f64));
    }

    /// Mean fraction of its rows each forward of the rollouts' decoding
    /// ran live (1: no row ever waited); `None` before any forward.
    pub fn batch_occupancy(&self) -> Option<f64> {
        let (steps, sum) = self.occupancy.get();
        (steps > 0).then(|| sum / steps as f64)
    }

    /// A row's ids after its reflection, from the reflection's last token
    /// (which a kept cache has not seen yet): that token, then failure
    /// `failure`'s retry request that fits how the reflection ended.
    fn continuation(
        &self,
        reflection: &Completion,
        turns: &ReflectionTurns,
        failure: usize,
    ) -> Vec<u32> {
        let ended_eos = reflection.finish == FinishReason::Eos;
        let last = *reflection
            .tokens
            .last()
            .expect("a reflection has at least one token");
        let request = &turns.retry_requests[failure][ended_eos as usize];
        std::iter::once(last)
            .chain(request.iter().copied())
            .collect()
    }

    /// Step 4: each row's ids (prefix, reflection, retry request, retry),
    /// the reflection's span in them, and the retry judged.
    fn assemble(
        &self,
        failures: &[Failure<'_>],
        group: usize,
        turns: &ReflectionTurns,
        second: SecondTurns,
    ) -> Result<Vec<Vec<Rollout>>> {
        let mut out: Vec<Vec<Rollout>> = (0..failures.len())
            .map(|_| Vec::with_capacity(group))
            .collect();
        let rows = (second.reflections.into_iter())
            .zip(second.continuations)
            .zip(second.retries);
        for (row, ((mut reflection, continuation), mut retry)) in rows.enumerate() {
            let f = row / group;
            let prefix = &turns.prefixes[f];
            let mut ids = Vec::with_capacity(
                prefix.len() + reflection.tokens.len() + continuation.len() + retry.tokens.len(),
            );
            ids.extend(prefix);
            ids.extend(&reflection.tokens);
            let reflection_span = prefix.len()..ids.len();
            ids.extend(&continuation[1..]);
            ids.extend(&retry.tokens);
            let sampled_logprobs = SampledLogprobs {
                reflection: reflection.logprobs.take(),
                retry: retry.logprobs.take(),
            };
            out[f].push(Rollout {
                ids,
                reflection: reflection_span,
                sampled_logprobs,
                reflection_text: reflection.text,
                reflection_finish: reflection.finish,
                retry: self.judge(failures[f].record, retry)?,
            });
        }
        Ok(out)
    }
}

/// Every row's second turn: its reflection, the ids after it up to the
/// retry (from the reflection's last token), and the retry.
struct SecondTurns {
    reflections: Vec<Completion>,
    continuations: Vec<Vec<u32>>,
    retries: Vec<Completion>,
}

/// What a chunk's failures bring to their second turn, per failure: the
/// ids up to the reflection request, and the retry request after a
/// reflection that ended without (`[0]`) or with (`[1]`) end-of-turn.
struct ReflectionTurns {
    prefixes: Vec<Vec<u32>>,
    retry_requests: Vec<[Vec<u32>; 2]>,
}

fn strip_eos<'t>(tokens: &'t [u32], eos: &[u32]) -> &'t [u32] {
    match tokens.last() {
        Some(t) if eos.contains(t) => &tokens[..tokens.len() - 1],
        _ => tokens,
    }
}
