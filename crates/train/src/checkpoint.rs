//! Checkpoints: an HF model directory (safetensors under the model's HF
//! tensor names, config.json, tokenizer and chat template) that r3 and
//! transformers both load, plus optimizer moments and the trainer's cursor.
//! Written under a temporary name and renamed, so a kill at any moment
//! leaves the previous checkpoint whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use r3_model::{LoadedModel, Weights};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::optim::AdamW;
use crate::{Result, TrainError};

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Failures consumed so far (the data cursor).
    pub cursor: usize,
    /// The model training started from (the KL reference).
    pub base_model: String,
    pub config: TrainConfig,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(value).expect("serialisable"),
    )
    .map_err(io(path))
}

/// Writes `output_dir/checkpoint-{step}` and points `output_dir/last` at it.
pub fn save(
    output_dir: &Path,
    model: &LoadedModel,
    weights: HashMap<String, Tensor>,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let tmp = output_dir.join(format!(".{name}.tmp"));
    let done = output_dir.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    Weights::new(&tmp, weights).save_safetensors(&tmp.join("model.safetensors"))?;
    write_json(&tmp.join("config.json"), &model.config.to_hf_json())?;
    model.tokenizer.save(&tmp.join("tokenizer.json"))?;
    write_json(
        &tmp.join("tokenizer_config.json"),
        &serde_json::json!({
            "chat_template": model.chat_template_source,
            "bos_token": model.bos_token,
            "eos_token": model.eos_token,
        }),
    )?;
    write_json(
        &tmp.join("generation_config.json"),
        &serde_json::json!({"eos_token_id": model.eos_token_ids, "bos_token_id": model.config.bos_token_id}),
    )?;
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for (i, (n, _)) in optimizer.params.iter().enumerate() {
        moments.insert(format!("m.{n}"), optimizer.m[i].clone());
        moments.insert(format!("v.{n}"), optimizer.v[i].clone());
    }
    moments.insert(
        "adam_step".into(),
        Tensor::new(&[optimizer.step as u32], &Device::Cpu)?,
    );
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    write_json(
        &tmp.join("trainer_state.json"),
        &serde_json::to_value(state).expect("serialisable"),
    )?;

    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done).map_err(io(&done))?;
    let last = output_dir.join("last");
    let last_tmp = output_dir.join(".last.tmp");
    std::fs::write(&last_tmp, &name)
        .and_then(|_| std::fs::rename(&last_tmp, &last))
        .map_err(io(&last))?;
    Ok(done)
}

/// The state saved in checkpoint `dir`.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))
}

/// Restores Adam's moments and step from checkpoint `dir`.
pub fn load_optimizer(dir: &Path, optimizer: &mut AdamW) -> Result<()> {
    let path = dir.join("optimizer.safetensors");
    let mut moments = candle_core::safetensors::load(&path, &Device::Cpu)
        .map_err(|e| TrainError::Invalid(format!("{}: {e}", path.display())))?;
    let mut take = |key: String| {
        moments
            .remove(&key)
            .ok_or_else(|| TrainError::Invalid(format!("{}: missing '{key}'", path.display())))
    };
    for i in 0..optimizer.params.len() {
        let name = optimizer.params[i].0.clone();
        optimizer.m[i] = take(format!("m.{name}"))?;
        optimizer.v[i] = take(format!("v.{name}"))?;
    }
    optimizer.step = take("adam_step".into())?.to_vec1::<u32>()?[0] as usize;
    Ok(())
}
