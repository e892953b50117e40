//! Model files on tiny random models the test writes itself: an HF
//! directory and a GGUF load to the same model, half-precision and
//! quantized tensors to the values they store, packed projections to the
//! dequantized ones, and transformers 5's rope keys to the same logits.

mod common;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::DType;
use common::{last_logits, max_abs_diff};
use r3_model::formats::rope_rows::{permute_rope_rows, unpermute_rope_rows};
use r3_model::tiny::{max_abs, TinyModel};
use r3_model::{Architecture, KvCache, Llama};

#[test]
fn hf_directory_and_gguf_load_the_same_model() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let tiny = TinyModel::new(arch, 64, 2, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tiny.write_hf_dir(&dir.path().join("hf"), DType::F32)
            .unwrap();
        tiny.write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
            .unwrap();
        let hf = r3_model::load(&dir.path().join("hf")).unwrap();
        let gg = r3_model::load(&dir.path().join("m.gguf")).unwrap();
        // GGUF stores the norm epsilon as f32.
        assert!((hf.config.rms_norm_eps - gg.config.rms_norm_eps).abs() < 1e-10);
        let gg_config = r3_model::ModelConfig {
            rms_norm_eps: hf.config.rms_norm_eps,
            ..gg.config.clone()
        };
        assert_eq!(hf.config, gg_config, "{arch:?}: config");
        assert_eq!(hf.eos_token_ids, gg.eos_token_ids);
        let text = "<|im_start|>user\nthe thin ant ate in the tent, 12 × 7 = 84?<|im_end|>\n";
        let ids = hf.tokenizer.encode(text).unwrap();
        assert_eq!(
            ids,
            gg.tokenizer.encode(text).unwrap(),
            "{arch:?}: tokenizers agree"
        );
        assert_eq!(hf.tokenizer.decode(&ids).unwrap(), text);
        let a = last_logits(&Llama::new(&hf.config, &hf.weights).unwrap(), &ids);
        let b = last_logits(&Llama::new(&gg.config, &gg.weights).unwrap(), &ids);
        assert_eq!(max_abs_diff(&a, &b), 0.0, "{arch:?}: identical logits");
    }
}

#[test]
fn half_precision_safetensors_load_as_f32() {
    let tiny = TinyModel::new(Architecture::Llama, 64, 1, 2).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let dir = tempfile::tempdir().unwrap();
        tiny.write_hf_dir(dir.path(), dtype).unwrap();
        let loaded = r3_model::load(dir.path()).unwrap();
        for (name, original) in &tiny.weights {
            let expected = original
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let got = loaded.weights.get(name, original.dims()).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(max_abs_diff(&got, &expected), 0.0, "{dtype:?} {name}");
        }
    }
}

#[test]
fn gguf_quantizations_dequantize_to_the_stored_values() {
    // K-quants work on blocks of 256, hence the width.
    let tiny = TinyModel::new(Architecture::Llama, 256, 1, 3).unwrap();
    let c = &tiny.config;
    for dtype in [
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        tiny.write_gguf(&path, dtype).unwrap();
        let loaded = r3_model::load(&path).unwrap();
        for (name, original) in &tiny.weights {
            let heads = if name.contains("q_proj") {
                Some(c.num_heads)
            } else if name.contains("k_proj") {
                Some(c.num_kv_heads)
            } else {
                None
            };
            let stored = match heads {
                Some(h) => permute_rope_rows(original, h).unwrap(),
                None => original.clone(),
            };
            let q = if stored.rank() == 2 {
                dtype
            } else {
                GgmlDType::F32
            };
            let mut expected = QTensor::quantize(&stored, q)
                .unwrap()
                .dequantize(&candle_core::Device::Cpu)
                .unwrap();
            if let Some(h) = heads {
                expected = unpermute_rope_rows(&expected, h).unwrap();
            }
            let got = loaded.weights.get(name, original.dims()).unwrap();
            assert_eq!(max_abs_diff(&got, &expected), 0.0, "{dtype:?} {name}");
            // And the quantized model is still the same model, roughly.
            let err = max_abs_diff(&got, original);
            assert!(
                err < 0.6,
                "{dtype:?} {name}: dequantized weights off by {err}"
            );
        }
    }
}

