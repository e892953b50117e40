//! Broken model files give one clear error naming the file, never a panic.

use candle_core::quantized::GgmlDType;
use candle_core::DType;
use r3_model::tiny::TinyModel;
use r3_model::{Architecture, Llama, ModelError};

fn tiny() -> TinyModel {
    TinyModel::new(Architecture::Llama, 64, 1, 9).unwrap()
}

fn error_of(path: &std::path::Path) -> String {
    match r3_model::load(path) {
        Ok(m) => match Llama::new(&m.config, &m.weights) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

fn hf_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    tiny().write_hf_dir(dir.path(), DType::F32).unwrap();
    dir
}

fn edit_json(path: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn missing_path() {
    let e = error_of(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}

#[test]
fn truncated_safetensors() {
    let dir = hf_dir();
    let st = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = error_of(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn truncated_and_garbage_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    tiny().write_gguf(&path, GgmlDType::Q8_0).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [10, 200, bytes.len() - 100] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = error_of(&path);
        assert!(e.contains("m.gguf"), "cut at {cut}: {e}");
    }
    // Cut inside the tensors' data: the tensor that runs past the end is
    // named, with what it lacks (checked before any of the mapped file is
    // read).
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = error_of(&path);
    assert!(
        e.contains("remaining in the file") && e.contains(".weight"),
        "{e}"
    );
    std::fs::write(&path, b"definitely not a model").unwrap();
    let e = error_of(&path);
    assert!(e.contains("not a valid GGUF"), "{e}");
}

#[test]
fn tensor_with_the_wrong_shape() {
    let mut t = tiny();
    let name = "model.layers.0.mlp.up_proj.weight";
    t.weights.insert(
        name.into(),
        candle_core::Tensor::zeros((3, 5), DType::F32, &candle_core::Device::Cpu).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    t.write_hf_dir(dir.path(), DType::F32).unwrap();
    let e = error_of(dir.path());
    assert!(
        e.contains(name) && e.contains("[3, 5]") && e.contains("expected"),
        "{e}"
    );
}

#[test]
fn unsupported_architecture() {
    let dir = hf_dir();
    edit_json(&dir.path().join("config.json"), |v| {
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"])
    });
    let e = error_of(dir.path());
    assert!(
        e.contains("config.json") && e.contains("GPTNeoXForCausalLM"),
        "{e}"
    );
}

#[test]
fn tokenizer_larger_than_the_vocabulary() {
    let dir = hf_dir();
    edit_json(&dir.path().join("config.json"), |v| {
        v["vocab_size"] = serde_json::json!(100)
    });
    let e = error_of(dir.path());
    assert!(e.contains("tokenizer has") && e.contains("100"), "{e}");
}

#[test]
fn chat_template_that_does_not_compile_or_render() {
    let dir = hf_dir();
    let tc = dir.path().join("tokenizer_config.json");
    edit_json(&tc, |v| {
        v["chat_template"] = serde_json::json!("{% for m in messages %}")
    });
    let e = error_of(dir.path());
    assert!(
        e.contains("tokenizer_config.json") && e.contains("chat template"),
        "{e}"
    );

    edit_json(&tc, |v| {
        v["chat_template"] = serde_json::json!("{{ raise_exception('roles must alternate') }}")
    });
    let loaded = r3_model::load(dir.path()).unwrap();
    let e = loaded.chat_template.render(&[], true).unwrap_err();
    assert!(matches!(e, ModelError::ChatTemplate { .. }));
    assert!(e.to_string().contains("roles must alternate"), "{e}");
}

#[test]
fn model_without_a_chat_template() {
    let dir = hf_dir();
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v.as_object_mut().unwrap().remove("chat_template");
    });
    let e = error_of(dir.path());
    assert!(e.contains("no chat template"), "{e}");
}

/// Settings that change the numbers but that r3 would not honour are
/// refused, naming the key, instead of running a different model.
#[test]
fn config_fields_that_would_change_the_numbers() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": 1e4, "rope_type": "yarn", "factor": 4.0}),
            "rope_type 'yarn' is not supported",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "dynamic", "factor": 2.0}),
            "rope_type 'dynamic' is not supported",
        ),
        (
            "rope_parameters",
            serde_json::json!({"rope_theta": 123.0, "rope_type": "default"}),
            "rope_theta 10000 and rope_parameters.rope_theta 123 disagree",
        ),
        ("hidden_act", serde_json::json!("gelu"), "hidden_act 'gelu'"),
        ("mlp_bias", serde_json::json!(true), "mlp_bias"),
        (
            "partial_rotary_factor",
            serde_json::json!(0.5),
            "partial_rotary_factor 0.5",
        ),
    ];
    for (key, value, expected) in cases {
        let dir = hf_dir();
        edit_json(&dir.path().join("config.json"), |v| {
            v[key] = value.clone();
        });
        let e = error_of(dir.path());
        assert!(
            e.contains("config.json") && e.contains(expected),
            "{key}: {e}"
        );
    }
}

