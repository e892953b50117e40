//! Checkpoints: an HF model directory (safetensors under the model's HF
//! tensor names, config.json, tokenizer and chat template) that r3 and
//! transformers both load, plus optimizer moments and the trainer's cursor.
//! Written under a temporary name and renamed, so a kill at any moment
//! leaves the previous checkpoint whole.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use r3_model::atomic::write_atomic;
use r3_model::export::{save_hf_dir, save_tokenizer_files};
use r3_model::lora::{Adapter, LoraConfig};
use r3_model::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::crash::{self, CrashPoint};
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
        cause: source,
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(
        path,
        serde_json::to_string_pretty(value).expect("serialisable"),
    )
    .map_err(io(path))
}

/// Flushes `dir`'s files and then `dir` itself to disk, so that a rename
/// after it can never expose a directory whose contents were still in
/// the page cache when the machine went down.
fn sync_dir_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(dir))
}

/// Checkpoint directories (`checkpoint-N`, and temporary ones a kill left
/// behind) and the logs of a run in `output_dir`.
fn run_files(output_dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut finished, mut stale) = (Vec::new(), Vec::new());
    let entries = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((finished, stale)),
        Err(e) => return Err(io(output_dir)(e)),
    };
    for entry in entries {
        let path = entry.map_err(io(output_dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".checkpoint-") && name.ends_with(".tmp") {
            stale.push(path);
        } else if name.starts_with("checkpoint-")
            || ["last", "metrics.jsonl", "samples.jsonl"].contains(&name)
        {
            finished.push(path);
        }
    }
    finished.sort();
    Ok((finished, stale))
}

/// Makes `output_dir` ready for a run: removes temporary checkpoints a
/// kill left behind; for a fresh run (`resuming` false) refuses a
/// directory that holds another run's checkpoints or logs, unless
/// `overwrite`, which deletes them first.
pub fn prepare_output_dir(output_dir: &Path, resuming: bool, overwrite: bool) -> Result<()> {
    std::fs::create_dir_all(output_dir).map_err(io(output_dir))?;
    let (finished, stale) = run_files(output_dir)?;
    for path in stale {
        std::fs::remove_dir_all(&path)
            .or_else(|_| std::fs::remove_file(&path))
            .map_err(io(&path))?;
    }
    if resuming || finished.is_empty() {
        return Ok(());
    }
    if !overwrite {
        let names: Vec<String> = finished
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        return Err(TrainError::Invalid(format!(
            "{} already holds a run ({}): resume it (--resume last), choose another output_dir, \
             or pass --overwrite to delete it",
            output_dir.display(),
            names.join(", ")
        )));
    }
    for path in finished {
        std::fs::remove_dir_all(&path)
            .or_else(|_| std::fs::remove_file(&path))
            .map_err(io(&path))?;
    }
    Ok(())
}

/// Deletes the logs of a run that was killed before its first checkpoint,
/// so that `--resume auto` can start it again; a directory holding any
/// checkpoint is left as it is.
pub fn discard_logs_without_checkpoints(output_dir: &Path) -> Result<()> {
    let (finished, _) = run_files(output_dir)?;
    let is_log = |p: &PathBuf| p.ends_with("metrics.jsonl") || p.ends_with("samples.jsonl");
    if finished.iter().all(is_log) {
        for log in finished {
            std::fs::remove_file(&log).map_err(io(&log))?;
        }
    }
    Ok(())
}

/// The newest checkpoint a run saved in `output_dir`, if any: the newest
/// `checkpoint-N`, which is renamed into place only once written and
/// synced, so that a kill between that rename and the update of the `last`
/// pointer loses nothing (`--resume auto` refused such a directory as
/// "already holds a run"). A `last` that points at no checkpoint is an
/// error.
pub fn last_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = output_dir.join("last");
    let pointed = match std::fs::read_to_string(&pointer) {
        Ok(name) => {
            let dir = output_dir.join(name.trim());
            if !dir.join("trainer_state.json").is_file() {
                return Err(TrainError::Invalid(format!(
                    "{} points at {}, which is not a checkpoint",
                    pointer.display(),
                    dir.display()
                )));
            }
            Some(dir)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(&pointer)(e)),
    };
    let (finished, _) = run_files(output_dir)?;
    let newest = finished
        .into_iter()
        .filter_map(|dir| {
            let name = dir.file_name()?.to_str()?;
            let step: u64 = name.strip_prefix("checkpoint-")?.parse().ok()?;
            dir.join("trainer_state.json")
                .is_file()
                .then_some((step, dir))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, dir)| dir);
    Ok(newest.or(pointed))
}

