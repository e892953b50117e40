//! The GRPO pieces against hand-computed values.

use candle_core::{Device, Tensor, Var};
use r3_train::config::TrainOn;
use r3_train::grpo::Group;
use r3_train::grpo::{
    group_advantages, grpo_loss, has_signal, importance_weights, mean_and_std, sequence_weights,
    ImportanceSampling, LossType, Objective, TokenTerms,
};
use r3_train::spans::trained_spans;

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

#[test]
fn advantages_are_normalised_within_the_group() {
    let a = group_advantages(&[1.0, 0.0, 0.0, 1.0], true);
    let std = (1.0f64 / 3.0).sqrt();
    for (got, sign) in a.iter().zip([1.0, -1.0, -1.0, 1.0]) {
        assert!(close(*got as f64, sign * 0.5 / (std + 1e-4)), "{got}");
    }
    assert_eq!(
        group_advantages(&[1.0, 0.0, 0.0, 0.0], false),
        vec![0.75, -0.25, -0.25, -0.25]
    );
    assert_eq!(
        group_advantages(&[1.0, 1.0, 1.0], true),
        vec![0.0, 0.0, 0.0]
    );
    assert!(!has_signal(&[0.0, 0.0]) && !has_signal(&[1.0, 1.0, 1.0]) && has_signal(&[0.0, 1.0]));
}

/// A rollout of 10 ids whose reflection is ids 4..7 and retry ids 8..10,
/// rewarded `reward`.
fn rollout(reward: bool) -> r3_loop::Rollout {
    r3_loop::Rollout {
        ids: (100..110).collect(),
        reflection: 4..7,
        reflection_text: String::new(),
        reflection_finish: r3_generate::FinishReason::Eos,
        retry: r3_loop::Attempt {
            tokens: vec![108, 109],
            text: String::new(),
            finish: r3_generate::FinishReason::Eos,
            verdict: match reward {
                true => r3_tasks::Verdict::pass(),
                false => r3_tasks::Verdict::fail("no"),
            },
        },
        sampled_logprobs: Default::default(),
    }
}

#[test]
fn the_mask_is_exactly_the_reflection_with_its_advantage_and_weight() {
    let groups = [Group::new(vec![rollout(true), rollout(false)], false)];
    assert!(groups[0].has_signal());
    let spans = trained_spans(&groups, TrainOn::Reflection, LossType::Grpo, 8);
    let ids: Vec<u32> = (100..110).collect();
    for (span, advantage) in spans[0].iter().zip([0.5, -0.5]) {
        assert_eq!(span.context, &ids[..4]);
        assert_eq!(span.tokens, &ids[4..7], "the reflection and nothing else");
        assert_eq!(span.advantage, advantage);
        assert_eq!(span.weight, 1.0 / 6.0, "mean over 3 tokens of 2 sequences");
    }
    let retry = trained_spans(&groups, TrainOn::Retry, LossType::Grpo, 8);
    assert_eq!(
        retry[0][0].tokens,
        &ids[8..],
        "the ablation trains the retry"
    );
    assert!(!Group::new(vec![rollout(true), rollout(true)], true).has_signal());
}

#[test]
fn metrics_and_advantages_share_one_estimator() {
    let (mean, std) = mean_and_std(&[1.0, 0.0, 0.0, 1.0]);
    assert_eq!(mean, 0.5);
    assert!(close(std, (1.0f64 / 3.0).sqrt()), "unbiased: {std}");
    assert_eq!(mean_and_std(&[2.0]), (2.0, 0.0));
}

#[test]
fn sequence_weights_follow_each_loss_type() {
    let lengths = [2, 4];
    assert_eq!(
        sequence_weights(&lengths, LossType::Grpo, 8),
        vec![0.25, 0.125]
    );
    assert_eq!(
        sequence_weights(&lengths, LossType::Bnpo, 8),
        vec![1.0 / 6.0, 1.0 / 6.0]
    );
    assert_eq!(
        sequence_weights(&lengths, LossType::DrGrpo, 8),
        vec![1.0 / 16.0, 1.0 / 16.0]
    );
}

