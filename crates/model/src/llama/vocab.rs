//! The decoder's two ends over the vocabulary, the token embeddings and the
//! output projection, each a `[vocab, hidden]` table. Trainable, it is f32;
//! frozen (inference, a LoRA base, a reference model) it stays in its
//! file's encoding where a kernel reads it: lookups unpack single rows,
//! logits and log-probs run on the packed blocks, and no f32 copy of the
//! table exists (for Qwen2.5-0.5B that is 544 MB saved).

use std::sync::Arc;

use candle_core::{Device, Tensor};
use r3_kernels::device_matmul::device_matmul;
use r3_kernels::matmul::Activations;
use r3_kernels::matmul::{matmul, packed_matmul_with};
use r3_kernels::packed::PackedMatrix;
use rayon::prelude::*;

use super::linear::{cast_like, WeightLayout};
use crate::error::Result;
use crate::logprob;
use crate::weights::Weights;

/// A `[vocab, hidden]` table.
#[derive(Debug, Clone)]
pub(super) enum VocabTable {
    Dense(Tensor),
    /// One part, the file's blocks.
    Packed(Arc<[PackedMatrix]>),
}

impl VocabTable {
    /// `name` as `layout` wants it: packed where the file allows and the
    /// layout is frozen, f32 otherwise.
    pub(super) fn load(
        weights: &Weights,
        name: &str,
        shape: [usize; 2],
        layout: WeightLayout,
    ) -> Result<Self> {
        if layout != WeightLayout::Fast {
            if let Some(packed) = weights.packed(name, &shape)? {
                return Ok(Self::Packed(Arc::from(vec![packed])));
            }
        }
        Ok(Self::Dense(weights.get(name, &shape)?))
    }

    /// Rows `ids`, `[ids.len(), hidden]`.
    pub(super) fn lookup(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Dense(table) => {
                let ids = Tensor::new(ids, table.device())?;
                Ok(table.index_select(&ids, 0)?)
            }
            Self::Packed(parts) => {
                let table = &parts[0];
                let h = table.cols();
                let mut rows = vec![0f32; ids.len() * h];
                rows.par_chunks_mut(h)
                    .zip(ids)
                    .for_each(|(row, &id)| table.unpack_row(id as usize, row));
                Ok(Tensor::from_vec(rows, (ids.len(), h), &Device::Cpu)?)
            }
        }
    }

    /// Logits `rows [n, hidden] · tableᵀ`; `transposed` is the dense
    /// table's `[hidden, vocab]` copy when the decoder keeps one, and
    /// `activations` how a packed table's decode products take `rows`.
    pub(super) fn project(
        &self,
        rows: &Tensor,
        transposed: Option<&Tensor>,
        activations: Activations,
    ) -> Result<Tensor> {
        Ok(match (self, transposed) {
            (Self::Packed(parts), _) => packed_matmul_with(rows, parts, activations)?,
            (Self::Dense(_), Some(w_t)) => matmul(rows, &cast_like(w_t, rows)?)?,
            (Self::Dense(w), None) => device_matmul(rows, &cast_like(w, rows)?.t()?)?,
        })
    }

    /// log p(target) per row of `hidden` (see `logprob`).
    pub(super) fn token_logprobs(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        match self {
            Self::Dense(w) => logprob::token_logprobs(hidden, w, targets),
            Self::Packed(parts) => logprob::packed_token_logprobs(hidden, parts, targets),
        }
    }

    /// The table in f32, detached: for export.
    pub(super) fn to_f32(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Dense(t) => t.detach(),
            Self::Packed(parts) => parts[0].to_f32()?,
        })
    }

    /// The f32 table, which training may update; `None` when packed.
    pub(super) fn dense_mut(&mut self) -> Option<&mut Tensor> {
        match self {
            Self::Dense(t) => Some(t),
            Self::Packed(_) => None,
        }
    }

    /// Bytes a product with the whole table reads (the output head).
    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Packed(parts) => parts.iter().map(|p| p.bytes()).sum(),
        }
    }

    /// Weights read in their file's encoding.
    pub(super) fn packed_weights(&self) -> usize {
        match self {
            Self::Dense(_) => 0,
            Self::Packed(parts) => parts.iter().map(|p| p.rows() * p.cols()).sum(),
        }
    }
}