#[test]
fn packed_weights_are_the_dequantized_weights_and_decode_alike() {
    // An inference decoder keeps Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/F16/BF16
    // projections packed as stored, and re-cuts Q4_K, Q5_K and Q6_K (to K4,
    // K5, K6; f32 stays f32). Unpacked, every packed matrix must equal
    // the dequantized tensor bit for bit — including llama.cpp's permuted
    // q/k rows and a vocabulary (271) that leaves the last 16-row group
    // partly empty — and the packed decoder must give the logits of the
    // f32 decoder on the same values, through prefill and decode steps.
    let tiny = TinyModel::new(Architecture::Llama, 256, 2, 11).unwrap();
    assert_ne!(tiny.config.vocab_size % 16, 0);
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
    ] {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        tiny.write_gguf(&path, dtype).unwrap();
        files.push((format!("{dtype:?}"), path, true));
    }
    for dtype in [DType::F16, DType::BF16] {
        let path = dir.path().join(format!("{dtype:?}"));
        tiny.write_hf_dir(&path, dtype).unwrap();
        files.push((format!("safetensors {dtype:?}"), path, true));
    }
    for (what, path, packable) in files {
        let loaded = r3_model::load(&path).unwrap();
        for (name, original) in &tiny.weights {
            let packed = loaded.weights.packed(name, original.dims()).unwrap();
            assert_eq!(
                packed.is_some(),
                packable && original.rank() == 2,
                "{what} {name}"
            );
            if let Some(packed) = packed {
                let expected = loaded.weights.get(name, original.dims()).unwrap();
                let got = packed.to_f32().unwrap();
                assert_eq!(max_abs_diff(&got, &expected), 0.0, "{what} {name}");
            }
        }
        let packed = Llama::new(&loaded.config, &loaded.weights).unwrap();
        let (trainable, _vars) = Llama::trainable(&loaded.config, &loaded.weights).unwrap();
        let dense = trainable.for_generation().unwrap();
        let all =
            tiny.config.vocab_size * 256 + 2 * (256 * 256 * 2 + 2 * 256 * 128 + 3 * 256 * 512);
        assert_eq!(
            packed.packed_weights(),
            if packable { all } else { 0 },
            "{what}"
        );
        assert_eq!(dense.packed_weights(), 0);
        let prompts: [&[u32]; 2] = [&[1, 2, 3, 4, 5, 6, 7], &[8, 9]];
        let steps: [[&[u32]; 2]; 3] = [[&[20], &[21]], [&[30, 31], &[32]], [&[40], &[41]]];
        let mut caches = [0, 1].map(|_| KvCache::new(&tiny.config, 2, 8));
        for (s, segments) in std::iter::once(prompts).chain(steps).enumerate() {
            let [a, b] = [&dense, &packed].map(|model| {
                let i = usize::from(std::ptr::eq(model, &packed));
                let hidden = model.forward(&segments, &mut caches[i]).unwrap();
                model.all_logits(&hidden).unwrap()
            });
            let (diff, scale) = (max_abs_diff(&a, &b), max_abs(&a).unwrap());
            assert!(diff <= 1e-5 * scale, "{what} step {s}: {diff} of {scale}");
        }
    }
}

/// transformers 5 writes the rope base inside `rope_parameters`; read from
/// there, a non-default base gives exactly the GGUF's logits (reading only
/// the top-level key fell back to 10,000 and ran another model).
#[test]
fn transformers_5_rope_parameters_give_the_gguf_logits() {
    let mut tiny = TinyModel::new(Architecture::Qwen2, 64, 2, 4).unwrap();
    tiny.config.rope_theta = 100_000.0;
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    tiny.write_hf_dir(&hf, DType::F32).unwrap();
    tiny.write_gguf(&dir.path().join("m.gguf"), GgmlDType::F32)
        .unwrap();
    let config_path = hf.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    let top = config.as_object_mut().unwrap();
    top.remove("rope_theta");
    top.remove("rope_scaling");
    top.insert(
        "rope_parameters".into(),
        serde_json::json!({"rope_theta": 100000.0, "rope_type": "default"}),
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let hf = r3_model::load(&hf).unwrap();
    let gg = r3_model::load(&dir.path().join("m.gguf")).unwrap();
    assert_eq!(hf.config.rope_theta, 100_000.0);
    let ids = [5, 17, 3, 99, 120, 7, 64, 2];
    let a = last_logits(&Llama::new(&hf.config, &hf.weights).unwrap(), &ids);
    let b = last_logits(&Llama::new(&gg.config, &gg.weights).unwrap(), &ids);
    assert_eq!(max_abs_diff(&a, &b), 0.0, "identical logits");
}

/// A model made for sampling with 8-bit inputs (`--int8-decode`) runs the
/// integer kernels on its Q4_0, Q4_1, Q4_K, Q5_0, Q5_K and Q6_K weights,
/// and Q8_0's at a few rows (at any with the tile kernel): through a prompt and decode steps, its logits
/// stay within the inputs' rounding of the exact model's (and differ from
/// them where the CPU runs the integer kernel); F16 weights, which have
/// none, give the exact logits.
#[test]
fn int8_decoding_stays_within_its_rounding_of_the_exact_logits() {
    let tiny = TinyModel::new(Architecture::Llama, 256, 2, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let integer = r3_kernels::CpuLevel::current() >= r3_kernels::CpuLevel::Avx2;
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
        GgmlDType::Q5_0,
        GgmlDType::Q5K,
        GgmlDType::F16,
    ] {
        let path = dir.path().join(format!("{dtype:?}.gguf"));
        tiny.write_gguf(&path, dtype).unwrap();
        let loaded = r3_model::load(&path).unwrap();
        let exact = Llama::new(&loaded.config, &loaded.weights).unwrap();
        let int8 = exact.clone().with_activations(r3_model::Activations {
            int8_decode: true,
            ..r3_model::Activations::EXACT
        });
        let prompts: [&[u32]; 2] = [&[1, 2, 3, 4, 5, 6, 7], &[8, 9]];
        let steps: [[&[u32]; 2]; 2] = [[&[20], &[21]], [&[40], &[41]]];
        let mut caches = [0, 1].map(|_| KvCache::new(&tiny.config, 2, 8));
        for (s, segments) in std::iter::once(prompts).chain(steps).enumerate() {
            let [a, b] = [&exact, &int8].map(|model| {
                let i = usize::from(std::ptr::eq(model, &int8));
                let hidden = model.forward(&segments, &mut caches[i]).unwrap();
                model.all_logits(&hidden).unwrap()
            });
            let (diff, scale) = (max_abs_diff(&a, &b), max_abs(&a).unwrap());
            assert!(
                diff <= 0.03 * scale,
                "{dtype:?} step {s}: {diff} of {scale}"
            );
            // Q8_0 takes the integer register kernel at up to 4 rows (the
            // decode steps), and the prompts' 9 tokens only where the CPU
            // has the tile kernel.
            let tiles = r3_kernels::int8_tile::available();
            let rounded =
                integer && dtype != GgmlDType::F16 && (dtype != GgmlDType::Q8_0 || s > 0 || tiles);
            assert_eq!(diff > 0.0, rounded, "{dtype:?} step {s}: {diff}");
        }
    }
}
