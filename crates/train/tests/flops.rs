//! The FLOP count of a training pass, against a count by hand for two
//! reflections sharing a prompt: the prefix once, each tail at its own
//! positions, the head only at trained positions; and for two retries
//! whose contexts diverge after the prompt.

use r3_model::tiny::TinyModel;
use r3_model::{Architecture, ModelConfig};
use r3_train::score::{training_flops, LoraShape, TrainedShape};
use r3_train::spans::TrainedSpan;

fn span<'g>(context: &'g [u32], tokens: &'g [u32]) -> TrainedSpan<'g> {
    TrainedSpan {
        context,
        tokens,
        advantage: 1.0,
        weight: 0.5,
        sampled: None,
    }
}

/// By hand: `(dense, attention, head)` FLOPs of a forward over positions
/// at `contexts`, with `trained` output-head positions.
fn by_hand(c: &ModelConfig, contexts: &[usize], trained: usize) -> (f64, f64, f64) {
    let (h, mlp) = (c.hidden_size as f64, c.intermediate_size as f64);
    let q = (c.num_heads * c.head_dim) as f64;
    let kv = (c.num_kv_heads * c.head_dim) as f64;
    let layers = c.num_layers as f64;
    let dense = layers * (2.0 * h * (q + 2.0 * kv) + 2.0 * q * h + 6.0 * h * mlp);
    let attention = contexts.iter().map(|&k| layers * 4.0 * q * k as f64).sum();
    let head = trained as f64 * 2.0 * h * c.vocab_size as f64;
    (contexts.len() as f64 * dense, attention, head)
}

fn tiny() -> ModelConfig {
    TinyModel::new(Architecture::Llama, 64, 2, 1)
        .unwrap()
        .config
}

#[test]
fn training_flops_count_what_the_layout_runs() {
    let c = tiny();
    let context = [5u32, 6, 7];
    let spans = [span(&context, &[8, 9]), span(&context, &[10, 11])];
    // Head pass: the shared context but its last id, at contexts 1 and 2;
    // tails: [last context id, first token] at contexts 3 and 4, per row.
    let (dense, attention, head) = by_hand(&c, &[1, 2, 3, 4, 3, 4], 4);
    let forward = dense + attention + head;
    let full = TrainedShape {
        lora: None,
        recompute: true,
    };
    let expected = forward + 2.0 * forward + (dense + attention);
    assert_eq!(training_flops(&c, &spans, full), expected);

    let lora = LoraShape {
        rank: 4,
        sides_per_layer: 2 * 64 + 2 * 64,
    };
    let adapters = |per: f64| per * (4 * 256) as f64 * c.num_layers as f64 * 6.0;
    let frozen = TrainedShape {
        lora: Some(lora),
        recompute: false,
    };
    let expected = (forward + adapters(2.0)) + (dense + 2.0 * attention + head + adapters(4.0));
    assert_eq!(training_flops(&c, &spans, frozen), expected);
}

#[test]
fn training_flops_run_a_common_prefix_once_when_contexts_diverge() {
    let c = tiny();
    let (a, b) = ([5u32, 6, 7, 1], [5u32, 6, 7, 2, 3]);
    let spans = [span(&a, &[8]), span(&b, &[10, 11])];
    // Head: [5, 6, 7] at contexts 1-3; tails [1] at 4 and [2, 3, 10] at 4-6.
    let (dense, attention, head) = by_hand(&c, &[1, 2, 3, 4, 4, 5, 6], 3);
    let forward = dense + attention + head;
    let full = TrainedShape {
        lora: None,
        recompute: false,
    };
    assert_eq!(training_flops(&c, &spans, full), 3.0 * forward);
}
