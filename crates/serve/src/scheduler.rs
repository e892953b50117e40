//! One thread owns the decoder and runs the requests that arrive together
//! as one batch: every waiting request whose budget and stop rules match
//! the oldest one's joins its batch (up to a row limit), so N concurrent
//! clients share each forward instead of queueing behind one another.
//! Each row samples with its own seeded stream, so a reply does not
//! depend on what else was batched with it.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use r3_generate::{Completion, Generator, Sampler, SamplingParams};
use r3_model::{KvCache, Llama, LoadedModel};

/// One prompt's rows: `n` choices of `prompt`, each with its own stream.
pub struct Rows {
    pub prompt: Vec<u32>,
    pub n: usize,
}

/// A request's work and where its completions go.
pub struct Job {
    /// The base decoder, or the base with a loaded adapter.
    pub decoder: Arc<Llama>,
    pub rows: Vec<Rows>,
    pub params: SamplingParams,
    /// The model's end-of-turn ids and the request's extra stop ids.
    pub stop_token_ids: Vec<u32>,
    /// Greedy rows compute their log-probs too.
    pub logprobs: bool,
    /// Where each sampled token goes as it is sampled, `(choice, token)`,
    /// for a streamed reply; a closed receiver (a client gone) is ignored.
    pub stream: Option<mpsc::UnboundedSender<(usize, u32)>>,
    /// Dropped unanswered only if the scheduler stops.
    pub reply: oneshot::Sender<Result<Vec<Completion>, String>>,
}

impl Job {
    fn row_count(&self) -> usize {
        self.rows.iter().map(|r| r.n).sum()
    }

    /// Jobs batch together when everything the decoder applies to a whole
    /// batch agrees: the decoder (adapter), the budget, the stop strings
    /// and the stop ids.
    fn batches_with(&self, other: &Job) -> bool {
        Arc::ptr_eq(&self.decoder, &other.decoder)
            && self.params.max_new_tokens == other.params.max_new_tokens
            && self.params.stop_strings == other.params.stop_strings
            && self.stop_token_ids == other.stop_token_ids
    }
}

/// A queue that holds at most this many jobs; senders wait beyond it, so
/// memory stays bounded however many clients connect.
pub const QUEUE: usize = 256;

/// Runs jobs from `jobs` until every sender is gone. `max_rows` bounds a
/// batch (and so the KV cache's memory). A thread of its own: decoding
/// blocks for seconds.
pub fn run(model: Arc<LoadedModel>, mut jobs: mpsc::Receiver<Job>, max_rows: usize) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match jobs.blocking_recv() {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        let batch = take_batch(&mut waiting, max_rows);
        let rows: usize = batch.iter().map(Job::row_count).sum();
        match decode(&model, &batch) {
            Ok(completions) => {
                let mut rest = completions.into_iter();
                for job in batch {
                    let mine: Vec<Completion> = rest.by_ref().take(job.row_count()).collect();
                    // A client that went away is not waiting for it.
                    let _ = job.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                let message = format!("generation failed on a batch of {rows} rows: {e}");
                for job in batch {
                    let _ = job.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

/// The oldest job and every waiting one that batches with it, within
/// `max_rows` (the oldest always runs, even alone past the limit).
fn take_batch(waiting: &mut VecDeque<Job>, max_rows: usize) -> Vec<Job> {
    let first = waiting.pop_front().expect("a waiting job");
    let mut rows = first.row_count();
    let mut batch = vec![first];
    let mut i = 0;
    while i < waiting.len() {
        let fits = rows + waiting[i].row_count() <= max_rows;
        if fits && waiting[i].batches_with(&batch[0]) {
            let job = waiting.remove(i).expect("in range");
            rows += job.row_count();
            batch.push(job);
        } else {
            i += 1;
        }
    }
    batch
}

/// Prefills every row's prompt and decodes the batch; returns the
/// completions in job, prompt, choice order.
fn decode(model: &LoadedModel, batch: &[Job]) -> r3_generate::Result<Vec<Completion>> {
    let first = &batch[0];
    let mut prompts: Vec<&[u32]> = Vec::new();
    let mut samplers = Vec::new();
    // Each row's job and choice index within it.
    let mut owners: Vec<(usize, usize)> = Vec::new();
    for (j, job) in batch.iter().enumerate() {
        let mut index = 0;
        for rows in &job.rows {
            for choice in 0..rows.n as u64 {
                owners.push((j, index));
                index += 1;
                prompts.push(&rows.prompt);
                let sampler = Sampler::new(&job.params, choice);
                samplers.push(match job.logprobs {
                    true => sampler.with_logprobs(),
                    false => sampler,
                });
            }
        }
    }
    // The batch-wide settings are the first job's, which every job shares
    // (`batches_with`); sampling is per row. The hottest temperature
    // stands for the batch, so that a GPU takes its greedy shortcut only
    // when every row is greedy.
    let params = SamplingParams {
        temperature: batch
            .iter()
            .map(|j| j.params.temperature)
            .fold(0.0, f64::max),
        ..first.params.clone()
    };
    let generator = Generator::new(&first.decoder, &model.tokenizer, &first.stop_token_ids);
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut cache = KvCache::new(
        &model.config,
        prompts.len(),
        longest + params.max_new_tokens,
    );
    let logits = generator.prefill(&mut cache, &prompts)?;
    let mut on_token = |row: usize, token: u32| {
        let (j, choice) = owners[row];
        if let Some(stream) = &batch[j].stream {
            let _ = stream.send((choice, token));
        }
    };
    Ok(generator
        .decode_observed(cache, logits, &params, samplers, false, &mut on_token)?
        .completions)
}