#[test]
fn config_with_fewer_layers_than_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    TinyModel::new(Architecture::Llama, 64, 2, 9)
        .unwrap()
        .write_hf_dir(dir.path(), DType::F32)
        .unwrap();
    edit_json(&dir.path().join("config.json"), |v| {
        v["num_hidden_layers"] = serde_json::json!(1);
    });
    let e = error_of(dir.path());
    assert!(
        e.contains("the config says 1 layers but the weights hold 2"),
        "{e}"
    );
}

/// Header values candle's reader would trust: an alignment of 0 (a
/// division by zero inside it) and a tensor with a zero dimension.
#[test]
fn gguf_with_zero_alignment_or_an_empty_dimension() {
    use candle_core::quantized::{gguf_file, QTensor};
    let write = |path: &std::path::Path, alignment: u32, dims: (usize, usize)| {
        let t = candle_core::Tensor::zeros(dims, DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let align = gguf_file::Value::U32(alignment);
        let metadata = [
            ("general.architecture", &arch),
            ("general.alignment", &align),
        ];
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &[("token_embd.weight", &q)]).unwrap();
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write(&path, 0, (4, 32));
    let e = error_of(&path);
    assert!(
        e.contains("m.gguf") && e.contains("general.alignment is 0"),
        "{e}"
    );
    write(&path, 32, (0, 32));
    let e = error_of(&path);
    assert!(
        e.contains("token_embd.weight") && e.contains("zero dimension"),
        "{e}"
    );
}

/// candle keeps the last of a key given twice; a check of the first would
/// pass an alignment of 32 followed by 0 and candle would divide by zero.
#[test]
fn gguf_with_the_alignment_given_twice() {
    use candle_core::quantized::{gguf_file, QTensor};
    let t = candle_core::Tensor::zeros((4, 32), DType::F32, &candle_core::Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("llama".into());
    let (good, zero) = (gguf_file::Value::U32(32), gguf_file::Value::U32(0));
    let metadata = [
        ("general.architecture", &arch),
        ("general.alignment", &good),
        ("general.alignment", &zero),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &metadata, &[("token_embd.weight", &q)]).unwrap();
    drop(file);
    let e = error_of(&path);
    assert!(
        e.contains("m.gguf") && e.contains("general.alignment is given more than once"),
        "{e}"
    );
}

/// Arrays nested 300,000 levels deep (a 3.6 MB file) overflowed the stack
/// of the header scan; now the nesting is refused before anything recurses.
#[test]
fn gguf_with_arrays_nested_without_bound() {
    let levels = 300_000;
    let mut bytes = Vec::new();
    bytes.extend(0x4655_4747u32.to_le_bytes()); // "GGUF"
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes()); // tensors
    bytes.extend(1u64.to_le_bytes()); // metadata pairs
    bytes.extend(1u64.to_le_bytes());
    bytes.push(b'x');
    bytes.extend(9u32.to_le_bytes()); // an array…
    for _ in 0..levels {
        bytes.extend(9u32.to_le_bytes()); // …of arrays…
        bytes.extend(1u64.to_le_bytes()); // …holding one
    }
    bytes.extend(4u32.to_le_bytes()); // innermost: u32s
    bytes.extend(0u64.to_le_bytes());
    let e = r3_model::formats::gguf::GgufFile::read(
        std::path::Path::new("deep.gguf"),
        &mut std::io::Cursor::new(bytes),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        e.contains("deep.gguf") && e.contains("nested more than 16 levels"),
        "{e}"
    );
}

/// Numbers that turned every logit NaN without a word: a zero or NaN rope
/// base and a NaN or negative epsilon, in a GGUF file and in config.json.
#[test]
fn model_numbers_that_would_make_every_logit_nan() {
    let dir = tempfile::tempdir().unwrap();
    type Edit = fn(&mut TinyModel);
    let cases: [(&str, Edit, &str); 4] = [
        ("theta0", |t| t.config.rope_theta = 0.0, "rope_theta"),
        ("thetanan", |t| t.config.rope_theta = f64::NAN, "rope_theta"),
        (
            "epsnan",
            |t| t.config.rms_norm_eps = f64::NAN,
            "rms_norm_eps",
        ),
        ("epsneg", |t| t.config.rms_norm_eps = -1e-5, "rms_norm_eps"),
    ];
    for (name, edit, key) in cases {
        let mut t = tiny();
        edit(&mut t);
        let path = dir.path().join(format!("{name}.gguf"));
        t.write_gguf(&path, GgmlDType::F32).unwrap();
        let e = error_of(&path);
        assert!(
            e.contains(&format!("{name}.gguf")) && e.contains(key),
            "{name}: {e}"
        );
    }
    let hf = hf_dir();
    edit_json(&hf.path().join("config.json"), |v| {
        v["rms_norm_eps"] = serde_json::json!(-1e-6)
    });
    let e = error_of(hf.path());
    assert!(
        e.contains("config.json") && e.contains("rms_norm_eps"),
        "{e}"
    );
}

/// Sizes whose product overflows or passes any real model are refused
/// before anything is allocated.
#[test]
fn shapes_past_any_real_model_are_refused() {
    let hf = hf_dir();
    edit_json(&hf.path().join("config.json"), |v| {
        v["hidden_size"] = serde_json::json!(1u64 << 33);
        v["intermediate_size"] = serde_json::json!(1u64 << 31);
        v["num_attention_heads"] = serde_json::json!(1u64 << 20);
        v["num_key_value_heads"] = serde_json::json!(1u64 << 20);
    });
    let e = error_of(hf.path());
    assert!(
        e.contains("parameters") && e.contains("not a model r3 can hold"),
        "{e}"
    );
}

/// A template that never ends runs out of fuel and says so.
#[test]
fn chat_template_that_loops_forever() {
    let dir = hf_dir();
    edit_json(&dir.path().join("tokenizer_config.json"), |v| {
        v["chat_template"] = serde_json::json!(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
        )
    });
    let loaded = r3_model::load(dir.path()).unwrap();
    let e = loaded
        .chat_template
        .render(&[], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("loop forever") && e.contains("tokenizer_config.json"),
        "{e}"
    );
}

/// A shard index may only name files beside it.
#[test]
fn shard_index_pointing_outside_the_model_directory() {
    for shard in ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors"] {
        let dir = hf_dir();
        let single = dir.path().join("model.safetensors");
        std::fs::rename(&single, dir.path().join("model-00001.safetensors")).unwrap();
        let index = serde_json::json!({"weight_map": {"model.norm.weight": shard}});
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            index.to_string(),
        )
        .unwrap();
        let e = error_of(dir.path());
        assert!(
            e.contains("model.safetensors.index.json") && e.contains("not a file name inside"),
            "{shard}: {e}"
        );
    }
}

/// An end-of-sequence id past the vocabulary is named as such, not as a
/// missing one.
#[test]
fn end_of_sequence_id_outside_the_vocabulary() {
    let mut t = tiny();
    t.config.eos_token_ids = vec![5000];
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("m.gguf");
    t.write_gguf(&gguf, GgmlDType::F32).unwrap();
    let e = error_of(&gguf);
    assert!(e.contains("eos_token_id' 5000 is outside"), "{e}");
    let hf = dir.path().join("hf");
    t.write_hf_dir(&hf, DType::F32).unwrap();
    let e = error_of(&hf);
    assert!(e.contains("end-of-sequence id 5000 is outside"), "{e}");
}
