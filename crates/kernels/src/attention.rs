//! Attention of a few new tokens per row over the whole KV cache, in one
//! pass: for generation, where a step brings one token per row.
//!
//! Written as matmuls, a decode step's attention is `batch · kv_heads` tiny
//! GEMMs per layer (three query rows against a few hundred keys), each with
//! its own dispatch and thread fan-out: about a millisecond per layer at
//! batch 32, a fifth of the step. Here each row's kv head is one task (so
//! that a batch of one row still spreads over the threads): scores,
//! softmax and the weighted sum of values for the query heads that share
//! it, reading the cache in place, the output gathered in the `[batch, t,
//! heads · head_dim]` layout the output projection wants. A cache column hidden from every query of a
//! row (a hole: another row's token, in a batch whose rows joined at
//! different times) takes no part, so a row costs its own columns, not the
//! batch's. There is no backward: forwards that need
//! gradients take the matmul path.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::exp::exp;
use crate::gemm::{gemm, Mat, Out};
use crate::level::with_vector_features;
use crate::reduce::{lanes_dot, lanes_max, lanes_sum};
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

    /// The rows of batch row `b`'s kv head `h`.
    fn head(&self, b: usize, h: usize) -> HeadRows<'a> {
        HeadRows {
            data: &self.data[b * self.batch_stride + h * self.head_stride..],
            len_stride: self.len_stride,
        }
    }
}

/// One kv head's `[len, head_dim]` rows in the cache.
#[derive(Clone, Copy)]
struct HeadRows<'a> {
    data: &'a [f32],
    len_stride: usize,
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
        let group = heads / kv_heads;
        // One task per row and kv head (a batch-1 step still splits over
        // the threads), writing its query heads' outputs `[t, group · d]`.
        let mut by_kv_head = vec![0f32; batch * kv_heads * t * group * d];
        by_kv_head
            .par_chunks_mut(t * group * d)
            .enumerate()
            .for_each_init(
                || (vec![0f32; group * t * len], Vec::new()),
                |(scores, runs), (task, out)| {
                    let (b, kv_head) = (task / kv_heads, task % kv_heads);
                    let heads_of_group = (b * heads + kv_head * group) * t * d;
                    let attention = GroupAttention {
                        q: &q[heads_of_group..][..group * t * d],
                        mask: &self.mask[b * t * len..][..t * len],
                        keys: keys.head(b, kv_head),
                        values: values.head(b, kv_head),
                        group,
                        t,
                        d,
                        len,
                        scale: self.scale,
                    };
                    attention.run(scores, runs, out);
                },
            );
        let out = if t == 1 {
            // `[batch, kv_heads, 1, group · d]` is `[batch, 1, heads · d]`.
            by_kv_head
        } else {
            tokens_first(&by_kv_head, kv_heads, t, group * d)
        };
        Ok((CpuStorage::F32(out), Shape::from((batch, t, heads * d))))
    }
}

/// `[batch, kv_heads, t, width]` as `[batch, t, kv_heads · width]`.
fn tokens_first(x: &[f32], kv_heads: usize, t: usize, width: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (b, row) in out.chunks_exact_mut(t * kv_heads * width).enumerate() {
        for (token, slot) in row.chunks_exact_mut(kv_heads * width).enumerate() {
            for (kv_head, slot) in slot.chunks_exact_mut(width).enumerate() {
                slot.copy_from_slice(&x[((b * kv_heads + kv_head) * t + token) * width..][..width]);
            }
        }
    }
    out
}

/// Everything one batch row's query heads that share a kv head attend
/// with: their queries `[group, t, d]`, the row's mask `[t, len]` and the
/// kv head's keys and values in the cache.
struct GroupAttention<'a> {
    q: &'a [f32],
    mask: &'a [f32],
    keys: HeadRows<'a>,
    values: HeadRows<'a>,
    group: usize,
    t: usize,
    d: usize,
    len: usize,
    scale: f32,
}

