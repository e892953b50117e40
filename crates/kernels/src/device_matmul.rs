//! candle's matmul with operands every backend reads as they are.
//!
//! candle's CPU backend multiplies matrices of any strides; its CUDA
//! backend refuses (`MatMulNonContiguous`) a matrix whose last two strides
//! are neither row- nor column-major. The last position of a batch of
//! prompts, `[b, h]` with rows `t·h` apart, is such a matrix: it passes
//! every CPU test and fails the first batched prefill on a GPU. So every
//! product that is not one of r3's CPU kernels goes through
//! [`device_matmul`], which copies such an operand first, on every device:
//! what the CPU tests run is what a GPU runs. Transposed views (a weight's
//! `.t()`, a narrowed key cache's transpose) pass without a copy.

use candle_core::{Result, Tensor};

/// `a · b` (candle's matmul, batched over leading dimensions), each operand
/// first copied to a contiguous one if cuBLAS could not read it in place.
pub fn device_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let readable = |t: &Tensor| match cublas_reads(t) {
        true => Ok(t.clone()),
        false => t.contiguous(),
    };
    readable(a)?.matmul(&readable(b)?)
}

/// Whether candle's CUDA matmul reads `t` in place: its last two dimensions
/// row-major or column-major (a dimension of one may have any stride), and
/// at most two batch dimensions, one a whole number of the other apart.
/// This is the rule of `gemm_config` in candle-core 0.11's CUDA backend.
fn cublas_reads(t: &Tensor) -> bool {
    let (dims, strides) = (t.dims(), t.stride());
    let n = dims.len();
    if n < 2 {
        return true;
    }
    let (rows, cols) = (dims[n - 2], dims[n - 1]);
    let (row_stride, col_stride) = (strides[n - 2], strides[n - 1]);
    let row_major = (col_stride == 1 || cols == 1) && (row_stride == cols || rows == 1);
    let col_major = (col_stride == rows || cols == 1) && (row_stride == 1 || rows == 1);
    let batch = match (&dims[..n - 2], &strides[..n - 2]) {
        ([], []) | ([_], [_]) => true,
        ([d0, d1], [s0, s1]) => *s0 == s1 * d1 || *d0 == 1 || *d1 == 1,
        _ => false,
    };
    (row_major || col_major) && batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn arange(dims: &[usize]) -> Tensor {
        let count: usize = dims.iter().product();
        Tensor::arange(0f32, count as f32, &Device::Cpu)
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    /// The layouts r3 multiplies: contiguous and transposed matrices, and a
    /// narrowed cache's keys transposed, pass; the last position of a
    /// batch and a column slice do not.
    #[test]
    fn cublas_reads_row_and_column_major_only() {
        let w = arange(&[6, 4]);
        assert!(cublas_reads(&w));
        assert!(cublas_reads(&w.t().unwrap()));
        // Keys [b, heads, capacity, d] narrowed to the filled length, as
        // the product q·kᵀ reads them.
        let keys = arange(&[2, 3, 8, 4]).narrow(2, 0, 5).unwrap();
        assert!(cublas_reads(&keys.t().unwrap()));
        assert!(cublas_reads(&keys));
        // The last of t = 3 positions of a batch of 2: rows 3·4 apart.
        let hidden = arange(&[2, 3, 4]);
        let last = hidden.narrow(1, 2, 1).unwrap().squeeze(1).unwrap();
        assert!(!cublas_reads(&last));
        // ... which is fine for one row.
        let one = hidden.narrow(0, 0, 1).unwrap().narrow(1, 2, 1).unwrap();
        assert!(cublas_reads(&one.squeeze(1).unwrap()));
        // q, k and v side by side; one of them is a column slice.
        assert!(!cublas_reads(&w.narrow(1, 1, 2).unwrap()));
        // More than two batch dimensions are refused in any layout (r3
        // multiplies none).
        assert!(!cublas_reads(&arange(&[2, 2, 2, 2, 2])));
    }

    /// The copy changes no value: the products agree with candle's matmul
    /// on the views as they were.
    #[test]
    fn device_matmul_gives_the_strided_product() {
        let hidden = arange(&[2, 3, 4]);
        let last = hidden.narrow(1, 2, 1).unwrap().squeeze(1).unwrap();
        let w = (arange(&[5, 4]) * 0.1).unwrap();
        let got = device_matmul(&last, &w.t().unwrap()).unwrap();
        let expected = last.matmul(&w.t().unwrap()).unwrap();
        let diff = (got - &expected).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(expected.i(1).unwrap().dims(), &[5]);
    }
}
