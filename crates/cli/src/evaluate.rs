//! `r3 eval` and `r3 mine`: measure a model's first and second tries, and
//! build the dataset of failures.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use r3_generate::SamplingParams;
use r3_loop::eval::{evaluate, EvalSettings, EvalSummary};
use r3_loop::{Policy, Rollouts};
use r3_tasks::{Prompts, Record, Task};

use crate::config::{DataConfig, EvalConfig, MineConfig, TaskConfig};
use crate::model::Model;
use crate::progress::{bar, Phases};
use crate::tasks::TaskArgs;
use crate::{model, ModelArgs};

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

/// The conversation side of a loaded model.
pub fn policy(model: &Model) -> Policy<'_> {
    Policy::new(&model.llama, &model.loaded)
}

/// The task, its records and the prompt set a command runs on.
fn setup(task: &TaskConfig, data: &DataConfig) -> Result<(Box<dyn Task>, Vec<Record>, Prompts)> {
    let task = task.build()?;
    let records = data.records(task.as_ref())?;
    let prompts = data.prompts(task.as_ref())?;
    Ok((task, records, prompts))
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
    pub task: TaskArgs,
    #[command(flatten)]
    pub data: DataArgs,
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
            model: self.model.spec(),
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
    let model = model::load(&config.model)?;
    let summary = run_eval(&config, &model)?;
    print_summary(&summary);
    eprintln!(
        "wrote {}/summary.json and transcripts.jsonl",
        args.out.display()
    );
    Ok(())
}

/// Evaluates and writes summary.json and transcripts.jsonl into `args.out`.
pub fn run_eval(args: &EvalConfig, model: &Model) -> Result<EvalSummary> {
    // An unwritable --out fails now, not after the whole evaluation.
    std::fs::create_dir_all(&args.out)
        .and_then(|_| tempfile::tempfile_in(&args.out).map(drop))
        .with_context(|| format!("cannot write into --out {}", args.out.display()))?;
    let (task, records, prompts) = setup(&args.task, &args.data)?;
    let policy = policy(model);
    let rollouts = Rollouts::new(&policy, task.as_ref(), &prompts, args.data.batch_rows);
    let turn = |max_new_tokens| SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        max_new_tokens,
        seed: args.seed,
        ..Default::default()
    };
    let answer_tokens = model.within_context(args.max_new_tokens, "--max-new-tokens");
    let settings = EvalSettings {
        attempt: turn(answer_tokens),
        reflection: turn(
            model.within_context(args.reflection_max_tokens, "--reflection-max-tokens"),
        ),
        retry: turn(answer_tokens),
    };
    let mut phases = Phases::new();
    let (summary, transcripts) = evaluate(&rollouts, &records, &settings, &mut |p, n, t| {
        phases.report(p, n, t)
    })?;
    phases.finish();
    write_atomic(
        &args.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    let mut lines = Vec::new();
    for t in &transcripts {
        writeln!(lines, "{}", serde_json::to_string(t)?)?;
    }
    write_atomic(&args.out.join("transcripts.jsonl"), &lines)?;
    Ok(summary)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    r3_model::atomic::write_atomic(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn print_summary(s: &EvalSummary) {
    println!(
        "{:<12} {:>9} {:>9} {:>18}",
        "", "correct", "accuracy", "95% interval"
    );
    for (name, p) in [("first try", s.first_try), ("second try", s.second_try)] {
        println!(
            "{:<12} {:>9} {:>9.3} {:>18}",
            name,
            format!("{}/{}", p.correct, p.n),
            p.accuracy,
            format!("[{:.3}, {:.3}]", p.low, p.high)
        );
    }
    println!("{:<12} {:>9}", "fixed", s.fixed_by_retry);
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
    pub task: TaskArgs,
    #[command(flatten)]
    pub data: DataArgs,
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
            model: self.model.spec(),
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
    let model = model::load(&config.model)?;
    run_mine(&config, &model)
}

pub fn run_mine(args: &MineConfig, model: &Model) -> Result<()> {
    let (task, records, prompts) = setup(&args.task, &args.data)?;
    let policy = policy(model);
    let rollouts = Rollouts::new(&policy, task.as_ref(), &prompts, args.data.batch_rows);
    let params = SamplingParams {
        temperature: args.temperature,
        max_new_tokens: model.within_context(args.max_new_tokens, "--max-new-tokens"),
        seed: args.seed,
        ..Default::default()
    };
    // What the failures file is bound to (with the data's digest): a rerun
    // with other settings is refused instead of mixing two runs.
    let settings = serde_json::json!({
        "model": std::fs::canonicalize(&model.loaded.path)
            .unwrap_or_else(|_| model.loaded.path.clone())
            .display()
            .to_string(),
        "task": args.task.describe(),
        "adapter": model.adapter.as_ref().map(|a| a.display().to_string()),
        "samples": args.samples,
        "temperature": args.temperature,
        "seed": args.seed,
        "max_new_tokens": args.max_new_tokens,
    });
    let progress = bar("mining", records.len());
    let summary = r3_loop::mine::mine(
        &rollouts,
        &records,
        args.samples,
        &params,
        &settings,
        &args.out,
        &mut |n| progress.inc(n as u64),
    )?;
    progress.finish();
    if summary.resumed_from > 0 {
        eprintln!("resumed at record {}", summary.resumed_from);
    }
    eprintln!(
        "{} of {} records failed at least once in {} samples; wrote {}",
        summary.failures_kept,
        summary.records_done,
        args.samples,
        args.out.display()
    );
    if summary.failures_kept == 0 {
        eprintln!(
            "the model never failed: there is nothing for r3 train to learn from on this data"
        );
    }
    Ok(())
}
