//! Attention of a few new tokens per row over the whole KV cache, in one
//! pass: for generation, where a step brings one token per row.
//!
//! Written as matmuls, a decode step's attention is `batch · kv_heads` tiny
//! GEMMs per layer (three query rows against a few hundred keys), each with
//! its own dispatch and thread fan-out: about a millisecond per layer at
//! batch 32, a fifth of the step. Here each row is one task: scores, softmax
//! and the weighted sum of values for every head, reading the cache in
//! place and writing the output in the `[batch, t, heads · head_dim]` layout
//! the output projection wants. A cache column hidden from every query of a
//! row (a hole: another row's token, in a batch whose rows joined at
//! different times) takes no part, so a row costs its own columns, not the
//! batch's. There is no backward: forwards that need
//! gradients take the matmul path.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::exp::exp;
use crate::level::with_vector_features;
use crate::reduce::{lanes_dot, lanes_sum};
use crate::storage::{f32_slice, with_f32_elements};

/// Rows with at most this many new tokens take the fused path; longer
/// segments (prefill) are better served by real GEMMs. A request joining a
/// decoding batch is fed this many ids a step: its padding slots cost the
/// other rows nothing here (16 rather than 4 measured 238 against 211
/// tokens/s with 8 concurrent `r3 serve` clients, the same with 32).
pub const MAX_FUSED_TOKENS: usize = 16;

/// Mask values at or below this hide a column (the cache masks with −1e9):
/// its weight after the softmax is exactly 0 whatever the key, so it is
/// not read.
const HIDDEN: f32 = -1e8;

/// Softmax attention of `q` `[batch, heads, t, head_dim]` (contiguous) over
/// the cache's `k`, `v` `[batch, kv_heads, len, head_dim]` (each row of
/// `head_dim` contiguous), with the additive `mask` `[batch, 1, 1, t, len]`
/// (contiguous). Query head `h` reads kv head `h / (heads / kv_heads)`.
/// Returns `[batch, t, heads · head_dim]`.
pub fn cached_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
) -> candle_core::Result<Tensor> {
    with_f32_elements(mask, |mask| {
        q.apply_op3_no_bwd(k, v, &CachedAttention { mask, scale })
    })?
}

struct CachedAttention<'a> {
    /// `[batch, t, len]`, additive.
    mask: &'a [f32],
    scale: f32,
}

/// Where one `[batch, heads, len, head_dim]` cache tensor's rows are.
struct Rows<'a> {
    data: &'a [f32],
    batch_stride: usize,
    head_stride: usize,
    len_stride: usize,
}

impl<'a> Rows<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<Self> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused attention: the cache must be f32")
        };
        let stride = layout.stride();
        if stride[3] != 1 {
            candle_core::bail!("fused attention: cache rows must be contiguous")
        }
        Ok(Self {
            data: &data[layout.start_offset()..],
            batch_stride: stride[0],
            head_stride: stride[1],
            len_stride: stride[2],
        })
    }

    #[inline(always)]
    fn row(&self, b: usize, h: usize, j: usize, d: usize) -> &'a [f32] {
        let at = b * self.batch_stride + h * self.head_stride + j * self.len_stride;
        &self.data[at..at + d]
    }
}

impl CustomOp3 for CachedAttention<'_> {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, heads, t, d) = q_layout.shape().dims4()?;
        let (_, kv_heads, len, _) = k_layout.shape().dims4()?;
        let q = f32_slice(q_storage, q_layout)?;
        let (keys, values) = (
            Rows::new(k_storage, k_layout)?,
            Rows::new(v_storage, v_layout)?,
        );
        if self.mask.len() != batch * t * len || heads % kv_heads != 0 {
            candle_core::bail!("fused attention: mask or head counts do not fit")
        }
        let mut out = vec![0f32; batch * t * heads * d];
        out.par_chunks_mut(t * heads * d).enumerate().for_each_init(
            || {
                let scores = vec![0f32; heads / kv_heads * t * len];
                (scores, Vec::with_capacity(len))
            },
            |(scores, visible), (b, out)| {
                let row = RowAttention {
                    q: &q[b * heads * t * d..][..heads * t * d],
                    mask: &self.mask[b * t * len..][..t * len],
                    keys: &keys,
                    values: &values,
                    b,
                    heads,
                    kv_heads,
                    t,
                    d,
                    len,
                    scale: self.scale,
                };
                row.run(scores, visible, out);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((batch, t, heads * d))))
    }
}

/// Everything one batch row attends with: its queries `[heads, t, d]`,
/// its mask `[t, len]` and its keys and values in the cache.
struct RowAttention<'a> {
    q: &'a [f32],
    mask: &'a [f32],
    keys: &'a Rows<'a>,
    values: &'a Rows<'a>,
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
    len: usize,
    scale: f32,
}

impl RowAttention<'_> {
    /// Writes `out` `[t, heads, d]`, with the widest vector instructions the
    /// CPU has (the loops below are written for the compiler to vectorize).
    fn run(&self, scores: &mut [f32], visible: &mut Vec<usize>, out: &mut [f32]) {
        with_vector_features!(self.run_portable(scores, visible, out))
    }

    /// The query heads that share a kv head are done together, so that each
    /// key and value row is read from memory once for all of them. Only the
    /// columns some query of the row sees take part: a hidden column's
    /// weight is exactly 0, so leaving it out changes nothing but the cost.
    #[inline(always)]
    fn run_portable(&self, scores: &mut [f32], visible: &mut Vec<usize>, out: &mut [f32]) {
        let (t, d, len) = (self.t, self.d, self.len);
        visible.clear();
        visible
            .extend((0..len).filter(|&j| (0..t).any(|token| self.mask[token * len + j] > HIDDEN)));
        let seen = visible.len();
        // The row's tokens come last: the slots before them (a segment
        // shorter than the step's) see nothing, are never read, and cost
        // nothing; their output stays 0.
        let first = (0..t)
            .find(|&token| self.mask[token * len..][..len].iter().any(|&m| m > HIDDEN))
            .unwrap_or(t);
        let group = self.heads / self.kv_heads;
        // Query `n` of a group is head `kv_head · group + n / t`, token `n % t`.
        let query = |kv_head: usize, n: usize| {
            let h = kv_head * group + n / t;
            &self.q[(h * t + n % t) * d..][..d]
        };
        let queries = || (0..group * t).filter(|n| n % t >= first);
        for kv_head in 0..self.kv_heads {
            for (i, &j) in visible.iter().enumerate() {
                let key = self.keys.row(self.b, kv_head, j, d);
                for n in queries() {
                    let mask = self.mask[(n % t) * len + j];
                    scores[n * seen + i] = lanes_dot(query(kv_head, n), key) * self.scale + mask;
                }
            }
            for n in queries() {
                let row = &mut scores[n * seen..][..seen];
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|score| *score = exp(*score - max));
                let total = lanes_sum(row);
                row.iter_mut().for_each(|p| *p /= total);
            }
            for (i, &j) in visible.iter().enumerate() {
                let value = self.values.row(self.b, kv_head, j, d);
                for n in queries() {
                    let p = scores[n * seen + i];
                    if p != 0.0 {
                        let h = kv_head * group + n / t;
                        axpy(p, value, &mut out[((n % t) * self.heads + h) * d..][..d]);
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}
