//! `r3 report`: PNG charts and a markdown summary of a training run, and a
//! side-by-side comparison of two evaluations.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use r3_loop::report::compare;

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
        writeln!(std::io::stdout(), "{}", compare(&dirs[0], &dirs[1])?)?;
        return Ok(());
    }
    let run = args.run.expect("clap requires a run directory");
    let (markdown, png) = r3_train::report::training_report(&run)?;
    writeln!(std::io::stdout(), "{markdown}")?;
    eprintln!(
        "wrote {} and {}",
        png.display(),
        run.join("report.md").display()
    );
    Ok(())
}
