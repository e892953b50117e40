//! One thread owns the decoder and runs every request in one continuously
//! batched stream: a request joins the running batch at the next step
//! (its prompt fed a chunk per step beside the rows decoding), and each
//! row leaves as soon as it finishes, so N concurrent clients share each
//! forward instead of queueing behind one another. Each row samples with
//! its own seeded stream under its own budget and stop rules, so a reply
//! does not depend on what else was batched with it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use r3_generate::{Completion, DecodeStream, Drawn, Generator, Sampler, ScoredPrompt, Turn};
use r3_model::{Llama, LoadedModel};

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
    pub params: r3_generate::SamplingParams,
    /// The model's end-of-turn ids and the request's extra stop ids.
    pub stop_token_ids: Vec<u32>,
    /// Greedy rows compute their log-probs too.
    pub logprobs: bool,
    /// Alternatives reported beside each sampled token.
    pub top_logprobs: usize,
    /// Score each prompt's own tokens too (`echo`).
    pub echo: bool,
    /// Where each sampled token goes as it is sampled, for a streamed
    /// reply; a closed receiver (a client gone) is ignored.
    pub stream: Option<mpsc::UnboundedSender<StreamedToken>>,
    /// Dropped unanswered only if the scheduler stops.
    pub reply: oneshot::Sender<Result<Done, String>>,
}

/// One sampled token of a streamed reply: its choice, the token, its
/// log-prob and its alternatives (empty unless asked for).
pub struct StreamedToken {
    pub choice: usize,
    pub token: u32,
    pub logprob: Option<f32>,
    pub alternatives: Vec<(u32, f32)>,
}

/// A finished job: its completions in prompt, choice order, and (for
/// `echo`) each prompt's own tokens scored.
pub struct Done {
    pub completions: Vec<Completion>,
    pub scored: Vec<ScoredPrompt>,
}

impl Job {
    fn row_count(&self) -> usize {
        self.rows.iter().map(|r| r.n).sum()
    }

    /// Jobs share a running batch when what the decoder applies to every
    /// row agrees: the weights (adapter) and the end-of-sequence ids.
    fn batches_with(&self, decoder: &Arc<Llama>, stop_token_ids: &[u32]) -> bool {
        Arc::ptr_eq(&self.decoder, decoder) && self.stop_token_ids == stop_token_ids
    }
}

/// A queue that holds at most this many jobs; senders wait beyond it, so
/// memory stays bounded however many clients connect.
pub const QUEUE: usize = 256;

/// A job in the running batch, and the completions it has so far.
struct Running {
    job: Job,
    completions: Vec<Option<Completion>>,
    scored: Vec<ScoredPrompt>,
    missing: usize,
}

impl Running {
    /// Answers the job (a client that went away is not waiting for it).
    fn reply(self) {
        let completions = self
            .completions
            .into_iter()
            .map(|c| c.expect("finished"))
            .collect();
        let done = Done {
            completions,
            scored: self.scored,
        };
        let _ = self.job.reply.send(Ok(done));
    }
}

/// Runs jobs from `jobs` until every sender is gone. `max_rows` bounds the
/// running batch (and so the KV cache's memory): a job joins when its
/// rows fit, or alone. A thread of its own: decoding blocks for seconds.
pub fn run(model: Arc<LoadedModel>, mut jobs: mpsc::Receiver<Job>, max_rows: usize) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match jobs.blocking_recv() {
                Some(job) => waiting.push_back(job),
                None => return,
            }
        }
        let first = waiting.front().expect("a waiting job");
        let (decoder, stop_token_ids) = (first.decoder.clone(), first.stop_token_ids.clone());
        let generator = Generator::new(&decoder, &model.tokenizer, &stop_token_ids);
        serve_batch(&generator, &decoder, &mut waiting, &mut jobs, max_rows);
    }
}

