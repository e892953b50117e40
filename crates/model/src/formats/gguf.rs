//! GGUF files: hyper-parameters from the metadata, weights kept in their
//! blocks and renamed to their HF names (llama.cpp's q/k row permutation is
//! undone when they are read). The tensors are read where the file is
//! mapped into memory, not copied out of it first.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use memmap2::Mmap;

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

/// One tensor's blocks as the file stores them, in the mapped file: what
/// [`Weights`] keeps of a GGUF tensor until a decoder asks for it, packed
/// or as f32.
#[derive(Debug, Clone)]
pub(crate) struct GgufTensor {
    map: Arc<Mmap>,
    range: Range<usize>,
    dtype: GgmlDType,
    dims: Vec<usize>,
}

impl GgufTensor {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    pub(crate) fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    pub(crate) fn dims(&self) -> &[usize] {
        &self.dims
    }

    /// The blocks as candle's quantized tensor, to dequantize. candle reads
    /// them as typed blocks (f16 and f32 fields), and a file's offsets need
    /// only be multiples of its `general.alignment`: copied first into
    /// memory aligned for any block type.
    pub(crate) fn to_qtensor(&self) -> candle_core::Result<QTensor> {
        let bytes = self.bytes();
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        let aligned = &mut bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()];
        aligned.copy_from_slice(bytes);
        qtensor_from_ggml(self.dtype, aligned, self.dims.clone(), &Device::Cpu)
    }
}

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

    /// The file mapped into memory, read-only. Packing reads each tensor's
    /// blocks where they lie (the page cache's own pages, in parallel),
    /// where reading them into memory first cost the load a copy of the
    /// whole file in fresh pages, which the kernel zeroes before use.
    #[allow(unsafe_code)]
    fn map(&self) -> Result<Arc<Mmap>> {
        let file = File::open(&self.path).map_err(|e| ModelError::io(&self.path, e))?;
        // SAFETY: the map is only read. Were another process to change the
        // file while it is mapped, the weights read would change with it
        // (truncating it would fault the reads), as with candle's and
        // safetensors' own maps; r3 never writes a model file it loads.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&self.path, e))?;
        Ok(Arc::new(map))
    }

    /// Tensor `name`'s blocks in `map`: a supported encoding, whole blocks,
    /// all of them inside the file.
    fn tensor(&self, name: &str, map: &Arc<Mmap>) -> Result<GgufTensor> {
        let fail = |why: String| ModelError::tensor(&self.path, name, why);
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| fail("missing".into()))?;
        let dtype = info.ggml_dtype;
        if !SUPPORTED.contains(&dtype) {
            return Err(fail(format!("quantization {dtype:?} is not supported")));
        }
        let elements = info.shape.elem_count();
        if !elements.is_multiple_of(dtype.block_size()) {
            return Err(fail(format!(
                "{elements} weights are not a whole number of {dtype:?} blocks of {}",
                dtype.block_size()
            )));
        }
        let bytes = (elements / dtype.block_size())
            .checked_mul(dtype.type_size())
            .ok_or_else(|| fail(format!("{elements} weights are more than memory holds")))?;
        let start = self.content.tensor_data_offset.saturating_add(info.offset);
        let remaining = (map.len() as u64).saturating_sub(start);
        if bytes as u64 > remaining {
            return Err(fail(format!(
                "needs {bytes} bytes at offset {start}, only {remaining} remaining in the file"
            )));
        }
        let start = start as usize;
        Ok(GgufTensor {
            map: map.clone(),
            range: start..start + bytes,
            dtype,
            dims: info.shape.dims().to_vec(),
        })
    }

    fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        self.tensor(name, &self.map()?)?
            .to_qtensor()
            .and_then(|t| t.dequantize(&Device::Cpu))
            .map_err(|e| ModelError::tensor(&self.path, name, e))
    }

    /// Every weight under its HF name, kept in the file's blocks; q and k
    /// remember llama.cpp's row permutation, undone when they are read.
    pub fn weights(&self, config: &ModelConfig) -> Result<Weights> {
        let permuted = matches!(
            config.architecture,
            Architecture::Llama | Architecture::Mistral
        );
        let map = self.map()?;
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
            tensors.insert(hf, (self.tensor(name, &map)?, rope_heads));
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
