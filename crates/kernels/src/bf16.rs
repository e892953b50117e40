//! Many-row products in bf16 arithmetic with f32 sums, for prefill and
//! for training on a frozen packed base (its forward and its input
//! gradient): on CPUs with AVX512_BF16 (Zen 4, Cooper Lake, Sapphire
//! Rapids and later)
//! `vdpbf16ps` multiplies two pairs of bf16 values and adds both products
//! into an f32 lane, 64 multiply-adds an instruction where an f32 FMA does
//! 32: measured 231 against 115 GFLOP/s on one Zen 4 core.
//!
//! Both operands are rounded to bf16 (8 significant bits, to nearest
//! even); a product of two bf16 values is exact in f32 and the sums stay
//! f32, as in torch's CPU autocast that TRL's `bf16 = true` turns on.
//! Where the CPU lacks the instruction, products stay f32 ([`available`]).
//! gemm has no bf16 dot-product kernel (its f16 path widens to f32), so
//! this one is r3's own.

use std::cell::RefCell;

/// Rows of a product's left operand as bf16 pairs: inputs `2p, 2p + 1`
/// of row `r` in the `u32` at `r · pairs + p`, the first in the low half
/// (the order `vdpbf16ps` pairs them with the weights), an odd last input
/// paired with zero.
pub(crate) struct Bf16Rows {
    data: Vec<u32>,
    rows: usize,
    pairs: usize,
}

/// Whether products in bf16 can run here: the kernels' level is AVX-512
/// (`R3_CPU` may lower it) and the CPU has AVX512_BF16.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::level::CpuLevel;
        CpuLevel::current() >= CpuLevel::Avx512 && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bf16, to nearest even: the rounding the vector
