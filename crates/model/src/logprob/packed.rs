//! The log-prob op through a frozen packed output projection (a LoRA base,
//! a reference model): the vocabulary walked a block of rows at a time for
//! all positions, with a running logsumexp.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use r3_kernels::gemm::{Mat, Out};
use r3_kernels::matmul::{fold_panels, Panel};
use r3_kernels::packed::PackedMatrix;
use r3_kernels::storage::f32_slice;

use super::{check_targets, tensor_f32};
use crate::error::{ModelError, Result};

/// [`super::token_logprobs`] through a frozen packed output projection `weight`
/// (`[vocab, h]`, one part): the output of a LoRA base or a reference
/// model, which then never exists in f32. The vocabulary is walked once per
/// direction, each block of rows unpacked once for every position, with a
/// running logsumexp; the backward gives `hidden` its gradient and nothing
/// else.
pub fn packed_token_logprobs(
    hidden: &Tensor,
    weight: &Arc<[PackedMatrix]>,
    targets: &[u32],
) -> Result<Tensor> {
    let (n, h) = hidden.dims2()?;
    let vocab: usize = weight.iter().map(PackedMatrix::rows).sum();
    if weight.iter().any(|p| p.cols() != h) {
        return Err(ModelError::Shape(format!(
            "hidden states of width {h} for a packed output projection of other width"
        )));
    }
    check_targets(targets, n, vocab)?;
    let op = PackedTokenLogprobs {
        weight: weight.clone(),
        targets: targets.to_vec(),
        logsumexp: OnceLock::new(),
    };
    let hidden = hidden.contiguous()?;
    Ok(match hidden.track_op() {
        true => hidden.apply_op1(op)?,
        false => hidden.apply_op1_no_bwd(&op)?,
    })
}

struct PackedTokenLogprobs {
    weight: Arc<[PackedMatrix]>,
    targets: Vec<u32>,
    /// Each row's logsumexp, saved by the forward for the backward.
    logsumexp: OnceLock<Vec<f32>>,
}

/// One thread's share of a pass over the vocabulary: a running max and sum
/// of exponentials per row (the logsumexp, merged block by block) and each
/// row's target logit.
struct RunningLogsumexp {
    max: Vec<f32>,
    sum: Vec<f64>,
    picked: Vec<f32>,
}

impl RunningLogsumexp {
    fn new(n: usize) -> Self {
        Self {
            max: vec![f32::NEG_INFINITY; n],
            sum: vec![0.0; n],
            picked: vec![0.0; n],
        }
    }

    /// Adds `sum` exponentials taken relative to `max` to row `i`.
    fn add(&mut self, i: usize, max: f32, sum: f64) {
        if max == f32::NEG_INFINITY {
            return;
        }
        let top = self.max[i].max(max);
        self.sum[i] =
            self.sum[i] * ((self.max[i] - top) as f64).exp() + sum * ((max - top) as f64).exp();
        self.max[i] = top;
    }

    fn merge(mut self, other: Self) -> Self {
        for i in 0..self.max.len() {
            self.add(i, other.max[i], other.sum[i]);
            // A target lies in exactly one block; elsewhere its slot is 0.
            self.picked[i] += other.picked[i];
        }
        self
    }
}

/// `logits [n, width] = hidden [n, h] · panel`, the panel's rows of W.
fn panel_logits(hidden: &[f32], h: usize, panel: &Panel<'_>, logits: &mut Vec<f32>) {
    let n = hidden.len() / h;
    logits.resize(n * panel.width, 0.0);
    let out = Out {
        data: logits,
        row_stride: panel.width,
    };
    let w = Mat::rows(panel.data, panel.width);
    r3_kernels::gemm::gemm((n, panel.rows, h), out, false, Mat::rows(hidden, h), w, 1);
}

impl CustomOp1 for PackedTokenLogprobs {
    fn name(&self) -> &'static str {
        "packed-token-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let hidden = f32_slice(s, l)?;
        let (n, h) = l.shape().dims2()?;
        let targets = &self.targets;
        // Each thread's running logsumexp, and its scratch for one block's
        // logits.
        let (total, _) = fold_panels(
            &self.weight,
            || (RunningLogsumexp::new(n), Vec::new()),
            |(acc, logits), panel| {
                panel_logits(hidden, h, &panel, logits);
                let block = panel.first..panel.first + panel.rows;
                for (i, row) in logits.chunks(panel.width).enumerate() {
                    let row = &row[..panel.rows];
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
                    acc.add(i, max, sum);
                    let target = targets[i] as usize;
                    if block.contains(&target) {
                        acc.picked[i] = row[target - panel.first];
                    }
                }
            },
            |(a, scratch), (b, _)| (a.merge(b), scratch),
        );
        let lse: Vec<f32> = (0..n)
            .map(|i| total.max[i] + (total.sum[i].ln() as f32))
            .collect();
        let out = (0..n).map(|i| total.picked[i] - lse[i]).collect();
        // A second forward of the same op (it has none) would keep the first.
        let _ = self.logsumexp.set(lse);
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, h) = hidden.dims2()?;
        let Some(lse) = self.logsumexp.get() else {
            candle_core::bail!("packed-token-logprobs: backward before forward");
        };
        let hidden_data = tensor_f32(&hidden.detach())?;
        let grad_out = tensor_f32(&grad_res.detach())?;
        let targets = &self.targets;
        // ∂h_i = g_i (w_{t_i} − Σ_v p_iv w_v), a block of the vocabulary at
        // a time: coeff = g · (onehot(target) − softmax), then coeff · W.
        let (grad, _) = fold_panels(
            &self.weight,
            || (vec![0f32; n * h], Vec::new()),
            |(grad, logits), panel| {
                panel_logits(&hidden_data, h, &panel, logits);
                for (i, row) in logits.chunks_mut(panel.width).enumerate() {
                    let g = grad_out[i];
                    for x in &mut row[..panel.rows] {
                        *x = -g * (*x - lse[i]).exp();
                    }
                    let target = targets[i] as usize;
                    if (panel.first..panel.first + panel.rows).contains(&target) {
                        row[target - panel.first] += g;
                    }
                }
                let coeff = Mat::rows(logits, panel.width);
                let w_rows = Mat {
                    data: panel.data,
                    row_stride: 1,
                    col_stride: panel.width,
                };
                let out = Out {
                    data: grad,
                    row_stride: h,
                };
                r3_kernels::gemm::gemm((n, h, panel.rows), out, true, coeff, w_rows, 1);
            },
            |(a, scratch), (b, _)| (r3_kernels::pool::add_vectors(a, b), scratch),
        );
        Ok(Some(Tensor::from_vec(grad, (n, h), hidden.device())?))
    }
}
