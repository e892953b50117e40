#![cfg(target_arch = "x86_64")]
//! The integer register kernel ([`crate::int8`]) for CPUs with AVX2 (and
//! those with AVX-512, which have it too). Four quant rows of a record
//! (inputs `j ..+ 4` of 16 output rows) are transposed so that each 32-bit
//! lane holds one output row's four weights; `vpmaddubsw` multiplies them
//! by four rounded inputs and adds pairs, `vpmaddwd` adds the pairs: 32
//! products in three instructions, where the exact kernel spends about
//! three on each 8 weights before its multiply-add.

use std::arch::x86_64::*;

use crate::int8::{Int8Rows, GROUPS};
use crate::packed::{Encoding, PackedMatrix, GROUP};

/// # Safety
/// The CPU must support AVX2, FMA and F16C, `x` must hold `R` rows of
/// `matrix.cols` inputs, and the encoding must have an integer kernel
/// ([`crate::int8::has_int8_kernel`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_group<const R: usize>(
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> [[f32; GROUP]; R] {
    // SAFETY: the caller upholds this function's contract (its doc),
    // which is all its raw reads, writes and intrinsics rely on.
    unsafe {
        // Accumulators in the transposed order: rows 0-3 and 8-11 of the
        // group, then 4-7 and 12-15 (see `transpose`).
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let ones = _mm256_set1_epi16(1);
        let nibbles = _mm256_set1_epi8(0x0F);
        let bit_pairs = _mm256_set1_epi8(0x30);
        let encoding = matrix.encoding();
        for (b, (head, r)) in matrix.records(group).enumerate() {
            let p = r.as_ptr();
            let inputs = x.groups.as_ptr().add(b * GROUPS * R);
            // Σ q_x·q_w over `w`'s four inputs (group `g` of the block),
            // added to each row's two 8-lane sums.
            let add = |sums: &mut [[__m256i; 2]; R], g: usize, w: [__m256i; 2]| {
                for (row, sums) in sums.iter_mut().enumerate() {
                    let q = _mm256_set1_epi32(*inputs.add(g * R + row));
                    for i in 0..2 {
                        let pairs = _mm256_maddubs_epi16(w[i], q);
                        sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(pairs, ones));
                    }
                }
            };
            let halves = |at: usize| {
                transposed(
                    [0, 8].map(|h| _mm256_cvtph_ps(_mm_loadu_si128(p.add(at + 2 * h).cast()))),
                )
            };
            let head = head.as_ptr().cast::<f32>();
            let head = |at: usize| [0, 8].map(|h| _mm256_loadu_ps(head.add(at + h)));
            // 16 integer scales (unsigned or signed bytes) times the head's d.
            let scaled = |at: usize, d: [__m256; 2], signed: bool| {
                transposed([0, 8].map(|h| {
                    let q = _mm_loadl_epi64(p.add(at + h).cast());
                    let q = if signed {
                        _mm256_cvtepi8_epi32(q)
                    } else {
                        _mm256_cvtepu8_epi32(q)
                    };
                    _mm256_mul_ps(_mm256_cvtepi32_ps(q), d[h / 8])
                }))
            };
            let block = b * R;
            if encoding == Encoding::K6 {
                let (lo, hi) = (scaled(0, head(0), true), scaled(GROUP, head(0), true));
                let mut sums = [[[_mm256_setzero_si256(); 2]; R]; 2];
                for j in (0..16).step_by(4) {
                    let q = transpose(p.add(2 * GROUP + j * GROUP));
                    let h = transpose(p.add(18 * GROUP + (j % 8) * GROUP));
                    // Input j's bit pair at bits 2·(j / 8), input j + 16's
                    // four higher: both moved to bits 4..5 (16-bit shifts,
                    // whose spill across bytes the mask drops).
                    let (first, second) = if j < 8 {
                        (h.map(|h| _mm256_slli_epi16(h, 4)), h)
                    } else {
                        (
                            h.map(|h| _mm256_slli_epi16(h, 2)),
                            h.map(|h| _mm256_srli_epi16(h, 2)),
                        )
                    };
                    let six = |low: [__m256i; 2], high: [__m256i; 2]| {
                        [0, 1].map(|i| {
                            _mm256_or_si256(
                                _mm256_and_si256(low[i], nibbles),
                                _mm256_and_si256(high[i], bit_pairs),
                            )
                        })
                    };
                    add(&mut sums[0], j / 4, six(q, first));
                    let upper = q.map(|q| _mm256_srli_epi16(q, 4));
                    add(&mut sums[1], GROUPS / 2 + j / 4, six(upper, second));
                }
                for row in 0..R {
                    let d_x = _mm256_set1_ps(x.scales[block + row]);
                    for (half, scale) in [lo, hi].iter().enumerate() {
                        let minus = _mm256_set1_epi32(32 * x.half_sums[(block + row) * 2 + half]);
                        for i in 0..2 {
                            let sum = _mm256_sub_epi32(sums[half][row][i], minus);
                            let s = _mm256_mul_ps(scale[i], d_x);
                            acc[row][i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sum), acc[row][i]);
                        }
                    }
                }
                continue;
            }
            let (d, o, quants) = match encoding {
                Encoding::Q4_0 => {
                    let d = halves(0);
                    (
                        d,
                        d.map(|d| _mm256_mul_ps(d, _mm256_set1_ps(-8.0))),
                        2 * GROUP,
                    )
                }
                Encoding::Q4_1 => (halves(0), halves(2 * GROUP), 4 * GROUP),
                _ => (
                    scaled(0, head(0), false),
                    scaled(GROUP, head(GROUP), false),
                    2 * GROUP,
                ),
            };
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for j in (0..16).step_by(4) {
                let q = transpose(p.add(quants + j * GROUP));
                add(&mut sums, j / 4, q.map(|q| _mm256_and_si256(q, nibbles)));
                let upper = q.map(|q| _mm256_and_si256(_mm256_srli_epi16(q, 4), nibbles));
                add(&mut sums, GROUPS / 2 + j / 4, upper);
            }
            for row in 0..R {
                let d_x = _mm256_set1_ps(x.scales[block + row]);
                let sum = _mm256_set1_ps(x.sums[block + row]);
                for i in 0..2 {
                    let s = _mm256_mul_ps(d[i], d_x);
                    acc[row][i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums[row][i]), acc[row][i]);
                    acc[row][i] = _mm256_fmadd_ps(o[i], sum, acc[row][i]);
                }
            }
        }
        acc.map(|acc| {
            let [lo, hi] = transposed(acc);
            let mut out = [0f32; GROUP];
            _mm256_storeu_ps(out.as_mut_ptr(), lo);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
            out
        })
    }
}

