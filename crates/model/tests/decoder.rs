//! The decoder on tiny random models the test builds itself: padding,
//! forking and setting rows aside do not change any row's logits, the
//! decode kernels follow the autograd path, gradients are right, and a
//! bf16 decoder follows the f32 one. (Model files: model_files.rs.)

mod common;

use candle_core::{DType, IndexOp, Tensor, Var, D};
use common::{last_logits, max_abs_diff};
use r3_model::tiny::{finite_difference_mismatch, max_abs, TinyModel};
use r3_model::{Architecture, KvCache, Llama};

fn tiny_model(arch: Architecture, seed: u64) -> Llama {
    let tiny = TinyModel::new(arch, 64, 2, seed).unwrap();
    Llama::new(&tiny.config, &tiny.weights()).unwrap()
}

#[test]
fn a_padded_batch_gives_each_row_its_own_logits() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let model = tiny_model(arch, 4);
        let rows: [&[u32]; 3] = [&[5, 17, 99, 3, 42, 8, 250], &[7, 7], &[100, 200, 33, 4]];
        let mut cache = KvCache::new(&model.config, 3, 8);
        let hidden = model.forward(&rows, &mut cache).unwrap();
        let logits = model.all_logits(&hidden).unwrap();
        let t = hidden.dim(1).unwrap();
        for (r, ids) in rows.iter().enumerate() {
            let mut alone = KvCache::new(&model.config, 1, 8);
            let single = model
                .all_logits(&model.forward(&[ids], &mut alone).unwrap())
                .unwrap();
            let padded = logits.i((r, t - ids.len().., ..)).unwrap();
            let diff = max_abs_diff(&padded, &single.i(0).unwrap());
            assert!(
                diff < 1e-4,
                "{arch:?} row {r}: padded logits differ by {diff}"
            );
        }
        // One-token decode steps keep agreeing, past the initial capacity.
        let mut alone: Vec<KvCache> = rows
            .iter()
            .map(|ids| {
                let mut c = KvCache::new(&model.config, 1, 8);
                model.forward(&[ids], &mut c).unwrap();
                c
            })
            .collect();
        for step in 0..6u32 {
            let next: Vec<[u32; 1]> = (0..3).map(|r| [(step * 31 + r * 7) % 260]).collect();
            let segs: Vec<&[u32]> = next.iter().map(|n| n.as_slice()).collect();
            let batched = model
                .last_logits(&model.forward(&segs, &mut cache).unwrap())
                .unwrap();
            for (r, c) in alone.iter_mut().enumerate() {
                let single = model
                    .last_logits(&model.forward(&[segs[r]], c).unwrap())
                    .unwrap();
                let diff = max_abs_diff(&batched.i(r).unwrap(), &single.i(0).unwrap());
                assert!(diff < 1e-4, "{arch:?} step {step} row {r}: {diff}");
            }
        }
    }
}

#[test]
fn forked_selected_and_set_aside_rows_continue_like_a_fresh_prefill() {
    let model = tiny_model(Architecture::Llama, 5);
    let prefix: &[u32] = &[1, 50, 60, 70, 80, 90];
    let continuations: [&[u32]; 3] = [&[11, 12, 13], &[21], &[31, 32]];
    let fresh = |ids: Vec<u32>| last_logits(&model, &ids);

    // Fork one prefill three ways; continue with segments of different lengths.
    let mut shared = KvCache::new(&model.config, 1, 16);
    model.forward(&[prefix], &mut shared).unwrap();
    let mut forked = shared.select_rows(&[0, 0, 0], 16).unwrap();
    let out = model
        .last_logits(&model.forward(&continuations, &mut forked).unwrap())
        .unwrap();
    for (r, cont) in continuations.iter().enumerate() {
        let expected = fresh([prefix, cont].concat());
        let diff = max_abs_diff(&out.i(r).unwrap(), &expected);
        assert!(diff < 1e-4, "fork row {r}: {diff}");
    }

    // Drop the middle row, in a cache too small for what follows (it grows).
    let mut kept = forked.select_rows(&[2, 0], 10).unwrap();
    // Set row 0 aside while row 1 goes on, then continue both.
    kept.deactivate(0).unwrap();
    assert_eq!((kept.batch(), kept.rows()), (1, 2));
    model.forward(&[&[40u32, 41][..]], &mut kept).unwrap();
    kept.activate_all().unwrap();
    assert_eq!(kept.batch(), 2);
    let next: [&[u32]; 2] = [&[42], &[43, 44]];
    let out = model
        .last_logits(&model.forward(&next, &mut kept).unwrap())
        .unwrap();
    let histories = [
        [prefix, continuations[2], next[0]].concat(),
        [prefix, continuations[0], &[40, 41], next[1]].concat(),
    ];
    for (r, history) in histories.into_iter().enumerate() {
        let diff = max_abs_diff(&out.i(r).unwrap(), &fresh(history));
        assert!(diff < 1e-4, "set-aside row {r}: {diff}");
    }
}

