//! `r3 eval` and `r3 mine`: measure a model's first and second tries, and
//! build the dataset of failures.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use r3_loop::eval::EvalSummary;

use r3_loop::Policy;

use crate::config::{DataConfig, EngineConfig, EvalConfig, MineConfig};
use crate::progress::Phases;
use crate::tasks::TaskArgs;
use crate::{model, DecodeArgs, ModelArgs};

/// Where records come from.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Task records: JSONL, a JSON array of records, or parquet
    #[arg(long)]
    pub data: PathBuf,
    /// Use only the first N records
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip malformed lines (and say how many) instead of failing
    #[arg(long)]
    pub skip_invalid: bool,
    /// TOML overriding the prompts: system, reflection, retry
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Most sequences decoded at once
    #[arg(long, default_value_t = 32)]
    pub batch_rows: usize,
}

impl DataArgs {
    fn config(&self) -> DataConfig {
        DataConfig {
            data: self.data.clone(),
            limit: self.limit,
            skip_invalid: self.skip_invalid,
            prompts: self.prompts.clone(),
            batch_rows: self.batch_rows,
        }
    }
}

/// OpenAI-compatible engines that sample instead of r3's own decoder.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// Engine base URLs (vLLM, SGLang, r3 serve: http://host:port), comma
    /// separated; --model still gives the tokenizer and chat template
    #[arg(long, value_delimiter = ',')]
    pub engine: Vec<String>,
    /// The model name the engines serve [default: the first engine's
    /// /v1/models]
    #[arg(long, requires = "engine")]
    pub engine_model: Option<String>,
}

impl EngineArgs {
    fn config(&self) -> Option<EngineConfig> {
        EngineConfig::new(&self.engine, self.engine_model.as_deref())
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// A TOML file of these settings, keyed by flag name (max_new_tokens = 64);
    /// flags given here win
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub engines: EngineArgs,
    /// Directory for summary.json and transcripts.jsonl
    #[arg(long, default_value = "runs/eval")]
    pub out: PathBuf,
    /// Sampling temperature of every turn (0: greedy)
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Token budget of the first attempt and of the retry
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Token budget of the reflection
    #[arg(long, default_value_t = 256)]
    pub reflection_max_tokens: usize,
}

impl EvalArgs {
    /// The validated settings these arguments ask for.
    fn config(&self) -> Result<EvalConfig> {
        let config = EvalConfig {
            model: self.model.sampling_spec(self.decode),
            engines: self.engines.config(),
            task: self.task.config()?,
            data: self.data.config(),
            out: self.out.clone(),
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            reflection_max_tokens: self.reflection_max_tokens,
        };
        config.validate()?;
        Ok(config)
    }
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let config = args.config()?;
    let summary = model::with_policy(&config.model, config.engines.as_ref(), |policy, _, _| {
        run_eval(&config, policy)
    })?;
    print_summary(&summary)?;
    eprintln!(
        "wrote {}/summary.json and transcripts.jsonl",
        args.out.display()
    );
    Ok(())
}

/// Evaluates with the terminal's progress display.
pub fn run_eval(config: &EvalConfig, policy: &Policy<'_>) -> r3_loop::Result<EvalSummary> {
    let mut phases = Phases::new();
    let summary = r3_loop::eval::run(config, policy, &mut |p, n, t| phases.report(p, n, t))?;
    phases.finish();
    Ok(summary)
}

/// The accuracy table on stdout: the one output a script reads, kept apart
/// from the progress on stderr.
pub fn print_summary(s: &EvalSummary) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<12} {:>9} {:>9} {:>18}",
        "", "correct", "accuracy", "95% interval"
    )?;
    for (name, p) in [("first try", s.first_try), ("second try", s.second_try)] {
        writeln!(
            out,
            "{:<12} {:>9} {:>9.3} {:>18}",
            name,
            format!("{}/{}", p.correct, p.n),
            p.accuracy,
            format!("[{:.3}, {:.3}]", p.low, p.high)
        )?;
    }
    writeln!(out, "{:<12} {:>9}", "fixed", s.fixed_by_retry)
}

#[derive(Args)]
pub struct MineArgs {
    /// A TOML file of these settings, keyed by flag name (samples = 16);
    /// flags given here win
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub decode: DecodeArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub engines: EngineArgs,
    /// First attempts sampled per record (the paper: up to 64)
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    #[arg(long, default_value_t = 0.9)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// The dataset of failures (JSONL); resumed if a previous run stopped
    #[arg(long)]
    pub out: PathBuf,
}

impl MineArgs {
    /// The validated settings these arguments ask for.
    fn config(&self) -> Result<MineConfig> {
        let config = MineConfig {
            model: self.model.sampling_spec(self.decode),
            engines: self.engines.config(),
            task: self.task.config()?,
            data: self.data.config(),
            samples: self.samples,
            temperature: self.temperature,
            seed: self.seed,
            max_new_tokens: self.max_new_tokens,
            out: self.out.clone(),
        };
        config.validate()?;
        Ok(config)
    }
}

pub fn mine(args: MineArgs) -> Result<()> {
    let config = args.config()?;
    model::with_policy(
        &config.model,
        config.engines.as_ref(),
        |policy, file, adapter| run_mine(&config, policy, file, adapter),
    )?;
    Ok(())
}

/// Mines with the terminal's progress display, and says what was kept.
pub fn run_mine(
    config: &MineConfig,
    policy: &Policy<'_>,
    model_file: &std::path::Path,
    adapter: Option<&std::path::Path>,
) -> r3_loop::Result<()> {
    let mut phases = Phases::new();
    let summary = r3_loop::mine::run(config, policy, model_file, adapter, &mut |p, n, t| {
        phases.report(p, n, t)
    })?;
    phases.finish();
    if summary.resumed_from > 0 {
        eprintln!("resumed at record {}", summary.resumed_from);
    }
    eprintln!(
        "{} of {} records failed at least once in {} samples; wrote {}",
        summary.failures_kept,
        summary.records_done,
        config.samples,
        config.out.display()
    );
    if summary.failures_kept == 0 {
        eprintln!(
            "the model never failed: there is nothing for r3 train to learn from on this data"
        );
    }
    Ok(())
}
