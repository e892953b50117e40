#![cfg(target_arch = "x86_64")]
//! The register kernel in AVX-512 intrinsics: the compiler does not keep
//! `R` accumulators of 16 lanes in registers on its own.

use std::arch::x86_64::*;

use crate::packed::{Encoding, PackedMatrix, BLOCK, GROUP, ROW_OF_LANE};

/// # Safety
/// The CPU must support AVX-512F, and `x` must hold `matrix.cols` inputs
/// of `R` interleaved rows.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn dot_group<const R: usize>(
    matrix: &PackedMatrix,
    group: usize,
    x: &[f32],
) -> [[f32; GROUP]; R] {
    // SAFETY: the caller upholds this function's contract (its doc),
    // which is all its raw reads, writes and intrinsics rely on.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        let add = |acc: &mut [__m512; R], k: usize, w: __m512| {
            let inputs = x.as_ptr().add(k * R);
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*inputs.add(r)), w, *acc);
            }
        };
        // The floats 0..=31, for quants looked up by lane permutes.
        let small_floats = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let next_floats = _mm512_add_ps(small_floats, _mm512_set1_ps(16.0));
        let row_of_lane = _mm512_loadu_si512(ROW_OF_LANE.map(|r| r as i32).as_ptr().cast());
        for (b, (head, r)) in matrix.records(group).enumerate() {
            let (k, p) = (b * BLOCK, r.as_ptr());
            let halves = |at: usize| _mm512_cvtph_ps(_mm256_loadu_si256(p.add(at).cast()));
            let bytes = |at: usize| _mm_loadu_si128(p.add(at).cast());
            // The span's head: 16 f32 per scalar.
            let head = |at: usize| _mm512_loadu_ps(head.as_ptr().cast::<f32>().add(at));
            // An integer scale times a head scalar, exactly.
            let times = |q: __m512i, h: __m512| _mm512_mul_ps(_mm512_cvtepi32_ps(q), h);
            // The 64 bytes at `at` of a payload laid out by lanes (four
            // inputs of the 16 rows), the lanes put in row order.
            let rows = |at: usize| {
                _mm512_permutexvar_epi32(row_of_lane, _mm512_loadu_si512(p.add(at).cast()))
            };
            match matrix.encoding() {
                Encoding::Q8_0 => {
                    // d·Σ x·q, as the AVX2 kernel sums it: a multiply
                    // fewer per weight than dequantizing first (one row:
                    // 25.5–26.9 → 41.4–42.0 G weights/s in cache on a Zen
                    // 4, measured).
                    let d = halves(0);
                    let mut dots = [_mm512_setzero_ps(); R];
                    for j in 0..BLOCK {
                        let q = _mm512_cvtepi8_epi32(bytes(2 * GROUP + j * GROUP));
                        add(&mut dots, k + j, _mm512_cvtepi32_ps(q));
                    }
                    for (acc, dot) in acc.iter_mut().zip(dots) {
                        *acc = _mm512_fmadd_ps(d, dot, *acc);
                    }
                }
                Encoding::F16 => {
                    for j in 0..BLOCK {
                        add(&mut acc, k + j, halves(j * 2 * GROUP));
                    }
                }
                Encoding::Bf16 => {
                    for j in 0..BLOCK {
                        let h =
                            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(j * 2 * GROUP).cast()));
                        add(
                            &mut acc,
                            k + j,
                            _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)),
                        );
                    }
                }
                Encoding::Q4_0
                | Encoding::Q4_1
                | Encoding::K4
                | Encoding::Q5_0
                | Encoding::Q5_1
                | Encoding::K5 => {
                    // Σ x·(d·q + o) as d·Σ x·q + o·Σ x (Q4_0's offset is
                    // −8·d and Q5_0's −16·d, exact; Q4_1's and Q5_1's their
                    // minimum), the block sums following the inputs (see
                    // `interleave`): a multiply and an add fewer per weight
                    // than dequantizing first, which is what a few rows are
                    // bound by. The row accumulators wait in memory while
                    // the block's dots take the registers.
                    let encoding = matrix.encoding();
                    let (d, o) = match encoding {
                        Encoding::Q4_0 | Encoding::Q5_0 => {
                            let d = halves(0);
                            (d, _mm512_mul_ps(d, _mm512_set1_ps(-encoding.centre())))
                        }
                        Encoding::Q4_1 | Encoding::Q5_1 => (halves(0), halves(2 * GROUP)),
                        _ => (
                            times(_mm512_cvtepu8_epi32(bytes(0)), head(0)),
                            times(_mm512_cvtepu8_epi32(bytes(GROUP)), head(GROUP)),
                        ),
                    };
                    // The 5-bit encodings' fifth bits, a word a row, come
                    // before the nibbles.
                    let five_bit = encoding.has_fifth_bits();
                    let fifth = if five_bit {
                        rows(encoding.payload_start())
                    } else {
                        _mm512_setzero_si512()
                    };
                    let quants = encoding.nibbles_start();
                    let nibbles = _mm512_set1_epi32(0x0F0F_0F0F);
                    let mut dots = [_mm512_setzero_ps(); R];
                    for j in (0..BLOCK / 2).step_by(4) {
                        let quants = rows(quants + j * GROUP);
                        // Input j + t's quant and input j + t + 16's as
                        // floats, looked up by lane permutes, which read
                        // only an index's low 4 bits (5 bits from two
                        // tables): a shift and a permute a vector of
                        // weights where a shift, a mask and a conversion
                        // took three. The 5-bit quants are made whole
                        // first, their fifth bits placed a word at a time
                        // (10 operations for 8 quants, not 16 one by one).
                        let whole = five_bit.then(|| {
                            let lo = _mm512_and_si512(quants, nibbles);
                            let hi = _mm512_and_si512(_mm512_srli_epi32(quants, 4), nibbles);
                            (
                                _mm512_or_si512(lo, fifth_bits_at_4(fifth, j as i32)),
                                _mm512_or_si512(hi, fifth_bits_at_4(fifth, (j + 16) as i32)),
                            )
                        });
                        for t in 0..4 {
                            let at =
                                |v: __m512i| _mm512_srl_epi32(v, _mm_cvtsi32_si128(8 * t as i32));
                            let (lo, hi) = match whole {
                                Some((lo, hi)) => (
                                    _mm512_permutex2var_ps(small_floats, at(lo), next_floats),
                                    _mm512_permutex2var_ps(small_floats, at(hi), next_floats),
                                ),
                                None => {
                                    let q = at(quants);
                                    (
                                        _mm512_permutexvar_ps(q, small_floats),
                                        _mm512_permutexvar_ps(
                                            _mm512_srli_epi32(q, 4),
                                            small_floats,
                                        ),
                                    )
                                }
                            };
                            let first = x.as_ptr().add((k + j + t) * R);
                            let second = x.as_ptr().add((k + j + t + BLOCK / 2) * R);
                            for (r, dot) in dots.iter_mut().enumerate() {
                                *dot = _mm512_fmadd_ps(_mm512_set1_ps(*first.add(r)), lo, *dot);
                                *dot = _mm512_fmadd_ps(_mm512_set1_ps(*second.add(r)), hi, *dot);
                            }
                        }
                    }
                    let sums = x.as_ptr().add(matrix.cols() * R + b * R);
                    for (r, (acc, dot)) in acc.iter_mut().zip(dots).enumerate() {
                        *acc = _mm512_fmadd_ps(d, dot, *acc);
                        *acc = _mm512_fmadd_ps(o, _mm512_set1_ps(*sums.add(r)), *acc);
                    }
                }
                Encoding::K6 => {
                    // Each half's Σ x·(q − 32)·s as s·Σ x·(q − 32), a
                    // multiply fewer per weight than dequantizing first;
                    // q − 32 as the sum of two floats looked up by lane
                    // permutes, which read only an index's low 4 bits (so
                    // neither part is masked): the low nibble from 0..=15,
                    // the high bit pair's 16·p − 32. Small integers, so the
                    // sum is exact: two permutes and an add where masks,
                    // shifts, an or, a subtraction and a conversion took
                    // six. The halves are summed one after the other, so
                    // that one set of dots takes the registers.
                    let scales = [
                        times(_mm512_cvtepi8_epi32(bytes(0)), head(0)),
                        times(_mm512_cvtepi8_epi32(bytes(GROUP)), head(0)),
                    ];
                    let high_floats = _mm512_setr_ps(
                        -32.0, -16.0, 0.0, 16.0, -32.0, -16.0, 0.0, 16.0, -32.0, -16.0, 0.0, 16.0,
                        -32.0, -16.0, 0.0, 16.0,
                    );
                    for (half, scale) in scales.into_iter().enumerate() {
                        let mut dots = [_mm512_setzero_ps(); R];
                        for j in 0..BLOCK / 2 {
                            let q = _mm512_cvtepu8_epi32(bytes(2 * GROUP + j * GROUP));
                            let h = _mm512_cvtepu8_epi32(bytes(18 * GROUP + (j % 8) * GROUP));
                            // Input j's quant: the low nibble, its pair at
                            // bits 2·(j / 8); input j + 16's: the high
                            // nibble, its pair four bits higher.
                            let (low, shift) = if half == 0 {
                                (q, 2 * (j / 8))
                            } else {
                                (_mm512_srli_epi32(q, 4), 2 * (j / 8) + 4)
                            };
                            let high = _mm512_srl_epi32(h, _mm_cvtsi32_si128(shift as i32));
                            let w = _mm512_add_ps(
                                _mm512_permutexvar_ps(low, small_floats),
                                _mm512_permutexvar_ps(high, high_floats),
                            );
                            add(&mut dots, k + j + half * BLOCK / 2, w);
                        }
                        for (acc, dot) in acc.iter_mut().zip(dots) {
                            *acc = _mm512_fmadd_ps(scale, dot, *acc);
                        }
                    }
                }
            }
        }
        acc.map(|lanes| {
            let mut out = [0f32; GROUP];
            _mm512_storeu_ps(out.as_mut_ptr(), lanes);
            out
        })
    }
}

/// Bits `i..i + 4` of each lane of `fifth` at bit 4 of its bytes 0..4, the
/// rest zero, in one multiply: `(b & 15) × 0x02040810` puts bit `t` of `b`
/// at bit `8t + 4`, its four partial products in disjoint bit ranges (no
/// carries).
#[inline(always)]
pub(crate) unsafe fn fifth_bits_at_4(fifth: __m512i, i: i32) -> __m512i {
    // SAFETY: only called from `dot_group` and the tile kernel, whose CPUs
    // have AVX-512F.
    unsafe {
        let bits = _mm512_and_si512(
            _mm512_srl_epi32(fifth, _mm_cvtsi32_si128(i)),
            _mm512_set1_epi32(0xF),
        );
        let spread = _mm512_mullo_epi32(bits, _mm512_set1_epi32(0x0204_0810));
        _mm512_and_si512(spread, _mm512_set1_epi32(0x1010_1010))
    }
}
