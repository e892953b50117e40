//! LoRA on frozen bases (f32 and packed): a zero B leaves the model as it
//! was, gradients reach only the adapters and match finite differences,
//! merging gives the adapter forward's logits, and adapters round-trip
//! through PEFT's directory format; bad adapters are named.

use candle_core::quantized::GgmlDType;
use candle_core::{IndexOp, Tensor, Var};
use r3_model::lora::{Adapter, LoraConfig};
use r3_model::tiny::{finite_difference_mismatch, max_abs, TinyModel};
use r3_model::{Architecture, KvCache, Llama, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const IDS: &[u32] = &[3, 70, 71, 72, 9, 40, 41];

fn all_logits(model: &Llama) -> Tensor {
    let mut cache = KvCache::new(&model.config, 1, 16);
    let hidden = model.forward(&[IDS], &mut cache).unwrap();
    model.all_logits(&hidden).unwrap().i(0).unwrap()
}

fn config(targets: &[&str]) -> LoraConfig {
    let targets: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    LoraConfig::new(4, 8.0, &targets).unwrap()
}

/// The tiny model's weights as loaded from a GGUF of `dtype` (packed base
/// for Q8_0/F16) or as f32.
fn base(dtype: Option<GgmlDType>) -> (TinyModel, Weights, tempfile::TempDir) {
    let tiny = TinyModel::new(Architecture::Qwen2, 64, 2, 21).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let weights = match dtype {
        Some(dtype) => {
            let path = dir.path().join("tiny.gguf");
            tiny.write_gguf(&path, dtype).unwrap();
            r3_model::load(&path).unwrap().weights
        }
        None => tiny.weights(),
    };
    (tiny, weights, dir)
}

/// Adapters with random B too, so that every A and B has a gradient.
fn random_adapters(model: &Llama, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut names: Vec<(String, Tensor)> = model.adapter_weights().into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors = names
        .into_iter()
        .map(|(name, t)| {
            let values = (0..t.elem_count())
                .map(|_| rng.random_range(-0.3f32..0.3))
                .collect();
            (
                name,
                Tensor::from_vec(values, t.shape(), t.device()).unwrap(),
            )
        })
        .collect();
    Weights::new("<random adapters>", tensors)
}

/// The tiny model's packed F16 base with random adapters (seed `seed`) on
/// `targets`: the base, its weights, their directory, the adapters'
/// config and the adapted model.
fn adapted(
    targets: &[&str],
    seed: u64,
) -> (TinyModel, Weights, tempfile::TempDir, LoraConfig, Llama) {
    let (tiny, weights, dir) = base(Some(GgmlDType::F16));
    let lora = config(targets);
    let (fresh, _) = Llama::with_lora(&tiny.config, &weights, &lora, None, 2).unwrap();
    let adapter = random_adapters(&fresh, seed);
    let with = Llama::new(&tiny.config, &weights)
        .unwrap()
        .with_adapter(&lora, &adapter)
        .unwrap();
    (tiny, weights, dir, lora, with)
}

#[test]
fn a_zero_b_leaves_the_base_models_logits_unchanged() {
    for dtype in [None, Some(GgmlDType::Q8_0)] {
        let (tiny, weights, _dir) = base(dtype);
        let plain = Llama::new(&tiny.config, &weights).unwrap();
        let (lora, vars) =
            Llama::with_lora(&tiny.config, &weights, &config(&["all-linear"]), None, 1).unwrap();
        // 7 projections × 2 layers × (A, B).
        assert_eq!(vars.len(), 28);
        assert!(vars
            .iter()
            .all(|(n, _)| n.starts_with("base_model.model.model.layers.")));
        assert_eq!(
            plain.packed_weights(),
            lora.packed_weights(),
            "the base stays packed"
        );
        let diff = max_abs(&(all_logits(&plain) - all_logits(&lora.detached())).unwrap()).unwrap();
        assert_eq!(diff, 0.0, "{dtype:?}");
    }
}

/// A training-style objective: weighted log-probs of the sequence's tokens.
fn objective(model: &Llama) -> Tensor {
    let mut cache = KvCache::differentiable(&model.config, 1);
    let hidden = model
        .forward(&[&IDS[..6]], &mut cache)
        .unwrap()
        .i(0)
        .unwrap();
    let lp = model.token_logprobs(&hidden, &IDS[1..]).unwrap();
    let weights = Tensor::new(&[0.5f32, -1.0, 2.0, 1.5, -0.7, 0.3], lp.device()).unwrap();
    (lp * weights).unwrap().sum_all().unwrap()
}

#[test]
fn gradients_reach_only_the_adapters_and_match_finite_differences() {
    for dtype in [None, Some(GgmlDType::Q8_0)] {
        let (tiny, weights, _dir) = base(dtype);
        let lora = config(&["q_proj", "v_proj", "down_proj", "gate_proj"]);
        let (fresh, _) = Llama::with_lora(&tiny.config, &weights, &lora, None, 2).unwrap();
        let start = random_adapters(&fresh, 3);
        let (model, vars) =
            Llama::with_lora(&tiny.config, &weights, &lora, Some(&start), 0).unwrap();
        // Only the targeted projections: 4 per layer.
        assert_eq!(vars.len(), 16);
        let grads = objective(&model).backward().unwrap();
        for (name, var) in &vars {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(norm.is_finite() && norm > 0.0, "{name}: {norm}");
        }
        // The frozen base is not a variable: nothing else can be updated.
        for (name, t) in model.parameters() {
            if !name.contains("lora_") {
                assert!(grads.get(&t).is_none(), "{name} got a gradient");
            }
        }
        // Central differences on every third adapter matrix.
        let probes: Vec<(String, &Var, usize)> = vars
            .iter()
            .step_by(3)
            .map(|(name, var)| (format!("{dtype:?} {name}"), var, 5 % var.elem_count()))
            .collect();
        let mismatch = finite_difference_mismatch(&|| objective(&model), &grads, &probes).unwrap();
        assert!(mismatch.is_none(), "{mismatch:?}");
    }
}

#[test]
fn merged_weights_give_the_adapter_forwards_logits() {
    for dtype in [None, Some(GgmlDType::Q8_0)] {
        let (tiny, weights, _dir) = base(dtype);
        let lora = config(&["all-linear"]);
        let (fresh, _) = Llama::with_lora(&tiny.config, &weights, &lora, None, 2).unwrap();
        let adapter = random_adapters(&fresh, 4);
        let with = Llama::new(&tiny.config, &weights)
            .unwrap()
            .with_adapter(&lora, &adapter)
            .unwrap();
        let merged = Llama::new(
            &tiny.config,
            &Weights::new("<merged>", with.merged_hf_weights().unwrap()),
        )
        .unwrap();
        let (a, b) = (all_logits(&with), all_logits(&merged));
        let diff = max_abs(&(&a - &b).unwrap()).unwrap();
        assert!(diff <= 1e-4, "{dtype:?}: {diff}");
        // And the adapter does change the model.
        let plain = Llama::new(&tiny.config, &weights).unwrap();
        assert!(max_abs(&(a - all_logits(&plain)).unwrap()).unwrap() > 1e-3);
        // Without adapters it is the base again.
        let off =
            max_abs(&(all_logits(&with.without_adapters()) - all_logits(&plain)).unwrap()).unwrap();
        assert_eq!(off, 0.0);
    }
}

/// A snapshot for generation holds each projection's adapters stacked
/// into two products: the same logits as one product pair per adapter,
/// with every projection adapted and with some parts of a fused q/k/v
/// or gate/up projection left without (zero blocks, offsets).
#[test]
fn stacked_adapters_give_the_per_adapter_logits() {
    for dtype in [None, Some(GgmlDType::Q8_0)] {
        for targets in [&["all-linear"][..], &["q_proj", "v_proj", "up_proj"]] {
            let (tiny, weights, _dir) = base(dtype);
            let lora = config(targets);
            let (fresh, _) = Llama::with_lora(&tiny.config, &weights, &lora, None, 2).unwrap();
            let adapter = random_adapters(&fresh, 5);
            let (model, _) =
                Llama::with_lora(&tiny.config, &weights, &lora, Some(&adapter), 2).unwrap();
            let per_adapter = all_logits(&model.detached());
            let stacked = all_logits(&model.for_generation().unwrap());
            let diff = max_abs(&(&stacked - &per_adapter).unwrap()).unwrap();
            assert!(diff <= 1e-4, "{dtype:?} {targets:?}: {diff}");
            let plain = Llama::new(&tiny.config, &weights).unwrap();
            let moved = max_abs(&(stacked - all_logits(&plain)).unwrap()).unwrap();
            assert!(
                moved > 1e-3,
                "{dtype:?} {targets:?}: the adapters changed nothing"
            );
        }
    }
}

#[test]
fn adapters_round_trip_through_a_peft_directory() {
    let (tiny, weights, dir, lora, with) = adapted(&["q_proj", "o_proj"], 5);
    let out = dir.path().join("adapter");
    std::fs::create_dir_all(&out).unwrap();
    Adapter::save(&out, &lora, "tiny.gguf", &with.adapter_weights()).unwrap();
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config_json["peft_type"], "LORA");
    assert_eq!(
        config_json["target_modules"],
        serde_json::json!(["q_proj", "o_proj"])
    );
    let loaded = Adapter::load(&out).unwrap();
    assert_eq!(loaded.config, lora);
    let names: Vec<&String> = loaded.weights.names().collect();
    assert!(
        names
            .iter()
            .any(|n| *n == "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"),
        "{names:?}"
    );
    let again = Llama::new(&tiny.config, &weights)
        .unwrap()
        .with_adapter(&loaded.config, &loaded.weights)
        .unwrap();
    assert_eq!(
        max_abs(&(all_logits(&with) - all_logits(&again)).unwrap()).unwrap(),
        0.0
    );
}

