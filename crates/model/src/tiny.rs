//! Tiny random models written to disk in both forms r3 loads (an HF
//! directory and a GGUF file). Tests use them where speed matters, so that
//! the loaders are exercised on files the project wrote itself.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor, Var};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::formats::gguf::gguf_name;
use crate::formats::rope_rows::permute_rope_rows;
use crate::llama::Llama;
use crate::random::random_weights;
use crate::weights::Weights;

/// ChatML, as SmolLM2 and Qwen2 write it.
pub const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Merges on top of the 256 byte tokens, so BPE merging is exercised.
const MERGES: &[(&str, &str)] = &[("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a")];
const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// A tiny model: its config and random weights under HF names.
pub struct TinyModel {
    pub config: ModelConfig,
    pub weights: HashMap<String, Tensor>,
    tokens: Vec<String>,
}

impl TinyModel {
    /// Random weights for a model of `hidden` width with `layers` layers;
    /// `hidden` must be a multiple of 256 for K-quant GGUF files.
    pub fn new(
        architecture: Architecture,
        hidden: usize,
        layers: usize,
        seed: u64,
    ) -> Result<Self> {
        let mut tokens: Vec<String> = {
            let mut bytes: Vec<char> = ByteLevel::alphabet().into_iter().collect();
            bytes.sort_unstable();
            bytes.into_iter().map(String::from).collect()
        };
        tokens.extend(MERGES.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
        let head_dim = 32;
        let config = ModelConfig {
            architecture,
            vocab_size: tokens.len() + 7,
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_layers: layers,
            num_heads: hidden / head_dim,
            num_kv_heads: (hidden / head_dim / 2).max(1),
            head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            attention_bias: architecture == Architecture::Qwen2,
            sliding_window: None,
            bos_token_id: Some(tokens.len() as u32 - 2),
            eos_token_ids: vec![tokens.len() as u32 - 1],
        };
        let weights = random_weights(&config, seed)?;
        Ok(Self {
            config,
            weights,
            tokens,
        })
    }

    pub fn weights(&self) -> Weights {
        Weights::new("<tiny model>", self.weights.clone())
    }

    /// The decoder with every weight a `Var`, and the vars by name: what
    /// gradient tests and toy training start from.
    pub fn trainable(&self) -> Result<(Llama, Vec<(String, Var)>)> {
        Llama::trainable(&self.config, &self.weights())
    }

    fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        let vocab: tokenizers::models::bpe::Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = MERGES
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut tok = tokenizers::Tokenizer::new(bpe);
        tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        tok.with_decoder(Some(ByteLevel::default()));
        tok.add_special_tokens(SPECIALS.iter().map(|s| AddedToken::from(*s, true)))
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(tok)
    }

    /// Writes an HF model directory with weights stored as `dtype`.
    pub fn write_hf_dir(&self, dir: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let write = |name: &str, text: String| -> Result<()> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| ModelError::io(path, e))
        };
        write("config.json", self.config.to_hf_json().to_string())?;
        write(
            "tokenizer_config.json",
            serde_json::json!({
                "chat_template": CHAT_TEMPLATE,
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
            })
            .to_string(),
        )?;
        let tok_path = dir.join("tokenizer.json");
        self.tokenizer()?
            .save(&tok_path, false)
            .map_err(|e| ModelError::invalid(&tok_path, e.to_string()))?;
        let converted = self
            .weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&converted, &path)
            .map_err(|e| ModelError::invalid(&path, e.to_string()))
    }

    /// Writes a GGUF file the way llama.cpp's converter does: llama.cpp
    /// tensor names, q/k rows permuted, matrices quantized to `dtype`
    /// (norms stay f32).
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<()> {
        let c = &self.config;
        let arch = match c.architecture {
            Architecture::Qwen2 => "qwen2",
            _ => "llama",
        };
        let permute = arch == "llama";
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        let mut names: Vec<&String> = self.weights.keys().collect();
        names.sort();
        for hf in names {
            let mut t = self.weights[hf].clone();
            if permute && hf.contains("q_proj") {
                t = permute_rope_rows(&t, c.num_heads)?;
            } else if permute && hf.contains("k_proj") {
                t = permute_rope_rows(&t, c.num_kv_heads)?;
            }
            let q = if t.rank() == 2 {
                QTensor::quantize(&t, dtype)?
            } else {
                QTensor::quantize(&t, GgmlDType::F32)?
            };
            let name = gguf_name(hf)
                .ok_or_else(|| ModelError::tensor("<tiny model>", hf, "has no GGUF name"))?;
            tensors.push((name, q));
        }
        let s = |v: &str| Value::String(v.to_string());
        let u = |v: usize| Value::U32(v as u32);
        let token_types: Vec<Value> = self
            .tokens
            .iter()
            .map(|t| Value::I32(if SPECIALS.contains(&t.as_str()) { 3 } else { 1 }))
            .collect();
        let metadata: Vec<(String, Value)> = vec![
            ("general.architecture".into(), s(arch)),
            (
                format!("{arch}.context_length"),
                u(c.max_position_embeddings),
            ),
            (format!("{arch}.embedding_length"), u(c.hidden_size)),
            (format!("{arch}.block_count"), u(c.num_layers)),
            (
                format!("{arch}.feed_forward_length"),
                u(c.intermediate_size),
            ),
            (format!("{arch}.attention.head_count"), u(c.num_heads)),
            (format!("{arch}.attention.head_count_kv"), u(c.num_kv_heads)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(c.rms_norm_eps as f32),
            ),
            (
                format!("{arch}.rope.freq_base"),
                Value::F32(c.rope_theta as f32),
            ),
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("default")),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(self.tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.merges".into(),
                Value::Array(MERGES.iter().map(|(a, b)| s(&format!("{a} {b}"))).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(token_types),
            ),
            (
                "tokenizer.ggml.bos_token_id".into(),
                Value::U32(c.bos_token_id.unwrap_or(0)),
            ),
            (
                "tokenizer.ggml.eos_token_id".into(),
                Value::U32(c.eos_token_ids[0]),
            ),
            ("tokenizer.chat_template".into(), s(CHAT_TEMPLATE)),
        ];
        let mut file = std::fs::File::create(path).map_err(|e| ModelError::io(path, e))?;
        let meta_refs: Vec<(&str, &Value)> =
            metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut file, &meta_refs, &tensor_refs)
            .map_err(|e| ModelError::invalid(path, e.to_string()))
    }
}

