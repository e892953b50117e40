//! What one training step measured: the line it writes to
//! `metrics.jsonl`, its rollout statistics computed in one place with one
//! estimator.

use r3_loop::Rollout;
use serde::{Deserialize, Serialize};

use crate::grpo::{mean_and_std, Group, SamplerGap};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub learning_rate: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Fraction of retries verified correct (the same as reward_mean: the
    /// reward is binary), kept under its own name for plots.
    pub retry_success: f64,
    pub loss: f64,
    pub kl: f64,
    /// Mean and max of |log π_sampler − log π_trainer| over the trained
    /// tokens the sampler reported log-probs for: ~0 when r3's own
    /// decoder samples, larger from an engine in another precision.
    /// (Absent, read as 0, in logs from before it was measured; so are
    /// the two below.)
    #[serde(default)]
    pub logprob_gap_mean: f64,
    #[serde(default)]
    pub logprob_gap_max: f64,
    /// Mean importance ratio π_trainer / π_sampler (per token or per
    /// sequence, by `importance_sampling`) before the cap, and the
    /// fraction of ratios above the cap.
    #[serde(default)]
    pub importance_ratio_mean: f64,
    #[serde(default)]
    pub importance_capped_fraction: f64,
    pub grad_norm: f64,
    pub clip_fraction: f64,
    pub reflection_length: f64,
    pub groups: usize,
    pub zero_signal_groups: usize,
    pub trained_tokens: usize,
    pub generated_tokens: usize,
    pub seconds_generation: f64,
    /// Mean fraction of the rollout rows live in each forward of r3's
    /// decoder (reflections and retries run as one continuous batch);
    /// 0 when engines sample. (Absent, read as 0, in older logs.)
    #[serde(default)]
    pub generation_batch_occupancy: f64,
    pub seconds_verification: f64,
    pub seconds_reference: f64,
    pub seconds_forward_backward: f64,
    /// Matrix-product FLOPs the forward and backward passes needed
    /// ([`crate::score::training_flops`]): divided by their seconds, the
    /// rate to set against the machine's GEMM peak. (Absent, read as 0,
    /// in the logs of runs from before it was counted.)
    #[serde(default)]
    pub forward_backward_flops: f64,
    pub seconds_optimizer: f64,
    pub seconds_step: f64,
    pub tokens_per_s: f64,
}

impl StepMetrics {
    /// The step's rollout statistics, all computed here with one estimator
    /// ([`mean_and_std`]).
    pub(crate) fn record_rollouts(&mut self, groups: &[Group]) {
        let rollouts: Vec<&Rollout> = groups.iter().flat_map(|g| &g.rollouts).collect();
        let rewards: Vec<f64> = groups
            .iter()
            .flat_map(|g| &g.rewards)
            .map(|&r| r as f64)
            .collect();
        (self.reward_mean, self.reward_std) = mean_and_std(&rewards);
        self.retry_success = self.reward_mean;
        self.groups = groups.len();
        self.generated_tokens = rollouts
            .iter()
            .map(|r| r.reflection.len() + r.retry.tokens.len())
            .sum();
        let lengths: Vec<f64> = rollouts.iter().map(|r| r.reflection.len() as f64).collect();
        self.reflection_length = mean_and_std(&lengths).0;
    }

    /// The step's sampler–trainer gap and what its correction did.
    pub(crate) fn record_gap(&mut self, gap: &SamplerGap) {
        self.logprob_gap_mean = gap.gap_sum / gap.tokens.max(1) as f64;
        self.logprob_gap_max = gap.gap_max;
        self.importance_ratio_mean = gap.ratio_sum / gap.ratios.max(1) as f64;
        self.importance_capped_fraction = gap.capped as f64 / gap.ratios.max(1) as f64;
    }
}
