//! Gradient checkpointing changes memory, not results: the recomputed
//! backward gives the plain backward's log-probs and parameter gradients,
//! for a group sharing one prefix and for rows with different prefixes,
//! training every weight or LoRA adapters on a frozen base. And batching
//! changes nothing either: spans of different lengths, whose padding the
//! forward leaves out of its products, score as each does alone, with
//! contexts identical, unrelated, or sharing a prompt and then diverging
//! (retry credit: each row's own reflection before its retry).

mod common;

use candle_core::{Tensor, Var};
use r3_model::tiny::{max_abs, TinyModel};
use r3_model::Architecture;
use r3_train::optim::Gradients;
use r3_train::score::TrainingForward;

fn run(
    arch: Architecture,
    prefixes: &[&[u32]],
    tokens: &[&[u32]],
    recompute: bool,
    lora: bool,
) -> (Vec<f32>, Vec<(String, Tensor)>) {
    let tiny = TinyModel::new(arch, 64, 3, 5).unwrap();
    let (model, vars): (_, Vec<(String, Var)>) = match lora {
        false => tiny.trainable().unwrap(),
        true => {
            let targets = ["all-linear".to_string()];
            let lora = r3_model::lora::LoraConfig::new(4, 8.0, &targets).unwrap();
            r3_model::Llama::with_lora(&tiny.config, &tiny.weights(), &lora, None, 3).unwrap()
        }
    };
    let mut grads = Gradients::new(&vars).unwrap();
    let forward =
        TrainingForward::new(&model, &common::spans(prefixes, tokens), 1.0, recompute).unwrap();
    let logprobs = forward.logprobs().clone();
    // Each token's weight follows from the token, so that a span weighs
    // the same in a batch and alone.
    let weights: Vec<f32> = tokens
        .iter()
        .flat_map(|t| t.iter())
        .map(|&t| 1.0 + (t % 3) as f32 * 0.5)
        .collect();
    let weights = Tensor::from_vec(weights, logprobs.dim(0).unwrap(), logprobs.device()).unwrap();
    let loss = (&logprobs * &weights).unwrap().sum_all().unwrap();
    forward.backward(&loss, &mut grads).unwrap();
    let names = vars.iter().map(|(n, _)| n.clone());
    (
        logprobs.to_vec1().unwrap(),
        names.zip(grads.sums().iter().cloned()).collect(),
    )
}

fn assert_same(arch: Architecture, prefixes: &[&[u32]], tokens: &[&[u32]]) {
    for lora in [false, true] {
        assert_same_with(arch, prefixes, tokens, lora);
    }
}

fn assert_same_with(arch: Architecture, prefixes: &[&[u32]], tokens: &[&[u32]], lora: bool) {
    let (plain_lp, plain) = run(arch, prefixes, tokens, false, lora);
    let (recomputed_lp, recomputed) = run(arch, prefixes, tokens, true, lora);
    assert_eq!(plain_lp.len(), recomputed_lp.len());
    // The checkpointed forward runs the plain forward's own ops: the same
    // values to the last bit, on every kernel path.
    for (a, b) in plain_lp.iter().zip(&recomputed_lp) {
        assert_eq!(a.to_bits(), b.to_bits(), "lora {lora}: log-prob {a} vs {b}");
    }
    let recomputed: std::collections::HashMap<_, _> = recomputed.into_iter().collect();
    for (name, a) in &plain {
        let b = &recomputed[name];
        let scale = max_abs(a).unwrap();
        // LoRA's B starts at zero, so A's gradient is zero at the start.
        let starts_at_zero = lora && name.contains("lora_A");
        assert!(scale > 0.0 || starts_at_zero, "{name} got no gradient");
        let diff = max_abs(&(a - b).unwrap()).unwrap();
        // The replay sums the same terms, but adds the head and tail passes'
        // contributions (and the forked rows') in another order: a few
        // roundings of the largest entry, never more than 16 ulps of it.
        assert!(
            diff <= 16.0 * f32::EPSILON * scale,
            "{name}: recomputed gradient differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn recomputed_gradients_match_plain_ones_for_a_shared_prefix() {
    let prefix: Vec<u32> = (0..11).map(|i| (i * 13 + 7) % 250).collect();
    let spans: [&[u32]; 3] = [&[5, 9, 200, 3], &[17, 1], &[42, 43, 44, 45, 46, 47]];
    assert_same(Architecture::Llama, &[prefix.as_slice(); 3], &spans);
}

#[test]
fn recomputed_gradients_match_plain_ones_for_different_prefixes() {
    let a: Vec<u32> = (0..9).map(|i| (i * 31 + 2) % 250).collect();
    let b: Vec<u32> = (0..4).map(|i| (i * 7 + 100) % 250).collect();
    let spans: [&[u32]; 2] = [&[8, 8, 8], &[60, 61, 62, 63, 64]];
    assert_same(Architecture::Qwen2, &[&a, &b], &spans);
}

#[test]
fn spans_of_different_lengths_score_in_a_batch_as_each_does_alone() {
    let prefix: Vec<u32> = (0..7).map(|i| (i * 19 + 3) % 250).collect();
    let other: Vec<u32> = (0..10).map(|i| (i * 23 + 11) % 250).collect();
    let spans: [&[u32]; 3] = [&[5, 9, 200, 3, 77, 78, 79], &[17], &[42, 43, 44]];
    let diverging = |tail: &[u32]| [prefix.as_slice(), tail].concat();
    // Common prefix the whole prompt; then one context the prompt itself,
    // so the head stops short of its last id.
    let (a, b, c) = (diverging(&[1, 2]), diverging(&[3]), diverging(&[4, 5, 6]));
    for (prefixes, arch) in [
        ([prefix.as_slice(); 3], Architecture::Llama),
        ([&prefix, &other, &prefix], Architecture::Qwen2),
        ([&a, &b, &c], Architecture::Llama),
        ([&a, &prefix, &c], Architecture::Qwen2),
    ] {
        for (recompute, lora) in [(false, false), (true, false), (true, true)] {
            let (batched_lp, batched) = run(arch, &prefixes, &spans, recompute, lora);
            let mut alone_lp = Vec::new();
            let mut alone: Vec<(String, Tensor)> = Vec::new();
            for (p, t) in prefixes.iter().zip(&spans) {
                let (lp, grads) = run(arch, &[p], &[t], recompute, lora);
                alone_lp.extend(lp);
                alone = match alone.is_empty() {
                    true => grads,
                    false => alone
                        .into_iter()
                        .zip(grads)
                        .map(|((n, a), (_, b))| (n, (a + b).unwrap()))
                        .collect(),
                };
            }
            let what = format!("{arch:?}, recompute {recompute}, lora {lora}");
            assert_eq!(batched_lp.len(), alone_lp.len());
            for (a, b) in batched_lp.iter().zip(&alone_lp) {
                assert!(
                    (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                    "{what}: {a} vs {b}"
                );
            }
            for ((name, a), (_, b)) in batched.iter().zip(&alone) {
                let scale = max_abs(b).unwrap();
                let diff = max_abs(&(a - b).unwrap()).unwrap();
                assert!(
                    diff <= 1e-5 * scale.max(1e-3),
                    "{what}, {name}: {diff} of {scale}"
                );
            }
        }
    }
}
