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
                        let q = _mm512_cvtepi8_epi32(bytes(Encoding::Q8_0.input_bytes(j)));
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
                // Q6_K takes `dot_group_k6`, which needs VBMI.
                Encoding::K6 => unreachable!("Q6_K's AVX-512 kernel is dot_group_k6"),
            }
        }
        acc.map(|lanes| {
            let mut out = [0f32; GROUP];
            _mm512_storeu_ps(out.as_mut_ptr(), lanes);
            out
        })
    }
}

/// Whether the CPU runs [`dot_group_k6`] (VBMI's byte permutes; every
/// AVX-512 CPU since Ice Lake and Zen 4). Q6_K takes the AVX2 kernel on
/// AVX-512 CPUs without it.
pub(crate) fn has_k6_kernel() -> bool {
    std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// [`dot_group`] for Q6_K. Each half of a block (its own scale `s`) sums
/// `s·Σ x·(q − 32)`. Four inputs' 6-bit quants are made at once, a byte
/// each (the low nibble and its bit pair, one bitwise select), and turned
/// into `q − 32` by one byte permute that reads them as its indices; each
/// input's 16 bytes are then permuted to the top of the rows' lanes, the
/// rest zeroed, so that one conversion gives `(q − 32)·2²⁴` exactly, and
/// `s·2⁻²⁴` (exact) takes the factor back: the same bits as summing
/// `q − 32`. Two operations a vector of weights beside the multiply-adds,
/// where two permutes of floats, shifts and an add took six.
///
/// # Safety
/// The CPU must support AVX-512F, BW and VBMI ([`has_k6_kernel`]), the
/// matrix must be Q6_K, and `x` must hold `matrix.cols` inputs of `R`
/// interleaved rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub(crate) unsafe fn dot_group_k6<const R: usize>(
    matrix: &PackedMatrix,
    group: usize,
    x: &[f32],
) -> [[f32; GROUP]; R] {
    debug_assert_eq!(matrix.encoding(), Encoding::K6);
    // SAFETY: the caller upholds this function's contract (its doc),
    // which is all its raw reads, writes and intrinsics rely on.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        // `q − 32` at index q (a byte permute reads an index's low 6 bits).
        let minus_32: [i8; 64] = std::array::from_fn(|q| q as i8 - 32);
        let minus_32 = _mm512_loadu_si512(minus_32.as_ptr().cast());
        // Input t's byte of row c (byte 16t + c of four inputs' 64) to
        // the top byte of lane c; the other bytes are zeroed.
        let to_top: [__m512i; 4] = std::array::from_fn(|t| {
            let index: [u8; 64] = std::array::from_fn(|i| (16 * t + i / 4) as u8);
            _mm512_loadu_si512(index.as_ptr().cast())
        });
        let top_bytes = 0x8888_8888_8888_8888;
        let nibbles = _mm512_set1_epi8(0x0F);
        let unscale = _mm512_set1_ps(1.0 / (1u32 << 24) as f32);
        for (b, (head, r)) in matrix.records(group).enumerate() {
            let (k, p) = (b * BLOCK, r.as_ptr());
            let d = _mm512_loadu_ps(head.as_ptr().cast());
            for half in 0..2 {
                let scale = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                    p.add(half * GROUP).cast(),
                )));
                let scale = _mm512_mul_ps(_mm512_mul_ps(scale, d), unscale);
                let mut dots = [_mm512_setzero_ps(); R];
                for j in (0..BLOCK / 2).step_by(4) {
                    // Inputs j..j + 4 of the half, 16 bytes each: their
                    // nibbles (the low ones in the first half, the high
                    // in the second) and the bytes of their bit pairs, at
                    // bits 2·(j / 8), 4 higher in the second half.
                    let q = _mm512_loadu_si512(p.add(Encoding::K6.input_bytes(j)).cast());
                    let h = _mm512_loadu_si512(p.add(Encoding::k6_pairs(j)).cast());
                    let low = if half == 0 {
                        q
                    } else {
                        _mm512_srli_epi32(q, 4)
                    };
                    let pair = 2 * (j / 8) + 4 * half;
                    let pair_at_4 = if pair <= 4 {
                        _mm512_sll_epi32(h, _mm_cvtsi32_si128(4 - pair as i32))
                    } else {
                        _mm512_srl_epi32(h, _mm_cvtsi32_si128(pair as i32 - 4))
                    };
                    // Bits 0-3 from the nibble, the rest from the pair's
                    // byte (bits 6 and 7 are not read).
                    let quants = _mm512_ternarylogic_epi32(nibbles, low, pair_at_4, 0xCA);
                    let centred = _mm512_permutexvar_epi8(quants, minus_32);
                    for (t, to_top) in to_top.iter().enumerate() {
                        let w = _mm512_cvtepi32_ps(_mm512_maskz_permutexvar_epi8(
                            top_bytes, *to_top, centred,
                        ));
                        let inputs = x.as_ptr().add((k + half * BLOCK / 2 + j + t) * R);
                        for (r, dot) in dots.iter_mut().enumerate() {
                            *dot = _mm512_fmadd_ps(_mm512_set1_ps(*inputs.add(r)), w, *dot);
                        }
                    }
                }
                for (acc, dot) in acc.iter_mut().zip(dots) {
                    *acc = _mm512_fmadd_ps(scale, dot, *acc);
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
