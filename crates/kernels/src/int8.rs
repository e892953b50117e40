//! Decoding with inputs rounded to 8 bits, as llama.cpp decodes: each
//! block of 32 inputs of a row becomes 32 signed bytes under one f32
//! scale, and the register kernel sums `q_x · q_w` in integers, 32
//! products an instruction, where the exact kernel converts every weight
//! to f32 first. On an AVX2 Zen 3 the exact 4- and 6-bit kernels are bound
//! by their instructions, not by memory (docs/performance.md, "Where
//! batch-1 decoding is bound"); the integer ones are not.
//!
//! The products change by the inputs' rounding (a relative error of about
//! 1/254 a value), so this is for sampling only, never for scoring or
//! training: a model made for generation opts in, and the importance
//! weights of training measure and correct the sampler–trainer gap as
//! they do for an external engine's.

use crate::level::{with_vector_features, CpuLevel};
use crate::packed::{lane_offset, Encoding, PackedMatrix, BLOCK, GROUP};

/// Whether products with weights in `encoding` have an integer kernel:
/// the 4- and 5-bit nibble layouts (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K),
/// Q6_K and Q8_0, which make up the Q4_0, Q4_1, Q8_0 and Q4_K_M models r3
/// fetches.
pub fn has_int8_kernel(encoding: Encoding) -> bool {
    !matches!(encoding, Encoding::F16 | Encoding::Bf16)
}

/// Groups of four inputs in a block.
pub(crate) const GROUPS: usize = BLOCK / 4;

/// `R` rows of inputs rounded to 8 bits, interleaved for the integer
/// kernels as [`crate::packed::interleave`] interleaves f32 rows.
pub struct Int8Rows {
    /// Block `b`, group `g`, row `r` at `(b·8 + g)·R + r`: inputs
    /// `32b + 4g ..+ 4` as signed bytes, little-endian in an `i32` (the
    /// kernel broadcasts it against four inputs of 8 output rows at once).
    pub(crate) groups: Vec<i32>,
    /// Block `b`, row `r` at `b·R + r`: the scale `d`, the inputs being
    /// about `d·q`.
    pub(crate) scales: Vec<f32>,
    /// Block `b`, row `r`: `Σ x` of the exact inputs, for offsets (`o·Σ x`).
    pub(crate) sums: Vec<f32>,
    /// Block `b`, row `r`, half `h` at `(b·R + r)·2 + h`: `Σ q` over inputs
    /// `16h ..+ 16`, for Q6_K's `q − 32` under a scale per half.
    pub(crate) half_sums: Vec<i32>,
    rows: usize,
}

impl Int8Rows {
    /// `x`, `rows` rows of `cols` inputs (a multiple of 32), rounded: each
    /// block's largest magnitude becomes ±127.
    pub fn new(x: &[f32], rows: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let mut out = Self {
            groups: vec![0; blocks * GROUPS * rows],
            scales: vec![0.0; blocks * rows],
            sums: vec![0.0; blocks * rows],
            half_sums: vec![0; blocks * rows * 2],
            rows,
        };
        with_vector_features!(out.round(x, cols));
        out
    }

    /// `x`, `rows` rows of `cols` inputs, rounded in passes of `height`
    /// rows, each its own [`Int8Rows`]: a kernel's rows then lie together,
    /// block after block (one matrix of all the rows put a 16-row tile's
    /// rows of a block 8 strides of `4·rows` bytes apart: prefill read them
    /// at 100 against bf16's 143 tokens/s). Several passes are rounded in
    /// parallel; one (every batch-1 decode product) on this thread.
    pub(crate) fn passes(x: &[f32], rows: usize, cols: usize, height: usize) -> Vec<Self> {
        use rayon::prelude::*;
        let height = height.max(1);
        let pass = |p: usize| {
            let r0 = p * height;
            let rows = height.min(rows - r0);
            Self::new(&x[r0 * cols..(r0 + rows) * cols], rows, cols)
        };
        let passes = rows.div_ceil(height);
        if passes > 1 {
            (0..passes).into_par_iter().map(pass).collect()
        } else {
            (0..passes).map(pass).collect()
        }
    }