#[test]
fn an_adapter_exported_in_bf16_holds_each_tensor_rounded_to_bf16() {
    let (_, _, dir, lora, with) = adapted(&["q_proj", "down_proj"], 9);
    let (f32_dir, bf16_dir) = (dir.path().join("f32"), dir.path().join("bf16"));
    std::fs::create_dir_all(&f32_dir).unwrap();
    std::fs::create_dir_all(&bf16_dir).unwrap();
    let tensors = with.adapter_weights();
    Adapter::save(&f32_dir, &lora, "tiny.gguf", &tensors).unwrap();
    let mut loaded = Adapter::load(&f32_dir).unwrap();
    loaded.base_model = Some("qwen2.5-coder-1.5b".into());
    loaded.export(&bf16_dir, candle_core::DType::BF16).unwrap();
    let file = bf16_dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let stored = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(stored.len(), tensors.len());
    for (name, view) in stored.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
    }
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("adapter_model.safetensors"))
            .unwrap()
            .len()
    };
    assert!(
        size(&bf16_dir) * 10 < size(&f32_dir) * 6,
        "bf16 is about half"
    );
    let exported = Adapter::load(&bf16_dir).unwrap();
    assert_eq!(exported.config, lora);
    assert_eq!(exported.base_model.as_deref(), Some("qwen2.5-coder-1.5b"));
    for (name, original) in &tensors {
        let rounded = original
            .to_dtype(candle_core::DType::BF16)
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .unwrap();
        let read = exported.weights.get(name, original.dims()).unwrap();
        let (want, got) = (
            rounded.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            read.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: not the bf16 rounding of the f32 adapter"
        );
        assert_ne!(
            original.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            got,
            "{name}: random f32 values survive bf16 unchanged only if nothing was rounded"
        );
    }
}

