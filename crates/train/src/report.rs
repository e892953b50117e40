//! A training run's report (`r3 report RUN`): metrics.jsonl drawn into
//! training.png, with a markdown summary beside it, and the held-out
//! comparison when the run directory has one.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::metrics::StepMetrics;
use crate::{Result, TrainError};
use r3_loop::report::{compare, read_jsonl};

/// A drawing failure, naming the chart file.
fn drawing<E: std::fmt::Display>(png: &Path) -> impl Fn(E) -> TrainError + '_ {
    move |e| TrainError::Invalid(format!("cannot draw {}: {e}", png.display()))
}

/// A file written, or the error naming it.
fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|cause| TrainError::Io {
        path: path.display().to_string(),
        cause,
    })
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
        return Err(TrainError::Invalid("no TrueType font found for chart text: install one (Debian: fonts-dejavu-core) or set R3_FONT=/path/to/font.ttf".into()));
    };
    let bytes = std::fs::read(&path).map_err(|cause| TrainError::Io {
        path: path.display().to_string(),
        cause,
    })?;
    // plotters keeps the font for the process's life.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| TrainError::Invalid(format!("{}: not a usable font", path.display())))?;
    Ok(())
}

/// One number of a step, for a chart.
type Metric = fn(&StepMetrics) -> f64;

/// Charts of a run's metrics.jsonl into training.png, and report.md (a
/// training directory, or a run directory holding `train/` and, for the
/// held-out comparison, `eval-base/` and `eval-trained/`). Returns the
/// markdown and the chart's path.
pub fn training_report(run: &Path) -> Result<(String, PathBuf)> {
    let train_dir = if run.join("metrics.jsonl").exists() {
        run.to_path_buf()
    } else {
        run.join("train")
    };
    let metrics_path = train_dir.join("metrics.jsonl");
    let rows: Vec<StepMetrics> = read_jsonl(&metrics_path)?;
    if rows.is_empty() {
        return Err(TrainError::Invalid(format!(
            "{}: no steps logged yet",
            metrics_path.display()
        )));
    }
    let series =
        |of: Metric| -> Vec<(f64, f64)> { rows.iter().map(|r| (r.step as f64, of(r))).collect() };
    register_font()?;
    let png = train_dir.join("training.png");
    {
        let root = BitMapBackend::new(&png, (1500, 900)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing(&png))?;
        let panels = root.split_evenly((2, 3));
        let charts: [(&str, Metric); 5] = [
            ("reward (= retry success)", |m| m.reward_mean),
            ("KL to reference (k3)", |m| m.kl),
            ("loss", |m| m.loss),
            ("reflection length (tokens)", |m| m.reflection_length),
            ("throughput (tokens/s)", |m| m.tokens_per_s),
        ];
        for (panel, (title, of)) in panels.iter().zip(charts) {
            draw_panel(panel, title, &series(of)).map_err(drawing(&png))?;
        }
        let zero = series(|m| m.zero_signal_groups as f64 / (m.groups as f64).max(1.0));
        draw_panel(&panels[5], "groups without signal (fraction)", &zero).map_err(drawing(&png))?;
        root.present().map_err(drawing(&png))?;
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
    write(&train_dir.join("report.md"), &md)?;
    if train_dir != run {
        write(
            &run.join("report.md"),
            &md.replace("](training.png)", "](train/training.png)"),
        )?;
    }
    Ok((md, png))
}

/// One chart of `points`, scaled to them, in `area`.
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    points: &[(f64, f64)],
) -> std::result::Result<(), String> {
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
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| e.to_string())?;
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
        .draw()
        .map_err(|e| e.to_string())?;
    let color = Palette99::pick(0);
    chart
        .draw_series(LineSeries::new(
            points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
        .map_err(|e| e.to_string())?;
    Ok(())
}
