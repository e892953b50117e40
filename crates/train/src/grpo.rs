//! GRPO on reflection tokens: where the reward enters ([`Group`]: rewards
//! read once, turned into group advantages), how tokens are weighted, and
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

/// `Σ weight × (−min(ρA, clip(ρ)A) + β·k3)` with `ρ = exp(logp − old)` and
/// `k3 = exp(ref − logp) − (ref − logp) − 1`.
pub fn grpo_loss(terms: &TokenTerms<'_>, objective: &Objective) -> Result<(Tensor, LossStats)> {
    let n = terms.advantages.len();
    let device = terms.logprobs.device();
    let advantages = Tensor::from_slice(terms.advantages, n, device)?;
    let weights = Tensor::from_slice(terms.weights, n, device)?;
    let ratio = (terms.logprobs - terms.old_logprobs)?.exp()?;
    let clipped_ratio = ratio.clamp(1.0 - objective.epsilon_low, 1.0 + objective.epsilon_high)?;
    let unclipped = (&ratio * &advantages)?;
    let clipped = (&clipped_ratio * &advantages)?;
    let mut per_token = unclipped.minimum(&clipped)?.neg()?;
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
