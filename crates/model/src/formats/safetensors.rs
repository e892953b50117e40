//! safetensors files and their shard index: the parsers of untrusted bytes,
//! apart from the reading so that they can be fuzzed in memory.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

pub(crate) fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(shard_names(index, &text)?
        .into_iter()
        .map(|f| dir.join(f))
        .collect())
}

/// The shard file names a `model.safetensors.index.json` (`index`, for
/// errors) names in `text`, each a plain file name beside it: the parser of
/// untrusted text, apart from the reading so that it can be fuzzed.
pub fn shard_names(index: &Path, text: &str) -> Result<Vec<String>> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: index.into(),
            cause: source,
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
    // A shard is a plain file name beside the index: `../../etc/passwd` or
    // an absolute path would read outside the model directory.
    if let Some(bad) = files.iter().find(|f| {
        let path = Path::new(f.as_str());
        path.components().count() != 1
            || !matches!(
                path.components().next(),
                Some(std::path::Component::Normal(_))
            )
    }) {
        return Err(ModelError::invalid(
            index,
            format!("shard '{bad}' is not a file name inside the model directory"),
        ));
    }
    Ok(files)
}

pub(crate) fn read_safetensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    parse_safetensors(path, &bytes)
}

/// The tensors of a safetensors file's `bytes` (`path` names it in
/// errors): the parser of untrusted bytes, apart from the reading so that
/// it can be fuzzed in memory.
pub fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<(String, Tensor)>> {
    let st = safetensors::SafeTensors::deserialize(bytes)
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
            .map_err(|e| ModelError::tensor(path, &name, e))?;
        out.push((name, t));
    }
    Ok(out)
}
