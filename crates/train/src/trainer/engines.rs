//! Rollouts sampled by engines while LoRA trains: before the rollouts of
//! each step, the adapter as it stands is written as a PEFT directory and
//! loaded on every engine under a versioned name (`<run>-step-N`; a new
//! name each time, so that no engine answers from a prefix cache of the
//! previous weights), the previous version unloaded and its directory
//! removed. Each rollout records the version it was sampled from.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use r3_loop::engine::Engines;
use r3_model::lora::{Adapter, LoraConfig};

use crate::config::TrainConfig;
use crate::{Result, TrainError};

pub(super) struct EngineSync {
    /// The engines; `engines.model` is the version rollouts sample from.
    pub(super) engines: Engines,
    dir: PathBuf,
    run: String,
    /// The step whose adapter the engines serve.
    served: Option<usize>,
}

fn engine_error(e: r3_loop::LoopError) -> TrainError {
    TrainError::Config(format!("engines: {e}"))
}

impl EngineSync {
    /// Connects to `config.engines`, if any (LoRA only: the config refuses
    /// engines with full fine-tuning).
    pub(super) fn connect(config: &TrainConfig) -> Result<Option<Self>> {
        if config.engines.is_empty() {
            return Ok(None);
        }
        let base = match &config.engine_model {
            Some(name) => name.clone(),
            None => Engines::served_model(&config.engines[0]).map_err(engine_error)?,
        };
        let engines = Engines::new(&config.engines, &base).map_err(engine_error)?;
        let dir = config
            .engine_adapter_dir
            .clone()
            .unwrap_or_else(|| config.output_dir.join("engine-adapters"));
        std::fs::create_dir_all(&dir).map_err(|cause| TrainError::Io {
            path: dir.display().to_string(),
            cause,
        })?;
        // The engines read the adapter from their own working directory.
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        let run = config
            .output_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "r3".into());
        Ok(Some(Self {
            engines,
            dir,
            run,
            served: None,
        }))
    }

    /// Makes the engines serve the adapter `weights` of `step` (once).
    pub(super) fn serve(
        &mut self,
        step: usize,
        lora: &LoraConfig,
        base_model: &str,
        weights: &HashMap<String, Tensor>,
    ) -> Result<()> {
        if self.served == Some(step) {
            return Ok(());
        }
        let name = format!("{}-step-{step}", self.run);
        let path = self.dir.join(&name);
        std::fs::create_dir_all(&path).map_err(|cause| TrainError::Io {
            path: path.display().to_string(),
            cause,
        })?;
        Adapter::save(&path, lora, base_model, weights)?;
        self.engines
            .load_adapter(&name, &path)
            .map_err(engine_error)?;
        if let Some(previous) = self.served {
            let old = format!("{}-step-{previous}", self.run);
            self.engines.unload_adapter(&old).map_err(engine_error)?;
            // Only the version in use stays on disk.
            let _ = std::fs::remove_dir_all(self.dir.join(&old));
        }
        self.engines.model = name;
        self.served = Some(step);
        Ok(())
    }
}
