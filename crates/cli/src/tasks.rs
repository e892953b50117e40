//! `r3 verify` and `r3 data`: the task side, usable without a model.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use r3_tasks::countdown_data::{generate, Difficulty};

use crate::config::TaskConfig;

/// Which task judges answers: a built-in one, or an external command.
#[derive(Args, Clone)]
pub struct TaskArgs {
    /// countdown, function-calling, bfcl or answer
    #[arg(long, required_unless_present = "verifier")]
    pub task: Option<String>,
    /// An external verifier command speaking JSON lines (see README)
    #[arg(long, conflicts_with = "task")]
    pub verifier: Option<String>,
    /// Seconds an external verifier may take per answer
    #[arg(long, default_value_t = 10.0)]
    pub verifier_timeout: f64,
}

impl TaskArgs {
    /// The validated choice of judge.
    pub fn config(&self) -> Result<TaskConfig> {
        Ok(TaskConfig::new(
            self.task.as_deref(),
            self.verifier.as_deref(),
            self.verifier_timeout,
        )?)
    }
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    task: TaskArgs,
    /// The record as JSON
    #[arg(long, conflicts_with_all = ["data", "index"], required_unless_present = "data")]
    record: Option<String>,
    /// Records: JSONL, a JSON array of records, or parquet
    #[arg(long, requires = "index")]
    data: Option<PathBuf>,
    /// 0-based index of the record in --data
    #[arg(long)]
    index: Option<usize>,
    /// Skip malformed lines of --data (and say how many) instead of failing
    #[arg(long)]
    skip_invalid: bool,
    /// The model's answer text
    #[arg(long)]
    answer: String,
}

pub fn verify(args: VerifyArgs) -> Result<()> {
    let task = args.task.config()?.build()?;
    let record = match (&args.record, &args.data, args.index) {
        (Some(json), _, _) => {
            let value: serde_json::Value =
                serde_json::from_str(json).context("--record is not valid JSON")?;
            task.check_record(&value)
                .map_err(|e| anyhow::anyhow!("--record: {e}"))?;
            value
        }
        (None, Some(path), Some(index)) => {
            let read = r3_tasks::read_records(path, task.as_ref(), args.skip_invalid)?;
            if read.skipped > 0 {
                eprintln!(
                    "{}: skipped {} malformed line(s)",
                    path.display(),
                    read.skipped
                );
            }
            match read.records.into_iter().nth(index) {
                Some(r) => r.value,
                None => bail!("{}: there is no record {index}", path.display()),
            }
        }
        _ => bail!("give --record JSON, or --data FILE with --index I"),
    };
    let verdict = task.verify(&record, &args.answer);
    if let Some(why) = task.broken() {
        bail!("{why}");
    }
    writeln!(std::io::stdout(), "{}", serde_json::to_string(&verdict)?)?;
    Ok(())
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Seeded, solvable Countdown puzzles as JSONL
    Countdown(CountdownData),
    /// Seeded two-number arithmetic as plain-answer JSONL (the demo's task)
    Arithmetic(ArithmeticData),
}

#[derive(Args)]
pub struct ArithmeticData {
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Operands are drawn from 1..=max-operand
    #[arg(long, default_value_t = 30)]
    max_operand: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    out: DataOut,
}

/// Where `r3 data` writes, and whether it may replace a file already there.
#[derive(Args)]
pub struct DataOut {
    #[arg(long)]
    out: PathBuf,
    /// Replace --out if it exists (otherwise an existing file is refused)
    #[arg(long)]
    overwrite: bool,
}

impl DataOut {
    /// The path to write, once it is known that no file is lost by writing it.
    fn path(&self) -> Result<&std::path::Path> {
        if self.out.exists() && !self.overwrite {
            bail!(
                "{} exists; choose a new --out or pass --overwrite",
                self.out.display()
            );
        }
        Ok(&self.out)
    }
}

/// Writes JSONL records atomically.
pub fn write_jsonl(path: &std::path::Path, records: &[serde_json::Value]) -> Result<()> {
    r3_model::atomic::write_atomic_with(path, |file| {
        let mut out = std::io::BufWriter::new(file);
        for r in records {
            writeln!(out, "{r}")?;
        }
        out.flush()
    })
    .with_context(|| format!("cannot write {}", path.display()))
}

#[derive(Args)]
pub struct CountdownData {
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// How many numbers per puzzle, e.g. 3..=4 or 3
    #[arg(long, default_value = "3..=4")]
    numbers: String,
    /// Numbers are drawn from 1..=max-number
    #[arg(long, default_value_t = 100)]
    max_number: u64,
    /// Smallest target
    #[arg(long, default_value_t = 1)]
    min_target: i64,
    /// Largest target
    #[arg(long, default_value_t = 100)]
    max_target: i64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    out: DataOut,
}

fn parse_range(text: &str) -> Result<std::ops::RangeInclusive<usize>> {
    let parse = |s: &str| {
        s.trim()
            .parse::<usize>()
            .with_context(|| format!("'{text}' is not a count or a range like 3..=4"))
    };
    match text.split_once("..=").or_else(|| text.split_once("..")) {
        Some((a, b)) => Ok(parse(a)?..=parse(b)?),
        None => {
            let n = parse(text)?;
            Ok(n..=n)
        }
    }
}

pub fn data(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Countdown(args) => {
            let out = args.out.path()?;
            let difficulty = Difficulty {
                count: parse_range(&args.numbers)?,
                max_number: args.max_number,
                target: args.min_target..=args.max_target,
            };
            let records =
                generate(args.count, &difficulty, args.seed).map_err(anyhow::Error::msg)?;
            write_jsonl(out, &records)?;
            eprintln!(
                "wrote {} solvable puzzles to {}",
                records.len(),
                out.display()
            );
            Ok(())
        }
        DataCommand::Arithmetic(args) => {
            let out = args.out.path()?;
            if args.max_operand == 0 {
                bail!("--max-operand must be at least 1");
            }
            let records = r3_tasks::arithmetic::generate(args.count, args.max_operand, args.seed);
            write_jsonl(out, &records)?;
            eprintln!(
                "wrote {} arithmetic records to {}",
                records.len(),
                out.display()
            );
            Ok(())
        }
    }
}
