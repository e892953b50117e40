//! Named weight tensors under HF names, in and out of safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::formats::gguf::GgufTensor;
use crate::formats::rope_rows::unpermute_rope_rows;
use crate::formats::safetensors::{read_safetensors, shard_files};
use r3_kernels::packed::{Encoding, PackedMatrix};

/// One tensor as its file stores it, so that inference can keep a compact
/// encoding while training asks for f32.
#[derive(Debug, Clone)]
enum Stored {
    /// Plain values: f32, f16 or bf16.
    Dense(Tensor),
    /// GGUF blocks, in the mapped file. With `rope_heads`, the rows are in
    /// llama.cpp's rope order for that many heads.
    Blocks {
        tensor: GgufTensor,
        rope_heads: Option<usize>,
    },
}

impl Stored {
    fn dims(&self) -> &[usize] {
        match self {
            Stored::Dense(t) => t.dims(),
            Stored::Blocks { tensor, .. } => tensor.dims(),
        }
    }
}

/// A model's parameters keyed by their HF names
/// (`model.layers.0.self_attn.q_proj.weight`). GGUF names are mapped onto
/// these on load, so that everything downstream — the decoder, training,
/// export — speaks one naming scheme. Tensors stay in their file's encoding
/// until asked for: as f32 ([`Weights::get`]) or packed for inference
/// ([`Weights::packed`]), on the device a decoder will run on. `Default` is
/// no weights at all: what a loaded model holds once its decoder is built
/// and the file's tensors released.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Where the tensors came from, for error messages.
    pub source: PathBuf,
    tensors: HashMap<String, Stored>,
    /// Where [`Weights::get`] puts tensors. Files are read on the CPU and
    /// each tensor is copied over as a decoder asks for it.
    device: Device,
    /// The type [`Weights::get`] gives: f32, or bf16 for a decoder that
    /// runs in bf16.
    dtype: DType,
}

impl Default for Weights {
    fn default() -> Self {
        Self::new(PathBuf::new(), HashMap::new())
    }
}

