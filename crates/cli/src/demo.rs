//! `r3 demo`: the whole loop on the default model, offline, in minutes:
//! two-number arithmetic (which the 135M model solves about a third of the
//! time, so groups of reflections get mixed rewards), the base model
//! evaluated on held-out records, failures mined from the rest, a few GRPO
//! steps on reflection tokens, the trained model evaluated again. It runs
//! the arithmetic experiment's own files (`experiments/arithmetic-smollm2`:
//! its prompts and training config, embedded), shortened by overrides,
//! through the same library calls as `r3 eval`, `r3 mine` and `r3 train`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use r3_train::config::TrainConfig;

use crate::config::{DataConfig, EvalConfig, MineConfig, TaskConfig};
use crate::evaluate::{print_summary, run_eval, run_mine};
use crate::model::ModelSpec;
use crate::tasks::write_jsonl;
use crate::{model, ModelArgs};
use r3_train::metrics::StepMetrics;

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Run directory
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// GRPO steps
    #[arg(long, default_value_t = 12)]
    steps: usize,
    /// Held-out records evaluated before and after training
    #[arg(long, default_value_t = 60)]
    eval_records: usize,
    /// Records mined for failures
    #[arg(long, default_value_t = 96)]
    mine_records: usize,
    /// A short run needs a larger step than the paper's 5e-7 to move at all
    #[arg(long, default_value_t = 2e-5)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The arithmetic experiment's prompts: its reflection turn asks for the
/// calculation (asked to "reflect on what went wrong", the 135M model
/// apologises and its greedy retry repeats the failed answer).
const PROMPTS: &str = include_str!("../../../experiments/arithmetic-smollm2/prompts.toml");

/// The arithmetic experiment's training config, which the demo shortens.
const TRAIN: &str = include_str!("../../../experiments/arithmetic-smollm2/train.toml");

