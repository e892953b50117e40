//! The model a run uses: a base (a path, a name r3 knows, a hub id, or the
//! default model), an optional PEFT adapter on top, opened on a device in
//! a precision. Every command and harness loads through here, so a model
//! means the same thing to `eval`, `mine`, `bench` and the demo.

use std::path::{Path, PathBuf};

use candle_core::Device;
use r3_model::lora::Adapter;
use r3_model::{device_name, Activations, DeviceChoice, Llama, LoadedModel, Precision};

use crate::config::EngineConfig;
use crate::engine::Engines;
use crate::{Backend, LoopError, Policy, Result};

/// A loaded model and the decoder built from it.
pub struct Model {
    pub loaded: LoadedModel,
    pub llama: Llama,
    /// The LoRA adapter directory applied, if any.
    pub adapter: Option<PathBuf>,
}

/// Which model to run: a base (`None`: the default model) and an optional
/// PEFT adapter directory on top.
#[derive(Debug, Clone, Default)]
pub struct ModelSpec {
    pub path: Option<PathBuf>,
    pub adapter: Option<PathBuf>,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// How packed products take their inputs: 8-bit decode inputs
    /// (`int8_decode`) for a model that only samples, faster on CPUs
    /// (`r3_kernels::int8`).
    pub activations: Activations,
}

fn context(what: String) -> impl FnOnce(r3_model::ModelError) -> LoopError {
    move |cause| LoopError::Load {
        what,
        cause: Box::new(cause),
    }
}

/// Opens the device `choice` names and says which one runs the model.
pub fn open_device(choice: DeviceChoice) -> Result<Device> {
    let device = choice
        .open()
        .map_err(context(format!("--device {choice}")))?;
    eprintln!("device: {}", device_name(&device));
    Ok(device)
}

impl Model {
    /// The conversation side of the model, which rollouts sample from.
    pub fn policy(&self) -> Policy<'_> {
        Policy::new(&self.llama, &self.loaded)
    }

    /// The file a run is bound to, absolute where it can be.
    pub fn canonical_path(&self) -> PathBuf {
        std::fs::canonicalize(&self.loaded.path).unwrap_or_else(|_| self.loaded.path.clone())
    }
}

