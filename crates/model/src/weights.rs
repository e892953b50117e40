//! Named weight tensors under HF names, in and out of safetensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// A model's parameters as f32 tensors keyed by their HF names
/// (`model.layers.0.self_attn.q_proj.weight`). GGUF names are mapped onto
/// these on load, so that everything downstream — the decoder, training,
/// export — speaks one naming scheme.
#[derive(Debug, Clone)]
pub struct Weights {
    /// Where the tensors came from, for error messages.
    pub source: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn new(source: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            source: source.into(),
            tensors,
        }
    }

    /// The tensor `name`, checked against the shape the decoder expects.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::tensor(&self.source, name, "missing"))?;
        if t.dims() != shape {
            return Err(ModelError::tensor(
                &self.source,
                name,
                format!("has shape {:?}, expected {:?}", t.dims(), shape),
            ));
        }
        Ok(t.clone())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// Loads `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`, converting f16/bf16 to f32.
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
        let tmp = path.with_extension("safetensors.tmp");
        candle_core::safetensors::save(&self.tensors, &tmp)
            .map_err(|e| ModelError::invalid(&tmp, e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e))
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.into(),
            source,
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::invalid(index, "missing 'weight_map' object"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::invalid(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(ModelError::tensor(
                    path,
                    &name,
                    format!("dtype {other:?} is not supported (f32, f16, bf16 are)"),
                ))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| ModelError::tensor(path, &name, e))?;
        out.push((name, t));
    }
    Ok(out)
}