/// A row that joins a decoding batch goes into the columns it has not
/// used: the column axis grows by one a step (the decoding row's), not by
/// the joining row's segment, and both rows see what they would alone.
#[test]
fn a_row_joining_a_decoding_batch_fills_its_unused_columns() {
    let model = tiny_model(Architecture::Qwen2, 6);
    let prompt: Vec<u32> = (1..=10).collect();
    let mut cache = KvCache::new(&model.config, 1, 4);
    model.forward(&[&prompt], &mut cache).unwrap();
    cache.add_rows(1).unwrap();
    let joining: [&[u32]; 3] = [&[70, 71, 72, 73], &[74, 75, 76, 77], &[78]];
    let (mut first, mut second) = (prompt.clone(), Vec::new());
    for (step, segment) in joining.iter().enumerate() {
        let decoded = [200 + step as u32];
        let out = model
            .last_logits(&model.forward(&[&decoded, segment], &mut cache).unwrap())
            .unwrap();
        assert_eq!(cache.len(), prompt.len() + step + 1, "step {step}");
        first.push(decoded[0]);
        second.extend_from_slice(segment);
        for (r, history) in [&first, &second].into_iter().enumerate() {
            let diff = max_abs_diff(&out.i(r).unwrap(), &last_logits(&model, history));
            assert!(diff < 1e-4, "step {step} row {r}: {diff}");
        }
    }
}

/// The model with every weight a `Var`, for gradient tests.
fn trainable(seed: u64) -> (Llama, Vec<(String, Var)>) {
    TinyModel::new(Architecture::Qwen2, 64, 2, seed)
        .unwrap()
        .trainable()
        .unwrap()
}

/// A training-style objective: a shared prefix computed once and forked,
/// continuations scored with `token_logprobs` at chosen positions.
fn objective(model: &Llama) -> Tensor {
    let prefix: &[u32] = &[3, 70, 71, 72, 9];
    let continuations: [&[u32]; 2] = [&[9, 40, 41, 42], &[9, 50, 51]];
    let mut cache = KvCache::differentiable(&model.config, 1);
    model.forward(&[&prefix[..4]], &mut cache).unwrap();
    let mut cache = cache.select_rows(&[0, 0], 0).unwrap();
    let hidden = model.forward(&continuations, &mut cache).unwrap();
    // Row 0 predicts 40, 41, 42; row 1 (one leading hole) predicts 50, 51.
    let rows = Tensor::cat(
        &[
            hidden.i((0, 0..3, ..)).unwrap(),
            hidden.i((1, 1..3, ..)).unwrap(),
        ],
        0,
    )
    .unwrap();
    let lp = model.token_logprobs(&rows, &[40, 41, 42, 50, 51]).unwrap();
    let weights = Tensor::new(&[0.5f32, -1.0, 2.0, 1.5, -0.7], lp.device()).unwrap();
    (lp * weights).unwrap().sum_all().unwrap()
}

#[test]
fn token_logprobs_match_a_full_log_softmax() {
    let (model, _) = trainable(6);
    let mut cache = KvCache::differentiable(&model.config, 1);
    let hidden = model
        .forward(&[&[4u32, 5, 6, 7, 8][..]], &mut cache)
        .unwrap()
        .i(0)
        .unwrap();
    let targets = [9u32, 10, 266, 0, 100];
    let chunked = model.token_logprobs(&hidden, &targets).unwrap();
    let full = candle_nn::ops::log_softmax(
        &model
            .all_logits(&hidden.unsqueeze(0).unwrap())
            .unwrap()
            .i(0)
            .unwrap(),
        D::Minus1,
    )
    .unwrap();
    let index = Tensor::new(&targets, hidden.device())
        .unwrap()
        .unsqueeze(1)
        .unwrap();
    let gathered = full.gather(&index, 1).unwrap().squeeze(1).unwrap();
    assert!(max_abs_diff(&chunked, &gathered) < 1e-5);
}

