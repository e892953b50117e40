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
