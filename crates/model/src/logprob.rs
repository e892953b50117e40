//! log p(target) = h·w_target − logsumexp(h·Wᵀ), for chosen positions only.
//!
//! A candle custom op with its own backward: the vocabulary projection is
//! computed a chunk of rows at a time and recomputed in the backward pass,
//! so peak memory is one `[chunk, vocab]` block instead of the full logits
//! (and the 3–4 copies of them autograd would keep) for every position.
//!
//! Gradients, with p = softmax(h·Wᵀ) and g the incoming gradient per row:
//!   ∂/∂h_i = g_i (w_{t_i} − Σ_v p_iv w_v)     ∂/∂W = Σ_i g_i (onehot(t_i) − p_i) ⊗ h_i

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use r3_kernels::gemm::{Mat, Out};
use r3_kernels::storage::f32_slice;

/// Logits held at once: about 16 MiB of f32.
const CHUNK_ELEMENTS: usize = 1 << 22;

/// Differentiable log-probabilities `[n]` of `targets` under `hidden [n, h]`
/// projected by `weight [vocab, h]`.
pub fn token_logprobs(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let (vocab, _) = weight.dims2()?;
    if targets.len() != n {
        return Err(ModelError::Shape(format!(
            "{} targets for {n} hidden rows",
            targets.len()
        )));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::Tokenizer(format!(
            "target id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let hidden = hidden.contiguous()?;
    let weight = weight.contiguous()?;
    Ok(hidden.apply_op2(
        &weight,
        TokenLogprobs {
            targets: targets.to_vec(),
        },
    )?)
}

struct TokenLogprobs {
    targets: Vec<u32>,
}

/// `dst[m × n] (+)= a[m × k] · b[k × n]`, dst row-major with `n` columns,
/// on all of candle's threads.
fn gemm(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, a: Mat, b: Mat) {
    let out = Out {
        data: dst,
        row_stride: n,
    };
    let threads = candle_core::utils::get_num_threads();
    r3_kernels::gemm::gemm((m, n, k), out, accumulate, a, b, threads);
}

impl TokenLogprobs {
    fn chunk_rows(vocab: usize, n: usize) -> usize {
        (CHUNK_ELEMENTS / vocab.max(1)).clamp(1, n.max(1))
    }

    /// logits[c × vocab] = hidden[rows] · Wᵀ for one chunk of rows.
    fn chunk_logits(hidden: &[f32], weight: &[f32], h: usize, vocab: usize, logits: &mut [f32]) {
        let rows = hidden.len() / h;
        let a = Mat {
            data: hidden,
            row_stride: h,
            col_stride: 1,
        };
        let w_t = Mat {
            data: weight,
            row_stride: 1,
            col_stride: h,
        };
        gemm(rows, vocab, h, logits, false, a, w_t);
    }
}

/// Replaces a row of logits by its softmax and returns its logsumexp.
fn softmax_in_place(row: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|x| *x *= inv);
    max + (sum as f32).ln()
}

fn tensor_f32(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.contiguous()?.flatten_all()?.to_vec1::<f32>()
}

impl CustomOp2 for TokenLogprobs {
    fn name(&self) -> &'static str {
        "token-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let hidden = f32_slice(s1, l1)?;
        let weight = f32_slice(s2, l2)?;
        let (n, h) = l1.shape().dims2()?;
        let (vocab, _) = l2.shape().dims2()?;
        let chunk = Self::chunk_rows(vocab, n);
        let mut out = vec![0f32; n];
        let mut logits = vec![0f32; chunk * vocab];
        for (c, out_chunk) in out.chunks_mut(chunk).enumerate() {
            let rows = out_chunk.len();
            let start = c * chunk;
            let logits = &mut logits[..rows * vocab];
            Self::chunk_logits(
                &hidden[start * h..(start + rows) * h],
                weight,
                h,
                vocab,
                logits,
            );
            out_chunk
                .par_iter_mut()
                .zip(logits.par_chunks_mut(vocab))
                .zip(&self.targets[start..start + rows])
                .for_each(|((o, row), &target)| {
                    let picked = row[target as usize];
                    *o = picked - softmax_in_place(row);
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, h) = hidden.dims2()?;
        let (vocab, _) = weight.dims2()?;
        // A frozen output projection (a LoRA base) needs no gradient: skip
        // the [vocab, h] product per chunk.
        let weight_trains = weight.track_op();
        let hidden_data = tensor_f32(&hidden.detach())?;
        let grad_out = tensor_f32(&grad_res.detach())?;
        let weight = weight.detach().contiguous()?;
        let (storage, layout) = weight.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("token-logprobs runs on the CPU only");
        };
        let weight_data = f32_slice(cpu, layout)?;
        let chunk = Self::chunk_rows(vocab, n);
        let mut grad_hidden = vec![0f32; n * h];
        let mut grad_weight = vec![0f32; if weight_trains { vocab * h } else { 0 }];
        let mut coeff = vec![0f32; chunk * vocab];
        for start in (0..n).step_by(chunk) {
            let rows = chunk.min(n - start);
            let hidden_chunk = &hidden_data[start * h..(start + rows) * h];
            let coeff = &mut coeff[..rows * vocab];
            Self::chunk_logits(hidden_chunk, weight_data, h, vocab, coeff);
            // coeff = g · (onehot(target) − softmax)
            coeff
                .par_chunks_mut(vocab)
                .zip(&self.targets[start..start + rows])
                .zip(&grad_out[start..start + rows])
                .for_each(|((row, &target), &g)| {
                    softmax_in_place(row);
                    row.iter_mut().for_each(|x| *x *= -g);
                    row[target as usize] += g;
                });
            let coeff_mat = Mat {
                data: coeff,
                row_stride: vocab,
                col_stride: 1,
            };
            // ∂h = coeff · W
            let w = Mat {
                data: weight_data,
                row_stride: h,
                col_stride: 1,
            };
            gemm(
                rows,
                h,
                vocab,
                &mut grad_hidden[start * h..(start + rows) * h],
                false,
                coeff_mat,
                w,
            );
            if !weight_trains {
                continue;
            }
            // ∂W += coeffᵀ · h
            let coeff_t = Mat {
                data: coeff,
                row_stride: 1,
                col_stride: vocab,
            };
            let hid = Mat {
                data: hidden_chunk,
                row_stride: h,
                col_stride: 1,
            };
            gemm(vocab, h, rows, &mut grad_weight, true, coeff_t, hid);
        }
        drop(storage);
        let device = hidden.device();
        let grad_weight = match weight_trains {
            true => Some(Tensor::from_vec(grad_weight, (vocab, h), device)?),
            false => None,
        };
        Ok((
            Some(Tensor::from_vec(grad_hidden, (n, h), device)?),
            grad_weight,
        ))
    }
}