pub fn demo(args: DemoArgs) -> Result<()> {
    if args.model.adapter.is_some() {
        anyhow::bail!(
            "the demo trains the whole model; --adapter is for eval, mine, generate and logits"
        );
    }
    claim_run_directory(&args.out)?;
    let all = r3_tasks::arithmetic::generate(args.eval_records + args.mine_records, 30, args.seed);
    let (held_out, pool) = all.split_at(args.eval_records);
    let eval_path = args.out.join("eval.jsonl");
    let train_path = args.out.join("train.jsonl");
    write_jsonl(&eval_path, held_out)?;
    write_jsonl(&train_path, pool)?;
    let prompts = args.out.join("prompts.toml");
    let train_toml = args.out.join("train.toml");
    for (path, text) in [(&prompts, PROMPTS), (&train_toml, TRAIN)] {
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let task = TaskConfig::new(Some("answer"), None, 10.0)?;
    let data = |path: &PathBuf| DataConfig {
        data: path.clone(),
        limit: None,
        skip_invalid: false,
        prompts: Some(prompts.clone()),
        batch_rows: 32,
    };
    let eval_config = |model: ModelSpec, out: &str| EvalConfig {
        model,
        engines: None,
        task: task.clone(),
        data: data(&eval_path),
        out: args.out.join(out),
        temperature: 0.0,
        top_p: 1.0,
        seed: args.seed,
        max_new_tokens: 16,
        reflection_max_tokens: 64,
    };

    eprintln!(
        "[1/4] evaluating the base model on {} held-out records",
        held_out.len()
    );
    let base = model::load(&args.model.spec())?;
    let before = run_eval(&eval_config(args.model.spec(), "eval-base"), &base.policy())?;

    eprintln!(
        "[2/4] mining failures: 4 sampled attempts at each of {} records",
        pool.len()
    );
    let failures = args.out.join("failures.jsonl");
    // Each demo mines afresh.
    let _ = std::fs::remove_file(&failures);
    let _ = std::fs::remove_file(args.out.join("failures.jsonl.state"));
    run_mine(
        &MineConfig {
            model: args.model.spec(),
            engines: None,
            task: task.clone(),
            data: data(&train_path),
            samples: 4,
            temperature: 0.9,
            seed: args.seed,
            max_new_tokens: 16,
            out: failures.clone(),
        },
        &base.policy(),
        &base.canonical_path(),
        None,
    )?;
    drop(base);

    eprintln!(
        "[3/4] training reflections with GRPO for {} steps",
        args.steps
    );
    let train_dir = args.out.join("train");
    let _ = std::fs::remove_dir_all(&train_dir);
    let model = args.model.model.as_ref().map(|p| p.display().to_string());
    let config = TrainConfig::load(
        Some(&train_toml),
        &[
            format!("model={:?}", model.unwrap_or_default()),
            format!("failures={:?}", failures.display().to_string()),
            format!("output_dir={:?}", train_dir.display().to_string()),
            format!("prompts={:?}", prompts.display().to_string()),
            format!("device={:?}", args.model.device.to_string()),
            format!("seed={}", args.seed),
            // Shortened: a few steps, no warmup, a larger step to move at
            // all, one checkpoint at the end.
            format!("max_steps={}", args.steps),
            "warmup_steps=0".into(),
            format!("learning_rate={:e}", args.learning_rate),
            "save_steps=0".into(),
        ],
    )?;
    let checkpoint = crate::train::run_train(config, &r3_train::resume::Start::Fresh)?;

    eprintln!("[4/4] evaluating the trained model");
    let trained_spec = ModelSpec {
        path: Some(checkpoint.clone()),
        adapter: None,
        ..args.model.spec()
    };
    let trained = model::load(&trained_spec)?;
    let after = run_eval(
        &eval_config(trained_spec, "eval-trained"),
        &trained.policy(),
    )?;

    let mut out = std::io::stdout();
    writeln!(
        out,
        "\nbase model ({}):",
        args.out.join("eval-base").display()
    )?;
    print_summary(&before)?;
    writeln!(
        out,
        "\nafter {} GRPO steps on reflections ({}):",
        args.steps,
        checkpoint.display()
    )?;
    print_summary(&after)?;
    let delta = |a: f64, b: f64| (b - a) * 100.0;
    writeln!(
        out,
        "\nfirst try {:+.1} points, second try {:+.1} points on {} held-out records.",
        delta(before.first_try_accuracy, after.first_try_accuracy),
        delta(before.second_try_accuracy, after.second_try_accuracy),
        before.n
    )?;
    writeln!(out, "{}", reward_signal(&train_dir.join("metrics.jsonl"))?)?;
    writeln!(
        out,
        "\npaired, on the same records:\n{}",
        r3_loop::report::compare(&args.out.join("eval-base"), &args.out.join("eval-trained"))?
    )?;
    let overlap = after.second_try.low <= before.second_try.high
        && before.second_try.low <= after.second_try.high;
    if overlap {
        writeln!(out, "The 95% intervals overlap; the paired McNemar test above compares the same records and is the sharper test. Twelve steps on 60 records demonstrate the loop; see docs/results/arithmetic-smollm2.md for the long run.")?;
    }
    writeln!(out, "run directory: {}", args.out.display())?;
    Ok(())
}

/// The demo replaces its own files in `out` on every run, so `out` must be
/// empty, new, or a previous demo's (it leaves a `.r3-demo` marker): a
/// user's directory is never written over.
fn claim_run_directory(out: &std::path::Path) -> Result<()> {
    let marker = out.join(".r3-demo");
    let has_files = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    if has_files && !marker.exists() {
        anyhow::bail!(
            "{} holds files that r3 demo did not write; choose another --out",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(&marker, "a directory r3 demo writes and rewrites\n")
        .with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(())
}

/// What the training run had to learn from: the share of groups whose
/// rewards were mixed (the only ones that train), and the retry success of
/// the sampled reflections in the first and the last steps.
fn reward_signal(metrics: &std::path::Path) -> Result<String> {
    let steps: Vec<StepMetrics> = r3_loop::report::read_jsonl(metrics)?;
    let groups: usize = steps.iter().map(|m| m.groups).sum();
    let silent: usize = steps.iter().map(|m| m.zero_signal_groups).sum();
    let (groups, silent) = (groups as f64, silent as f64);
    let half = steps.len().div_ceil(2);
    let mean = |part: &[StepMetrics]| {
        part.iter().map(|m| m.retry_success).sum::<f64>() / part.len().max(1) as f64
    };
    Ok(format!(
        "reward signal: {:.0}% of {} groups had mixed rewards (the rest train nothing); retry success during training {:.1}% in the first {} steps, {:.1}% in the last {}.",
        100.0 * (groups - silent) / groups.max(1.0),
        groups,
        100.0 * mean(&steps[..half]),
        half,
        100.0 * mean(&steps[half..]),
        steps.len() - half
    ))
}
