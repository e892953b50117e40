//! How a forward runs, chosen once per forward (in `Llama::plan`) and
//! read by every layer: the one predicate for "fused kernel or autograd
//! op". (Which *gradients* an op computes — none for a frozen weight, the
//! input's only — is a property of its tensors, decided where the product
//! or log-prob kernel is chosen: `kernels/matmul.rs`, `logprob.rs`.)

use crate::cache::KvCache;

/// Fused kernels, or ops autograd records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// Values only (generation, and scoring under the reference or old
    /// policy): r3's cached attention, and off the CPU candle's fused
    /// rms-norm, softmax and rope, none of which has a backward pass.
    Infer,
    /// Training: every op composed of basic ops that autograd records (or a
    /// fused kernel with its own backward: on the CPU RMSNorm, rope,
    /// attention's softmax and the MLP's gate), so
    /// that gradients reach every trained weight and, through the
    /// differentiable cache, a shared prefix. The forward of a
    /// checkpointed layer and its replay run these same ops, so their
    /// values agree to the last bit.
    Train,
}

impl Exec {
    /// A forward over a differentiable cache is a training forward; any
    /// other computes values only.
    pub fn of(cache: &KvCache) -> Self {
        match cache.is_differentiable() {
            true => Self::Train,
            false => Self::Infer,
        }
    }

    /// Whether ops may run their fused kernels.
    pub fn fused(self) -> bool {
        self == Self::Infer
    }
}
