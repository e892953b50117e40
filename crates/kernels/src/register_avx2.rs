#![cfg(target_arch = "x86_64")]
//! The register kernel for CPUs with AVX2 but not AVX-512 (most laptops):
//! each 16-lane row of weights is two 8-lane halves, and with 16 vector
//! registers four rows of accumulators fit ([`crate::packed::register_rows`]); more rows
//! spill to memory, slower but summed the same way.

use std::arch::x86_64::*;

use crate::packed::{Encoding, PackedMatrix, BLOCK, GROUP};

/// # Safety
/// The CPU must support AVX2, FMA and F16C, and `x` must hold
/// `matrix.cols` inputs of `R` interleaved rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_group<const R: usize>(
    matrix: &PackedMatrix,
    group: usize,
    x: &[f32],
) -> [[f32; GROUP]; R] {
    // SAFETY (each arm): as this function, for the matrix's own encoding.
    match matrix.encoding() {
        Encoding::Q4_0 => unsafe { dot_group_as::<R, { Encoding::Q4_0 as u8 }>(matrix, group, x) },
        Encoding::Q4_1 => unsafe { dot_group_as::<R, { Encoding::Q4_1 as u8 }>(matrix, group, x) },
        Encoding::K4 => unsafe { dot_group_as::<R, { Encoding::K4 as u8 }>(matrix, group, x) },
        _ => unsafe { dot_group_as::<R, ANY_ENCODING>(matrix, group, x) },
    }
}

/// The `ENCODING` of a [`dot_group_as`] that reads the matrix's encoding
/// at run time.
const ANY_ENCODING: u8 = u8::MAX;