#[test]
fn every_parameter_gets_a_gradient_and_it_matches_finite_differences() {
    let (model, vars) = trainable(7);
    let grads = objective(&model).backward().unwrap();
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{name}: gradient norm {norm}"
        );
    }
    // Central differences on a few entries of several kinds of parameter.
    let probes = [
        ("model.embed_tokens.weight", 40 * 64 + 3),
        ("model.embed_tokens.weight", 71 * 64 + 10),
        (
            "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight_t",
            100,
        ),
        ("model.layers.0.self_attn.q_proj+k_proj+v_proj.bias", 64 + 5),
        (
            "model.layers.1.self_attn.q_proj+k_proj+v_proj.weight_t",
            64 * 96 + 90,
        ),
        ("model.layers.1.self_attn.o_proj.weight_t", 700),
        ("model.layers.0.mlp.gate_proj+up_proj.weight_t", 4000),
        ("model.layers.1.mlp.down_proj.weight_t", 1234),
        ("model.layers.0.input_layernorm.weight", 9),
        ("model.norm.weight", 30),
    ];
    // Central differences in f32 err by (rounding of f)/ε + O(ε²). The
    // objective passes through thousands of roundings; its error, measured
    // with gemm's AVX2 and AVX-512 kernels, is 10-20 ulps of |f|: at
    // ε = 1e-3 that alone moves the estimate by 0.01 while the truncation
    // error is still below 1e-4 at ε = 0.064. So ε is large, and the
    // tolerance is the rounding bound, 64 ulps of |f|, over ε plus 1% of the
    // gradient. (The k-bias probe, whose gradient is small because a
    // shift of every key cancels in the softmax but for RoPE, failed at
    // ε = 4e-3 on AVX2; at ε ≥ 0.016 its estimate converges on autograd's.)
    let probes: Vec<(String, &Var, usize)> = probes
        .iter()
        .map(|&(name, index)| {
            let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
            (name.to_string(), var, index)
        })
        .collect();
    let mismatch = finite_difference_mismatch(&|| objective(&model), &grads, &probes).unwrap();
    assert!(mismatch.is_none(), "{mismatch:?}");
}

#[test]
fn decode_kernels_match_the_autograd_path() {
    // Var weights send every forward down candle's differentiable ops; the
    // detached view of the same weights takes the decode kernels: one-pass
    // attention for segments of up to four tokens, and column-split
    // products (whole and partial column blocks) for few-row batches.
    for (arch, window) in [
        (Architecture::Llama, None),
        (Architecture::Qwen2, None),
        (Architecture::Mistral, Some(3)),
    ] {
        let mut tiny = TinyModel::new(arch, 128, 2, 9).unwrap();
        tiny.config.sliding_window = window;
        assert_eq!(tiny.config.num_heads / tiny.config.num_kv_heads, 2);
        let (matmul, _vars) = Llama::trainable(&tiny.config, &tiny.weights()).unwrap();
        let fused = matmul.detached();
        let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7], &[8, 9], &[10, 11, 12, 13, 14]];
        let steps: [[&[u32]; 3]; 3] = [
            [&[20], &[21], &[22]],
            [&[30, 31], &[32], &[33, 34, 35]],
            [&[40, 41, 42, 43], &[44], &[45]],
        ];
        let mut caches = [0, 1].map(|_| KvCache::new(&tiny.config, 3, 8));
        for (model, cache) in [&matmul, &fused].into_iter().zip(&mut caches) {
            model.forward(&prompts, cache).unwrap();
        }
        for (s, segments) in steps.iter().enumerate() {
            let [a, b] = [&matmul, &fused].map(|model| {
                let i = usize::from(std::ptr::eq(model, &fused));
                let hidden = model.forward(segments, &mut caches[i]).unwrap();
                model.all_logits(&hidden).unwrap()
            });
            assert!(a.track_op() && !b.track_op(), "the two paths differ");
            // Logits here are O(100): the paths agree to float rounding.
            let (diff, scale) = (max_abs_diff(&a.detach(), &b), max_abs(&b).unwrap());
            assert!(diff <= 1e-6 * scale, "{arch:?} step {s}: {diff} of {scale}");
        }
    }
}

