//! log p(target) = h·w_target − logsumexp(h·Wᵀ), for chosen positions only.
//!
//! A candle custom op with its own backward: the vocabulary projection is
//! computed a chunk of rows at a time and recomputed in the backward pass,
//! so peak memory is one `[chunk, vocab]` block instead of the full logits
//! (and the 3–4 copies of them autograd would keep) for every position.
//! A frozen packed projection (a LoRA base) goes the other way round, a
//! block of the vocabulary at a time for all positions (see
//! [`packed_token_logprobs`]), so that each block is unpacked once.
//!
//! Gradients, with p = softmax(h·Wᵀ) and g the incoming gradient per row:
//!   ∂/∂h_i = g_i (w_{t_i} − Σ_v p_iv w_v)     ∂/∂W = Σ_i g_i (onehot(t_i) − p_i) ⊗ h_i

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use r3_kernels::device_matmul::device_matmul;
use r3_kernels::gemm::{Mat, Out};
use r3_kernels::storage::f32_slice;

mod packed;
pub use packed::packed_token_logprobs;

/// Logits held at once: about 16 MiB of f32.
const CHUNK_ELEMENTS: usize = 1 << 22;

/// Differentiable log-probabilities `[n]` of `targets` under `hidden [n, h]`
/// projected by `weight [vocab, h]`.
pub fn token_logprobs(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let (vocab, _) = weight.dims2()?;
    check_targets(targets, n, vocab)?;
    if !hidden.device().is_cpu() || hidden.dtype() != DType::F32 {
        return portable_token_logprobs(hidden, weight, targets);
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

/// The same log-probabilities in candle's portable ops, for devices
/// without the CPU op and for bf16: a chunk of rows at a time, as
/// `logits − logsumexp` gathered at the targets, in f32. Autograd keeps each chunk's logits until the
/// backward pass, so memory grows with the rows (bounded by training's
/// micro-batches), where the CPU op holds one chunk.
fn portable_token_logprobs(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, _) = hidden.dims2()?;
    let vocab = weight.dim(0)?;
    let device = hidden.device();
    if n == 0 {
        return Ok(Tensor::zeros(0, DType::F32, device)?);
    }
    let rows = TokenLogprobs::chunk_rows(vocab, n);
    let targets = Tensor::from_slice(targets, (n, 1), device)?;
    // A bf16 decoder over f32 master weights casts the table here.
    let weight_t = weight.to_dtype(hidden.dtype())?.t()?;
    let mut chunks = Vec::with_capacity(n.div_ceil(rows));
    for start in (0..n).step_by(rows) {
        let len = rows.min(n - start);
        let logits =
            device_matmul(&hidden.narrow(0, start, len)?, &weight_t)?.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(1)?.detach();
        let sum = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?;
        let logsumexp = (sum.log()? + max)?;
        let picked = logits.gather(&targets.narrow(0, start, len)?, 1)?;
        chunks.push((picked - logsumexp)?.squeeze(1)?);
    }
    Ok(Tensor::cat(&chunks, 0)?)
}

fn check_targets(targets: &[u32], n: usize, vocab: usize) -> Result<()> {
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};
    use r3_kernels::packed::{Encoding, PackedMatrix};

    fn seeded(shape: (usize, usize), seed: u64) -> Tensor {
        let (r, c) = shape;
        let values: Vec<f32> = (0..r * c)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 250.0) - 2.0)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Through a packed vocabulary of several blocks (the last group
    /// padded), log-probs and the hidden states' gradients are those of
    /// the dense op on the dequantized table, and the targets may sit in
    /// any block.
    #[test]
    fn packed_logprobs_and_gradients_match_the_dense_op() {
        let (vocab, h, n) = (1000, 64, 9);
        let q = QTensor::quantize(&seeded((vocab, h), 1), GgmlDType::Q8_0).unwrap();
        let encoding = Encoding::of_ggml(GgmlDType::Q8_0).unwrap();
        let packed = PackedMatrix::new(encoding, vocab, h, &q.data().unwrap(), None).unwrap();
        let packed: Arc<[PackedMatrix]> = Arc::from(vec![packed]);
        let dense = q.dequantize(&Device::Cpu).unwrap();
        let targets = [0u32, 999, 128, 127, 500, 3, 998, 640, 17];
        let weights = Tensor::new(
            &[0.5f32, -1.0, 2.0, 1.5, -0.7, 0.3, 1.0, -2.0, 0.25],
            &Device::Cpu,
        )
        .unwrap();
        let run = |packed_op: bool| {
            let hidden = Var::from_tensor(&(seeded((n, h), 2) * 0.1).unwrap()).unwrap();
            let lp = match packed_op {
                true => packed_token_logprobs(hidden.as_tensor(), &packed, &targets),
                false => token_logprobs(hidden.as_tensor(), &dense, &targets),
            }
            .unwrap();
            let grads = (&lp * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (lp, grads.get(&hidden).unwrap().clone())
        };
        let ((lp_packed, g_packed), (lp_dense, g_dense)) = (run(true), run(false));
        assert!(max_diff(&lp_packed, &lp_dense) < 1e-4);
        assert!(max_diff(&g_packed, &g_dense) < 1e-4);
        // Not a trivial agreement: the log-probs differ from row to row.
        let lp: Vec<f32> = lp_dense.to_vec1().unwrap();
        assert!(lp.iter().any(|&x| x < -1.0));
    }

    /// The portable path (what runs on a GPU) gives the CPU op's log-probs
    /// and both gradients, over several row chunks with a short last one.
    #[test]
    fn portable_logprobs_and_gradients_match_the_cpu_op() {
        let vocab = 1 << 20; // 4 rows per chunk
        let (h, n) = (2, 10);
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 104_729 % vocab as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| 1.0 - 0.3 * i as f32).collect();
        let weights = Tensor::new(weights, &Device::Cpu).unwrap();
        let run = |portable: bool| {
            let hidden = Var::from_tensor(&seeded((n, h), 3)).unwrap();
            let table = Var::from_tensor(&(seeded((vocab, h), 4) * 0.5).unwrap()).unwrap();
            let (x, w) = (hidden.as_tensor(), table.as_tensor());
            let lp = match portable {
                true => portable_token_logprobs(x, w, &targets),
                false => token_logprobs(x, w, &targets),
            }
            .unwrap();
            let loss = (&lp * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let g = |v: &Var| grads.get(v).unwrap().clone();
            (lp, g(&hidden), g(&table))
        };
        let (cpu, portable) = (run(false), run(true));
        assert!(max_diff(&cpu.0, &portable.0) < 1e-4);
        assert!(max_diff(&cpu.1, &portable.1) < 1e-4);
        assert!(max_diff(&cpu.2, &portable.2) < 1e-5);
        let lp: Vec<f32> = cpu.0.to_vec1().unwrap();
        assert!(lp.iter().all(|&x| x < -1.0), "{lp:?}");
    }
}
