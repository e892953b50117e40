//! Random weights for a model of a given shape: the tiny test models, and
//! `r3 bench --random-init CONFIG.json`, which measures a model's real
//! shapes (Qwen2.5-1.5B, 7B) on a machine that cannot download its weights.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;
use crate::error::Result;

/// Every weight of `config`'s decoder under its HF name, in f32: norms
/// drawn around 1, projections with standard deviation 1/√input (so that
/// activations keep their scale through the layers), embeddings around 0.
/// The same seed gives the same weights.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let c = config;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (h, q, kv, mlp) = (
        c.hidden_size,
        c.num_heads * c.head_dim,
        c.num_kv_heads * c.head_dim,
        c.intermediate_size,
    );
    let mut weights = HashMap::new();
    let mut put = |name: String, shape: &[usize], mean: f32, std: f32| -> Result<()> {
        let normal = Normal::new(mean, std).expect("a positive, finite deviation");
        let n: usize = shape.iter().product();
        let values: Vec<f32> = normal.sample_iter(&mut rng).take(n).collect();
        weights.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        Ok(())
    };
    let input = |width: usize| 1.0 / (width as f32).sqrt();
    put(
        "model.embed_tokens.weight".into(),
        &[c.vocab_size, h],
        0.0,
        1.0,
    )?;
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), &[c.vocab_size, h], 0.0, input(h))?;
    }
    put("model.norm.weight".into(), &[h], 1.0, 0.1)?;
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.1)?;
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.1,
        )?;
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[q, h],
            0.0,
            input(h),
        )?;
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv, h],
            0.0,
            input(h),
        )?;
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv, h],
            0.0,
            input(h),
        )?;
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, q],
            0.0,
            input(q),
        )?;
        if c.attention_bias {
            put(format!("{p}.self_attn.q_proj.bias"), &[q], 0.0, 0.1)?;
            put(format!("{p}.self_attn.k_proj.bias"), &[kv], 0.0, 0.1)?;
            put(format!("{p}.self_attn.v_proj.bias"), &[kv], 0.0, 0.1)?;
        }
        put(
            format!("{p}.mlp.gate_proj.weight"),
            &[mlp, h],
            0.0,
            input(h),
        )?;
        put(format!("{p}.mlp.up_proj.weight"), &[mlp, h], 0.0, input(h))?;
        put(
            format!("{p}.mlp.down_proj.weight"),
            &[h, mlp],
            0.0,
            input(mlp),
        )?;
    }
    Ok(weights)
}