/// Cuts `output_dir`'s logs back to `step`: lines of later steps were
/// written after the checkpoint a resumed run continues from, and are
/// about to be written again.
pub fn trim_logs(output_dir: &Path, step: usize) -> Result<()> {
    for name in ["metrics.jsonl", "samples.jsonl"] {
        let path = output_dir.join(name);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        let mut kept = String::with_capacity(text.len());
        for line in text.lines() {
            let line_step = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64));
            // A torn last line (a kill mid-write) has no step: dropped.
            if line_step.is_some_and(|s| s as usize <= step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        if kept.len() != text.len() {
            write_atomic(&path, kept.as_bytes()).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// What a run trained: a whole model (HF names) or LoRA adapters (PEFT
/// names).
pub enum Trained<'a> {
    Model(HashMap<String, Tensor>),
    Adapter(&'a LoraConfig, HashMap<String, Tensor>),
}

/// Writes `output_dir/checkpoint-{step}` and points `output_dir/last` at
/// it: an HF model directory, or a PEFT adapter directory (whose
/// `base_model_name_or_path` names the base), with the optimizer and
/// trainer state for an exact resume either way.
pub fn save(
    output_dir: &Path,
    model: &LoadedModel,
    weights: Trained,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let name = format!("checkpoint-{}", state.step);
    let tmp = output_dir.join(format!(".{name}.tmp"));
    let done = output_dir.join(&name);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    match weights {
        Trained::Model(weights) => {
            save_hf_dir(model, &tmp, weights, DType::F32, &state.base_model)?
        }
        Trained::Adapter(lora, tensors) => {
            Adapter::save(&tmp, lora, &state.base_model, &tensors)?;
            save_tokenizer_files(model, &tmp)?;
        }
    }
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for (i, (n, _)) in optimizer.params.iter().enumerate() {
        moments.insert(format!("m.{n}"), optimizer.m[i].clone());
        moments.insert(format!("v.{n}"), optimizer.v[i].clone());
    }
    moments.insert(
        "adam_step".into(),
        Tensor::new(&[optimizer.step as u32], &Device::Cpu)?,
    );
    let optimizer_path = tmp.join("optimizer.safetensors");
    candle_core::safetensors::save(&moments, &optimizer_path).map_err(|e| {
        TrainError::Invalid(format!("cannot write {}: {e}", optimizer_path.display()))
    })?;
    write_json(
        &tmp.join("trainer_state.json"),
        &serde_json::to_value(state).expect("serialisable"),
    )?;

    sync_dir_tree(&tmp)?;
    crash::maybe_crash(CrashPoint::CheckpointWritten, state.step);
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done).map_err(io(&done))?;
    crash::maybe_crash(CrashPoint::CheckpointRenamed, state.step);
    let last = output_dir.join("last");
    write_atomic(&last, name.as_bytes()).map_err(io(&last))?;
    Ok(done)
}

/// The state of checkpoint `dir`, once it is known that `config` may
/// continue it: only [`TrainConfig::CHANGEABLE_ON_RESUME`] may differ. Read
/// before any weights load, so that resuming a LoRA run as full
/// fine-tuning (or the reverse) names `use_peft`, not a missing file.
pub fn resumable_state(dir: &Path, config: &TrainConfig) -> Result<TrainerState> {
    let state = read_state(dir)?;
    let changed = config.resume_differences(&state.config);
    if !changed.is_empty() {
        return Err(TrainError::Config(format!(
            "{} was trained with other settings ({}); only {} may change on resume",
            dir.display(),
            changed.join("; "),
            TrainConfig::CHANGEABLE_ON_RESUME.join(", ")
        )));
    }
    Ok(state)
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
        let (name, param) = &optimizer.params[i];
        let device = param.device().clone();
        optimizer.m[i] = take(format!("m.{name}"))?.to_device(&device)?;
        optimizer.v[i] = take(format!("v.{name}"))?.to_device(&device)?;
    }
    optimizer.step = take("adam_step".into())?.to_vec1::<u32>()?[0] as usize;
    Ok(())
}
