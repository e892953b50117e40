//! Turning one row of logits into one token: greedy, or temperature with
//! top-k and top-p. Each row of a batch has its own seeded RNG, so a row's
//! output depends on the seed and its index, not on what else is batched.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How tokens are drawn; `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    /// Nucleus size; 1.0 disables it.
    pub top_p: f64,
    /// Keep only the k most likely tokens; 0 disables it.
    pub top_k: usize,
    pub max_new_tokens: usize,
    /// Generation ends when the text contains one of these (which is then
    /// cut from the text).
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            max_new_tokens: 256,
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

/// One drawn token and, where known, its log-probability under the
/// distribution it was drawn from: after temperature, top-k and top-p
/// (renormalised over what they keep); for greedy rows that asked for it,
/// the plain log-softmax of the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Drawn {
    pub token: u32,
    pub logprob: Option<f32>,
}

/// Draws tokens for one row, reusing its scratch buffers across steps.
pub struct Sampler {
    rng: ChaCha8Rng,
    temperature: f32,
    top_p: f32,
    top_k: usize,
    /// Greedy rows compute their log-prob only when asked: it costs a pass
    /// over the vocabulary that greedy decoding otherwise skips.
    greedy_logprobs: bool,
    /// (probability, token) candidates; reused so that a step allocates nothing.
    candidates: Vec<(f32, u32)>,
    probs: Vec<f32>,
}

impl Sampler {
    /// A sampler for row `row` of a batch generated with `params`.
    pub fn new(params: &SamplingParams, row: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
        rng.set_stream(row);
        Self {
            rng,
            temperature: params.temperature as f32,
            top_p: params.top_p as f32,
            top_k: params.top_k,
            greedy_logprobs: false,
            candidates: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// This sampler, reporting log-probs on greedy rows too.
    pub fn with_logprobs(mut self) -> Self {
        self.greedy_logprobs = true;
        self
    }

    /// Whether greedy draws report their log-prob: a GPU's greedy path
    /// computes it there only for such rows.
    pub fn greedy_logprobs(&self) -> bool {
        self.greedy_logprobs
    }

    /// The next token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.draw(logits).token
    }

    /// The next token, with its log-prob (see [`Drawn`]).
    pub fn draw(&mut self, logits: &[f32]) -> Drawn {
        if self.temperature <= 0.0 {
            let token = argmax(logits);
            let logprob = self.greedy_logprobs.then(|| {
                let max = logits[token as usize];
                let total: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
                -total.ln()
            });
            return Drawn { token, logprob };
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / self.temperature;
        self.probs.clear();
        self.probs.extend_from_slice(logits);
        r3_kernels::exp::exp_shifted(&mut self.probs, max, inv_t);
        let total: f32 = self.probs.iter().sum();
        self.probs.iter_mut().for_each(|p| *p /= total);
        if self.top_k == 0 && self.top_p >= 1.0 {
            let token = draw(
                &mut self.rng,
                self.probs
                    .iter()
                    .copied()
                    .enumerate()
                    .map(|(i, p)| (p, i as u32)),
                1.0,
            );
            let logprob = Some(self.probs[token as usize].ln());
            return Drawn { token, logprob };
        }
        self.collect_candidates();
        let mass: f32 = self.candidates.iter().map(|c| c.0).sum();
        let token = draw(&mut self.rng, self.candidates.iter().copied(), mass);
        let logprob = Some((self.probs[token as usize] / mass).ln());
        Drawn { token, logprob }
    }

    /// Fills `candidates` with the top-k / top-p set, most likely first,
    /// sorting only the tokens that can be in it.
    fn collect_candidates(&mut self) {
        let k = if self.top_k == 0 {
            self.probs.len()
        } else {
            self.top_k.min(self.probs.len())
        };
        // The final set is a prefix of the tokens sorted by probability, and
        // so is {p >= floor}: once that holds k tokens or top_p of the mass,
        // it contains the final set, and only it needs sorting.
        let mut floor = 1e-3f32;
        loop {
            self.candidates.clear();
            self.candidates.extend(
                self.probs
                    .iter()
                    .enumerate()
                    .filter(|(_, &p)| p >= floor)
                    .map(|(i, &p)| (p, i as u32)),
            );
            let mass: f32 = self.candidates.iter().map(|c| c.0).sum();
            if self.candidates.len() >= k || mass >= self.top_p || floor == 0.0 {
                break;
            }
            floor = if floor < 1e-12 { 0.0 } else { floor * 1e-3 };
        }
        self.candidates
            .sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        self.candidates.truncate(k);
        let mut cumulative = 0.0;
        let mut keep = self.candidates.len();
        for (i, c) in self.candidates.iter().enumerate() {
            cumulative += c.0;
            if cumulative >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        self.candidates.truncate(keep);
    }
}

impl Sampler {
    /// The `k` most likely tokens of the distribution the last token was
    /// drawn from (the one [`Drawn::logprob`] is under), most likely
    /// first, with their log-probs: OpenAI's `top_logprobs`. Call it
    /// right after [`Sampler::draw`] on the same logits.
    pub fn alternatives(&self, logits: &[f32], k: usize) -> Vec<(u32, f32)> {
        if k == 0 {
            return Vec::new();
        }
        if self.temperature <= 0.0 {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let log_total = logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
            let top = largest(k, logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
            return top
                .into_iter()
                .map(|(l, t)| (t, l - max - log_total))
                .collect();
        }
        if self.top_k == 0 && self.top_p >= 1.0 {
            let top = largest(
                k,
                self.probs.iter().enumerate().map(|(i, &p)| (p, i as u32)),
            );
            return top.into_iter().map(|(p, t)| (t, p.ln())).collect();
        }
        // The candidates kept by top-k / top-p, sorted, most likely first.
        let mass: f32 = self.candidates.iter().map(|c| c.0).sum();
        let kept = self.candidates.iter().take(k);
        kept.map(|&(p, t)| (t, (p / mass).ln())).collect()
    }
}

/// The `k` largest `(value, token)` pairs, largest first (the lower token
/// on ties), without sorting the vocabulary: most values fall below the
/// smallest kept one and cost one comparison.
pub(crate) fn largest(k: usize, items: impl Iterator<Item = (f32, u32)>) -> Vec<(f32, u32)> {
    let mut top: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for item in items {
        if top.len() == k && item.0 <= top[k - 1].0 {
            continue;
        }
        let at = top.partition_point(|kept| kept.0 >= item.0);
        top.insert(at, item);
        top.truncate(k);
    }
    top
}

/// Index of the largest logit (the first on ties, as torch's argmax).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn draw(rng: &mut ChaCha8Rng, items: impl Iterator<Item = (f32, u32)>, mass: f32) -> u32 {
    let mut u = rng.random::<f32>() * mass;
    let mut last = 0;
    for (p, token) in items {
        last = token;
        if u < p {
            return token;
        }
        u -= p;
    }
    last
}