/// conversions do (for tails, padding and tests).
fn round(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

fn pair(first: f32, second: f32) -> u32 {
    round(first) | round(second) << 16
}

impl Bf16Rows {
    /// No rows: a buffer for [`Bf16Rows::fill`].
    pub(crate) const fn empty() -> Self {
        Self {
            data: Vec::new(),
            rows: 0,
            pairs: 0,
        }
    }

    /// Columns `0..cols` of `rows` rows of `x`, `stride` apart.
    pub(crate) fn new(x: &[f32], rows: usize, cols: usize, stride: usize) -> Self {
        let mut this = Self::empty();
        this.fill(x, rows, cols, stride);
        this
    }

    /// [`Bf16Rows::new`] into this buffer.
    pub(crate) fn fill(&mut self, x: &[f32], rows: usize, cols: usize, stride: usize) {
        let pairs = cols.div_ceil(2);
        // Every pair is written below: no need to clear first.
        self.data.resize(rows * pairs, 0);
        for (r, out) in self.data.chunks_exact_mut(pairs.max(1)).enumerate() {
            let row = &x[r * stride..r * stride + cols];
            let done = vector::round_pairs(row, out);
            for (p, slot) in out.iter_mut().enumerate().skip(done) {
                let second = row.get(2 * p + 1).copied().unwrap_or(0.0);
                *slot = pair(row[2 * p], second);
            }
        }
        (self.rows, self.pairs) = (rows, pairs);
    }
}

/// Weights for [`product`]: `pairs` rows of `stride` columns of bf16
/// pairs, `stride` a multiple of 32 (two vectors of pairs), the columns
/// past the real ones padding whose sums are never stored.
pub(crate) struct Bf16Columns {
    data: Vec<u32>,
    pairs: usize,
    stride: usize,
}

impl Bf16Columns {
    /// No columns: a buffer for the fills.
    pub(crate) const fn empty() -> Self {
        Self {
            data: Vec::new(),
            pairs: 0,
            stride: 0,
        }
    }

    /// Room for `pairs` rows of `cols` columns, rounded up. Nothing is
    /// cleared: the fills write every real column, and the padding's sums
    /// are never stored (the tiles' stores are masked to `cols`).
    fn reset(&mut self, pairs: usize, cols: usize) {
        (self.pairs, self.stride) = (pairs, cols.next_multiple_of(32));
        self.data.resize(pairs * self.stride, 0);
    }

    /// The first `cols` columns of `w [k, width]` (row-major), paired down
    /// the columns: column `j`'s entries `2p, 2p + 1` at `p · stride + j`.
    /// The layout of an unpacked panel in the forward product.
    pub(crate) fn fill_down(&mut self, w: &[f32], k: usize, width: usize, cols: usize) {
        self.reset(k.div_ceil(2), cols);
        for (p, out) in self.data.chunks_exact_mut(self.stride).enumerate() {
            let first = &w[2 * p * width..][..cols];
            let second = (2 * p + 1 < k).then(|| &w[(2 * p + 1) * width..][..cols]);
            let done = vector::round_interleaved(first, second, out);
            for (j, slot) in out.iter_mut().enumerate().take(cols).skip(done) {
                *slot = pair(first[j], second.map_or(0.0, |s| s[j]));
            }
        }
    }

    /// `wᵀ` for the first `inner` columns of `w [cols, width]`: column
    /// `j` of the result is row `j` of `w`, paired along it, entries `2p,
    /// 2p + 1` at `p · stride + j`. The layout of an unpacked panel in the
    /// input gradient, where W's rows are the inner dimension.
    pub(crate) fn fill_across(&mut self, w: &[f32], cols: usize, width: usize, inner: usize) {
        self.reset(inner.div_ceil(2), cols);
        let (blocked_cols, blocked_pairs) =
            vector::transpose_pairs(w, width, cols, inner, &mut self.data, self.stride);
        for j in 0..cols {
            let source = &w[j * width..][..inner];
            let from = if j < blocked_cols { blocked_pairs } else { 0 };
            for p in from..self.pairs {
                let second = source.get(2 * p + 1).copied().unwrap_or(0.0);
                self.data[p * self.stride + j] = pair(source[2 * p], second);
            }
        }
    }
}

thread_local! {
    /// Each thread's operands, reused from task to task: a panel's pairs
    /// take megabytes, which fresh allocations would fault in every time.
    static SCRATCH: RefCell<(Bf16Rows, Bf16Columns)> =
        const { RefCell::new((Bf16Rows::empty(), Bf16Columns::empty())) };
}

/// Hands `f` this thread's reusable operands.
pub(crate) fn with_scratch<T>(f: impl FnOnce(&mut Bf16Rows, &mut Bf16Columns) -> T) -> T {
    SCRATCH.with_borrow_mut(|(rows, columns)| f(rows, columns))
}

/// `out[r][j] (+)= Σ_p a[r][p] · b[p][j]` for every row of `a` and the
/// first `cols` columns of `b` (`accumulate` adds to `out`), in bf16 pairs
/// with f32 sums.
///
/// # Safety
/// [`available`] must hold, and `out` must have `a.rows` rows of
/// `out_stride ≥ cols` writable values, written by no one else meanwhile.
pub(crate) unsafe fn product(
    a: &Bf16Rows,
    b: &Bf16Columns,
    cols: usize,
    out: *mut f32,
    out_stride: usize,
    accumulate: bool,
) {
    assert!(
        a.pairs == b.pairs && cols <= b.stride && cols <= out_stride,
        "bf16 product: {} pairs a row against {} of weights, {cols} columns of {}",
        a.pairs,
        b.pairs,
        b.stride
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX512_BF16 and `out` holds the rows and columns
    // written (this function's contract); the operands' extents are
    // checked above.
    unsafe {
        vector::product(a, b, cols, out, out_stride, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (a, b, cols, out, out_stride, accumulate);
        unreachable!("bf16 products run only where `available` holds")
    }
}

#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::*;

    use super::{available, Bf16Columns, Bf16Rows};

    /// Rows a tile holds: 12 rows × 2 vectors of sums, 2 of weights and a
    /// broadcast input fill 27 of the 32 registers.
    const TILE_ROWS: usize = 12;
    /// Pairs a pass over the inner dimension takes: a tile's inputs (12 KB)
    /// stay in L1 and a block of a 128-column panel (128 KB) in L2.
    const PASS_PAIRS: usize = 256;

    /// Rounds `row` to pairs in `out` as far as whole vectors reach (32
    /// inputs each) where the CPU converts them; returns the pairs done.
    pub(super) fn round_pairs(row: &[f32], out: &mut [u32]) -> usize {
        if !available() {
            return 0;
        }
        let chunks = (row.len() / 32).min(out.len() / 16);
        // SAFETY: AVX512_BF16 is present; each chunk reads 32 inputs and
        // writes 16 pairs within the slices (`chunks` bounds both).
        unsafe { round_pairs_avx512(row, out, chunks) };
        chunks * 16
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn round_pairs_avx512(row: &[f32], out: &mut [u32], chunks: usize) {
        for c in 0..chunks {
            // SAFETY: within `row` and `out` (the caller's `chunks`).
            unsafe {
                let src = row.as_ptr().add(32 * c);
                let low = _mm512_loadu_ps(src);
                let high = _mm512_loadu_ps(src.add(16));
                // Inputs 0-15 into the low 16 halves, in order: pair p is
                // inputs 2p, 2p + 1.
                let halves: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * c).cast(), halves);
            }
        }
    }

    /// [`super::Bf16Columns::fill_across`] for whole blocks of 16 rows of
    /// `w` and 16 pairs (32 of its columns), rounded 32 inputs at a time
    /// and transposed in registers (a store per value, 64 stride-apart
    /// rows at a time, was 6% of a training step); returns the rows and
    /// pairs done, the rest left to the caller.
    pub(super) fn transpose_pairs(
        w: &[f32],
        width: usize,
        cols: usize,
        inner: usize,
        out: &mut [u32],
        stride: usize,
    ) -> (usize, usize) {
        if !available() {
            return (0, 0);
        }
        let (rows, pairs) = (cols / 16 * 16, inner / 32 * 16);
        if rows == 0 || pairs == 0 {
            return (0, 0);
        }
        assert!(
            (rows - 1) * width + 2 * pairs <= w.len()
                && (pairs - 1) * stride + rows <= out.len()
                && rows <= stride,
            "bf16 transpose: {rows} rows of {width} and {pairs} pairs out of bounds"
        );
        // SAFETY: AVX512_BF16 is present; each block reads 32 values of 16
        // rows `width` apart and writes 16 values of 16 rows `stride`
        // apart, within the bounds asserted above.
        unsafe { transpose_pairs_avx512(w, width, rows, pairs, out, stride) };
        (rows, pairs)
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn transpose_pairs_avx512(
        w: &[f32],
        width: usize,
        rows: usize,
        pairs: usize,
        out: &mut [u32],
        stride: usize,
    ) {
        for j0 in (0..rows).step_by(16) {
            for q0 in (0..pairs).step_by(16) {
                // SAFETY: within `w` and `out` (the caller's assertion).
                unsafe {
                    // Row i of the block: pairs q0.. of row j0 + i of `w`.
                    let r: [__m512i; 16] = std::array::from_fn(|i| {
                        let src = w.as_ptr().add((j0 + i) * width + 2 * q0);
                        let high = _mm512_loadu_ps(src.add(16));
                        std::mem::transmute(_mm512_cvtne2ps_pbh(high, _mm512_loadu_ps(src)))
                    });
                    // Within each 128-bit lane `l`, `u[4i + m]` gets pair
                    // 4l + m of rows 4i ..+ 4.
                    let t: [__m512i; 16] = std::array::from_fn(|i| match i % 2 {
                        0 => _mm512_unpacklo_epi32(r[i], r[i + 1]),
                        _ => _mm512_unpackhi_epi32(r[i - 1], r[i]),
                    });
                    let u: [__m512i; 16] = std::array::from_fn(|i| {
                        let (base, m) = (i / 4 * 4, i % 4);
                        let (a, b) = (t[base + m / 2], t[base + m / 2 + 2]);
                        match m % 2 {
                            0 => _mm512_unpacklo_epi64(a, b),
                            _ => _mm512_unpackhi_epi64(a, b),
                        }
                    });
                    // Then the 4 × 4 lanes of `u[m], u[4 + m], u[8 + m],
                    // u[12 + m]` transposed: pair 4l + m of all 16 rows.
                    for m in 0..4 {
                        let (a0, a1, a2, a3) = (u[m], u[4 + m], u[8 + m], u[12 + m]);
                        let v0 = _mm512_shuffle_i32x4::<0x44>(a0, a1);
                        let v1 = _mm512_shuffle_i32x4::<0xEE>(a0, a1);
                        let v2 = _mm512_shuffle_i32x4::<0x44>(a2, a3);
                        let v3 = _mm512_shuffle_i32x4::<0xEE>(a2, a3);
                        let lanes = [
                            _mm512_shuffle_i32x4::<0x88>(v0, v2),
                            _mm512_shuffle_i32x4::<0xDD>(v0, v2),
                            _mm512_shuffle_i32x4::<0x88>(v1, v3),
                            _mm512_shuffle_i32x4::<0xDD>(v1, v3),
                        ];
                        for (l, lane) in lanes.into_iter().enumerate() {
                            let q = q0 + 4 * l + m;
                            _mm512_storeu_si512(out.as_mut_ptr().add(q * stride + j0).cast(), lane);
                        }
                    }
                }
            }
        }
    }

    /// Pairs `first[j]` (low) with `second[j]` (high, zero when absent)
    /// into `out[j]`, 16 columns a vector; returns the columns done.
    pub(super) fn round_interleaved(
        first: &[f32],
        second: Option<&[f32]>,
        out: &mut [u32],
    ) -> usize {
        if !available() {
            return 0;
        }
        let chunks = first.len().min(out.len()) / 16;
        // SAFETY: AVX512_BF16 is present; each chunk reads 16 values of
        // `first` and `second` (as long as `first`) and writes 16 of `out`.
        unsafe { round_interleaved_avx512(first, second, out, chunks) };
        chunks * 16
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn round_interleaved_avx512(
        first: &[f32],
        second: Option<&[f32]>,
        out: &mut [u32],
        chunks: usize,
    ) {
        let widen = |v: __m512| -> __m512i {
            // SAFETY: the CPU has AVX512_BF16 (this function's feature).
            unsafe {
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                    _mm512_cvtneps_pbh(v),
                ))
            }
        };
        for c in 0..chunks {
            // SAFETY: within the slices (the caller's `chunks`).
            unsafe {
                let low = widen(_mm512_loadu_ps(first.as_ptr().add(16 * c)));
                let high = match second {
                    Some(s) => {
                        _mm512_slli_epi32::<16>(widen(_mm512_loadu_ps(s.as_ptr().add(16 * c))))
                    }
                    None => _mm512_setzero_si512(),
                };
                _mm512_storeu_si512(
                    out.as_mut_ptr().add(16 * c).cast(),
                    _mm512_or_si512(low, high),
                );
            }
        }
    }

    /// See [`super::product`]: tiles of [`TILE_ROWS`] rows × 32 columns,
    /// [`PASS_PAIRS`] pairs a pass.
    ///
    /// # Safety
    /// As [`super::product`], whose checks have passed.
    pub(super) unsafe fn product(
        a: &Bf16Rows,
        b: &Bf16Columns,
        cols: usize,
        out: *mut f32,
        out_stride: usize,
        accumulate: bool,
    ) {
        for p0 in (0..a.pairs).step_by(PASS_PAIRS) {
            let pairs = PASS_PAIRS.min(a.pairs - p0);
            let add = accumulate || p0 > 0;
            for r0 in (0..a.rows).step_by(TILE_ROWS) {
                let rows = TILE_ROWS.min(a.rows - r0);
                for j0 in (0..cols).step_by(32) {
                    let tile = Tile {
                        a: &a.data[r0 * a.pairs + p0..],
                        a_stride: a.pairs,
                        b: &b.data[p0 * b.stride + j0..],
                        b_stride: b.stride,
                        pairs,
                        cols: 32.min(cols - j0),
                        add,
                    };
                    // SAFETY: the caller's contract, for rows r0.. and
                    // columns j0.. of `out`; the tile's slices hold `rows`
                    // rows of `pairs` pairs and `pairs` rows of 32.
                    unsafe {
                        let out = out.add(r0 * out_stride + j0);
                        macro_rules! heights {
                            ($($r:literal)*) => {
                                match rows {
                                    $($r => tile.run::<$r>(out, out_stride),)*
                                    _ => unreachable!("a tile has 1 to {TILE_ROWS} rows"),
                                }
                            };
                        }
                        heights!(1 2 3 4 5 6 7 8 9 10 11 12);
                    }
                }
            }
        }
    }

    /// One tile's operands: `R` rows of `pairs` pairs (`a_stride` apart),
    /// `pairs` rows of 32 weight columns (`b_stride` apart), the first
    /// `cols` of them written.
    struct Tile<'a> {
        a: &'a [u32],
        a_stride: usize,
        b: &'a [u32],
        b_stride: usize,
        pairs: usize,
        cols: usize,
        add: bool,
    }

    impl Tile<'_> {
        /// # Safety
        /// The CPU has AVX512_BF16, `a` holds `R` rows and `out` `R` rows
        /// of `out_stride ≥ cols` values.
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn run<const R: usize>(&self, out: *mut f32, out_stride: usize) {
            debug_assert!(self.a.len() > (R - 1) * self.a_stride + self.pairs - 1);
            debug_assert!(self.b.len() >= (self.pairs - 1) * self.b_stride + 32);
            // SAFETY: the reads stay within `a` and `b` (asserted in
            // debug builds, guaranteed by `product`'s slicing), the writes
            // within `out` (this function's contract).
            unsafe {
                let mut sums = [[_mm512_setzero_ps(); 2]; R];
                let (a, b) = (self.a.as_ptr(), self.b.as_ptr());
                for p in 0..self.pairs {
                    let w = b.add(p * self.b_stride);
                    let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.cast()));
                    let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(w.add(16).cast()));
                    for (r, sum) in sums.iter_mut().enumerate() {
                        let x = _mm512_set1_epi32(*a.add(r * self.a_stride + p) as i32);
                        let x: __m512bh = std::mem::transmute(x);
                        sum[0] = _mm512_dpbf16_ps(sum[0], x, w0);
                        sum[1] = _mm512_dpbf16_ps(sum[1], x, w1);
                    }
                }
                for (r, sum) in sums.iter().enumerate() {
                    for (h, &s) in sum.iter().enumerate() {
                        let valid = self.cols.saturating_sub(16 * h).min(16);
                        let mask: __mmask16 = ((1u32 << valid) - 1) as u16;
                        let dst = out.add(r * out_stride + 16 * h);
                        let s = match self.add {
                            true => _mm512_add_ps(s, _mm512_maskz_loadu_ps(mask, dst)),
                            false => s,
                        };
                        _mm512_mask_storeu_ps(dst, mask, s);
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod vector {
    pub(super) fn round_pairs(_: &[f32], _: &mut [u32]) -> usize {
        0
    }

    pub(super) fn round_interleaved(_: &[f32], _: Option<&[f32]>, _: &mut [u32]) -> usize {
        0
    }

    pub(super) fn transpose_pairs(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: &mut [u32],
        _: usize,
    ) -> (usize, usize) {
        (0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::random_values;

    fn bf16(x: f32) -> f64 {
        f64::from(half::bf16::from_f32(x).to_f32())
    }

    /// `Σ bf16(a)·bf16(b)` in f64, and `Σ |a·b|` for the tolerance.
    fn reference(a: &[f32], b: impl Iterator<Item = f32>) -> (f64, f64) {
        a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&x, y)| {
            let p = bf16(x) * bf16(y);
            (s + p, m + p.abs())
        })
    }

    /// Every tile height and a partial last tile of columns, odd inner
    /// sizes (a pair with zero), more than one pass over the inner
    /// dimension, with and without accumulation: the products of the
    /// bf16-rounded operands, to f32 summation.
    #[test]
    fn products_are_the_sums_of_rounded_operands_in_both_layouts() {
        if !available() {
            eprintln!("skipped: this CPU (or R3_CPU) has no AVX512_BF16");
            return;
        }
        let (mut down, mut across) = (Bf16Columns::empty(), Bf16Columns::empty());
        for (m, k, cols, width) in [
            (13, 64, 48, 48),
            (1, 7, 5, 16),
            (25, 601, 70, 80),
            (12, 1030, 32, 32),
        ] {
            let x = random_values(&[m, k], 1 + m as u64, 1.0);
            let w = random_values(&[k, width], 2 + k as u64, 1.0);
            let prior = random_values(&[m, cols], 3, 1.0);
            let rows = Bf16Rows::new(&x, m, k, k);
            // The same weights in both layouts: `w [k, width]` paired down
            // its columns, and its transpose `[cols, k]` paired across.
            let wt: Vec<f32> = (0..cols)
                .flat_map(|j| (0..k).map(move |i| (i, j)))
                .map(|(i, j)| w[i * width + j])
                .collect();
            // The buffers are reused from case to case, as a thread's are
            // from task to task: stale values must never leak through.
            down.fill_down(&w, k, width, cols);
            across.fill_across(&wt, cols, k, k);
            for columns in [&down, &across] {
                for accumulate in [false, true] {
                    let mut out = prior.clone();
                    // SAFETY: `available` holds; `out` is m × cols.
                    unsafe { product(&rows, columns, cols, out.as_mut_ptr(), cols, accumulate) };
                    for r in 0..m {
                        for j in 0..cols {
                            let (sum, scale) =
                                reference(&x[r * k..][..k], (0..k).map(|i| w[i * width + j]));
                            let expected = sum
                                + if accumulate {
                                    f64::from(prior[r * cols + j])
                                } else {
                                    0.0
                                };
                            let got = f64::from(out[r * cols + j]);
                            assert!(
                                (got - expected).abs() <= 1e-5 * (scale + 1.0),
                                "[{m}, {k}] · [{k}, {cols}] at ({r}, {j}), accumulate {accumulate}: {got} vs {expected}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Rounding to nearest even, as the vector conversion does: the pairs
    /// of a row past 32 inputs (vector) and of its tail (scalar) agree.
    #[test]
    fn rows_round_to_nearest_even_in_vectors_and_tails() {
        let x = random_values(&[1, 70], 9, 3.0);
        let rows = Bf16Rows::new(&x, 1, 70, 70);
        for (p, &v) in rows.data.iter().enumerate() {
            assert_eq!(v & 0xFFFF, round(x[2 * p]), "input {}", 2 * p);
            assert_eq!(v >> 16, round(x[2 * p + 1]), "input {}", 2 * p + 1);
        }
    }
}
