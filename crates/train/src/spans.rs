//! **Where the mask is built**, as data: for each rollout of a step, the
//! ids it trains, with the advantage and weight of each. Everything not in
//! a span — prompt, attempt, instructions and (for `train_on =
//! "reflection"`) the retry — is never scored, so its weight is exactly 0.
//! The trainer and the scorer take these spans and nothing else.

use r3_loop::Rollout;

use crate::config::TrainOn;
use crate::grpo::{sequence_weights, Group, LossType};

/// One rollout's trained tokens: `tokens` follow `context` in its ids, and
/// each of their log-probs enters the loss as `weight × advantage × …`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainedSpan<'g> {
    /// The ids before the span (shared by a group's rollouts up to the
    /// reflection): conditioning only.
    pub context: &'g [u32],
    /// The trained ids: the reflection, its end-of-turn token included.
    pub tokens: &'g [u32],
    pub advantage: f32,
    /// The `loss_type` aggregate's weight of each of these tokens.
    pub weight: f32,
    /// The sampler's log-probs of `tokens`, where it reported them: the
    /// other side of the sampler–trainer gap.
    pub sampled: Option<&'g [f32]>,
}

/// The trained spans of a step's groups, group by group, rollout by
/// rollout: the one place that decides which tokens learn.
pub fn trained_spans<'g>(
    groups: &'g [Group],
    train_on: TrainOn,
    loss_type: LossType,
    max_completion_length: usize,
) -> Vec<Vec<TrainedSpan<'g>>> {
    let span = |r: &Rollout| match train_on {
        TrainOn::Reflection => r.reflection.clone(),
        TrainOn::Retry => r.retry_span(),
    };
    let sampled = |r: &'g Rollout| match train_on {
        TrainOn::Reflection => r.sampled_logprobs.reflection.as_deref(),
        TrainOn::Retry => r.sampled_logprobs.retry.as_deref(),
    };
    let lengths: Vec<usize> = groups
        .iter()
        .flat_map(|g| &g.rollouts)
        .map(|r| span(r).len())
        .collect();
    let mut weights = sequence_weights(&lengths, loss_type, max_completion_length).into_iter();
    groups
        .iter()
        .map(|g| {
            g.rollouts
                .iter()
                .zip(&g.advantages)
                .map(|(r, &advantage)| {
                    let span = span(r);
                    TrainedSpan {
                        context: &r.ids[..span.start],
                        tokens: &r.ids[span],
                        advantage,
                        weight: weights.next().expect("one weight per rollout"),
                        sampled: sampled(r),
                    }
                })
                .collect()
        })
        .collect()
}