/// One running batch for the decoder and stop ids of the oldest waiting
/// job: jobs join while the oldest waiting one shares them (so a job that
/// needs another decoder waits only for this batch to drain), and the
/// batch ends when no row is left.
fn serve_batch(
    generator: &Generator<'_>,
    decoder: &Arc<Llama>,
    waiting: &mut VecDeque<Job>,
    jobs: &mut mpsc::Receiver<Job>,
    max_rows: usize,
) {
    let mut stream = DecodeStream::new(generator, 256);
    let mut running: HashMap<usize, Running> = HashMap::new();
    // Each row's job and choice index within it.
    let mut owners: HashMap<usize, (usize, usize)> = HashMap::new();
    let (mut next_job, mut next_row) = (0usize, 0usize);
    loop {
        while let Ok(job) = jobs.try_recv() {
            waiting.push_back(job);
        }
        while let Some(job) = waiting.front() {
            let rows = job.row_count();
            let fits = stream.live() + rows <= max_rows || stream.is_idle();
            if !fits || !job.batches_with(decoder, generator.eos_token_ids) {
                break;
            }
            let job = waiting.pop_front().expect("looked at");
            let scored = match job.echo {
                true => {
                    let scores = job
                        .rows
                        .iter()
                        .map(|r| generator.prompt_logprobs(&r.prompt, job.top_logprobs));
                    match scores.collect::<r3_generate::Result<Vec<_>>>() {
                        Ok(scored) => scored,
                        Err(e) => {
                            let _ = job
                                .reply
                                .send(Err(format!("scoring the prompt failed: {e}")));
                            continue;
                        }
                    }
                }
                false => Vec::new(),
            };
            if job.params.max_new_tokens == 0 {
                // Scoring only: nothing to generate.
                Running {
                    completions: vec![Some(Completion::empty()); rows],
                    scored,
                    missing: 0,
                    job,
                }
                .reply();
                continue;
            }
            let (mut turns, mut rows_of_job) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
            for (choice, prompt) in job
                .rows
                .iter()
                .flat_map(|r| std::iter::repeat_n(&r.prompt, r.n))
                .enumerate()
            {
                let sampler = Sampler::new(&job.params, choice as u64);
                turns.push(Turn {
                    key: next_row,
                    ids: prompt.clone(),
                    params: job.params.clone(),
                    sampler: if job.logprobs {
                        sampler.with_logprobs()
                    } else {
                        sampler
                    },
                    keep: false,
                    alternatives: job.top_logprobs,
                });
                rows_of_job.push((next_row, (next_job, choice)));
                next_row += 1;
            }
            if let Err(e) = stream.join(turns) {
                let _ = job
                    .reply
                    .send(Err(format!("the request could not join the batch: {e}")));
                continue;
            }
            owners.extend(rows_of_job);
            running.insert(
                next_job,
                Running {
                    completions: vec![None; rows],
                    scored,
                    missing: rows,
                    job,
                },
            );
            next_job += 1;
        }
        if stream.is_idle() {
            return;
        }
        let live = stream.live();
        let mut on_token = |row: usize, drawn: &Drawn, alternatives: &[(u32, f32)]| {
            let (j, choice) = owners[&row];
            if let Some(sender) = &running[&j].job.stream {
                let _ = sender.send(StreamedToken {
                    choice,
                    token: drawn.token,
                    logprob: drawn.logprob,
                    alternatives: alternatives.to_vec(),
                });
            }
        };
        match stream.step(&mut on_token) {
            Ok(finished) => {
                for f in finished {
                    let (j, choice) = owners.remove(&f.key).expect("a row of a running job");
                    let done = running.get_mut(&j).expect("running");
                    done.completions[choice] = Some(f.completion);
                    done.missing -= 1;
                    if done.missing == 0 {
                        running.remove(&j).expect("running").reply();
                    }
                }
            }
            Err(e) => {
                let message = format!("generation failed on a batch of {live} rows: {e}");
                for (_, r) in running.drain() {
                    let _ = r.job.reply.send(Err(message.clone()));
                }
                return;
            }
        }
    }
}
