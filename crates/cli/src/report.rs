//! `r3 report`: PNG charts and a markdown summary of a training run, and a
//! side-by-side comparison of two evaluations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use r3_loop::eval::{EvalSummary, Transcript};
use r3_loop::stats::{mcnemar_exact, Proportion};
use r3_train::metrics::StepMetrics;
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
    let (markdown, png) = training_report(&run)?;
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

/// Registers a system sans-serif font for chart text (plotters draws text
/// itself); `R3_FONT` names one explicitly.
fn register_font() -> Result<()> {
    let candidates = [
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "/usr/share/fonts/TTF/DejaVuSans.ttf",
        "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
        "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
        "/System/Library/Fonts/Supplemental/Arial.ttf",
        "/Library/Fonts/Arial.ttf",
    ];
    let chosen = std::env::var("R3_FONT")
        .ok()
        .map(PathBuf::from)
        .into_iter()
        .chain(candidates.iter().map(PathBuf::from))
        .find(|p| p.exists());
    let Some(path) = chosen else {
        bail!("no TrueType font found for chart text: install one (Debian: fonts-dejavu-core) or set R3_FONT=/path/to/font.ttf");
    };
    let bytes: &'static [u8] = Box::leak(
        std::fs::read(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{}: not a usable font", path.display()))?;
    Ok(())
}

/// One number of a step, for a chart.
type Metric = fn(&StepMetrics) -> f64;

/// Charts of a run's metrics.jsonl into training.png, and report.md.
pub fn training_report(run: &Path) -> Result<(String, PathBuf)> {
    let train_dir = if run.join("metrics.jsonl").exists() {
        run.to_path_buf()
    } else {
        run.join("train")
    };
    let metrics_path = train_dir.join("metrics.jsonl");
    let rows: Vec<StepMetrics> = read_jsonl(&metrics_path)?;
    if rows.is_empty() {
        bail!("{}: no steps logged yet", metrics_path.display());
    }
    let series =
        |of: Metric| -> Vec<(f64, f64)> { rows.iter().map(|r| (r.step as f64, of(r))).collect() };
    register_font()?;
    let png = train_dir.join("training.png");
    {
        let root = BitMapBackend::new(&png, (1500, 900)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((2, 3));
        let charts: [(&str, Metric); 5] = [
            ("reward (= retry success)", |m| m.reward_mean),
            ("KL to reference (k3)", |m| m.kl),
            ("loss", |m| m.loss),
            ("reflection length (tokens)", |m| m.reflection_length),
            ("throughput (tokens/s)", |m| m.tokens_per_s),
        ];
        for (panel, (title, of)) in panels.iter().zip(charts) {
            draw_panel(panel, title, &series(of))?;
        }
        let zero = series(|m| m.zero_signal_groups as f64 / (m.groups as f64).max(1.0));
        draw_panel(&panels[5], "groups without signal (fraction)", &zero)?;
        root.present()?;
    }
    let first = &rows[0];
    let last = &rows[rows.len() - 1];
    let mean = |of: Metric| rows.iter().map(of).sum::<f64>() / rows.len() as f64;
    let mut md = format!(
        "# r3 training report: {}\n\n![training](training.png)\n\n| | |\n|---|---|\n\
         | steps | {} |\n| reward, first → last step | {:.3} → {:.3} |\n| mean reward | {:.3} |\n\
         | mean KL | {:.5} |\n| groups without signal | {:.0}% |\n| mean reflection length | {:.1} tokens |\n\
         | seconds per step | {:.1} (generation {:.1}, forward+backward {:.1}, optimizer {:.1}) |\n| tokens/s | {:.0} |\n",
        run.display(),
        rows.len(),
        first.reward_mean,
        last.reward_mean,
        mean(|m| m.reward_mean),
        mean(|m| m.kl),
        100.0 * mean(|m| m.zero_signal_groups as f64) / mean(|m| m.groups as f64).max(1.0),
        mean(|m| m.reflection_length),
        mean(|m| m.seconds_step),
        mean(|m| m.seconds_generation),
        mean(|m| m.seconds_forward_backward),
        mean(|m| m.seconds_optimizer),
        mean(|m| m.tokens_per_s),
    );
    let (base, trained) = (run.join("eval-base"), run.join("eval-trained"));
    if base.join("summary.json").exists() && trained.join("summary.json").exists() {
        md.push_str("\n## Held-out evaluation\n\n");
        md.push_str(&compare(&base, &trained)?);
    }
    std::fs::write(train_dir.join("report.md"), &md)?;
    if train_dir != run {
        std::fs::write(
            run.join("report.md"),
            md.replace("](training.png)", "](train/training.png)"),
        )?;
    }
    Ok((md, png))
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    points: &[(f64, f64)],
) -> Result<()> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.1).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    let small = (y1 - y0).abs() < 0.01 || y1.abs().max(y0.abs()) < 0.01;
    let format_y = |v: &f64| {
        if small {
            format!("{v:.1e}")
        } else {
            format!("{v:.3}")
        }
    };
    chart
        .configure_mesh()
        .x_desc("step")
        .label_style(("sans-serif", 14))
        .y_label_formatter(&format_y)
        .draw()?;
    let color = Palette99::pick(0);
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        color.stroke_width(2),
    ))?;
    chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    Ok(())
}