#[test]
fn bad_adapters_are_named() {
    let (tiny, weights, dir) = base(None);
    let lora = config(&["q_proj"]);
    // Made for a wider base: the tensor and both shapes are named.
    let wide = TinyModel::new(Architecture::Qwen2, 128, 2, 21).unwrap();
    let (other, _) = Llama::with_lora(&wide.config, &wide.weights(), &lora, None, 2).unwrap();
    let foreign = Weights::new("other/adapter_model.safetensors", other.adapter_weights());
    let e = Llama::with_lora(&tiny.config, &weights, &lora, Some(&foreign), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lora_A.weight") && e.contains("[4, 128]") && e.contains("[4, 64]"),
        "{e}"
    );
    // An adapter for a projection the settings do not target.
    let (both, _) = Llama::with_lora(
        &tiny.config,
        &weights,
        &config(&["q_proj", "k_proj"]),
        None,
        2,
    )
    .unwrap();
    let extra = Weights::new("x/adapter_model.safetensors", both.adapter_weights());
    let e = Llama::with_lora(&tiny.config, &weights, &lora, Some(&extra), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("k_proj") && e.contains("not an adapter of a targeted projection"),
        "{e}"
    );
    // A directory without the tensors file.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(
        empty.join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}"#,
    )
    .unwrap();
    let e = Adapter::load(&empty).err().unwrap().to_string();
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("missing"),
        "{e}"
    );
    // Settings r3 does not implement, and unknown modules.
    std::fs::write(empty.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}"#).unwrap();
    assert!(Adapter::load(&empty)
        .err()
        .unwrap()
        .to_string()
        .contains("use_dora"));
    let e = LoraConfig::new(4, 8.0, &["qkv".to_string()]).unwrap_err();
    assert!(
        e.contains("unknown LoRA target module 'qkv'") && e.contains("gate_proj"),
        "{e}"
    );
}

