//! Random weights for a model of a given shape: the tiny test models, and
//! `r3 bench --random-init CONFIG.json`, which measures a model's real
//! shapes (Qwen2.5-1.5B, 7B) on a machine that cannot download its weights.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Tensors of more values than this are drawn in parallel blocks, each
/// from its own stream of a generator seeded off the sequential one (a
/// 1.5B model took 17 s on one core); smaller ones come straight from the
/// sequential generator, so the tiny test models keep their values.
const PARALLEL_BLOCK: usize = 1 << 22;

/// Every weight of `config`'s decoder under its HF name, in f32: norms
/// drawn around 1, projections with standard deviation 1/√input (so that
/// activations keep their scale through the layers), embeddings around 0.
/// The same seed gives the same weights, whatever the thread count.
pub fn random_weights(config: &ModelConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    check_fits_in_memory(config)?;
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
        let values: Vec<f32> = if n <= PARALLEL_BLOCK {
            normal.sample_iter(&mut rng).take(n).collect()
        } else {
            let base = rng.next_u64();
            let mut values = vec![0f32; n];
            values
                .par_chunks_mut(PARALLEL_BLOCK)
                .enumerate()
                .for_each(|(block, out)| {
                    let mut rng = ChaCha8Rng::seed_from_u64(base);
                    rng.set_stream(block as u64);
                    out.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
                });
            values
        };
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

/// Refuses a shape whose f32 weights need more memory than the machine has
/// available, instead of aborting on the allocation.
fn check_fits_in_memory(config: &ModelConfig) -> Result<()> {
    let bytes = config
        .parameter_count()
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| ModelError::Memory("the shape's sizes multiply past 2^64".into()))?;
    if let Some(available) = available_memory_bytes() {
        if bytes > available {
            return Err(ModelError::Memory(format!(
                "random f32 weights of this shape take {:.1} GB; the machine has {:.1} GB available",
                bytes as f64 / 1e9,
                available as f64 / 1e9
            )));
        }
    }
    Ok(())
}

/// `MemAvailable` from /proc/meminfo, where there is one.
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiny::TinyModel;
    use crate::Architecture;

    /// A tiny shape whose embedding table spans three parallel blocks, the
    /// last one partial.
    fn config_with_a_large_table() -> ModelConfig {
        let mut config = TinyModel::new(Architecture::Llama, 64, 1, 0)
            .unwrap()
            .config;
        config.vocab_size = 2 * PARALLEL_BLOCK / 64 + 5;
        config
    }

    fn draw_with_threads(config: &ModelConfig, threads: usize) -> Vec<f32> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let weights = pool.install(|| random_weights(config, 3)).unwrap();
        weights["model.embed_tokens.weight"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn a_large_tensor_is_the_same_on_any_thread_count_and_well_drawn() {
        let config = config_with_a_large_table();
        let one = draw_with_threads(&config, 1);
        assert_eq!(one, draw_with_threads(&config, 3));
        // Each block has its own stream: no block repeats another.
        let block = |i: usize| &one[i * PARALLEL_BLOCK..i * PARALLEL_BLOCK + 64];
        assert_ne!(block(0), block(1));
        assert_ne!(block(1), block(2));
        let n = one.len() as f64;
        let mean = one.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = one.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 1.0).abs() < 1e-3, "deviation {}", var.sqrt());
    }
}