/// Runs `work` with the policy a command samples from: `spec`'s model on
/// r3's own decoder, or, with `engines`, the engines serving it (only the
/// model's config, tokenizer, chat template and end-of-turn ids are read
/// here: an HF directory without weights will do). `work` also gets the
/// model file a run is bound to and the adapter applied locally.
pub fn with_policy<T>(
    spec: &ModelSpec,
    engines: Option<&EngineConfig>,
    work: impl FnOnce(&Policy<'_>, &Path, Option<&Path>) -> Result<T>,
) -> Result<T> {
    let Some(engines) = engines else {
        let model = load(spec)?;
        return work(
            &model.policy(),
            &model.canonical_path(),
            model.adapter.as_deref(),
        );
    };
    if spec.adapter.is_some() {
        return Err(LoopError::Invalid(
            "--adapter applies to r3's own decoder; with --engine, load the adapter on the \
             engines and name it with --engine-model"
                .into(),
        ));
    }
    let path = r3_fetch::resolve_model(spec.path.as_deref())?;
    let loaded = r3_model::load_conversation(&path)
        .map_err(context(format!("cannot load model {}", path.display())))?;
    let model_name = match &engines.model {
        Some(name) => name.clone(),
        None => Engines::served_model(&engines.urls[0])?,
    };
    let engines = Engines::new(&engines.urls, &model_name)?;
    eprintln!(
        "sampling from {} engine(s) serving {model_name}: {}",
        engines.urls().len(),
        engines.urls().join(", ")
    );
    let file = std::fs::canonicalize(&loaded.path).unwrap_or_else(|_| loaded.path.clone());
    work(
        &Policy::with_backend(Backend::Engines(&engines), &loaded),
        &file,
        None,
    )
}

/// Loads the model `spec` names. A path to a PEFT adapter directory (an
/// r3 LoRA checkpoint) loads its base, `base_model_name_or_path`, with it.
/// The file's tensors are released once the decoder is built: a GGUF
/// base's blocks would otherwise stay beside their packed copies.
pub fn load(spec: &ModelSpec) -> Result<Model> {
    let mut model = load_with_weights(spec)?;
    model.loaded.weights = Default::default();
    Ok(model)
}

/// [`load`], keeping the file's tensors in `loaded.weights` for a harness
/// that builds more decoders from them (benchmarks).
pub fn load_with_weights(spec: &ModelSpec) -> Result<Model> {
    let adapter_dir = match (&spec.path, &spec.adapter) {
        (Some(dir), None) if dir.join("adapter_config.json").exists() => Some(dir),
        (_, adapter) => adapter.as_ref(),
    };
    let Some(dir) = adapter_dir else {
        let loaded = load_base_for(spec.path.as_deref(), spec)?;
        let llama = Llama::new(&loaded.config, &loaded.weights).map_err(context(format!(
            "cannot build the decoder for {}",
            loaded.path.display()
        )))?;
        let llama = llama.with_activations(spec.activations);
        return Ok(Model {
            loaded,
            llama,
            adapter: None,
        });
    };
    let lora = Adapter::load(dir).map_err(context(format!(
        "cannot load the adapter {}",
        dir.display()
    )))?;
    let base = match &spec.adapter {
        Some(_) => spec.path.clone(),
        None => lora.base_model.as_ref().map(PathBuf::from),
    };
    let loaded = load_base_for(base.as_deref(), spec)?;
    let llama = Llama::new(&loaded.config, &loaded.weights)
        .and_then(|base| base.with_adapter(&lora.config, &lora.weights))
        .map_err(context(format!(
            "the adapter {} does not fit {}",
            dir.display(),
            loaded.path.display()
        )))?
        .with_activations(spec.activations);
    Ok(Model {
        loaded,
        llama,
        adapter: Some(dir.clone()),
    })
}

/// A model of the shape an HF `config.json` describes, with random weights
/// (seed 0) and the tokenizer and chat template of `tokenizer_from` (the
/// default model when `None`): for benchmarks at a real model's shapes on a
/// machine without its weights.
pub fn load_random_init(
    config_path: &Path,
    tokenizer_from: Option<&Path>,
    device: DeviceChoice,
    precision: Precision,
) -> Result<Model> {
    // The device first: a missing GPU fails before seconds of random init.
    let device = open_device(device)?;
    let mut loaded = random_model(config_path, tokenizer_from)?;
    loaded.weights.set_device(device);
    loaded.weights.set_dtype(precision.dtype())?;
    let llama = Llama::new(&loaded.config, &loaded.weights).map_err(context(format!(
        "cannot build a decoder of the shape {}",
        config_path.display()
    )))?;
    Ok(Model {
        loaded,
        llama,
        adapter: None,
    })
}

/// [`random_shape`] with random weights (seed 0), on the CPU.
pub fn random_model(config_path: &Path, tokenizer_from: Option<&Path>) -> Result<LoadedModel> {
    let mut loaded = random_shape(config_path, tokenizer_from)?;
    let weights = r3_model::random::random_weights(&loaded.config, 0)?;
    loaded.weights = r3_model::Weights::new(config_path, weights);
    Ok(loaded)
}

/// `tokenizer_from`'s tokenizer, chat template and special tokens (the
/// default model's when `None`) with the shape of `config_path`, and no
/// weights.
pub fn random_shape(config_path: &Path, tokenizer_from: Option<&Path>) -> Result<LoadedModel> {
    let config = r3_model::ModelConfig::from_hf_file(config_path).map_err(context(format!(
        "cannot read the model shape {}",
        config_path.display()
    )))?;
    let mut loaded = load_base(tokenizer_from)?;
    if loaded.tokenizer.vocab_size() > config.vocab_size {
        return Err(LoopError::Invalid(format!(
            "{}: vocab_size {} is smaller than the {} tokens of {}'s tokenizer",
            config_path.display(),
            config.vocab_size,
            loaded.tokenizer.vocab_size(),
            loaded.path.display()
        )));
    }
    loaded.weights = Default::default();
    loaded.config = config;
    loaded.path = config_path.to_path_buf();
    Ok(loaded)
}

/// [`load_base`] with its weights set for the device and type `spec` asks
/// for (the device opened and named).
fn load_base_for(path: Option<&Path>, spec: &ModelSpec) -> Result<LoadedModel> {
    // The device first: a missing GPU fails before a large file is read.
    let device = open_device(spec.device)?;
    let mut loaded = load_base(path)?;
    loaded.weights.set_device(device);
    loaded.weights.set_dtype(spec.precision.dtype())?;
    Ok(loaded)
}

/// Loads `path` ([`r3_fetch::resolve_model`]: a path, a known name, a hub
/// id), or the default model when `None`.
pub fn load_base(path: Option<&Path>) -> Result<LoadedModel> {
    let path = r3_fetch::resolve_model(path)?;
    r3_model::load(&path).map_err(context(format!("cannot load model {}", path.display())))
}
