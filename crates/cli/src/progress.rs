//! Progress bars on stderr for long work.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` items with a label and an ETA.
pub fn bar(label: &str, len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>16} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

/// Feeds `(phase, increment, phase_total)` reports into one bar per phase.
pub struct Phases {
    current: Option<(String, ProgressBar)>,
}

impl Phases {
    pub fn new() -> Self {
        Self { current: None }
    }

    pub fn report(&mut self, phase: &str, increment: usize, total: usize) {
        if self.current.as_ref().is_none_or(|(p, _)| p != phase) {
            if let Some((_, old)) = self.current.take() {
                old.finish();
            }
            self.current = Some((phase.to_string(), bar(phase, total)));
        }
        if let Some((_, b)) = &self.current {
            b.inc(increment as u64);
        }
    }

    pub fn finish(self) {
        if let Some((_, b)) = self.current {
            b.finish();
        }
    }
}