/// The issue's attacks on adapters: NaN, infinite or absurd weights, a
/// runaway scale or rank, and PEFT settings r3 would silently ignore are
/// refused by name instead of turning every logit NaN.
#[test]
fn adapters_that_would_give_wrong_numbers_are_refused() {
    let (tiny, weights, dir) = base(None);
    let lora = config(&["q_proj"]);
    let (model, _) = Llama::with_lora(&tiny.config, &weights, &lora, None, 2).unwrap();
    for bad in [f32::NAN, f32::INFINITY, 1e30] {
        let mut tensors = model.adapter_weights();
        let name = tensors
            .keys()
            .find(|n| n.ends_with("lora_B.weight"))
            .unwrap()
            .clone();
        let t = &tensors[&name];
        let mut values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[3] = bad;
        tensors.insert(
            name.clone(),
            Tensor::from_vec(values, t.shape(), t.device()).unwrap(),
        );
        let adapter = Weights::new("bad/adapter_model.safetensors", tensors);
        let e = Llama::new(&tiny.config, &weights)
            .unwrap()
            .with_adapter(&lora, &adapter)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&name) && e.contains("not a trained adapter"),
            "{bad}: {e}"
        );
    }
    let e = LoraConfig::new(4, 1e30, &["q_proj".to_string()]).unwrap_err();
    assert!(e.contains("lora_alpha / lora_r"), "{e}");
    let e = LoraConfig::new(1_000_000_000, 8.0, &["q_proj".to_string()]).unwrap_err();
    assert!(e.contains("lora_r 1000000000 is over"), "{e}");
    // A rank past the tiny model's 64-wide projections.
    let wide_rank = LoraConfig::new(65, 130.0, &["q_proj".to_string()]).unwrap();
    let e = Llama::with_lora(&tiny.config, &weights, &wide_rank, None, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lora_r 65 is larger than"), "{e}");

    let settings = dir.path().join("settings");
    std::fs::create_dir_all(&settings).unwrap();
    for (key, value) in [
        ("use_dora", r#""yes""#),
        ("layer_replication", "[[0, 1]]"),
        ("exclude_modules", r#"["k_proj"]"#),
        ("fan_in_fan_out", "true"),
        ("bias", r#""all""#),
    ] {
        std::fs::write(
            settings.join("adapter_config.json"),
            format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "{key}": {value}}}"#),
        )
        .unwrap();
        let e = Adapter::load(&settings).err().unwrap().to_string();
        assert!(
            e.contains(key) && e.contains("plain LoRA only"),
            "{key}: {e}"
        );
    }
}
