//! Gradient checkpointing changes memory, not results: the recomputed
//! backward gives the plain backward's log-probs and parameter gradients,
//! for a group sharing one prefix and for rows with different prefixes,
//! training every weight or LoRA adapters on a frozen base.

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
    let n = logprobs.dim(0).unwrap();
    let weights: Vec<f32> = (0..n).map(|i| 1.0 + (i % 3) as f32 * 0.5).collect();
    let weights = Tensor::from_vec(weights, n, logprobs.device()).unwrap();
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