/// [`dot_group`] compiled for one encoding (`ENCODING`, its `as u8`), so
/// that its record sizes and scales are constants and no block asks which
/// encoding it holds, or for any ([`ANY_ENCODING`]). Compiled on their
/// own, the 4-bit encodings ran 1.1–1.3× at one row and up to 1.15× at
/// four; the 5-bit ones gained nothing and K6 ran at half its rate (its
/// two halves' loops unrolled whole, it seems), so those share the form
/// that asks (`r3 bench kernels`, Zen 3, docs/performance.md).
///
/// # Safety
/// As [`dot_group`], for a matrix in that encoding (any, with
/// [`ANY_ENCODING`]).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline(never)]
unsafe fn dot_group_as<const R: usize, const ENCODING: u8>(
    matrix: &PackedMatrix,
    group: usize,
    x: &[f32],
) -> [[f32; GROUP]; R] {
    let encoding = match ENCODING {
        ANY_ENCODING => matrix.encoding(),
        _ => Encoding::ALL[ENCODING as usize],
    };
    // SAFETY: the caller upholds this function's contract (its doc),
    // which is all its raw reads, writes and intrinsics rely on.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let add = |acc: &mut [[__m256; 2]; R], k: usize, w: [__m256; 2]| {
            let inputs = x.as_ptr().add(k * R);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_ps(*inputs.add(r));
                acc[0] = _mm256_fmadd_ps(x, w[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(x, w[1], acc[1]);
            }
        };
        let low_nibbles = _mm256_set1_epi32(0x0F);
        for (b, (head, r)) in matrix.records_as(encoding, group).enumerate() {
            let (k, p) = (b * BLOCK, r.as_ptr());
            // Lanes 0..8 and 8..16 of 16 halves, 16 unsigned or signed bytes.
            let halves = |at: usize| {
                [0, 16].map(|half| _mm256_cvtph_ps(_mm_loadu_si128(p.add(at + half).cast())))
            };
            let bytes = |at: usize| [0, 8].map(|half| _mm_loadl_epi64(p.add(at + half).cast()));
            let unsigned = |at: usize| bytes(at).map(|q| _mm256_cvtepu8_epi32(q));
            // The span's head: 16 f32 per scalar.
            let head = head.as_ptr().cast::<f32>();
            let head = |at: usize| [0, 8].map(|half| _mm256_loadu_ps(head.add(at + half)));
            let scale = |q: [__m256i; 2], d: [__m256; 2]| {
                [0, 1].map(|i| _mm256_mul_ps(_mm256_cvtepi32_ps(q[i]), d[i]))
            };
            let floats_of = |q: [__m256i; 2]| q.map(|q| _mm256_cvtepi32_ps(q));
            // A block of weights d·q + o summed as d·Σ x·q + o·Σ x, the
            // block sums following the inputs (see `interleave`): a
            // multiply and an add fewer per weight than dequantizing first.
            let finish = |acc: &mut [[__m256; 2]; R],
                          dots: [[__m256; 2]; R],
                          d: [__m256; 2],
                          o: [__m256; 2]| {
                let sums = x.as_ptr().add(matrix.cols() * R + b * R);
                for (r, (acc, dot)) in acc.iter_mut().zip(dots).enumerate() {
                    let sum = _mm256_set1_ps(*sums.add(r));
                    for i in 0..2 {
                        acc[i] = _mm256_fmadd_ps(d[i], dot[i], acc[i]);
                        acc[i] = _mm256_fmadd_ps(o[i], sum, acc[i]);
                    }
                }
            };
            match encoding {
                Encoding::Q8_0 => {
                    // d·Σ x·q, a multiply fewer per weight (as `finish`, no offset).
                    let d = halves(0);
                    let mut dots = [[_mm256_setzero_ps(); 2]; R];
                    for j in 0..BLOCK {
                        let q = bytes(Encoding::Q8_0.input_bytes(j))
                            .map(|q| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)));
                        add(&mut dots, k + j, q);
                    }
                    for (acc, dot) in acc.iter_mut().zip(dots) {
                        for i in 0..2 {
                            acc[i] = _mm256_fmadd_ps(d[i], dot[i], acc[i]);
                        }
                    }
                }
                Encoding::F16 => {
                    for j in 0..BLOCK {
                        add(&mut acc, k + j, halves(j * 2 * GROUP));
                    }
                }
                Encoding::Q4_0
                | Encoding::Q4_1
                | Encoding::K4
                | Encoding::Q5_0
                | Encoding::Q5_1
                | Encoding::K5 => {
                    // Q4_0's offset is −8·d and Q5_0's −16·d (exact). Lanes
                    // in the payload's order (`by_lanes`), as the
                    // accumulators are.
                    let (d, o) = match encoding {
                        Encoding::Q4_0 | Encoding::Q5_0 => {
                            let d = halves(0);
                            let centre = _mm256_set1_ps(-encoding.centre());
                            (d, d.map(|d| _mm256_mul_ps(d, centre)))
                        }
                        Encoding::Q4_1 | Encoding::Q5_1 => (halves(0), halves(2 * GROUP)),
                        _ => (
                            scale(unsigned(0), head(0)),
                            scale(unsigned(GROUP), head(GROUP)),
                        ),
                    };
                    let (d, o) = (swap_halves(d), swap_halves(o));
                    // The 5-bit encodings' fifth bits, a word a row, come
                    // before the nibbles.
                    let five_bit = encoding.has_fifth_bits();
                    let fifth = if five_bit {
                        by_lanes(p.add(encoding.payload_start()))
                    } else {
                        [_mm256_setzero_si256(); 2]
                    };
                    let quants = encoding.nibbles_start();
                    let mut dots = [[_mm256_setzero_ps(); 2]; R];
                    for j in (0..BLOCK / 2).step_by(4) {
                        let v = by_lanes(p.add(quants + j * GROUP));
                        if five_bit {
                            // Whole 5-bit quants a byte, four inputs at
                            // once, then one shuffle an input.
                            let mut lo = [_mm256_setzero_si256(); 2];
                            let mut hi = [_mm256_setzero_si256(); 2];
                            for h in 0..2 {
                                (lo[h], hi[h]) = five(v[h], fifth[h], j as i32);
                            }
                            for t in 0..4 {
                                add(&mut dots, k + j + t, floats_of(lo.map(|v| byte(v, t))));
                                let hi = floats_of(hi.map(|v| byte(v, t)));
                                add(&mut dots, k + j + t + BLOCK / 2, hi);
                            }
                        } else {
                            for t in 0..4 {
                                let q = v.map(|v| byte(v, t));
                                let lo = q.map(|q| _mm256_and_si256(q, low_nibbles));
                                let hi = q.map(|q| _mm256_srli_epi32(q, 4));
                                add(&mut dots, k + j + t, floats_of(lo));
                                add(&mut dots, k + j + t + BLOCK / 2, floats_of(hi));
                            }
                        }
                    }
                    finish(&mut acc, dots, d, o);
                }
                Encoding::K6 => {
                    let signed = |at: usize| bytes(at).map(|q| _mm256_cvtepi8_epi32(q));
                    let scales = [signed(0), signed(GROUP)].map(|s| scale(s, head(0)));
                    // Each half's Σ x·(q − 32)·s as s·Σ x·(q − 32), a
                    // multiply fewer per weight than dequantizing first.
                    // Two inputs' quants made at once, a byte each (the
                    // nibble or'ed with its bit pair moved to bits 4..5,
                    // less 32), then each input's 16 bytes widened to the
                    // rows' lanes: about 4 operations a vector of weights
                    // beside the multiply-adds, where widening first, then
                    // shifting and masking lane by lane, took 7. The halves
                    // are summed one after the other, so that one set of
                    // dots takes the registers.
                    let (nibbles, pairs) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
                    let centre = _mm256_set1_epi8(32);
                    for (half, scale) in scales.into_iter().enumerate() {
                        let mut dots = [[_mm256_setzero_ps(); 2]; R];
                        for j in (0..BLOCK / 2).step_by(2) {
                            let q = _mm256_loadu_si256(p.add(Encoding::K6.input_bytes(j)).cast());
                            let h = _mm256_loadu_si256(p.add(Encoding::k6_pairs(j)).cast());
                            // Input j's nibble is the low one in the first
                            // half, the high one in the second; its pair sits
                            // at bits 2·(j / 8), four higher in the second.
                            let (low, pair_at_4) = match (half, j < 8) {
                                (0, true) => (q, _mm256_slli_epi32::<4>(h)),
                                (0, false) => (q, _mm256_slli_epi32::<2>(h)),
                                (_, true) => (_mm256_srli_epi32::<4>(q), h),
                                (_, false) => {
                                    (_mm256_srli_epi32::<4>(q), _mm256_srli_epi32::<2>(h))
                                }
                            };
                            let quants = _mm256_or_si256(
                                _mm256_and_si256(low, nibbles),
                                _mm256_and_si256(pair_at_4, pairs),
                            );
                            let centred = _mm256_sub_epi8(quants, centre);
                            let inputs = [
                                _mm256_castsi256_si128(centred),
                                _mm256_extracti128_si256::<1>(centred),
                            ];
                            for (t, input) in inputs.into_iter().enumerate() {
                                let w = widen(input).map(|q| _mm256_cvtepi32_ps(q));
                                add(&mut dots, k + half * BLOCK / 2 + j + t, w);
                            }
                        }
                        for (acc, dot) in acc.iter_mut().zip(dots) {
                            for i in 0..2 {
                                acc[i] = _mm256_fmadd_ps(scale[i], dot[i], acc[i]);
                            }
                        }
                    }
                }
                Encoding::Bf16 => {
                    for j in 0..BLOCK {
                        add(
                            &mut acc,
                            k + j,
                            [0, 16].map(|half| {
                                let h = _mm_loadu_si128(p.add(j * 2 * GROUP + half).cast());
                                let bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
                                _mm256_castsi256_ps(bits)
                            }),
                        );
                    }
                }
            }
        }
        let by_lanes = encoding.by_lanes();
        acc.map(|acc| {
            let [lo, hi] = if by_lanes { swap_halves(acc) } else { acc };
            let mut out = [0f32; GROUP];
            _mm256_storeu_ps(out.as_mut_ptr(), lo);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
            out
        })
    }
}

