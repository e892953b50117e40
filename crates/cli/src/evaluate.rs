//! `r3 eval` and `r3 mine`: measure a model's first and second tries, and
//! build the dataset of failures.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use r3_generate::SamplingParams;
use r3_loop::eval::{evaluate, EvalSettings, EvalSummary};
use r3_loop::{Policy, Rollouts};
use r3_tasks::{Prompts, Record, Task};

use crate::model::Model;
use crate::progress::{bar, Phases};
use crate::tasks::TaskArgs;
use crate::{model, ModelArgs};

/// Where records come from.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// A JSONL file of task records
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

/// The conversation side of a loaded model.
pub fn policy(model: &Model) -> Policy<'_> {
    Policy::new(&model.llama, &model.loaded)
}

/// The task, its records and the prompt set a command runs on.
fn setup(task: &TaskArgs, data: &DataArgs) -> Result<(Box<dyn Task>, Vec<Record>, Prompts)> {
    let task = task.build()?;
    let records = data.records(task.as_ref())?;
    let prompts = data.prompts(task.as_ref())?;
    Ok((task, records, prompts))
}

#[derive(Args)]
pub struct EvalArgs {
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

pub fn eval(args: EvalArgs) -> Result<()> {
    let model = model::load(&args.model)?;
    let summary = run_eval(&args, &model)?;
    print_summary(&summary);
    eprintln!(
        "wrote {}/summary.json and transcripts.jsonl",
        args.out.display()
    );
    Ok(())
}

/// Evaluates and writes summary.json and transcripts.jsonl into `args.out`.
pub fn run_eval(args: &EvalArgs, model: &Model) -> Result<EvalSummary> {
    if args.reflection_max_tokens == 0 {
        bail!("--reflection-max-tokens must be at least 1: a reflection needs a token");
    }
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

pub fn mine(args: MineArgs) -> Result<()> {
    let model = model::load(&args.model)?;
    run_mine(&args, &model)
}

pub fn run_mine(args: &MineArgs, model: &Model) -> Result<()> {
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
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
        "task": task.name(),
        "verifier": args.task.verifier,
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