/// Four quant rows of 16 bytes at `p` (inputs `j ..+ 4` of the group's 16
/// output rows) as 32-bit lanes of four bytes, one output row each: output
/// rows 0-3 and 8-11 in the first vector, 4-7 and 12-15 in the second.
#[inline(always)]
unsafe fn transpose(p: *const u8) -> [__m256i; 2] {
    // SAFETY: only called from `dot_group`, whose CPU has AVX2, on 64
    // bytes of a record.
    unsafe {
        let zip = _mm256_setr_epi8(
            0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12,
            5, 13, 6, 14, 7, 15,
        );
        // Rows j and j + 1 byte by byte, output rows 0-7 | 8-15; then j + 2, j + 3.
        let pair = |at: usize| {
            let v = _mm256_loadu_si256(p.add(at).cast());
            _mm256_shuffle_epi8(_mm256_permute4x64_epi64::<0xD8>(v), zip)
        };
        let (first, second) = (pair(0), pair(2 * GROUP));
        [
            _mm256_unpacklo_epi16(first, second),
            _mm256_unpackhi_epi16(first, second),
        ]
    }
}

/// Eight-lane halves of 16 values between the natural order (0-7, 8-15)
/// and [`transpose`]'s (0-3 8-11, 4-7 12-15); the same swap both ways.
#[inline(always)]
unsafe fn transposed(v: [__m256; 2]) -> [__m256; 2] {
    // SAFETY: only called from `dot_group`, whose CPU has AVX2.
    unsafe {
        [
            _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
            _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
        ]
    }
}