impl Weights {
    pub fn new(source: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            source: source.into(),
            tensors: tensors
                .into_iter()
                .map(|(name, t)| (name, Stored::Dense(t)))
                .collect(),
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// Makes decoders built from these weights run on `device`: tensors are
    /// copied there as f32, and nothing stays packed off the CPU (the packed
    /// kernels are CPU kernels).
    pub fn set_device(&mut self, device: Device) {
        self.device = device;
    }

    /// The device decoders built from these weights run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Makes decoders built from these weights compute in `dtype` (f32 or
    /// bf16; other types are refused). Packed weights are f32 kernels, so
    /// with bf16 nothing stays packed.
    pub fn set_dtype(&mut self, dtype: DType) -> Result<()> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(ModelError::Device(format!(
                "dtype {dtype:?}: expected f32 or bf16"
            )));
        }
        self.dtype = dtype;
        Ok(())
    }

    /// The type decoders built from these weights compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Weights read from a GGUF file: each tensor's blocks with the number
    /// of rope heads whose row order must be undone, if any.
    pub(crate) fn from_blocks(
        source: impl Into<PathBuf>,
        tensors: HashMap<String, (GgufTensor, Option<usize>)>,
    ) -> Self {
        Self {
            source: source.into(),
            tensors: tensors
                .into_iter()
                .map(|(name, (tensor, rope_heads))| {
                    let stored = Stored::Blocks { tensor, rope_heads };
                    (name, stored)
                })
                .collect(),
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }

    /// The shape of tensor `name`, if there is one.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(Stored::dims)
    }

    fn stored(&self, name: &str, shape: &[usize]) -> Result<&Stored> {
        let stored = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::tensor(&self.source, name, "missing"))?;
        let dims = stored.dims();
        if dims != shape {
            return Err(ModelError::tensor(
                &self.source,
                name,
                format!("has shape {dims:?}, expected {shape:?}"),
            ));
        }
        Ok(stored)
    }

    /// The tensor `name` on the weights' device in their type (f32 unless
    /// set otherwise), checked against the shape the decoder expects.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let f32 = match self.stored(name, shape)? {
            Stored::Dense(t) => t.to_dtype(DType::F32),
            Stored::Blocks { tensor, rope_heads } => tensor
                .to_qtensor()
                .and_then(|t| t.dequantize(&Device::Cpu))
                .and_then(|t| match rope_heads {
                    Some(heads) => unpermute_rope_rows(&t, *heads),
                    None => Ok(t),
                }),
        };
        f32.and_then(|t| t.to_dtype(self.dtype)?.to_device(&self.device))
            .map_err(|e| ModelError::tensor(&self.source, name, e))
    }

    /// The matrix `name` `[out, in]` packed for inference, or `None` when
    /// its encoding has no packed kernel (f32) and it is best
    /// used as f32, or the weights are for another device than the CPU or
    /// another type than f32.
    pub fn packed(&self, name: &str, shape: &[usize]) -> Result<Option<PackedMatrix>> {
        let fail = |e: &dyn std::fmt::Display| ModelError::tensor(&self.source, name, e);
        let stored = self.stored(name, shape)?;
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(None);
        }
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        if !cols.is_multiple_of(r3_kernels::packed::BLOCK) {
            return Ok(None);
        }
        let packed = match stored {
            Stored::Dense(t) => {
                let encoding = match t.dtype() {
                    DType::F16 => Encoding::F16,
                    DType::BF16 => Encoding::Bf16,
                    _ => return Ok(None),
                };
                let bits = half_bits(t).map_err(|e| fail(&e))?;
                let raw: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
                PackedMatrix::new(encoding, rows, cols, &raw, None)
            }
            Stored::Blocks { tensor, rope_heads } => {
                let raw = tensor.bytes();
                let order = match rope_heads {
                    Some(heads) => Some(rope_source_rows(rows, *heads).map_err(|e| fail(&e))?),
                    None => None,
                };
                match PackedMatrix::from_ggml(tensor.dtype(), rows, cols, raw, order.as_deref()) {
                    Some(packed) => packed,
                    None => return Ok(None),
                }
            }
        };
        packed.map(Some).map_err(|e| fail(&e))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Every tensor's name, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Loads `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`, keeping f16/bf16 as stored.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_files(&index)?
        } else {
            return Err(ModelError::invalid(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        let mut tensors = HashMap::new();
        for file in &files {
            for (name, t) in read_safetensors(file)? {
                tensors.insert(name, t);
            }
        }
        Ok(Self::new(dir, tensors))
    }

    /// Writes every tensor as f32 into one safetensors file, through a
    /// temporary name and a rename so that a crash never leaves half a file.
    pub fn save_safetensors(&self, path: &Path) -> Result<()> {
        let mut f32 = HashMap::new();
        for (name, dims) in self.names().filter_map(|n| Some((n, self.dims(n)?))) {
            f32.insert(name.clone(), self.get(name, dims)?);
        }
        let bytes = safetensors::serialize(f32.iter().map(|(name, t)| (name.as_str(), t)), None)
            .map_err(|e| ModelError::invalid(path, e.to_string()))?;
        crate::atomic::write_atomic(path, &bytes).map_err(|e| ModelError::io(path, e))
    }
}

/// The raw bits of an f16 or bf16 tensor, in order.
fn half_bits(t: &Tensor) -> candle_core::Result<Vec<u16>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .into_iter()
            .map(half::f16::to_bits)
            .collect(),
        _ => flat
            .to_vec1::<half::bf16>()?
            .into_iter()
            .map(half::bf16::to_bits)
            .collect(),
    })
}

/// For each row of a q/k matrix in HF order, the row of llama.cpp's rope
/// order it comes from: the same permutation [`unpermute_rope_rows`]
/// applies, read off a column of row numbers.
fn rope_source_rows(rows: usize, heads: usize) -> candle_core::Result<Vec<usize>> {
    let numbers: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let column = Tensor::from_vec(numbers, (rows, 1), &Device::Cpu)?;
    let order = unpermute_rope_rows(&column, heads)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(order.into_iter().map(|r| r as usize).collect())
}
