//! Helpers shared by the model's test files.
#![allow(dead_code)]

use candle_core::{IndexOp, Tensor};
use r3_model::tiny::max_abs;
use r3_model::{KvCache, Llama};

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap()).unwrap()
}

/// The last position's logits of `ids` run alone through `model`.
pub fn last_logits(model: &Llama, ids: &[u32]) -> Tensor {
    let mut cache = KvCache::new(&model.config, 1, 64);
    let hidden = model.forward(&[ids], &mut cache).unwrap();
    model.last_logits(&hidden).unwrap().i(0).unwrap()
}
