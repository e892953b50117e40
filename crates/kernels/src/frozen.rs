//! Products with frozen weights, the base of a LoRA model: the backward
//! pass gives the input its gradient and nothing else. candle's matmul
//! would also compute every weight's gradient (a product as large as the
//! forward, per projection, thrown away) and cannot run packed weights.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::gemm::{gemm, Mat, Out};
use crate::matmul::Activations;
use crate::matmul::{fold_panels, PackedProduct};
use crate::packed::PackedMatrix;
use crate::storage::{f32_slice, with_f32_elements};

/// `x [m, k] · w [k, n]` with `w` frozen.
pub fn dense(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenDense {
        w: w.contiguous()?.detach(),
    })
}

/// `x [m, k] · [W₁ᵀ | W₂ᵀ | …]` with the packed `W_i [n_i, k]` frozen,
/// forward and backward taking `activations` (bf16 products, where the
/// CPU has them, for mixed-precision training).
pub fn packed(
    x: &Tensor,
    parts: &Arc<[PackedMatrix]>,
    activations: Activations,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenPacked {
        parts: parts.clone(),
        activations,
    })
}

struct FrozenDense {
    w: Tensor,
}

impl CustomOp1 for FrozenDense {
    fn name(&self) -> &'static str {
        "frozen-dense-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        let (k_w, n) = self.w.dims2()?;
        if k != k_w {
            candle_core::bail!("frozen product: [{m}, {k}] · [{k_w}, {n}]")
        }
        let x = f32_slice(storage, layout)?;
        let mut out = vec![0f32; m * n];
        with_f32_elements(&self.w, |w| {
            let threads = rayon::current_num_threads();
            gemm(
                (m, n, k),
                Out {
                    data: &mut out,
                    row_stride: n,
                },
                false,
                Mat::rows(x, k),
                Mat::rows(w, n),
                threads,
            )
        })?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_y.matmul(&self.w.t()?)?))
    }
}

struct FrozenPacked {
    parts: Arc<[PackedMatrix]>,
    activations: Activations,
}

impl CustomOp1 for FrozenPacked {
    fn name(&self) -> &'static str {
        "frozen-packed-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        PackedProduct {
            parts: &self.parts,
            activations: self.activations,
        }
        .cpu_fwd(storage, layout)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad_x = grad_y
            .contiguous()?
            .apply_op1_no_bwd(&PackedTransposedProduct {
                parts: &self.parts,
                bf16: self.activations.bf16_products && crate::bf16::available(),
            })?;
        Ok(Some(grad_x))
    }
}

/// `g [m, Σ n_i] · [W₁; W₂; …]`: the input gradient through packed
/// weights. Each task unpacks a block of 16-row groups into its thread's
/// panel and adds that block's share into a per-thread sum, in bf16
/// products where `bf16` is set.
struct PackedTransposedProduct<'a> {
    parts: &'a [PackedMatrix],
    bf16: bool,
}