    /// Fills the rows from `x`, in loops written for the compiler to
    /// vectorize: the largest magnitude and the sum in eight running lanes
    /// (the sum taken input by input was one chain of dependent additions:
    /// this function's share of a 1.5B prefill 5.4–5.5% → 4.7–4.9%), and
    /// the rounding to nearest with ties to even, one vector instruction
    /// (ties away from zero, `f32::round`, is a library call per input,
    /// which took a third of this function's time in batch-1 decoding).
    #[inline(always)]
    fn round(&mut self, x: &[f32], cols: usize) {
        let rows = self.rows;
        for (r, row) in x.chunks_exact(cols).take(rows).enumerate() {
            for (b, block) in row.chunks_exact(BLOCK).enumerate() {
                let (mut maxima, mut lanes) = ([0f32; 8], [0f32; 8]);
                for chunk in block.chunks_exact(8) {
                    for ((m, s), v) in maxima.iter_mut().zip(&mut lanes).zip(chunk) {
                        *m = m.max(v.abs());
                        *s += v;
                    }
                }
                let largest = maxima.iter().fold(0f32, |m, v| m.max(*v));
                let d = largest / 127.0;
                let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
                // A plain loop: `array::from_fn` is not inlined into this
                // function's vector features.
                let mut q = [0i8; BLOCK];
                for (q, v) in q.iter_mut().zip(block) {
                    *q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
                }
                for g in 0..GROUPS {
                    let bytes = [0, 1, 2, 3].map(|i| q[4 * g + i] as u8);
                    self.groups[(b * GROUPS + g) * rows + r] = i32::from_le_bytes(bytes);
                }
                self.scales[b * rows + r] = d;
                self.sums[b * rows + r] = lanes.iter().sum();
                for h in 0..2 {
                    let half = &q[h * BLOCK / 2..(h + 1) * BLOCK / 2];
                    self.half_sums[(b * rows + r) * 2 + h] = half.iter().map(|&v| v as i32).sum();
                }
            }
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input `k` of row `r`, as rounded.
    fn quant(&self, r: usize, k: usize) -> i32 {
        let group = self.groups[(k / 4) * self.rows + r];
        group.to_le_bytes()[k % 4] as i8 as i32
    }
}

/// `dots[r][c] = Σ_k x[r][k] · W[16·group + c, k]` with `x` rounded
/// ([`Int8Rows`]) and the weights unpacked in registers, at this CPU's
/// level; `None` where the encoding has no integer kernel. Each row is
/// summed in the same order whatever `R` is.
pub(crate) fn dot_group<const R: usize>(
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> Option<[[f32; GROUP]; R]> {
    dot_group_at(CpuLevel::current(), matrix, group, x)
}

/// [`dot_group`] at `level` (at most what the CPU runs): tests compare
/// every level the machine has. AVX-512 CPUs with VNNI take its kernel,
/// those without it the AVX2 one.
pub(crate) fn dot_group_at<const R: usize>(
    level: CpuLevel,
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> Option<[[f32; GROUP]; R]> {
    assert!(
        x.rows == R && x.sums.len() * BLOCK == R * matrix.cols(),
        "{R} rounded rows of {} inputs",
        matrix.cols()
    );
    assert!(
        level <= CpuLevel::detected(),
        "{level:?} is beyond this CPU"
    );
    if !has_int8_kernel(matrix.encoding()) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::register_int8::{avx2, vnni};
        if vnni_at(level) {
            // SAFETY: the CPU supports AVX-512 VNNI, VL and BW besides
            // AVX2, FMA and F16C (checked above and in `vnni_at`), `x`
            // holds R rows of `cols` inputs and the encoding has an
            // integer kernel.
            return Some(unsafe { vnni::dot_group(matrix, group, x) });
        }
        if level >= CpuLevel::Avx2 {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above),
            // `x` holds R rows of `cols` inputs and the encoding has an
            // integer kernel.
            return Some(unsafe { avx2::dot_group(matrix, group, x) });
        }
    }
    dot_group_portable(matrix, group, x)
}

/// Whether the integer kernel at `level` is the VNNI one: AVX-512 on a CPU
/// with VNNI and the VL and BW extensions its 256-bit `vpdpbusd` needs
/// (Ice Lake and later Xeons, Zen 4 and later).
fn vnni_at(level: CpuLevel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level >= CpuLevel::Avx512
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// [`dot_group`] in plain Rust: the reference the vector kernel is
/// tested against, bit for bit (the integer sums are exact and the f32
/// steps after them the same, in the same order). `None` where the
/// encoding has no integer kernel.
pub(crate) fn dot_group_portable<const R: usize>(
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> Option<[[f32; GROUP]; R]> {
    if !has_int8_kernel(matrix.encoding()) {
        return None;
    }
    let mut dots = [[0f32; GROUP]; R];
    for (b, (head, record)) in matrix.records(group).enumerate() {
        let w = BlockWeights::new(matrix.encoding(), head, record);
        for (r, dot) in dots.iter_mut().enumerate() {
            let (d_x, sum) = (x.scales[b * R + r], x.sums[b * R + r]);
            let half_sum = |h: usize| x.half_sums[(b * R + r) * 2 + h];
            for (c, dot) in dot.iter_mut().enumerate() {
                let integer = |inputs: std::ops::Range<usize>| -> i32 {
                    inputs
                        .map(|i| x.quant(r, b * BLOCK + i) * w.quants[c][i])
                        .sum()
                };
                match matrix.encoding() {
                    Encoding::K6 => {
                        for h in 0..2 {
                            let half = h * BLOCK / 2..(h + 1) * BLOCK / 2;
                            let sum = (integer(half) - 32 * half_sum(h)) as f32;
                            *dot = (w.scale[h][c] * d_x).mul_add(sum, *dot);
                        }
                    }
                    Encoding::Q8_0 => {
                        let sum_q = integer(0..BLOCK) as f32;
                        *dot = (w.scale[0][c] * d_x).mul_add(sum_q, *dot);
                    }
                    _ => {
                        let sum_q = integer(0..BLOCK) as f32;
                        *dot = (w.scale[0][c] * d_x).mul_add(sum_q, *dot);
                        *dot = w.offset[c].mul_add(sum, *dot);
                    }
                }
            }
        }
    }
    Some(dots)
}

/// One record's 16 blocks as the integer kernels see them: quants
/// (unsigned, but Q8_0's), a scale (two for Q6_K's halves) and an offset
/// per row.
struct BlockWeights {
    quants: [[i32; BLOCK]; GROUP],
    scale: [[f32; GROUP]; 2],
    offset: [f32; GROUP],
}

impl BlockWeights {
    fn new(encoding: Encoding, head: &[u8], record: &[u8]) -> Self {
        let f16 = |at: usize, c: usize| {
            half::f16::from_le_bytes([record[at + 2 * c], record[at + 2 * c + 1]]).to_f32()
        };
        let head_f32 = |at: usize, c: usize| {
            let i = at + 4 * c;
            f32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]])
        };
        let mut w = Self {
            quants: [[0; BLOCK]; GROUP],
            scale: [[0.0; GROUP]; 2],
            offset: [0.0; GROUP],
        };
        let nibbles = |w: &mut Self, at: usize| {
            for j in 0..BLOCK / 2 {
                for c in 0..GROUP {
                    let q = if encoding.by_lanes() {
                        record[at + lane_offset(j, c)]
                    } else {
                        record[at + j * GROUP + c]
                    };
                    w.quants[c][j] = (q & 0x0F) as i32;
                    w.quants[c][j + BLOCK / 2] = (q >> 4) as i32;
                }
            }
        };
        match encoding {
            Encoding::Q4_0
            | Encoding::Q4_1
            | Encoding::K4
            | Encoding::Q5_0
            | Encoding::Q5_1
            | Encoding::K5 => {
                // The fifth bits, if any, a word a row, then the nibbles.
                nibbles(&mut w, encoding.nibbles_start());
                let payload = encoding.payload_start();
                for c in 0..GROUP {
                    if encoding.has_fifth_bits() {
                        let fifth = [0, 1, 2, 3].map(|e| record[payload + lane_offset(e, c)]);
                        let fifth = u32::from_le_bytes(fifth);
                        for (i, q) in w.quants[c].iter_mut().enumerate() {
                            *q |= (((fifth >> i) & 1) << 4) as i32;
                        }
                    }
                    (w.scale[0][c], w.offset[c]) = match encoding {
                        Encoding::Q4_0 | Encoding::Q5_0 => {
                            let d = f16(0, c);
                            (d, d * -encoding.centre())
                        }
                        Encoding::Q4_1 | Encoding::Q5_1 => (f16(0, c), f16(2 * GROUP, c)),
                        _ => (
                            head_f32(0, c) * record[c] as f32,
                            head_f32(4 * GROUP, c) * record[GROUP + c] as f32,
                        ),
                    };
                }
            }
            Encoding::Q8_0 => {
                for j in 0..BLOCK {
                    for c in 0..GROUP {
                        w.quants[c][j] = record[encoding.input_bytes(j) + c] as i8 as i32;
                    }
                }
                for c in 0..GROUP {
                    w.scale[0][c] = f16(0, c);
                }
            }
            Encoding::K6 => {
                nibbles(&mut w, encoding.payload_start());
                for j in 0..BLOCK / 2 {
                    for c in 0..GROUP {
                        let h = record[Encoding::k6_pairs(j) + c];
                        let shift = 2 * (j / 8);
                        w.quants[c][j] |= (((h >> shift) & 3) << 4) as i32;
                        w.quants[c][j + BLOCK / 2] |= (((h >> (shift + 4)) & 3) << 4) as i32;
                    }
                }
                for c in 0..GROUP {
                    w.scale[0][c] = head_f32(0, c) * record[c] as i8 as f32;
                    w.scale[1][c] = head_f32(0, c) * record[GROUP + c] as i8 as f32;
                }
            }
            _ => unreachable!("has_int8_kernel is checked first"),
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{random, random_values};
    use candle_core::quantized::{GgmlDType, QTensor};

    fn packed(dtype: GgmlDType, rows: usize, cols: usize) -> (PackedMatrix, Vec<f32>) {
        let w = random(&[rows, cols], 5, 1.0);
        let q = QTensor::quantize(&w, dtype).unwrap();
        let packed = PackedMatrix::from_ggml(dtype, rows, cols, &q.data().unwrap(), None)
            .unwrap()
            .unwrap();
        let dequantized = q.dequantize(&candle_core::Device::Cpu).unwrap();
        (
            packed,
            dequantized.flatten_all().unwrap().to_vec1().unwrap(),
        )
    }

    /// The rounded inputs are within half a step of the exact ones, the
    /// largest of a block is ±127, and the sums are the exact inputs'.
    #[test]
    fn rounding_keeps_each_input_within_half_a_step() {
        let cols = 96;
        let x: Vec<f32> = random_values(&[3, cols], 9, 2.0);
        let q = Int8Rows::new(&x, 3, cols);
        for r in 0..3 {
            for b in 0..cols / BLOCK {
                let d = q.scales[b * 3 + r];
                let block = &x[r * cols + b * BLOCK..][..BLOCK];
                let mut largest = 0;
                for (i, &v) in block.iter().enumerate() {
                    let quant = q.quant(r, b * BLOCK + i);
                    assert!((v - d * quant as f32).abs() <= d * 0.5 * (1.0 + 1e-5));
                    largest = largest.max(quant.abs());
                }
                assert_eq!(largest, 127);
                let (sum, magnitude) = block.iter().fold((0f64, 0f64), |(s, m), &v| {
                    (s + v as f64, m + v.abs() as f64)
                });
                assert!((q.sums[b * 3 + r] as f64 - sum).abs() <= magnitude * 1e-6);
                let halves: i32 = (0..2).map(|h| q.half_sums[(b * 3 + r) * 2 + h]).sum();
                let all: i32 = (0..BLOCK).map(|i| q.quant(r, b * BLOCK + i)).sum();
                assert_eq!(halves, all);
            }
        }
    }

    /// The integer product is the product of the dequantized weights with
    /// the rounded inputs (to f32 rounding), for every encoding with an
    /// integer kernel, and each vector level the machine runs gives the
    /// reference's bits, at one, two and three rows (the AVX2 kernels
    /// compile the nibble encodings apart up to two).
    #[test]
    fn integer_products_are_the_rounded_inputs_times_the_weights() {
        rounded_inputs_times_the_weights::<1>();
        rounded_inputs_times_the_weights::<2>();
        rounded_inputs_times_the_weights::<3>();
    }

    fn rounded_inputs_times_the_weights<const R: usize>() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let (rows, cols) = (32, 512);
            let (matrix, w) = packed(dtype, rows, cols);
            let x: Vec<f32> = random_values(&[R, cols], 4, 1.0);
            let q = Int8Rows::new(&x, R, cols);
            for group in 0..matrix.groups() {
                let reference = dot_group_portable::<R>(&matrix, group, &q).unwrap();
                for (r, dots) in reference.iter().enumerate() {
                    for (c, &got) in dots.iter().enumerate() {
                        let row = group * GROUP + c;
                        let (mut want, mut scale) = (0f64, 0f64);
                        for k in 0..cols {
                            let b = k / BLOCK;
                            let input = q.scales[b * R + r] as f64 * q.quant(r, k) as f64;
                            // The offsets meet the exact inputs' sums.
                            let offset_part = match dtype {
                                GgmlDType::Q6K | GgmlDType::Q8_0 => 0.0,
                                _ => {
                                    let offset = matrix_offset(&matrix, group, b, c);
                                    offset as f64 * (x[r * cols + k] as f64 - input)
                                }
                            };
                            want += input * w[row * cols + k] as f64 + offset_part;
                            scale += (x[r * cols + k] * w[row * cols + k]).abs() as f64;
                        }
                        let got = got as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * scale.max(1.0),
                            "{dtype:?} row {r} column {c}: {got} against {want}"
                        );
                    }
                }
                for level in CpuLevel::available() {
                    if let Some(dots) = dot_group_at::<R>(level, &matrix, group, &q) {
                        assert_eq!(
                            dots.map(|r| r.map(f32::to_bits)),
                            reference.map(|r| r.map(f32::to_bits)),
                            "{dtype:?} at {level:?}"
                        );
                    }
                }
            }
        }
    }

