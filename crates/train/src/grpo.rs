//! GRPO on reflection tokens: where the reward enters ([`Group`]: rewards
//! read once, turned into group advantages), how tokens are weighted, the
//! correction for the sampler–trainer gap ([`importance_weights`]), and
//! the clipped objective with a k3 KL penalty to the reference. (Which
//! tokens are trained: `spans.rs`.)

use candle_core::Tensor;
use r3_loop::Rollout;
use serde::{Deserialize, Serialize};

use crate::Result;

/// Added to the group's standard deviation, as in TRL.
const STD_EPS: f64 = 1e-4;

/// How per-token losses are aggregated (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean over each sequence's tokens, then mean over sequences.
    Grpo,
    /// Mean over all tokens of the batch.
    Bnpo,
    /// Sum over tokens divided by (sequences × max completion length).
    DrGrpo,
}

/// The mean and the unbiased (n − 1) standard deviation of `values` (0
/// for fewer than two): the one estimator for advantages and metrics.
pub fn mean_and_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    let std = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (mean, std)
}

/// Where the reward enters: each rollout's advantage within its group,
/// `(r − mean) / (std + ε)` (unbiased std) or `r − mean` unscaled.
pub fn group_advantages(rewards: &[f32], scale_rewards: bool) -> Vec<f32> {
    let (mean, std) = mean_and_std(&rewards.iter().map(|&r| r as f64).collect::<Vec<_>>());
    rewards
        .iter()
        .map(|&r| {
            let centred = r as f64 - mean;
            match scale_rewards {
                true => (centred / (std + STD_EPS)) as f32,
                false => centred as f32,
            }
        })
        .collect()
}

/// A group whose rewards are all equal has zero advantages: no signal.
pub fn has_signal(rewards: &[f32]) -> bool {
    rewards.iter().any(|&r| r != rewards[0])
}

/// The G rollouts of one failure: **where the reward enters training**.
/// Each rollout's reward is read off its retry's verdict once, here, and
/// everything downstream (advantages, signal, metrics, samples) uses these.
pub struct Group {
    pub rollouts: Vec<Rollout>,
    /// One per rollout: 1 if its retry was verified correct, else 0.
    pub rewards: Vec<f32>,
    /// One per rollout, from the group's rewards ([`group_advantages`]).
    pub advantages: Vec<f32>,
}

impl Group {
    /// The group of `rollouts`, their rewards turned into advantages.
    pub fn new(rollouts: Vec<Rollout>, scale_rewards: bool) -> Self {
        let rewards: Vec<f32> = rollouts.iter().map(Rollout::reward).collect();
        Self {
            advantages: group_advantages(&rewards, scale_rewards),
            rewards,
            rollouts,
        }
    }

    /// Whether any two rewards differ; a group without signal trains
    /// nothing and is skipped.
    pub fn has_signal(&self) -> bool {
        has_signal(&self.rewards)
    }
}

/// The weight of each token of each trained sequence that makes
/// `Σ weight × token_loss` the `loss_type` aggregate over every sequence of
/// an optimizer step, so the step can be computed in micro-batches and
/// summed. `lengths` are the sequences' trained lengths.
pub fn sequence_weights(
    lengths: &[usize],
    loss_type: LossType,
    max_completion_length: usize,
) -> Vec<f32> {
    let sequences = lengths.len() as f32;
    let total: usize = lengths.iter().sum();
    lengths
        .iter()
        .map(|&len| match loss_type {
            LossType::Grpo => 1.0 / (sequences * len.max(1) as f32),
            LossType::Bnpo => 1.0 / total.max(1) as f32,
            LossType::DrGrpo => 1.0 / (sequences * max_completion_length.max(1) as f32),
        })
        .collect()
}

/// Truncated importance sampling, by TRL's `vllm_importance_sampling_mode`
/// names: the ratio `π_trainer / π_sampler` per token or per sequence
/// (the product of its tokens'), cut to the cap (`truncate`) or zeroed
/// above it (`mask`), weights each token's policy-gradient term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImportanceSampling {
    None,
    TokenTruncate,
    TokenMask,
    SequenceTruncate,
    SequenceMask,
}

/// How far the sampler's log-probs were from the trainer's, and what the
/// correction did, summed over a step's micro-batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplerGap {
    /// Σ |log π_sampler − log π_trainer| over the tokens with a sampled log-prob.
    pub gap_sum: f64,
    pub gap_max: f64,
    pub tokens: usize,
    /// Σ of the ratios (per token or per sequence, by the mode) before the cap.
    pub ratio_sum: f64,
    pub ratios: usize,
    /// Ratios above the cap.
    pub capped: usize,
}

impl SamplerGap {
    /// Adds a micro-batch's numbers to the step's.
    pub fn add(&mut self, other: &SamplerGap) {
        self.gap_sum += other.gap_sum;
        self.gap_max = self.gap_max.max(other.gap_max);
        self.tokens += other.tokens;
        self.ratio_sum += other.ratio_sum;
        self.ratios += other.ratios;
        self.capped += other.capped;
    }
}

