//! Many-row products with inputs rounded to 8 bits ([`crate::int8`]), for
//! sampling: the rollouts' prefill and their widest decode steps. The
//! register kernels unpack a group's weights again for every pass of four
//! rows, and at 32 rows spend most of their instructions on that; here a
//! block of weights is unpacked once into eight 512-bit vectors and
//! multiplied into tiles of up to [`TILE_ROWS`] rows, one `vpdpbusd` for
//! 64 products where `vdpbf16ps` does 32. Each output is the register
//! kernels' to the bit (the integer sums are exact, and the f32 steps
//! after them the same, in the same order), so a row's tokens do not
//! depend on how many rows sample beside it.
//!
//! It needs AVX-512 VNNI and VBMI (Ice Lake and later Xeons, Zen 4 and
//! later): `vpermb` transposes Q6_K's and Q8_0's input-major records into
//! lanes in one instruction. Without them the register kernels and the
//! f32 (or bf16) panels keep these products.

use crate::packed::Encoding;

/// The most rows one tile multiplies per unpacked block: 16 f32 sums and
/// the block's eight weight vectors fill 24 of the 32 vector registers.
pub(crate) const TILE_ROWS: usize = 16;

/// Whether this CPU runs the tile kernel: the kernels' level is AVX-512
/// (`R3_CPU` may lower it) with VNNI, VBMI, BW and VL.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::level::CpuLevel;
        CpuLevel::current() >= CpuLevel::Avx512
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether weights in `encoding` have a tile kernel: every encoding with
/// an integer kernel (the 4- and 5-bit nibble layouts, Q6_K and Q8_0).
pub fn has_tile_kernel(encoding: Encoding) -> bool {
    crate::int8::has_int8_kernel(encoding)
}

#[cfg(target_arch = "x86_64")]
pub(crate) use vector::product;

#[cfg(target_arch = "x86_64")]
mod vector {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::TILE_ROWS;
    use crate::int8::{Int8Rows, GROUPS};
    use crate::packed::{Encoding, PackedMatrix, GROUP};
    use crate::register_avx512::fifth_bits_at_4;

    /// Bytes of rounded inputs a chunk of tiles keeps in cache while
    /// every group of a task's columns passes over it.
    const CHUNK_BYTES: usize = 192 * 1024;

    /// `out[r][16·g + c] = Σ_k x[r][k] · W[16·g + c][k]` for every row of
    /// the rounded `tiles` ([`Int8Rows::passes`] of [`TILE_ROWS`]: row `r` is row
    /// `r % 16` of tile `r / 16`) and every group `g` in `groups` (the
    /// columns of a group beyond the matrix's rows are not written).
    ///
    /// # Safety
    /// [`super::available`] must hold, the encoding must have a tile
    /// kernel ([`super::has_tile_kernel`]), every tile but the last must
    /// hold [`TILE_ROWS`] rounded rows of `matrix.cols()` inputs and the
    /// last 1 to [`TILE_ROWS`], and `out` must be valid for writes of all
    /// those rows, `out_stride` apart, each `16·groups.end` wide (or up
    /// to the matrix's last row), written by no one else meanwhile.
    pub(crate) unsafe fn product(
        matrix: &PackedMatrix,
        groups: Range<usize>,
        tiles: &[Int8Rows],
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: the caller upholds this function's contract.
        unsafe { product_avx512(matrix, groups, tiles, out, out_stride) }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
    unsafe fn product_avx512(
        matrix: &PackedMatrix,
        groups: Range<usize>,
        tiles: &[Int8Rows],
        out: *mut f32,
        out_stride: usize,
    ) {
        let per_chunk = (CHUNK_BYTES / matrix.cols().max(1) / TILE_ROWS).max(1);
        for (c, chunk) in tiles.chunks(per_chunk).enumerate() {
            for group in groups.clone() {
                let valid = GROUP.min(matrix.rows() - group * GROUP);
                for (t, x) in chunk.iter().enumerate() {
                    let r0 = (c * per_chunk + t) * TILE_ROWS;
                    let tile = Tile {
                        matrix,
                        group,
                        x,
                        // SAFETY: row r0, column 16·group are within `out`
                        // (the contract).
                        out: unsafe { out.add(r0 * out_stride + group * GROUP) },
                        out_stride,
                        valid,
                    };
                    macro_rules! heights {
                        ($($r:literal)*) => {
                            match x.rows() {
                                // SAFETY: as this function.
                                $($r => unsafe { tile.run::<$r>() },)*
                                _ => unreachable!("a tile has 1 to {TILE_ROWS} rows"),
                            }
                        };
                    }
                    heights!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
                }
            }
        }
    }

    /// A tile's `R` rows times one group's 16 columns.
    struct Tile<'a> {
        matrix: &'a PackedMatrix,
        group: usize,
        x: &'a Int8Rows,
        /// The tile's first row's output at the group's first column.
        out: *mut f32,
        out_stride: usize,
        /// The group's columns within the matrix.
        valid: usize,
    }

