//! Named points where a test can make training die as a `kill -9` would,
//! deterministically: `R3_CRASH_AT=POINT:STEP` aborts the process (no
//! unwinding, no destructors, no flushing) when training reaches `POINT`
//! at step `STEP`. Resume must then be exact from every such point; the
//! kill -9 tests prove it point by point instead of by timing. Unset, as
//! in every real run, a crash point costs one comparison.

use std::sync::OnceLock;

/// Where a run can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After a step's metrics line is written, before any checkpoint.
    StepLogged,
    /// Mid-checkpoint: its files written to the temporary directory,
    /// before the rename into place.
    CheckpointWritten,
    /// The checkpoint renamed into place, before the `last` pointer moves.
    CheckpointRenamed,
}

impl CrashPoint {
    /// Every point, for tests that try each.
    pub const ALL: [CrashPoint; 3] = [
        Self::StepLogged,
        Self::CheckpointWritten,
        Self::CheckpointRenamed,
    ];

    /// The name `R3_CRASH_AT` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::StepLogged => "step-logged",
            Self::CheckpointWritten => "checkpoint-written",
            Self::CheckpointRenamed => "checkpoint-renamed",
        }
    }
}

/// Aborts the process if `R3_CRASH_AT` names `point` at `step`.
pub fn maybe_crash(point: CrashPoint, step: usize) {
    static TARGET: OnceLock<Option<(String, usize)>> = OnceLock::new();
    let target = TARGET.get_or_init(|| {
        let text = std::env::var("R3_CRASH_AT").ok()?;
        let (name, step) = text.split_once(':')?;
        Some((name.to_string(), step.parse().ok()?))
    });
    if target
        .as_ref()
        .is_some_and(|(name, at)| name == point.name() && *at == step)
    {
        std::process::abort();
    }
}