/// The importance weight of every trained token, sequence after sequence,
/// and the gap measured on the way. `trainer` holds log π_old of each
/// token (the policy before this step's updates, scored as it is
/// trained), `lengths` each sequence's token count, and `sampled[i]` the
/// sampler's log-probs of sequence `i`'s tokens, or `None` when it reported
/// none: those tokens weigh 1 and are not measured.
pub fn importance_weights(
    trainer: &[f32],
    lengths: &[usize],
    sampled: &[Option<&[f32]>],
    mode: ImportanceSampling,
    cap: f64,
) -> (Vec<f32>, SamplerGap) {
    let mut weights = Vec::with_capacity(trainer.len());
    let mut gap = SamplerGap::default();
    let corrected = |ratio: f64, gap: &mut SamplerGap| -> f32 {
        gap.ratio_sum += ratio;
        gap.ratios += 1;
        let over = ratio > cap;
        gap.capped += over as usize;
        match (mode, over) {
            (_, false) => ratio as f32,
            (ImportanceSampling::TokenMask | ImportanceSampling::SequenceMask, true) => 0.0,
            (_, true) => cap as f32,
        }
    };
    let mut start = 0;
    for (&len, sequence) in lengths.iter().zip(sampled) {
        let own = &trainer[start..start + len];
        start += len;
        let Some(sampled) = sequence.filter(|s| s.len() == len) else {
            weights.extend(std::iter::repeat_n(1.0, len));
            continue;
        };
        let deltas = own.iter().zip(sampled).map(|(&t, &s)| t as f64 - s as f64);
        for delta in deltas.clone() {
            gap.gap_sum += delta.abs();
            gap.gap_max = gap.gap_max.max(delta.abs());
        }
        gap.tokens += len;
        match mode {
            ImportanceSampling::None => weights.extend(std::iter::repeat_n(1.0, len)),
            ImportanceSampling::TokenTruncate | ImportanceSampling::TokenMask => {
                weights.extend(deltas.map(|delta| corrected(delta.exp(), &mut gap)));
            }
            ImportanceSampling::SequenceTruncate | ImportanceSampling::SequenceMask => {
                let weight = corrected(deltas.sum::<f64>().exp(), &mut gap);
                weights.extend(std::iter::repeat_n(weight, len));
            }
        }
    }
    (weights, gap)
}

/// Per-token inputs of the objective, all `[n]` over the tokens trained.
pub struct TokenTerms<'a> {
    /// log π_θ of each token: the only differentiable input.
    pub logprobs: &'a Tensor,
    /// log π_old at sampling time.
    pub old_logprobs: &'a Tensor,
    /// log π_ref; `None` when β = 0.
    pub ref_logprobs: Option<&'a Tensor>,
    /// The sequence's advantage, repeated on each of its tokens.
    pub advantages: &'a [f32],
    /// Aggregation weights, from [`sequence_weights`], one per token.
    pub weights: &'a [f32],
    /// Importance weights of the policy-gradient term, from
    /// [`importance_weights`], one per token.
    pub importance: &'a [f32],
}

/// Clipping bounds and KL strength.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    pub epsilon_low: f64,
    pub epsilon_high: f64,
    pub beta: f64,
}

/// Scalars worth logging, computed alongside the loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossStats {
    /// Σ weight × k3 KL (the KL part of the loss, before β).
    pub kl: f64,
    /// Tokens whose clipped term was the active one.
    pub clipped_tokens: usize,
    pub tokens: usize,
}

impl LossStats {
    /// Adds a micro-batch's statistics to the step's.
    pub fn add(&mut self, other: &LossStats) {
        self.kl += other.kl;
        self.clipped_tokens += other.clipped_tokens;
        self.tokens += other.tokens;
    }
}

/// `Σ weight × (−w·min(ρA, clip(ρ)A) + β·k3)` with `ρ = exp(logp − old)`,
/// `w` the importance weight and `k3 = exp(ref − logp) − (ref − logp) − 1`.
pub fn grpo_loss(terms: &TokenTerms<'_>, objective: &Objective) -> Result<(Tensor, LossStats)> {
    let n = terms.advantages.len();
    let device = terms.logprobs.device();
    let advantages = Tensor::from_slice(terms.advantages, n, device)?;
    let weights = Tensor::from_slice(terms.weights, n, device)?;
    let importance = Tensor::from_slice(terms.importance, n, device)?;
    let ratio = (terms.logprobs - terms.old_logprobs)?.exp()?;
    let clipped_ratio = ratio.clamp(1.0 - objective.epsilon_low, 1.0 + objective.epsilon_high)?;
    let unclipped = (&ratio * &advantages)?;
    let clipped = (&clipped_ratio * &advantages)?;
    let mut per_token = (unclipped.minimum(&clipped)?.neg()? * importance)?;
    let mut stats = LossStats {
        tokens: n,
        ..Default::default()
    };
    let active_clipped: Vec<f32> = clipped
        .lt(&unclipped)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?;
    stats.clipped_tokens = active_clipped.iter().filter(|&&c| c > 0.0).count();
    if let (Some(reference), true) = (terms.ref_logprobs, objective.beta != 0.0) {
        let delta = (reference - terms.logprobs)?;
        let kl = ((delta.exp()? - &delta)? - 1.0)?;
        stats.kl = (&kl * &weights)?.sum_all()?.to_scalar::<f32>()? as f64;
        per_token = (per_token + (kl * objective.beta)?)?;
    }
    let loss = (per_token * weights)?.sum_all()?;
    Ok((loss, stats))
}
