//! The packed products alone, per encoding: weights per second with the
//! matrix in the cache and streamed from memory. Decode at batch 1 reads
//! every weight once a token, so its speed is whichever of two limits binds:
//! the memory's read rate or the kernel's own instructions. The two rates
//! side by side say which: streamed ≈ in cache means the kernel binds, and
//! fewer bytes will not make decoding faster on this machine. With many
//! rows (batched decoding) the products are FLOP-bound, and their GFLOP/s
//! are given against the GEMM peak.

use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use r3_kernels::matmul::Activations;
use r3_kernels::matmul::{packed_matmul_with, takes_bf16, takes_int8};
use r3_kernels::packed::PackedMatrix;
use serde_json::{json, Value};

use crate::machine::{self, fraction, Limits};
use crate::{BenchError, Result};

/// The GGUF types timed, each as r3 packs it.
const TYPES: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
];

/// Inputs of every matrix: Qwen2.5-1.5B's hidden size, a whole number of
/// K-quant super-blocks.
const COLS: usize = 1536;

/// Outputs of the matrix kept in the cache: a few MB at most, under a
/// server CPU's L3.
const CACHED_ROWS: usize = 2048;

/// The products to time: `rows` input rows (1 is batch-1 decoding) for
/// `seconds` per encoding and placement.
pub struct KernelsBench {
    /// Input rows of each product: 1 is decoding at batch 1.
    pub rows: usize,
    /// Seconds each encoding is timed in each placement.
    pub seconds: f64,
    /// Bytes the streamed copies of a matrix add up to at least: far
    /// beyond the L3 to measure memory, a few MB in tests.
    pub streamed_bytes: usize,
    /// Seconds spent measuring the machine's read rate first; 0 skips it.
    pub limit_seconds: f64,
    /// Inputs exact, rounded to 8 bits (where an encoding has an integer
    /// kernel) or, with the weights, to bf16 (past the register rows).
    pub activations: Activations,
}

/// One placement's rate.
struct Rate {
    weights_per_s: f64,
    bytes_per_s: f64,
}

/// Times `packed_matmul_with(x, m, activations)` over `matrices` in turn
/// for `seconds`.
fn rate(
    x: &Tensor,
    matrices: &[Arc<[PackedMatrix]>],
    seconds: f64,
    activations: Activations,
) -> Result<Rate> {
    let (weights, bytes) = matrices.iter().fold((0, 0), |(w, b), m| {
        (w + m[0].rows() * m[0].cols(), b + m[0].bytes())
    });
    for m in matrices {
        packed_matmul_with(x, m, activations)?;
    }
    let (start, mut passes) = (Instant::now(), 0usize);
    while passes == 0 || start.elapsed().as_secs_f64() < seconds {
        for m in matrices {
            packed_matmul_with(x, m, activations)?;
        }
        passes += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Rate {
        weights_per_s: (weights * passes) as f64 / elapsed,
        bytes_per_s: (bytes * passes) as f64 / elapsed,
    })
}

/// A random `[rows, COLS]` matrix quantized to `dtype` and packed as the
/// loader packs a file's tensor.
fn packed(dtype: GgmlDType, rows: usize) -> Result<PackedMatrix> {
    let values = Tensor::randn(0f32, 1.0, (rows, COLS), &Device::Cpu)?;
    let quantized = QTensor::quantize(&values, dtype)?;
    let raw = quantized.data()?;
    PackedMatrix::from_ggml(dtype, rows, COLS, &raw, None)
        .ok_or_else(|| format!("{dtype:?} is not packed"))
        .and_then(|packed| packed)
        .map_err(BenchError::Invalid)
}

/// Times every packed encoding in the cache and streamed, after the
/// machine's read rate; one JSON object with the machine.
pub fn run(bench: &KernelsBench) -> Result<Value> {
    if bench.rows == 0 || bench.seconds <= 0.0 {
        return Err(BenchError::Invalid(
            "need --rows ≥ 1 and --seconds > 0".into(),
        ));
    }
    let limits = Limits::measure(bench.limit_seconds, true);
    let read_rate = limits.as_ref().map(|l| l.read_gb_per_s);
    let gemm_peak = limits.as_ref().map(|l| l.gemm_gflops);
    // Two FLOPs (a multiply and an add) per weight and input row.
    let gflops = |rate: &Rate| 2.0 * bench.rows as f64 * rate.weights_per_s / 1e9;
    let x = Tensor::randn(0f32, 1.0, (bench.rows, COLS), &Device::Cpu)?;
    let mut encodings = Vec::new();
    for dtype in TYPES {
        let cached = packed(dtype, CACHED_ROWS)?;
        let bits = cached.bytes() as f64 * 8.0 / (CACHED_ROWS * COLS) as f64;
        // Copies of one matrix, each its own memory, read one after the other.
        let copies = bench.streamed_bytes.div_ceil(cached.bytes());
        let streamed: Vec<Arc<[PackedMatrix]>> = (0..copies)
            .map(|_| Arc::from(vec![cached.clone()]))
            .collect();
        let cache = [Arc::from(vec![cached.clone()])];
        let in_cache = rate(&x, &cache, bench.seconds, bench.activations)?;
        let from_memory = rate(&x, &streamed, bench.seconds, bench.activations)?;
        // Where both are asked for, an integer kernel takes the product.
        let int8 = bench.activations.int8_decode && takes_int8(cached.encoding(), bench.rows);
        encodings.push(json!({
            "ggml": format!("{dtype:?}"),
            "encoding": format!("{:?}", cached.encoding()),
            "bits_per_weight": bits,
            "int8_inputs": int8,
            "bf16_products": !int8
                && bench.activations.bf16_products
                && takes_bf16(cached.encoding(), bench.rows),
            "in_cache": {
                "bytes": cached.bytes(),
                "weights_per_s": in_cache.weights_per_s,
                "gb_per_s": in_cache.bytes_per_s / 1e9,
                "gflops": gflops(&in_cache),
            },
            "streamed": {
                "bytes": copies * cached.bytes(),
                "weights_per_s": from_memory.weights_per_s,
                "gb_per_s": from_memory.bytes_per_s / 1e9,
                "gflops": gflops(&from_memory),
            },
            "streamed_over_in_cache": from_memory.weights_per_s / in_cache.weights_per_s,
            "streamed_fraction_of_limit": fraction(from_memory.bytes_per_s, 1.0, read_rate),
            "in_cache_fraction_of_gemm_peak": fraction(gflops(&in_cache) * 1e9, 1.0, gemm_peak),
        }));
    }
    Ok(json!({
        "bench": "kernels",
        "machine": machine::describe(limits.as_ref()),
        "threads": candle_core::utils::get_num_threads(),
        "rows": bench.rows,
        "cols": COLS,
        "cached_rows": CACHED_ROWS,
        "seconds": bench.seconds,
        "streamed_bytes": bench.streamed_bytes,
        "formula": "weights_per_s = passes × Σ rows·cols ÷ seconds over packed_matmul([rows, cols] × each matrix); streamed: copies of the matrix adding up to ≥ streamed_bytes, read in turn; streamed_fraction_of_limit = streamed bytes/s ÷ the measured read rate; gflops = 2 × rows × weights_per_s, in_cache_fraction_of_gemm_peak = in-cache gflops ÷ the measured GEMM peak (what binds with many rows)",
        "encodings": encodings,
    }))
}