    /// The largest sums a block can reach come out of each vector level as
    /// out of the reference, whose sums are 32-bit: the vector kernels'
    /// 16-bit pair sums must not overflow. Every input is ±127 and 15
    /// weights in 16 are at their largest quant, so the pair sums of odd
    /// pairs (no weight of input 0 or 16 in them) reach the bounds: 30480
    /// in the 4-bit kernel, 32004 in Q6_K's, 31496 in the 5-bit ones' four
    /// results between widenings.
    #[test]
    fn the_largest_block_sums_do_not_overflow() {
        const R: usize = 2;
        let (rows, cols) = (16, 512);
        // One weight in 16 at -1, the others just under 1: quant 15 of 4
        // bits and 31 of 5 (the minimum at -1, or Q5_0's scale set by it
        // as -16), 63 of Q6_K's 6 (its scale set by -1 as -32).
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| if i % 16 == 0 { -1.0 } else { 31.0 / 32.0 })
            .collect();
        let x: Vec<f32> = (0..R * cols)
            .map(|i| if i < cols { 1.0 } else { -1.0 })
            .collect();
        let q = Int8Rows::new(&x, R, cols);
        assert!((0..cols).all(|k| q.quant(0, k) == 127 && q.quant(1, k) == -127));
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let tensor =
                candle_core::Tensor::from_vec(w.clone(), (rows, cols), &candle_core::Device::Cpu)
                    .unwrap();
            let quantized = QTensor::quantize(&tensor, dtype).unwrap();
            let matrix =
                PackedMatrix::from_ggml(dtype, rows, cols, &quantized.data().unwrap(), None)
                    .unwrap()
                    .unwrap();
            let largest = match dtype {
                GgmlDType::Q6K => 63,
                GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q5K => 31,
                _ => 15,
            };
            for (head, record) in matrix.records(0) {
                let quants = BlockWeights::new(matrix.encoding(), head, record).quants;
                let at_largest = quants.iter().flatten().filter(|&&q| q == largest);
                assert_eq!(at_largest.count(), GROUP * (BLOCK - 2), "{dtype:?}");
            }
            let reference = dot_group_portable::<R>(&matrix, 0, &q).unwrap();
            let want = (cols / 16) as f32 * (15.0 * 31.0 / 32.0 - 1.0);
            for (r, sign) in [(0, 1.0), (1, -1.0)] {
                for &got in &reference[r] {
                    // Within the quants' rounding: Q5_0 keeps 31/32 as 15/16.
                    assert!((got - sign * want).abs() < 0.05 * want, "{dtype:?}: {got}");
                }
            }
            for level in CpuLevel::available() {
                if let Some(dots) = dot_group_at::<R>(level, &matrix, 0, &q) {
                    assert_eq!(
                        dots.map(|r| r.map(f32::to_bits)),
                        reference.map(|r| r.map(f32::to_bits)),
                        "{dtype:?} at {level:?}"
                    );
                }
            }
        }
    }

    /// The offset of block `b` of row `16·group + c`, as the reference reads it.
    fn matrix_offset(matrix: &PackedMatrix, group: usize, b: usize, c: usize) -> f32 {
        let (head, record) = matrix.records(group).nth(b).unwrap();
        BlockWeights::new(matrix.encoding(), head, record).offset[c]
    }

    /// Against the exact product, the rounding costs what 8 bits a block
    /// should: well under 1% of the products' scale.
    #[test]
    fn rounding_costs_under_a_percent_of_the_product() {
        const R: usize = 2;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
            let (rows, cols) = (16, 1536);
            let (matrix, w) = packed(dtype, rows, cols);
            let x: Vec<f32> = random_values(&[R, cols], 8, 1.0);
            let dots = dot_group_portable::<R>(&matrix, 0, &Int8Rows::new(&x, R, cols)).unwrap();
            for r in 0..R {
                for c in 0..rows {
                    let exact: f32 = (0..cols).map(|k| x[r * cols + k] * w[c * cols + k]).sum();
                    let scale: f32 = (0..cols)
                        .map(|k| (x[r * cols + k] * w[c * cols + k]).abs())
                        .sum();
                    let error = (dots[r][c] - exact).abs() / scale;
                    assert!(error < 0.005, "{dtype:?}: {error}");
                }
            }
        }
    }
}
