//! One entry point for "a path to a model": an HF directory or a GGUF file.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::config::{token_ids, ModelConfig};
use crate::error::{ModelError, Result};
use crate::formats::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// Sampling defaults a model ships in `generation_config.json`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
}

/// Which on-disk form a model came in, so exports can say what they changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    HfDirectory,
    Gguf,
}

/// Everything loaded from a model path, before the decoder is built.
pub struct LoadedModel {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
    /// The template source text, kept for export.
    pub chat_template_source: String,
    /// Every id that ends an assistant turn (config, generation config and
    /// tokenizer's eos token, merged).
    pub eos_token_ids: Vec<u32>,
    pub bos_token: Option<String>,
    pub eos_token: String,
    pub generation: GenerationDefaults,
}

/// What to read of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parts {
    Everything,
    /// Config, tokenizer, chat template and end-of-turn ids: what a
    /// conversation needs when engines elsewhere hold the weights.
    Conversation,
}

/// Loads an HF model directory or a `.gguf` file.
pub fn load(path: &Path) -> Result<LoadedModel> {
    load_parts(path, Parts::Everything)
}

/// [`load`] without the weights (`weights` is empty): an HF directory
/// needs only `config.json` and the tokenizer files. For sampling on
/// engines, where a model too large for this machine lives.
pub fn load_conversation(path: &Path) -> Result<LoadedModel> {
    load_parts(path, Parts::Conversation)
}

fn load_parts(path: &Path, parts: Parts) -> Result<LoadedModel> {
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    let loaded = if meta.is_dir() {
        load_hf_dir(path, parts)?
    } else {
        load_gguf(path, parts)?
    };
    if loaded.tokenizer.vocab_size() > loaded.config.vocab_size {
        return Err(ModelError::invalid(
            path,
            format!(
                "the tokenizer has {} tokens but the model's vocabulary has only {} rows",
                loaded.tokenizer.vocab_size(),
                loaded.config.vocab_size
            ),
        ));
    }
    // A config that names fewer layers than the file holds would run a
    // truncated model without a word.
    let deepest = loaded
        .weights
        .names()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max();
    if let Some(deepest) = deepest {
        if deepest + 1 != loaded.config.num_layers {
            return Err(ModelError::invalid(
                path,
                format!(
                    "the config says {} layers but the weights hold {}",
                    loaded.config.num_layers,
                    deepest + 1
                ),
            ));
        }
    }
    if let Some(&bad) = loaded
        .eos_token_ids
        .iter()
        .find(|&&id| id as usize >= loaded.config.vocab_size)
    {
        return Err(ModelError::invalid(
            path,
            format!(
                "end-of-sequence id {bad} is outside the vocabulary of {}",
                loaded.config.vocab_size
            ),
        ));
    }
    if loaded.eos_token_ids.is_empty() {
        return Err(ModelError::invalid(
            path,
            "no end-of-sequence token is defined",
        ));
    }
    Ok(loaded)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.into(),
        cause: source,
    })
}

/// `tokenizer_config.json` writes special tokens as a string or as
/// `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn load_hf_dir(dir: &Path, parts: Parts) -> Result<LoadedModel> {
    let config = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json"))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_json(&tc_path)?;
    let (template, template_path) = match tc.get("chat_template") {
        Some(Value::String(s)) => (s.clone(), tc_path.clone()),
        Some(Value::Array(named)) => {
            let default = named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or(named.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ModelError::invalid(&tc_path, "chat_template list has no template")
                })?;
            (default.to_string(), tc_path.clone())
        }
        _ => {
            let jinja = dir.join("chat_template.jinja");
            let text = std::fs::read_to_string(&jinja).map_err(|_| {
                ModelError::invalid(
                    &tc_path,
                    "the model has no chat template (no 'chat_template' here and no chat_template.jinja)",
                )
            })?;
            (text, jinja)
        }
    };
    let bos_token = token_string(tc.get("bos_token"));
    let eos_token = token_string(tc.get("eos_token"))
        .ok_or_else(|| ModelError::invalid(&tc_path, "missing 'eos_token'"))?;
    let mut eos_token_ids = config.eos_token_ids.clone();
    let mut generation = GenerationDefaults::default();
    let gen_path = dir.join("generation_config.json");
    if gen_path.exists() {
        let g = read_json(&gen_path)?;
        eos_token_ids.extend(token_ids(g.get("eos_token_id")));
        generation = GenerationDefaults {
            temperature: g.get("temperature").and_then(Value::as_f64),
            top_p: g.get("top_p").and_then(Value::as_f64),
            top_k: g.get("top_k").and_then(Value::as_u64).map(|k| k as usize),
        };
    }
    eos_token_ids.extend(tokenizer.token_to_id(&eos_token));
    eos_token_ids.sort_unstable();
    eos_token_ids.dedup();
    let chat_template = ChatTemplate::new(
        &template,
        bos_token.as_deref().unwrap_or(""),
        &eos_token,
        &template_path,
    )?;
    Ok(LoadedModel {
        path: dir.into(),
        format: ModelFormat::HfDirectory,
        weights: match parts {
            Parts::Everything => Weights::from_hf_dir(dir)?,
            Parts::Conversation => Weights::default(),
        },
        config,
        tokenizer,
        chat_template,
        chat_template_source: template,
        eos_token_ids,
        bos_token,
        eos_token,
        generation,
    })
}

fn load_gguf(path: &Path, parts: Parts) -> Result<LoadedModel> {
    let gguf = GgufFile::open(path)?;
    let tokenizer = Tokenizer::from_gguf(&gguf)?;
    let config = gguf.config(tokenizer.vocab_size())?;
    let weights = match parts {
        Parts::Everything => gguf.weights(&config)?,
        Parts::Conversation => Weights::default(),
    };
    let template = gguf
        .get_str("tokenizer.chat_template")
        .ok_or_else(|| {
            ModelError::invalid(
                path,
                "the model has no chat template ('tokenizer.chat_template')",
            )
        })?
        .to_string();
    let name_of = |key: &str| gguf.get_u32(key).and_then(|id| tokenizer.id_to_token(id));
    let bos_token = name_of("tokenizer.ggml.bos_token_id");
    let eos_token = match gguf.get_u32("tokenizer.ggml.eos_token_id") {
        None => {
            return Err(ModelError::invalid(
                path,
                "missing 'tokenizer.ggml.eos_token_id'",
            ))
        }
        Some(id) => tokenizer.id_to_token(id).ok_or_else(|| {
            ModelError::invalid(
                path,
                format!(
                    "'tokenizer.ggml.eos_token_id' {id} is outside the tokenizer's {} tokens",
                    tokenizer.vocab_size()
                ),
            )
        })?,
    };
    let chat_template = ChatTemplate::new(
        &template,
        bos_token.as_deref().unwrap_or(""),
        &eos_token,
        path,
    )?;
    Ok(LoadedModel {
        path: path.into(),
        format: ModelFormat::Gguf,
        eos_token_ids: config.eos_token_ids.clone(),
        config,
        weights,
        tokenizer,
        chat_template,
        chat_template_source: template,
        bos_token,
        eos_token,
        generation: GenerationDefaults::default(),
    })
}
