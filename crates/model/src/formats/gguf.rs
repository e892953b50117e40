//! GGUF files: hyper-parameters from the metadata, weights kept in their
//! blocks and renamed to their HF names (llama.cpp's q/k row permutation is
//! undone when they are read).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::config::{Architecture, ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::weights::Weights;

/// An opened GGUF file: its metadata read, its tensors not yet.
pub struct GgufFile {
    pub path: PathBuf,
    content: Content,
}

/// The quantizations r3 dequantizes; others are rejected by name rather than
/// risking a silently wrong model.
const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        Self::read(path, &mut BufReader::new(file))
    }

    /// Parses a GGUF header from `reader` (`path` names it in errors): the
    /// parser of untrusted bytes, apart from the opening so that it can be
    /// fuzzed in memory.
    pub fn read<R: Read + Seek>(path: &Path, reader: &mut R) -> Result<Self> {
        // What candle's reader would trust: a zero alignment, a key given
        // twice, arrays nested deep enough to overflow its stack.
        if let Some(why) =
            super::gguf_header::refused_by_scan(reader).map_err(|e| ModelError::io(path, e))?
        {
            return Err(ModelError::invalid(
                path,
                format!("not a valid GGUF file: {why}"),
            ));
        }
        let content = Content::read(reader)
            .map_err(|e| ModelError::invalid(path, format!("not a valid GGUF file: {e}")))?;
        if let Some((name, info)) = content
            .tensor_infos
            .iter()
            .find(|(_, info)| info.shape.dims().contains(&0))
        {
            return Err(ModelError::tensor(
                path,
                name,
                format!("has a zero dimension {:?}", info.shape.dims()),
            ));
        }
        Ok(Self {
            path: path.into(),
            content,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| ModelError::invalid(&self.path, format!("missing metadata '{key}'")))
    }

    fn get_usize(&self, key: &str) -> Result<usize> {
        value_as_u64(self.get(key)?)
            .map(|v| v as usize)
            .ok_or_else(|| {
                ModelError::invalid(&self.path, format!("metadata '{key}' is not an integer"))
            })
    }

    fn get_f64(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(v) => Ok(*v as f64),
            Value::F64(v) => Ok(*v),
            other => value_as_u64(other).map(|v| v as f64).ok_or_else(|| {
                ModelError::invalid(&self.path, format!("metadata '{key}' is not a number"))
            }),
        }
    }

    pub(crate) fn get_str(&self, key: &str) -> Option<&str> {
        match self.content.metadata.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn get_u32(&self, key: &str) -> Option<u32> {
        self.content
            .metadata
            .get(key)
            .and_then(value_as_u64)
            .map(|v| v as u32)
    }

    fn architecture(&self) -> Result<(String, Architecture)> {
        let name = self
            .get_str("general.architecture")
            .ok_or_else(|| {
                ModelError::invalid(&self.path, "missing metadata 'general.architecture'")
            })?
            .to_string();
        let arch = match name.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(ModelError::UnsupportedArchitecture {
                    path: self.path.clone(),
                    arch: name,
                })
            }
        };
        Ok((name, arch))
    }

    /// The decoder's hyper-parameters from `{arch}.*` metadata.
    pub fn config(&self, vocab_size_from_tokenizer: usize) -> Result<ModelConfig> {
        let (prefix, architecture) = self.architecture()?;
        let key = |k: &str| format!("{prefix}.{k}");
        let hidden_size = self.get_usize(&key("embedding_length"))?;
        let num_heads = self.get_usize(&key("attention.head_count"))?;
        let head_dim = match self.get_usize(&key("attention.key_length")) {
            Ok(d) => d,
            Err(_) => hidden_size / num_heads.max(1),
        };
        let vocab_size = match self.content.tensor_infos.get("token_embd.weight") {
            Some(info) => *info.shape.dims().first().ok_or_else(|| {
                ModelError::tensor(&self.path, "token_embd.weight", "has no dimensions")
            })?,
            None => vocab_size_from_tokenizer,
        };
        let rope_scaling = match self.content.tensor_infos.get("rope_freqs.weight") {
            Some(_) => {
                let factors = self
                    .tensor_f32("rope_freqs.weight")?
                    .to_vec1::<f32>()
                    .map_err(|e| ModelError::tensor(&self.path, "rope_freqs.weight", e))?;
                RopeScaling::Factors(factors)
            }
            None => RopeScaling::None,
        };
        let config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size: self.get_usize(&key("feed_forward_length"))?,
            num_layers: self.get_usize(&key("block_count"))?,
            num_heads,
            num_kv_heads: self
                .get_usize(&key("attention.head_count_kv"))
                .unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: self.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            rope_theta: self.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: self.get_usize(&key("context_length")).unwrap_or(4096),
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            attention_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            sliding_window: None,
            bos_token_id: self.get_u32("tokenizer.ggml.bos_token_id"),
            eos_token_ids: self
                .get_u32("tokenizer.ggml.eos_token_id")
                .into_iter()
                .collect(),
        };
        config
            .validate()
            .map_err(|m| ModelError::invalid(&self.path, m))?;
        Ok(config)
    }

    /// The blocks of tensor `name`, read from the file.
    fn tensor_blocks(&self, name: &str) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| ModelError::tensor(&self.path, name, "missing"))?;
        if !SUPPORTED.contains(&info.ggml_dtype) {
            return Err(ModelError::tensor(
                &self.path,
                name,
                format!("quantization {:?} is not supported", info.ggml_dtype),
            ));
        }
        let file = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        let mut reader = BufReader::new(file);
        info.read(&mut reader, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| ModelError::tensor(&self.path, name, e))
    }

    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        self.tensor_blocks(name)?
            .dequantize(&Device::Cpu)
            .map_err(|e| ModelError::tensor(&self.path, name, e))
    }

    /// Every weight under its HF name, kept in the file's blocks; q and k
    /// remember llama.cpp's row permutation, undone when they are read.
    pub fn weights(&self, config: &ModelConfig) -> Result<Weights> {
        let permuted = matches!(
            config.architecture,
            Architecture::Llama | Architecture::Mistral
        );
        let mut tensors = HashMap::new();
        for name in self.content.tensor_infos.keys() {
            if name == "rope_freqs.weight" {
                continue;
            }
            let hf = hf_name(name).ok_or_else(|| {
                ModelError::tensor(
                    &self.path,
                    name,
                    "unknown tensor name for this architecture",
                )
            })?;
            let rope_heads = match permuted {
                true if hf.contains("q_proj.") => Some(config.num_heads),
                true if hf.contains("k_proj.") => Some(config.num_kv_heads),
                _ => None,
            };
            tensors.insert(hf, (self.tensor_blocks(name)?, rope_heads));
        }
        Ok(Weights::from_blocks(&self.path, tensors))
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) if *v >= 0 => Some(*v as u64),
        Value::I16(v) if *v >= 0 => Some(*v as u64),
        Value::I32(v) if *v >= 0 => Some(*v as u64),
        Value::I64(v) if *v >= 0 => Some(*v as u64),
        _ => None,
    }
}

/// llama.cpp's names for the model-wide tensors, beside transformers'.
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names for the modules of layer `i` (`blk.i.*`), beside
/// transformers' (`model.layers.i.*`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Maps a tensor name between llama.cpp's and transformers' schemes;
/// `to_hf` picks the direction.
fn rename(name: &str, to_hf: bool) -> Option<String> {
    let oriented = |pair: &(&'static str, &'static str)| {
        if to_hf {
            *pair
        } else {
            (pair.1, pair.0)
        }
    };
    let from = |pair: &(&'static str, &'static str)| oriented(pair).0;
    let to = |pair: &(&'static str, &'static str)| oriented(pair).1;
    if let Some(pair) = GLOBAL_NAMES.iter().find(|p| from(p) == name) {
        return Some(to(pair).to_string());
    }
    let (from_prefix, to_prefix) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let (layer, tail) = name.strip_prefix(from_prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let pair = LAYER_NAMES.iter().find(|p| from(p) == module)?;
    Some(format!("{to_prefix}{layer}.{}.{kind}", to(pair)))
}

/// transformers' name of a llama.cpp tensor.
fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, true)
}

/// llama.cpp's name of a transformers tensor, for writing GGUF files.
pub fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, false)
}