/// A decoder built in bf16 computes in bf16 (nothing packed, logits f32)
/// and stays within bf16's rounding of the f32 decoder, over a padded
/// batch and decode steps; log-probs take the portable path and agree too.
#[test]
fn a_bf16_decoder_follows_the_f32_one() {
    let tiny = TinyModel::new(Architecture::Qwen2, 64, 2, 9).unwrap();
    let f32_model = Llama::new(&tiny.config, &tiny.weights()).unwrap();
    let mut weights = tiny.weights();
    weights.set_dtype(DType::BF16).unwrap();
    let bf16_model = Llama::new(&tiny.config, &weights).unwrap();
    assert_eq!(bf16_model.dtype(), DType::BF16);
    assert_eq!(bf16_model.packed_weights(), 0);
    assert!(weights.set_dtype(DType::F16).is_err());
    let rows: [&[u32]; 2] = [&[5, 17, 99, 3, 42, 8], &[7, 7]];
    let run = |model: &Llama| {
        let mut cache = KvCache::new(&model.config, 2, 8);
        let mut logits = vec![model
            .last_logits(&model.forward(&rows, &mut cache).unwrap())
            .unwrap()];
        for step in 0..3u32 {
            let next = [[step + 1], [step + 40]];
            let segs: Vec<&[u32]> = next.iter().map(|n| n.as_slice()).collect();
            logits.push(
                model
                    .last_logits(&model.forward(&segs, &mut cache).unwrap())
                    .unwrap(),
            );
        }
        Tensor::stack(&logits, 0).unwrap()
    };
    let (exact, half) = (run(&f32_model), run(&bf16_model));
    assert_eq!(half.dtype(), DType::F32);
    let relative = max_abs_diff(&exact, &half) / max_abs(&exact).unwrap();
    assert!(relative > 0.0 && relative < 2e-2, "{relative}");

    let ids = [5u32, 17, 99, 3, 42, 8];
    let logprobs = |model: &Llama| {
        let mut cache = KvCache::new(&model.config, 1, 8);
        let hidden = model.forward(&[&ids[..5]], &mut cache).unwrap();
        let (_, t, h) = hidden.dims3().unwrap();
        model
            .token_logprobs(&hidden.reshape((t, h)).unwrap(), &ids[1..])
            .unwrap()
    };
    let (exact, half) = (logprobs(&f32_model), logprobs(&bf16_model));
    assert_eq!(half.dtype(), DType::F32);
    // Within bf16's rounding of logits of this scale (a missing or wrong
    // logsumexp would be off by about the logsumexp itself, over 5).
    let relative = max_abs_diff(&exact, &half) / max_abs(&exact).unwrap();
    assert!(relative > 0.0 && relative < 5e-2, "{relative}");
}

/// Mixed precision: the f32 model computing in bf16 (`computing_in`) gives
/// every f32 parameter an f32 gradient, within bf16's rounding of the f32
/// model's gradient — the weights stay f32 masters that AdamW updates.
#[test]
fn bf16_compute_over_f32_weights_gives_f32_gradients_close_to_f32s() {
    let (model, vars) = trainable(7);
    let exact = objective(&model).backward().unwrap();
    let mixed_model = model.clone().computing_in(DType::BF16);
    assert_eq!(mixed_model.dtype(), DType::BF16);
    let loss = objective(&mixed_model);
    assert_eq!(loss.dtype(), DType::F32);
    let mixed = loss.backward().unwrap();
    for (name, var) in &vars {
        let (e, m) = (exact.get(var).unwrap(), mixed.get(var).unwrap());
        assert_eq!(m.dtype(), DType::F32, "{name}");
        let scale = max_abs(e).unwrap();
        let relative = max_abs_diff(e, m) / scale;
        assert!(relative < 0.1, "{name}: {relative} of {scale}");
    }
    // bf16 really ran: the two differ.
    let (name, var) = &vars[0];
    assert!(
        max_abs_diff(exact.get(var).unwrap(), mixed.get(var).unwrap()) > 0.0,
        "{name}"
    );
}