impl CustomOp1 for PackedTransposedProduct<'_> {
    fn name(&self) -> &'static str {
        "packed-transposed-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n) = layout.shape().dims2()?;
        let k = self.parts.first().map_or(0, PackedMatrix::cols);
        let rows: usize = self.parts.iter().map(PackedMatrix::rows).sum();
        if rows != n || self.parts.iter().any(|p| p.cols() != k) {
            candle_core::bail!(
                "packed transposed product: [{m}, {n}] · packed weights of {rows} rows"
            )
        }
        let g = f32_slice(storage, layout)?;
        let out = fold_panels(
            self.parts,
            || vec![0f32; m * k],
            |sum, panel| {
                if self.bf16 {
                    return crate::bf16::with_scratch(|rows, columns| {
                        rows.fill(&g[panel.first..], m, panel.rows, n);
                        columns.fill_across(panel.data, k, panel.width, panel.rows);
                        // SAFETY: bf16 products are available; `sum` is
                        // m × k, this task's own.
                        unsafe { crate::bf16::product(rows, columns, k, sum.as_mut_ptr(), k, true) }
                    });
                }
                // The panel is [k, width]: read transposed, its first
                // `rows` columns are this block's rows of W.
                let w_rows = Mat {
                    data: panel.data,
                    row_stride: 1,
                    col_stride: panel.width,
                };
                let g_cols = Mat::rows(&g[panel.first..], n);
                let out = Out {
                    data: sum,
                    row_stride: k,
                };
                gemm((m, k, panel.rows), out, true, g_cols, w_rows, 1);
            },
            crate::pool::add_vectors,
        );
        Ok((CpuStorage::F32(out), Shape::from((m, k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::Encoding;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let (a, b): (Vec<f32>, Vec<f32>) = (
            a.flatten_all().unwrap().to_vec1().unwrap(),
            b.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "{i}: {x} vs {y}");
        }
    }

    fn seeded(shape: (usize, usize), seed: u64) -> Tensor {
        let (r, c) = shape;
        let values: Vec<f32> = (0..r * c)
            .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// Through packed weights (two parts, one with a padded last group), the
    /// input's gradient is the one through the dequantized weights, and the
    /// forward is the packed product's.
    #[test]
    fn packed_backward_gives_the_input_gradient_of_the_dequantized_product() {
        // 7 rows take the register kernels forward, 70 the unpacked panels.
        for m in [7, 70] {
            packed_case(m, Activations::EXACT, 1e-5);
        }
    }

    /// With bf16 products the panels' forward and input gradient (70 rows)
    /// are the dequantized product's to bf16 rounding, and, where the CPU
    /// has the instruction, not the f32 ones bit for bit: the kernel ran.
    #[test]
    fn bf16_products_give_the_product_and_its_gradient_to_bf16_rounding() {
        let exact = packed_case(70, Activations::EXACT, 1e-5);
        let bf16_products = Activations {
            bf16_products: true,
            ..Activations::EXACT
        };
        let bf16 = packed_case(70, bf16_products, 2e-2);
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let differ = (0..2).all(|i| values(&exact[i]) != values(&bf16[i]));
        assert_eq!(differ, crate::bf16::available());
    }

    /// The packed product of `m` rows and its input gradient, checked
    /// against the dequantized weights' to `tol`.
    fn packed_case(m: usize, activations: Activations, tol: f32) -> [Tensor; 2] {
        let k = 64;
        let mut parts = Vec::new();
        let mut dense = Vec::new();
        for (rows, seed) in [(40, 1), (24, 2)] {
            let q = QTensor::quantize(&seeded((rows, k), seed), GgmlDType::Q8_0).unwrap();
            let raw = q.data().unwrap();
            parts.push(
                PackedMatrix::new(
                    Encoding::of_ggml(GgmlDType::Q8_0).unwrap(),
                    rows,
                    k,
                    &raw,
                    None,
                )
                .unwrap(),
            );
            dense.push(q.dequantize(&Device::Cpu).unwrap());
        }
        let parts: Arc<[PackedMatrix]> = parts.into();
        let w_t = Tensor::cat(&dense, 0).unwrap().t().unwrap();
        let x = Var::from_tensor(&seeded((m, k), 3)).unwrap();
        let weights = seeded((m, 64), 4 + m as u64);
        let y = packed(x.as_tensor(), &parts, activations).unwrap();
        let reference = x.as_tensor().matmul(&w_t).unwrap();
        close(&y, &reference, tol);
        let grad = |y: &Tensor| {
            (y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (ours, theirs) = (grad(&y), grad(&reference));
        let gradient = ours.get(&x).unwrap().clone();
        close(&gradient, theirs.get(&x).unwrap(), tol);
        [y, gradient]
    }

    /// A frozen dense weight gets no gradient; the input gets candle's.
    #[test]
    fn dense_backward_gives_the_input_gradient_and_none_to_the_weight() {
        let x = Var::from_tensor(&seeded((70, 48), 5)).unwrap();
        let w = seeded((48, 33), 6);
        let weights = seeded((70, 33), 7);
        let y = crate::matmul::matmul(x.as_tensor(), &w).unwrap();
        let reference = x.as_tensor().matmul(&w).unwrap();
        close(&y, &reference, 1e-5);
        let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
        let (ours, theirs) = (
            loss(&y).backward().unwrap(),
            loss(&reference).backward().unwrap(),
        );
        close(ours.get(&x).unwrap(), theirs.get(&x).unwrap(), 1e-5);
        assert!(ours.get(&w).is_none());
    }
}