// The helpers below are functions, not closures: the compiler kept such a
// closure (Q6_K's quants, once) out of line, its vectors passed through
// memory (10% of Qwen2.5-Coder-1.5B's batch-1 decode in the closure alone,
// measured). An `#[inline(always)]` function is inlined into `dot_group`
// and compiled with its target features.

/// The 5-bit quants of inputs `j..j + 4` (byte `t` of the first word:
/// input `j + t`) and `j + 16..j + 20` (the second), lane by lane, from the
/// four bytes of nibbles `v` holds a row and the row's fifth bits: the
/// fifth bits placed a word at a time (10 operations for 8 quants), not
/// one quant at a time (28).
#[inline(always)]
unsafe fn five(v: __m256i, fifth: __m256i, j: i32) -> (__m256i, __m256i) {
    // SAFETY: only called from `dot_group`, whose CPU has AVX2.
    unsafe {
        let nibbles = _mm256_set1_epi32(0x0F0F_0F0F);
        (
            _mm256_or_si256(_mm256_and_si256(v, nibbles), fifth_bits_at_4(fifth, j)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi32(v, 4), nibbles),
                fifth_bits_at_4(fifth, j + 16),
            ),
        )
    }
}

/// Bits `i..i + 4` of each lane of `fifth` at bit 4 of its bytes 0..4, the
/// rest zero, in one multiply: `(b & 15) × 0x02040810` puts bit `t` of `b`
/// at bit `8t + 4`, its four partial products in disjoint bit ranges (no
/// carries).
#[inline(always)]
pub(crate) unsafe fn fifth_bits_at_4(fifth: __m256i, i: i32) -> __m256i {
    // SAFETY: only called from `dot_group`, whose CPU has AVX2.
    unsafe {
        let bits = _mm256_and_si256(
            _mm256_srl_epi32(fifth, _mm_cvtsi32_si128(i)),
            _mm256_set1_epi32(0xF),
        );
        let spread = _mm256_mullo_epi32(bits, _mm256_set1_epi32(0x0204_0810));
        _mm256_and_si256(spread, _mm256_set1_epi32(0x1010_1010))
    }
}

