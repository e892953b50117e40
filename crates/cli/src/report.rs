//! `r3 report`: PNG charts and a markdown summary of a training run, and a
//! side-by-side comparison of two evaluations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use r3_loop::eval::{EvalSummary, Transcript};
use r3_loop::stats::{mcnemar_exact, Proportion};
use serde::de::DeserializeOwned;

#[derive(Args)]
pub struct ReportArgs {
    /// A training output directory (with metrics.jsonl) or a demo directory
    #[arg(required_unless_present = "compare")]
    run: Option<PathBuf>,
    /// Two `r3 eval` output directories to compare
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<PathBuf>>,
}

pub fn report(args: ReportArgs) -> Result<()> {
    if let Some(dirs) = &args.compare {
        println!("{}", compare(&dirs[0], &dirs[1])?);
        return Ok(());
    }
    let run = args.run.expect("clap requires a run directory");
    let (markdown, png) = crate::chart::training_report(&run)?;
    println!("{markdown}");
    eprintln!(
        "wrote {} and {}",
        png.display(),
        run.join("report.md").display()
    );
    Ok(())
}

/// A JSON artifact read as the type that wrote it: a missing or renamed
/// field is an error naming the file, never a silent 0.
fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not what r3 writes", path.display()))
}

/// The rows of a JSON-lines artifact, typed, each error naming `file:line`
/// (read by the project's one JSONL reader, streaming).
pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let mut rows = Vec::new();
    r3_tasks::records::for_each_jsonl_line(path, |line, text| -> Result<()> {
        let row = text
            .map_err(anyhow::Error::msg)
            .and_then(|t| Ok(serde_json::from_str(t)?))
            .with_context(|| format!("{}:{line}: not what r3 writes", path.display()))?;
        rows.push(row);
        Ok(())
    })?;
    Ok(rows)
}

/// Markdown comparing two evaluations of the same records: each column's
/// accuracy with its 95% interval, and for each row the exact McNemar test
/// on the records where exactly one of the two succeeded.
pub fn compare(a: &Path, b: &Path) -> Result<String> {
    let (sa, sb): (EvalSummary, EvalSummary) = (
        read_json(&a.join("summary.json"))?,
        read_json(&b.join("summary.json"))?,
    );
    let (ta, tb) = (outcomes(a)?, outcomes(b)?);
    if ta.keys().ne(tb.keys()) {
        bail!(
            "{} and {} evaluated different records: a paired comparison needs the same data",
            a.display(),
            b.display()
        );
    }
    let cell = |p: &Proportion| {
        format!(
            "{:.1}% ({}/{}) [{:.1}, {:.1}]",
            p.accuracy * 100.0,
            p.correct,
            p.n,
            p.low * 100.0,
            p.high * 100.0
        )
    };
    let mut out = format!(
        "| | {} | {} | only A / only B | McNemar p |\n|---|---|---|---|---|\n",
        a.display(),
        b.display()
    );
    for (label, (pa, pb), pick) in [
        ("first try", (&sa.first_try, &sb.first_try), 0usize),
        ("second try", (&sa.second_try, &sb.second_try), 1),
    ] {
        let only_a = ta.iter().filter(|(l, o)| o[pick] && !tb[l][pick]).count();
        let only_b = tb.iter().filter(|(l, o)| o[pick] && !ta[l][pick]).count();
        let p = mcnemar_exact(only_a, only_b);
        let p = if p < 1e-3 {
            format!("{p:.1e}")
        } else {
            format!("{p:.3}")
        };
        out.push_str(&format!(
            "| {label} | {} | {} | {only_a} / {only_b} | {p} |\n",
            cell(pa),
            cell(pb),
        ));
    }
    out.push_str(&format!(
        "| fixed by the retry | {} | {} | | |\n",
        sa.fixed_by_retry, sb.fixed_by_retry
    ));
    Ok(out)
}

/// Per record line of an eval's transcripts: [first try, second try] succeeded.
fn outcomes(dir: &Path) -> Result<BTreeMap<u64, [bool; 2]>> {
    let rows: Vec<Transcript> = read_jsonl(&dir.join("transcripts.jsonl"))?;
    Ok(rows
        .iter()
        .map(|t| {
            let first = t.attempt.verdict.success;
            let retried = t.retry.as_ref().is_some_and(|r| r.verdict.success);
            (t.line as u64, [first, first || retried])
        })
        .collect())
}
