//! `x · W` for the few rows of a decode step, with the weight's columns
//! split across threads.
//!
//! The gemm crate runs a one-row product on one thread, and splits a
//! 32-row one poorly, so a decode step read its weights at one core's
//! memory bandwidth. Here every block of `COLUMN_BLOCK` output columns is an
//! independent single-threaded GEMM, and the blocks are shared out by rayon.
//! No backward: forwards that need gradients use candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::logprob::f32_slice;

/// Products with at most this many rows take the split path; larger ones
/// (prefill) have enough rows for gemm's own parallelism.
const MAX_SPLIT_ROWS: usize = 64;

/// Output columns per task: a multiple of the 16-lane vector width, small
/// enough that a 576-column projection still gives each thread a few
/// blocks to balance (128 measured best at batch 32 of 128, 256, 512).
const COLUMN_BLOCK: usize = 128;

/// `x [m, k] · w [k, n]`: split by columns when `x` has few rows and
/// nothing needs a gradient, candle's matmul otherwise.
pub(crate) fn matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let few_rows = x.dim(0)? <= MAX_SPLIT_ROWS;
    let plain = |t: &Tensor| !t.track_op() && t.device().is_cpu() && t.dtype() == DType::F32;
    if few_rows && plain(x) && plain(w) && w.is_contiguous() {
        return x.contiguous()?.apply_op2_no_bwd(w, &FewRowsMatmul);
    }
    x.matmul(w)
}

struct FewRowsMatmul;

impl CustomOp2 for FewRowsMatmul {
    fn name(&self) -> &'static str {
        "few-rows-matmul"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (k_w, n) = w_layout.shape().dims2()?;
        let (x, w) = (
            f32_slice(x_storage, x_layout)?,
            f32_slice(w_storage, w_layout)?,
        );
        if k != k_w {
            candle_core::bail!("few-rows matmul: [{m}, {k}] · [{k_w}, {n}]")
        }
        let blocks: Vec<Vec<f32>> = (0..n.div_ceil(COLUMN_BLOCK))
            .into_par_iter()
            .map(|block| {
                let first = block * COLUMN_BLOCK;
                let cols = COLUMN_BLOCK.min(n - first);
                let mut dst = vec![0f32; m * cols];
                // SAFETY: x is m × k and w is k × n, both row-major and in
                // bounds for these strides; columns first..first + cols of w
                // are in bounds; dst is m × cols and exclusively borrowed.
                unsafe {
                    gemm::gemm(
                        m,
                        cols,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        cols as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr().add(first),
                        1,
                        n as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
                dst
            })
            .collect();
        let mut out = vec![0f32; m * n];
        for (block, dst) in blocks.iter().enumerate() {
            let first = block * COLUMN_BLOCK;
            let cols = dst.len() / m.max(1);
            for (row, part) in dst.chunks_exact(cols.max(1)).enumerate() {
                out[row * n + first..][..cols].copy_from_slice(part);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}