/// One input's 16 quant bytes as the rows' lanes, sign-extended: rows
/// 0..8 and 8..16.
#[inline(always)]
unsafe fn widen(v: __m128i) -> [__m256i; 2] {
    // SAFETY: only called from `dot_group`, whose CPU has AVX2.
    unsafe {
        [
            _mm256_cvtepi8_epi32(v),
            _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)),
        ]
    }
}

/// Byte `t` of each 32-bit lane, zero-extended: one shuffle, as the
/// zero-extension of 8 bytes the natural layout took (a shift and a mask
/// made the exact kernel 10-20% slower at 8 rows, measured).
#[inline(always)]
unsafe fn byte(v: __m256i, t: usize) -> __m256i {
    // SAFETY: only called from the kernels here, whose CPU has AVX2, with
    // `t < 4` (a byte of a 32-bit lane).
    unsafe { _mm256_shuffle_epi8(v, _mm256_loadu_si256(PICK_BYTE[t].as_ptr().cast())) }
}

/// `vpshufb` masks: byte 0 of each 32-bit lane `l` takes byte `4·l + t`
/// of its 128-bit half, the lane's other bytes are zeroed (0x80).
static PICK_BYTE: [[u8; 32]; 4] = {
    let mut masks = [[0x80; 32]; 4];
    let mut t = 0;
    while t < 4 {
        let mut lane = 0;
        while lane < 8 {
            masks[t][4 * lane] = (4 * (lane % 4) + t) as u8;
            lane += 1;
        }
        t += 1;
    }
    masks
};

/// The 64 bytes at `p` of a payload laid out by lanes
/// ([`crate::packed::lane_offset`]): output rows 0-3 and 8-11 in the
/// first vector, 4-7 and 12-15 in the second, four bytes a row.
#[inline(always)]
pub(crate) unsafe fn by_lanes(p: *const u8) -> [__m256i; 2] {
    // SAFETY: only called from the kernels, whose CPU has AVX2, on 64
    // bytes of a record.
    unsafe {
        [
            _mm256_loadu_si256(p.cast()),
            _mm256_loadu_si256(p.add(2 * GROUP).cast()),
        ]
    }
}

/// Eight-lane halves of 16 values between the row order (0-7, 8-15) and
/// [`by_lanes`]'s (0-3 8-11, 4-7 12-15); the same swap both ways.
#[inline(always)]
pub(crate) unsafe fn swap_halves(v: [__m256; 2]) -> [__m256; 2] {
    // SAFETY: only called from the kernels, whose CPU has AVX2.
    unsafe {
        [
            _mm256_permute2f128_ps::<0x20>(v[0], v[1]),
            _mm256_permute2f128_ps::<0x31>(v[0], v[1]),
        ]
    }
}