/// The largest absolute entry of `t`: how tests measure how far two
/// tensors (logits, gradients) are apart.
pub fn max_abs(t: &Tensor) -> Result<f32> {
    Ok(t.abs()?.flatten_all()?.max(0)?.to_scalar()?)
}

/// Checks autograd's gradient (`grads`, of `objective`) at each probe
/// `(label, var, flat index)` against a central difference, and returns
/// the first disagreement. ε = 0.032 and a tolerance of 64 ulps of |f|
/// over ε plus 1% of the gradient: an objective that passes through
/// thousands of f32 roundings errs by 10-20 ulps of |f|, which at small ε
/// swamps the estimate, while truncation stays under 1e-4 up to ε = 0.064
/// (measured with gemm's AVX2 and AVX-512 kernels; see decoder.rs).
pub fn finite_difference_mismatch(
    objective: &dyn Fn() -> Tensor,
    grads: &candle_core::backprop::GradStore,
    probes: &[(String, &Var, usize)],
) -> Result<Option<String>> {
    let eps = 3.2e-2f32;
    let f = objective().to_scalar::<f32>()?.abs();
    let rounding = 64.0 * (f32::from_bits(f.to_bits() + 1) - f) / eps;
    for (label, var, index) in probes {
        let Some(grad) = grads.get(var) else {
            return Ok(Some(format!("{label}: no gradient")));
        };
        let analytic = grad.flatten_all()?.to_vec1::<f32>()?[*index];
        let original = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let eval = |delta: f32| -> Result<f32> {
            let mut data = original.clone();
            data[*index] += delta;
            var.set(&Tensor::from_vec(data, var.shape(), var.device())?)?;
            Ok(objective().to_scalar::<f32>()?)
        };
        let numeric = (eval(eps)? - eval(-eps)?) / (2.0 * eps);
        eval(0.0)?;
        let tolerance = rounding + 1e-2 * analytic.abs().max(numeric.abs());
        if (analytic - numeric).abs() > tolerance {
            return Ok(Some(format!(
                "{label}[{index}]: autograd {analytic} vs finite differences {numeric}"
            )));
        }
    }
    Ok(None)
}

/// The device the generation and conversation tests run their models on:
/// `R3_TEST_DEVICE` (`cpu` when unset), so that a machine with a GPU and a
/// Rust toolchain runs those tests there too (`R3_TEST_DEVICE=cuda cargo
/// test --features r3-model/cuda -p r3-generate -p r3-loop`). Opened once
/// per process, so that every model of a test shares it.
pub fn test_device() -> Device {
    static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| {
            let name = std::env::var("R3_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
            let choice: crate::DeviceChoice = name
                .parse()
                .unwrap_or_else(|e| panic!("R3_TEST_DEVICE: {e}"));
            choice
                .open()
                .unwrap_or_else(|e| panic!("R3_TEST_DEVICE={name}: {e}"))
        })
        .clone()
}