    /// The output column each 32-bit lane of a packed nibble record holds
    /// (columns 0-3 and 8-11 in its first 32 bytes, 4-7 and 12-15 in its
    /// second): its own inverse.
    #[inline(always)]
    unsafe fn lane_columns() -> __m512i {
        // SAFETY: only called from functions with AVX-512.
        unsafe { _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15) }
    }

    impl Tile<'_> {
        /// # Safety
        /// As [`product`], for this tile's rows and group.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
        unsafe fn run<const R: usize>(&self) {
            // SAFETY: as above.
            unsafe {
                let acc = match self.matrix.encoding() {
                    Encoding::K6 => self.six_bits::<R>(),
                    Encoding::Q8_0 => self.eight_bits::<R>(),
                    _ => self.nibbles::<R>(),
                };
                let mask: __mmask16 = ((1u32 << self.valid) - 1) as __mmask16;
                for (row, acc) in acc.iter().enumerate() {
                    let columns = _mm512_permutexvar_ps(lane_columns(), *acc);
                    _mm512_mask_storeu_ps(self.out.add(row * self.out_stride), mask, columns);
                }
            }
        }

        /// Where the tile's first row's rounded inputs of block `b` lie,
        /// group by group (`i32` group `g` of row `r` at `[g] + r`), and
        /// its index into the per-block scalars: kept in registers, so that
        /// each row's reads are a constant offset.
        #[inline(always)]
        fn block_inputs(&self, b: usize) -> ([*const i32; GROUPS], usize) {
            let m = self.x.rows();
            let first = self.x.groups.as_ptr().wrapping_add(b * GROUPS * m);
            (std::array::from_fn(|g| first.wrapping_add(g * m)), b * m)
        }

        /// Q4_0, Q4_1, Q4_K and their 5-bit forms, as
        /// [`crate::register_int8`]'s `nibbles`: `d·Σ q_x·q + o·Σ x` a
        /// block.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
        #[inline(never)]
        unsafe fn nibbles<const R: usize>(&self) -> [__m512; R] {
            // SAFETY: as [`Tile::run`]; every read is within a record or
            // its head, or within `x`.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); R];
                let low = _mm512_set1_epi8(0x0F);
                for (b, (head, r)) in self.matrix.records(self.group).enumerate() {
                    let p = r.as_ptr();
                    let encoding = self.matrix.encoding();
                    let (d, o) = match encoding {
                        Encoding::Q4_0 | Encoding::Q5_0 => {
                            let d = halves(p);
                            (d, _mm512_mul_ps(d, _mm512_set1_ps(-encoding.centre())))
                        }
                        Encoding::Q4_1 | Encoding::Q5_1 => (halves(p), halves(p.add(2 * GROUP))),
                        _ => {
                            let head = head.as_ptr().cast::<f32>();
                            (
                                scaled(p, head, false),
                                scaled(p.add(GROUP), head.add(GROUP), false),
                            )
                        }
                    };
                    let quants = encoding.nibbles_start();
                    let (d, o) = (
                        _mm512_permutexvar_ps(lane_columns(), d),
                        _mm512_permutexvar_ps(lane_columns(), o),
                    );
                    // The 5-bit encodings' fifth bits: a word a column,
                    // in the nibbles' lane order.
                    let fifth = encoding
                        .has_fifth_bits()
                        .then(|| _mm512_loadu_si512(p.add(encoding.payload_start()).cast()));
                    // Inputs 4j ..+ 4 (low nibbles) and 16 + 4j ..+ 4 (high).
                    let mut lower = [_mm512_setzero_si512(); 4];
                    let mut upper = [_mm512_setzero_si512(); 4];
                    for j in 0..4 {
                        let q = _mm512_loadu_si512(p.add(quants + 4 * j * GROUP).cast());
                        lower[j] = _mm512_and_si512(q, low);
                        upper[j] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low);
                        if let Some(fifth) = fifth {
                            let i = 4 * j as i32;
                            lower[j] = _mm512_or_si512(lower[j], fifth_bits_at_4(fifth, i));
                            upper[j] = _mm512_or_si512(upper[j], fifth_bits_at_4(fifth, 16 + i));
                        }
                    }
                    let (inputs, first) = self.block_inputs(b);
                    let (scales, sums_x) = (
                        self.x.scales.as_ptr().add(first),
                        self.x.sums.as_ptr().add(first),
                    );
                    for (row, acc) in acc.iter_mut().enumerate() {
                        let mut sums = _mm512_setzero_si512();
                        for j in 0..4 {
                            let (lo, hi) = (*inputs[j].add(row), *inputs[GROUPS / 2 + j].add(row));
                            sums = _mm512_dpbusd_epi32(sums, lower[j], _mm512_set1_epi32(lo));
                            sums = _mm512_dpbusd_epi32(sums, upper[j], _mm512_set1_epi32(hi));
                        }
                        let d_x = _mm512_set1_ps(*scales.add(row));
                        let sum = _mm512_set1_ps(*sums_x.add(row));
                        let s = _mm512_mul_ps(d, d_x);
                        *acc = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(sums), *acc);
                        *acc = _mm512_fmadd_ps(o, sum, *acc);
                    }
                }
                acc
            }
        }

        /// Q6_K (K6), as [`crate::register_int8`]'s `six_bits`:
        /// `s_h·(Σ q_x·q − 32·Σ q_x)` for each half `h` of a block.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
        #[inline(never)]
        unsafe fn six_bits<const R: usize>(&self) -> [__m512; R] {
            // SAFETY: as [`Tile::run`]; every read is within a record or
            // its head, or within `x`.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); R];
                for (b, (head, r)) in self.matrix.records(self.group).enumerate() {
                    let p = r.as_ptr();
                    let head = head.as_ptr().cast::<f32>();
                    let scales = [scaled(p, head, true), scaled(p.add(GROUP), head, true)]
                        .map(|s| _mm512_permutexvar_ps(lane_columns(), s));
                    // [j][half]: inputs 4j ..+ 4 of each half.
                    let mut quants = [[_mm512_setzero_si512(); 2]; 4];
                    for (j, q) in quants.iter_mut().enumerate() {
                        *q = six_bit_quants(p, 4 * j);
                    }
                    let (inputs, first) = self.block_inputs(b);
                    let (scales_x, half_sums) = (
                        self.x.scales.as_ptr().add(first),
                        self.x.half_sums.as_ptr().add(2 * first),
                    );
                    for (row, acc) in acc.iter_mut().enumerate() {
                        let d_x = _mm512_set1_ps(*scales_x.add(row));
                        for (half, scale) in scales.iter().enumerate() {
                            // The sums start from −32·Σ q_x (the integers
                            // are exact, so where they start is free).
                            let minus = -32 * *half_sums.add(2 * row + half);
                            let mut sums = _mm512_set1_epi32(minus);
                            for (j, w) in quants.iter().enumerate() {
                                let q = *inputs[half * GROUPS / 2 + j].add(row);
                                sums = _mm512_dpbusd_epi32(sums, w[half], _mm512_set1_epi32(q));
                            }
                            let s = _mm512_mul_ps(*scale, d_x);
                            *acc = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(sums), *acc);
                        }
                    }
                }
                acc
            }
        }

        /// Q8_0, as [`crate::register_int8`]'s `bytes`: `d·Σ q_x·q` a
        /// block. `vpdpbusd` wants its first factor unsigned: each row's
        /// inputs are moved up by 128 (`q_x + 128`, their sign bits
        /// flipped, one scalar XOR a broadcast) and its sums start from
        /// `−128·Σ q`, made once a block for all the rows; the integers
        /// stay exact.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")]
        #[inline(never)]
        unsafe fn eight_bits<const R: usize>(&self) -> [__m512; R] {
            // SAFETY: as [`Tile::run`]; every read is within a record or
            // within `x`.
            unsafe {
                let mut acc = [_mm512_setzero_ps(); R];
                let by_128 = _mm512_set1_epi8(-128);
                for (b, (_, r)) in self.matrix.records(self.group).enumerate() {
                    let p = r.as_ptr();
                    let d = _mm512_permutexvar_ps(lane_columns(), halves(p));
                    // Inputs 4j ..+ 4, and 128·Σ q.
                    let mut quants = [_mm512_setzero_si512(); GROUPS];
                    let mut moved = _mm512_setzero_si512();
                    for (j, q) in quants.iter_mut().enumerate() {
                        *q = transpose(p.add(Encoding::Q8_0.input_bytes(4 * j)));
                        moved = _mm512_dpbusd_epi32(moved, by_128, *q);
                    }
                    let start = _mm512_sub_epi32(_mm512_setzero_si512(), moved);
                    let (inputs, first) = self.block_inputs(b);
                    let scales_x = self.x.scales.as_ptr().add(first);
                    for (row, acc) in acc.iter_mut().enumerate() {
                        let mut sums = start;
                        for (j, q) in quants.iter().enumerate() {
                            let up = *inputs[j].add(row) ^ 0x8080_8080_u32 as i32;
                            sums = _mm512_dpbusd_epi32(sums, _mm512_set1_epi32(up), *q);
                        }
                        let s = _mm512_mul_ps(d, _mm512_set1_ps(*scales_x.add(row)));
                        *acc = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(sums), *acc);
                    }
                }
                acc
            }
        }
    }

    /// The six-bit quants of inputs `j ..+ 4` of a Q6_K record at `p` (its
    /// first half) and of inputs `j + 16 ..+ 4` (its second), one output
    /// column a lane in [`lane_columns`]' order: a nibble and a bit pair
    /// each, as `register_int8`'s `six_bit_quants` reads them.
    #[inline(always)]
    unsafe fn six_bit_quants(p: *const u8, j: usize) -> [__m512i; 2] {
        // SAFETY: only called from the tile kernels, whose CPU has
        // AVX-512 BW and VBMI, on a Q6_K record.
        unsafe {
            let (low, pair) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
            let q = transpose(p.add(Encoding::K6.input_bytes(j)));
            let h = transpose(p.add(Encoding::k6_pairs(j)));
            // Input j's bit pair at bits 2·(j / 8), input j + 16's four
            // higher: both moved to bits 4..5 (16-bit shifts, whose spill
            // across bytes the mask drops).
            let (first, second) = if j < 8 {
                (_mm512_slli_epi16(h, 4), h)
            } else {
                (_mm512_slli_epi16(h, 2), _mm512_srli_epi16(h, 2))
            };
            let six = |nibble: __m512i, bits: __m512i| {
                _mm512_or_si512(_mm512_and_si512(nibble, low), _mm512_and_si512(bits, pair))
            };
            [six(q, first), six(_mm512_srli_epi16(q, 4), second)]
        }
    }

    /// Four quant rows of 16 bytes at `p` (inputs `j ..+ 4`, one byte per
    /// output column, as Q6_K is packed) as 32-bit lanes of four bytes,
    /// one output column each in [`lane_columns`]' order: one `vpermb`.
    #[inline(always)]
    unsafe fn transpose(p: *const u8) -> __m512i {
        // SAFETY: only called from the tile kernels, whose CPU has AVX-512
        // VBMI, on 64 bytes of a record.
        const INDEX: [u8; 64] = {
            let columns = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];
            let mut index = [0u8; 64];
            let mut at = 0;
            while at < 64 {
                index[at] = (16 * (at % 4) + columns[at / 4]) as u8;
                at += 1;
            }
            index
        };
        unsafe {
            let index = _mm512_loadu_si512(INDEX.as_ptr().cast());
            _mm512_permutexvar_epi8(index, _mm512_loadu_si512(p.cast()))
        }
    }

    /// The 16 f16 scalars at `p`, in row order.
    #[inline(always)]
    unsafe fn halves(p: *const u8) -> __m512 {
        // SAFETY: only called from the tile kernels, whose CPU has
        // AVX-512, on 32 bytes of a record.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }

    /// 16 integer scales at `p` (unsigned or `signed` bytes) times the 16
    /// f32 at `d` (a span's head), in row order: exact products.
    #[inline(always)]
    unsafe fn scaled(p: *const u8, d: *const f32, signed: bool) -> __m512 {
        // SAFETY: only called from the tile kernels, whose CPU has
        // AVX-512, on 16 bytes of a record and 16 f32 of its head.
        unsafe {
            let bytes = _mm_loadu_si128(p.cast());
            let ints = if signed {
                _mm512_cvtepi8_epi32(bytes)
            } else {
                _mm512_cvtepu8_epi32(bytes)
            };
            _mm512_mul_ps(_mm512_cvtepi32_ps(ints), _mm512_loadu_ps(d))
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::int8::{dot_group_portable, Int8Rows};
    use crate::packed::{PackedMatrix, GROUP};
    use crate::test_support::{random, random_values};
    use candle_core::quantized::{GgmlDType, QTensor};

    fn packed(dtype: GgmlDType, rows: usize, cols: usize) -> PackedMatrix {
        let q = QTensor::quantize(&random(&[rows, cols], 7, 1.0), dtype).unwrap();
        PackedMatrix::from_ggml(dtype, rows, cols, &q.data().unwrap(), None)
            .unwrap()
            .unwrap()
    }

    /// Every output is the portable integer reference's for that row
    /// alone, to the bit, for each encoding with a tile kernel, at tile
    /// heights 5 to 16 and their tails, past a row chunk, with a last group
    /// of 8 columns; columns past the matrix and outside the groups asked
    /// for are not written.
    #[test]
    fn tiles_are_the_register_kernels_bits_for_any_rows() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI and VBMI");
            return;
        }
        let cases = [
            (GgmlDType::Q4_0, 512, vec![5, 16, 40]),
            (GgmlDType::Q4_1, 256, vec![7, 33]),
            (GgmlDType::Q4K, 768, vec![5, 12, 16, 17, 300]),
            (GgmlDType::Q6K, 512, vec![6, 16, 31, 400]),
            (GgmlDType::Q5_0, 256, vec![5, 16, 40]),
            (GgmlDType::Q5_1, 256, vec![9, 33]),
            (GgmlDType::Q5K, 512, vec![5, 16, 17]),
            (GgmlDType::Q8_0, 256, vec![5, 16, 33]),
        ];
        for (dtype, cols, heights) in cases {
            let rows = 40;
            let matrix = packed(dtype, rows, cols);
            assert!(has_tile_kernel(matrix.encoding()));
            for m in heights {
                let x = random_values(&[m, cols], m as u64, 1.5);
                let tiles = Int8Rows::passes(&x, m, cols, TILE_ROWS);
                let stride = 3 * GROUP + 5;
                let mut out = vec![f32::NAN; m * stride];
                // Groups 1 and 2 (columns 16..40) only.
                // SAFETY: available (checked), an encoding with a tile
                // kernel, m rounded rows of `cols` in tiles, `out` m rows
                // of `stride` > 48 columns.
                unsafe { product(&matrix, 1..3, &tiles, out.as_mut_ptr(), stride) };
                for r in 0..m {
                    let one = Int8Rows::new(&x[r * cols..(r + 1) * cols], 1, cols);
                    let row = &out[r * stride..(r + 1) * stride];
                    for group in 0..matrix.groups() {
                        let [want] = dot_group_portable::<1>(&matrix, group, &one).unwrap();
                        for (c, want) in want.iter().enumerate() {
                            let column = group * GROUP + c;
                            let got = row[column];
                            if group == 0 || column >= rows {
                                assert!(got.is_nan(), "{dtype:?} m {m}: column {column} written");
                            } else {
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{dtype:?} m {m} row {r} column {column}: {got} against {want}"
                                );
                            }
                        }
                    }
                    assert!(row[3 * GROUP..].iter().all(|v| v.is_nan()));
                }
            }
        }
    }
}