impl GroupAttention<'_> {
    /// Writes `out` `[t, group, d]` (zeroed by the caller), with the
    /// widest vector instructions the CPU has for the softmax (the loops
    /// below are written for the compiler to vectorize).
    fn run(&self, scores: &mut [f32], runs: &mut Vec<Range<usize>>, out: &mut [f32]) {
        with_vector_features!(self.run_portable(scores, runs, out))
    }

    /// The query heads are done together, so that each key and value row
    /// is read once for all of them. Scores are dot products a column and
    /// head; the weighted values one small product per run of visible
    /// columns (gemm on this task's thread: `[heads, seen] · [seen, d]`,
    /// where adding `p · v` row by row made the output a load and a store
    /// per value; default model, batch 1, 512–768 tokens of context:
    /// 101–103 → 110–114 tokens/s, with 8-bit inputs 119–137 → 149–157).
    /// Scores as a product were no faster: gemm packs the keys `[len, d]`
    /// transposed, a value at a time. Only the columns some query of the
    /// row sees take part: a hidden column's weight is exactly 0, so
    /// leaving it out changes nothing but the cost.
    #[inline(always)]
    fn run_portable(&self, scores: &mut [f32], runs: &mut Vec<Range<usize>>, out: &mut [f32]) {
        let (group, t, d, len) = (self.group, self.t, self.d, self.len);
        let seen = self.visible_runs(runs);
        // The row's tokens come last: the slots before them (a segment
        // shorter than the step's) see nothing, weigh every column 0, and
        // their output stays 0.
        let first = (0..t)
            .find(|&token| self.mask[token * len..][..len].iter().any(|&m| m > HIDDEN))
            .unwrap_or(t);
        // Scores `[group · t, seen]`: query head `g`, token `token` is row
        // `g · t + token`, a run's columns at its offset among the seen.
        let rows = group * t;
        let scores = &mut scores[..rows * seen];
        self.scores((runs, first, seen), scores);
        for g in 0..group {
            for token in 0..t {
                let row = &mut scores[(g * t + token) * seen..][..seen];
                if token < first {
                    row.fill(0.0);
                    continue;
                }
                let max = lanes_max(row);
                row.iter_mut().for_each(|score| *score = exp(*score - max));
                let inverse = 1.0 / lanes_sum(row);
                row.iter_mut().for_each(|p| *p *= inverse);
            }
        }
        // `out[token][g] = Σ p · v`: with one token a row, the group's rows
        // lie `d` apart in `out` (one product); with more, a head's tokens
        // lie `group · d` apart (a product per head).
        let (products, heads, out_stride) = match t {
            1 => (1, group, d),
            _ => (group, 1, group * d),
        };
        let mut offset = 0;
        for run in runs.iter() {
            let values = Mat::rows(
                &self.values.data[run.start * self.values.len_stride..],
                self.values.len_stride,
            );
            for product in 0..products {
                let weights = Mat::rows(&scores[product * t * seen + offset..], seen);
                let out = Out {
                    data: &mut out[product * d..],
                    row_stride: out_stride,
                };
                gemm((heads * t, d, run.len()), out, true, weights, values, 1);
            }
            offset += run.len();
        }
    }

    /// `scores[(g · t + token) · seen + i] = dot(q, k_j) · scale + mask`
    /// for the `i`-th visible column `j`.
    #[inline(always)]
    fn scores_with(
        &self,
        (runs, first, seen): (&[Range<usize>], usize, usize),
        scores: &mut [f32],
        dot: impl Fn(&[f32], &[f32]) -> f32,
    ) {
        let (group, t, d, len) = (self.group, self.t, self.d, self.len);
        for (i, j) in runs.iter().flat_map(|run| run.clone()).enumerate() {
            let key = &self.keys.data[j * self.keys.len_stride..][..d];
            for g in 0..group {
                for token in first..t {
                    let query = &self.q[(g * t + token) * d..][..d];
                    let mask = self.mask[token * len + j];
                    scores[(g * t + token) * seen + i] = dot(query, key) * self.scale + mask;
                }
            }
        }
    }

    /// [`Self::scores_with`] with the dot product of the level this runs
    /// at: the AVX2 and AVX-512 dots sum their lanes by shuffle halvings,
    /// where the compiler sums a portable loop's lanes in order (fifteen
    /// dependent scalar additions, 60% of attention's time in a batch-1
    /// profile).
    #[inline(always)]
    fn scores(&self, columns: (&[Range<usize>], usize, usize), scores: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::reduce::{dot_avx2, dot_avx512};
            use crate::CpuLevel;
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(
                a: &GroupAttention,
                c: (&[Range<usize>], usize, usize),
                s: &mut [f32],
            ) {
                // SAFETY: the CPU has AVX-512F and `d` is a multiple of 16
                // (the caller's checks).
                a.scores_with(c, s, |q, k| unsafe { dot_avx512(q, k) })
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(a: &GroupAttention, c: (&[Range<usize>], usize, usize), s: &mut [f32]) {
                // SAFETY: the CPU has AVX2 and FMA and `d` is a multiple of
                // 8 (the caller's checks).
                a.scores_with(c, s, |q, k| unsafe { dot_avx2(q, k) })
            }
            match CpuLevel::current() {
                // SAFETY: the level is at most what the CPU runs.
                CpuLevel::Avx512 if self.d.is_multiple_of(16) => {
                    return unsafe { avx512(self, columns, scores) }
                }
                // SAFETY: as above.
                CpuLevel::Avx512 | CpuLevel::Avx2 if self.d.is_multiple_of(8) => {
                    return unsafe { avx2(self, columns, scores) }
                }
                _ => {}
            }
        }
        self.scores_with(columns, scores, lanes_dot)
    }

    /// Fills `runs` with the row's visible columns (some query sees them),
    /// as runs of neighbours; returns how many there are.
    fn visible_runs(&self, runs: &mut Vec<Range<usize>>) -> usize {
        let (t, len) = (self.t, self.len);
        let visible = |j: usize| (0..t).any(|token| self.mask[token * len + j] > HIDDEN);
        runs.clear();
        let mut j = 0;
        while j < len {
            if visible(j) {
                let start = j;
                while j < len && visible(j) {
                    j += 1;
                }
                runs.push(start..j);
            } else {
                j += 1;
            }
        }
        runs.iter().map(|run| run.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_relative_difference, random};
    use candle_core::Device;

    /// Row 0 sees its causal prefix; row 1 the same with two holes (another
    /// row's columns); row 2's first token is a padding slot that sees
    /// nothing. Token `i` of `t` sees the columns up to `len − t + i`.
    fn mask(batch: usize, t: usize, len: usize) -> Vec<f32> {
        let mut mask = vec![-1e9f32; batch * t * len];
        for b in 0..batch {
            for token in 0..t {
                if b % 3 == 2 && token == 0 && t > 1 {
                    continue;
                }
                for j in 0..=len - t + token {
                    if !(b % 3 == 1 && (j == 2 || j == 5)) {
                        mask[(b * t + token) * len + j] = 0.0;
                    }
                }
            }
        }
        mask
    }

    /// Softmax attention in f64, one query at a time; a query that sees no
    /// column gives 0.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &[f32], scale: f32) -> Tensor {
        let (batch, heads, t, d) = q.dims4().unwrap();
        let (kv_heads, len) = (k.dim(1).unwrap(), k.dim(2).unwrap());
        let values = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (q, k, v) = (values(q), values(k), values(v));
        let mut out = vec![0f32; batch * t * heads * d];
        for b in 0..batch {
            for h in 0..heads {
                let kv = h / (heads / kv_heads);
                let cache =
                    |x: &[f32], j: usize, e: usize| x[((b * kv_heads + kv) * len + j) * d + e];
                for token in 0..t {
                    let row = &mask[(b * t + token) * len..][..len];
                    if row.iter().all(|&m| m <= HIDDEN) {
                        continue;
                    }
                    let scores: Vec<f64> = (0..len)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|e| {
                                    q[((b * heads + h) * t + token) * d + e] as f64
                                        * cache(&k, j, e) as f64
                                })
                                .sum();
                            dot * scale as f64 + row[j] as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for e in 0..d {
                        let sum: f64 = (0..len).map(|j| weights[j] * cache(&v, j, e) as f64).sum();
                        out[((b * t + token) * heads + h) * d + e] = (sum / total) as f32;
                    }
                }
            }
        }
        Tensor::from_vec(out, (batch, t, heads * d), &Device::Cpu).unwrap()
    }

    #[test]
    fn cached_attention_is_softmax_attention_over_the_visible_columns() {
        // Head sizes with and without a tail past the 16 lanes (128: the
        // Qwen models'); grouped (3 query heads a kv head) and not; one
        // token a row and several.
        for (heads, kv_heads, d) in [(6, 2, 20), (4, 4, 64), (9, 3, 64), (4, 2, 128)] {
            // Contexts shorter than a product's blocks and longer.
            for (t, len) in [(1, 13), (3, 13), (1, 300), (3, 300)] {
                let (batch, scale) = (4, 1.0 / (d as f32).sqrt());
                let q = random(&[batch, heads, t, d], 1, 1.0);
                let k = random(&[batch, kv_heads, len, d], 2, 1.0);
                let v = random(&[batch, kv_heads, len, d], 3, 1.0);
                let mask = mask(batch, t, len);
                let mask_tensor =
                    Tensor::from_vec(mask.clone(), (batch, 1, 1, t, len), &Device::Cpu).unwrap();
                let got = cached_attention(&q, &k, &v, &mask_tensor, scale).unwrap();
                let expected = reference(&q, &k, &v, &mask, scale);
                let difference = max_relative_difference(&got, &expected);
                assert!(
                    difference < 1e-5,
                    "heads {heads}/{kv_heads}, d {d}, t {t}, len {len}: {difference}"
                );
                if t > 1 {
                    // The padding slot's output is exactly 0.
                    let slot = got.get(2).unwrap().get(0).unwrap().abs().unwrap();
                    assert_eq!(slot.max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
                }
            }
        }
    }
}