#[test]
fn loss_and_gradient_match_a_hand_computation() {
    let lp = [-1.0f32, -2.0, -0.5, -2.0, -0.5];
    let old = [-1.0f32, -1.5, -0.8, -1.5, -0.8];
    let reference = [-1.2f32, -2.0, -0.3, -1.0, -0.9];
    let adv = [1.0f32, 1.0, 1.0, -1.0, -1.0];
    let weights = [0.1f32, 0.2, 0.3, 0.25, 0.15];
    let importance = [1.0f32, 0.5, 2.0, 0.0, 1.5];
    let objective = Objective {
        epsilon_low: 0.2,
        epsilon_high: 0.2,
        beta: 0.04,
    };
    let var = Var::new(&lp, &Device::Cpu).unwrap();
    let old_t = Tensor::new(&old, &Device::Cpu).unwrap();
    let ref_t = Tensor::new(&reference, &Device::Cpu).unwrap();
    let terms = TokenTerms {
        logprobs: var.as_tensor(),
        old_logprobs: &old_t,
        ref_logprobs: Some(&ref_t),
        advantages: &adv,
        weights: &weights,
        importance: &importance,
    };
    let (loss, stats) = grpo_loss(&terms, &objective).unwrap();
    let grads = loss.backward().unwrap();
    let grad: Vec<f32> = grads.get(var.as_tensor()).unwrap().to_vec1().unwrap();

    // By hand: ratio, which term of the min is active, its derivative.
    let mut expected_loss = 0.0f64;
    let mut expected_kl = 0.0f64;
    for i in 0..5 {
        let (l, o, r, a, w, is) = (
            lp[i] as f64,
            old[i] as f64,
            reference[i] as f64,
            adv[i] as f64,
            weights[i] as f64,
            importance[i] as f64,
        );
        let ratio = (l - o).exp();
        let clipped = ratio.clamp(0.8, 1.2);
        let (pg, dpg) = if clipped * a < ratio * a {
            (-clipped * a, 0.0)
        } else {
            (-ratio * a, -ratio * a)
        };
        let kl = (r - l).exp() - (r - l) - 1.0;
        let dkl = 1.0 - (r - l).exp();
        // The importance weight scales the policy term, not the KL.
        expected_loss += w * (is * pg + 0.04 * kl);
        expected_kl += w * kl;
        let expected_grad = w * (is * dpg + 0.04 * dkl);
        assert!(
            close(grad[i] as f64, expected_grad),
            "token {i}: {} vs {expected_grad}",
            grad[i]
        );
    }
    // Tokens 2 (ratio above 1.2, A > 0) and 3 (below 0.8, A < 0) are clipped.
    assert_eq!(stats.clipped_tokens, 2);
    assert!(close(
        loss.to_scalar::<f32>().unwrap() as f64,
        expected_loss
    ));
    assert!(close(stats.kl, expected_kl));
    assert!(
        grad[2] != 0.0 && grad[3] != 0.0,
        "the KL term still acts on clipped tokens"
    );
}

#[test]
fn each_loss_type_aggregates_per_token_losses_as_documented() {
    // Two sequences of 2 and 3 tokens, ratio 1 (old = logp), β = 0:
    // per-token loss = −A.
    let lp = [-1.0f32; 5];
    let adv = [0.5f32, 0.5, -2.0, -2.0, -2.0];
    let t = Tensor::new(&lp, &Device::Cpu).unwrap();
    let objective = Objective {
        epsilon_low: 0.2,
        epsilon_high: 0.2,
        beta: 0.0,
    };
    for (loss_type, expected) in [
        (
            LossType::Grpo,
            ((-0.5 - 0.5) / 2.0 + (2.0 * 3.0) / 3.0) / 2.0,
        ),
        (LossType::Bnpo, (-1.0 + 6.0) / 5.0),
        (LossType::DrGrpo, (-1.0 + 6.0) / (2.0 * 10.0)),
    ] {
        let per_sequence = sequence_weights(&[2, 3], loss_type, 10);
        let weights: Vec<f32> = [vec![per_sequence[0]; 2], vec![per_sequence[1]; 3]].concat();
        let terms = TokenTerms {
            logprobs: &t,
            old_logprobs: &t,
            ref_logprobs: None,
            advantages: &adv,
            weights: &weights,
            importance: &[1.0; 5],
        };
        let (loss, _) = grpo_loss(&terms, &objective).unwrap();
        assert!(
            close(loss.to_scalar::<f32>().unwrap() as f64, expected),
            "{loss_type:?}"
        );
    }
}

#[test]
fn importance_weights_cut_or_drop_what_the_sampler_overrated_as_documented() {
    // Three sequences: 2 tokens, 2 tokens, and 1 token with no sampled
    // log-probs. Trainer − sampler: [ln 2, ln 2], [ln 0.5, ln 5], [−].
    let (l2, l5, lh) = (2f32.ln(), 5f32.ln(), 0.5f32.ln());
    let trainer = [-1.0 + l2, -2.0 + l2, -1.0 + lh, -3.0 + l5, -0.7];
    let sampled_a = [-1.0f32, -2.0];
    let sampled_b = [-1.0f32, -3.0];
    let sampled = [Some(&sampled_a[..]), Some(&sampled_b[..]), None];
    let lengths = [2, 2, 1];
    let weights = |mode| importance_weights(&trainer, &lengths, &sampled, mode, 3.0);
    let near = |got: &[f32], want: &[f32]| {
        got.len() == want.len() && got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-5)
    };

    let (w, gap) = weights(ImportanceSampling::TokenTruncate);
    assert!(near(&w, &[2.0, 2.0, 0.5, 3.0, 1.0]), "{w:?}");
    assert_eq!((gap.tokens, gap.ratios, gap.capped), (4, 4, 1));
    assert!(close(gap.ratio_sum, 2.0 + 2.0 + 0.5 + 5.0));
    assert!(close(gap.gap_max, 5f64.ln()));
    assert!(close(gap.gap_sum, 2.0 * 2f64.ln() + 2f64.ln() + 5f64.ln()));

    let (w, _) = weights(ImportanceSampling::TokenMask);
    assert!(near(&w, &[2.0, 2.0, 0.5, 0.0, 1.0]), "{w:?}");

    // Per sequence: the product of the tokens' ratios, 4 and 2.5.
    let (w, gap) = weights(ImportanceSampling::SequenceTruncate);
    assert!(near(&w, &[3.0, 3.0, 2.5, 2.5, 1.0]), "{w:?}");
    assert_eq!((gap.ratios, gap.capped), (2, 1));
    let (w, _) = weights(ImportanceSampling::SequenceMask);
    assert!(near(&w, &[0.0, 0.0, 2.5, 2.5, 1.0]), "{w:?}");

    // "none" measures the gap and weighs every token 1.
    let (w, gap) = weights(ImportanceSampling::None);
    assert_eq!(w, vec![1.0; 5]);
    assert_eq!((gap.tokens, gap.ratios), (4, 0));
}
