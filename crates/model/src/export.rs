//! Writing a model as an HF directory that r3 and transformers both load:
//! weights under HF names, `config.json`, and the tokenizer files with the
//! chat template. Checkpoints and `r3 merge` write through here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::atomic::write_atomic;
use crate::error::{ModelError, Result};
use crate::loader::LoadedModel;
use crate::weights::Weights;

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialise");
    write_atomic(path, text.as_bytes()).map_err(|e| ModelError::io(path, e))
}

/// `dir/model.safetensors` (HF names, in `dtype`: f32 for checkpoints and
/// merges; bf16 halves a random stand-in model) and `config.json` for
/// `model`'s architecture, then the tokenizer files.
pub fn save_hf_dir(
    model: &LoadedModel,
    dir: &Path,
    weights: HashMap<String, Tensor>,
    dtype: DType,
    name_or_path: &str,
) -> Result<()> {
    let mut weights = Weights::new(dir, weights);
    weights.set_dtype(dtype)?;
    weights.save_safetensors(&dir.join("model.safetensors"))?;
    let mut config = model.config.to_hf_json();
    // What the weights came from, as transformers records it.
    config["_name_or_path"] = name_or_path.into();
    write_json(&dir.join("config.json"), &config)?;
    save_tokenizer_files(model, dir)
}

/// `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
/// `generation_config.json` (the end-of-turn ids).
pub fn save_tokenizer_files(model: &LoadedModel, dir: &Path) -> Result<()> {
    model.tokenizer.save(&dir.join("tokenizer.json"))?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::json!({
            "chat_template": model.chat_template_source,
            "bos_token": model.bos_token,
            "eos_token": model.eos_token,
        }),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &serde_json::json!({"eos_token_id": model.eos_token_ids, "bos_token_id": model.config.bos_token_id}),
    )
}
