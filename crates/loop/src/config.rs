//! Validated settings for evaluation and mining, built once (from a
//! command line, a file or the demo) and checked before any work, as the
//! trainer's `TrainConfig` is: the runs take these, never raw arguments.

use std::path::PathBuf;
use std::time::Duration;

use r3_model::Activations;
use r3_tasks::external::ExternalVerifier;
use r3_tasks::{Prompts, Record, Task};

use crate::model::ModelSpec;
use crate::{LoopError, Result};

/// Stops with a message naming the flag and what is wrong with it.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err(LoopError::Invalid(format!($($arg)*)))
    };
}

/// Which judge: a built-in task or an external verifier command.
#[derive(Debug, Clone)]
pub enum TaskConfig {
    Builtin(String),
    External { command: String, timeout: Duration },
}

impl TaskConfig {
    /// From `--task` / `--verifier` / `--verifier-timeout`, checked.
    pub fn new(task: Option<&str>, verifier: Option<&str>, timeout_seconds: f64) -> Result<Self> {
        Ok(match (task, verifier) {
            (_, Some(command)) => Self::External {
                command: command.to_string(),
                timeout: r3_tasks::external::timeout_from_seconds(timeout_seconds)
                    .map_err(|e| LoopError::Invalid(format!("--verifier-timeout: {e}")))?,
            },
            (Some(name), None) => {
                r3_tasks::builtin(name)?;
                Self::Builtin(name.to_string())
            }
            (None, None) => bail!("give --task or --verifier"),
        })
    }

    /// The task itself (an external verifier starts on first use).
    pub fn build(&self) -> Result<Box<dyn Task>> {
        Ok(match self {
            Self::Builtin(name) => r3_tasks::builtin(name)?,
            Self::External { command, timeout } => {
                Box::new(ExternalVerifier::new(command, *timeout))
            }
        })
    }

    /// The name runs record (a built-in task's, or the command).
    pub fn describe(&self) -> String {
        match self {
            Self::Builtin(name) => name.clone(),
            Self::External { command, .. } => format!("verifier: {command}"),
        }
    }
}

/// Where records come from and how many are decoded at once.
#[derive(Debug, Clone)]
pub struct DataConfig {
    pub data: PathBuf,
    pub limit: Option<usize>,
    pub skip_invalid: bool,
    /// TOML overriding the prompts: system, reflection, retry.
    pub prompts: Option<PathBuf>,
    pub batch_rows: usize,
}

impl DataConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_rows == 0 {
            bail!("--batch-rows must be at least 1");
        }
        if self.limit == Some(0) {
            bail!("--limit must be at least 1");
        }
        Ok(())
    }

    /// The records `task` accepts (malformed lines skipped and counted if
    /// asked), at most `limit`; none is an error.
    pub fn records(&self, task: &dyn Task) -> Result<Vec<Record>> {
        let read = r3_tasks::read_records(&self.data, task, self.skip_invalid)?;
        if read.skipped > 0 {
            eprintln!(
                "{}: skipped {} malformed line(s)",
                self.data.display(),
                read.skipped
            );
        }
        let mut records = read.records;
        if let Some(limit) = self.limit {
            records.truncate(limit);
        }
        if records.is_empty() {
            bail!("{}: no records", self.data.display());
        }
        Ok(records)
    }

    pub fn prompts(&self, task: &dyn Task) -> Result<Prompts> {
        Ok(match &self.prompts {
            Some(path) => Prompts::from_file(task, path)?,
            None => Prompts::for_task(task),
        })
    }
}

/// Checks a sampling temperature and nucleus.
/// Every sampling flag of every command is checked here, before a model loads.
pub fn check_sampling(temperature: f64, top_p: f64) -> Result<()> {
    if !(temperature >= 0.0 && temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0, not {temperature}");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], not {top_p}");
    }
    Ok(())
}

/// OpenAI-compatible engines that sample instead of r3's own decoder.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Base URLs (`http://host:port`); requests are spread over them.
    pub urls: Vec<String>,
    /// The served model's name (or a loaded adapter's); `None` asks the
    /// first engine's `/v1/models`.
    pub model: Option<String>,
}

impl EngineConfig {
    /// From `--engine URL[,URL…]` and `--engine-model`: `None` without URLs.
    pub fn new(urls: &[String], model: Option<&str>) -> Option<Self> {
        (!urls.is_empty()).then(|| Self {
            urls: urls.to_vec(),
            model: model.map(str::to_string),
        })
    }
}

/// `r3 eval`: first and second tries of every record.
#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub model: ModelSpec,
    /// Engines that sample instead of r3's decoder.
    pub engines: Option<EngineConfig>,
    pub task: TaskConfig,
    pub data: DataConfig,
    /// Directory for summary.json and transcripts.jsonl.
    pub out: PathBuf,
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    /// Token budget of the first attempt and of the retry.
    pub max_new_tokens: usize,
    pub reflection_max_tokens: usize,
}

impl EvalConfig {
    /// Rejects impossible values before any model is loaded.
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        check_sampling(self.temperature, self.top_p)?;
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        if self.reflection_max_tokens == 0 {
            bail!("--reflection-max-tokens must be at least 1: a reflection needs a token");
        }
        check_decoder(&self.model, self.engines.as_ref())
    }
}

/// `r3 mine`: the dataset of failures.
#[derive(Debug, Clone)]
pub struct MineConfig {
    pub model: ModelSpec,
    /// Engines that sample instead of r3's decoder.
    pub engines: Option<EngineConfig>,
    pub task: TaskConfig,
    pub data: DataConfig,
    /// First attempts sampled per record (the paper: up to 64).
    pub samples: usize,
    pub temperature: f64,
    pub seed: u64,
    pub max_new_tokens: usize,
    /// The failures file (JSONL), resumed if a previous run stopped.
    pub out: PathBuf,
}

impl MineConfig {
    /// Rejects impossible values before any model is loaded.
    pub fn validate(&self) -> Result<()> {
        self.data.validate()?;
        check_sampling(self.temperature, 1.0)?;
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if self.max_new_tokens == 0 {
            bail!("--max-new-tokens must be at least 1");
        }
        check_decoder(&self.model, self.engines.as_ref())
    }
}

/// `--int8-decode` and `--bf16-products` choose how r3's own decoder
/// samples; engines sample with their own kernels, so either with them is
/// a mistake to name.
fn check_decoder(model: &ModelSpec, engines: Option<&EngineConfig>) -> Result<()> {
    if model.activations != Activations::EXACT && engines.is_some() {
        bail!("--int8-decode and --bf16-products are for r3's own decoder; with --engine the engines sample");
    }
    Ok(())
}
