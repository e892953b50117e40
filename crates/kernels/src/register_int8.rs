#![cfg(target_arch = "x86_64")]
//! The integer register kernels ([`crate::int8`]) for x86: one for CPUs
//! with AVX2 (and AVX-512 without VNNI), one for those with AVX-512 VNNI.
//! Each 32-bit lane holds four weights of one output row (inputs
//! `j ..+ 4`), as the 4- and 5-bit encodings are packed
//! ([`crate::packed::lane_offset`]) and Q6_K's and Q8_0's records are
//! transposed to as they are read, and one instruction multiplies them by
//! four rounded inputs: 32 products, where the exact kernel spends about
//! three instructions on each 8 weights before its multiply-add. How the
//! products are added is all the two kernels differ in ([`Products`]):
//! with AVX2, `vpmaddubsw` adds pairs in 16 bits, as far as their bounds
//! allow (a whole block of the 4-bit encodings, half a block of the 5-bit
//! ones, two results of Q6_K's), and `vpmaddwd` widens them; with VNNI,
//! `vpdpbusd` adds all four into 32 bits in the one instruction.
//!
//! One function per encoding (per family for K6 and Q8_0) and instruction
//! set, each compiled on its own: with every family in one loop, the
//! one-row kernel of the 4-bit ones ran 20-25% slower once Q8_0 joined,
//! and one form for all the nibble encodings slower still ([`nibbles`];
//! measured).

use std::arch::x86_64::*;

use crate::int8::{Int8Rows, GROUPS};
use crate::packed::{Encoding, PackedMatrix, GROUP};
use crate::register_avx2::{by_lanes, fifth_bits_at_4, swap_halves};

/// How far ahead of the record being summed its group's stream is asked
/// for. The integer kernels are quick enough that, streamed, they waited
/// on memory the hardware prefetcher had not asked for in time: with this,
/// streamed Q4_K and Q6_K rose 10-15% and Qwen2.5-Coder-1.5B's batch-1
/// decode 19-20 → 22-23 tok/s on a Zen 3 (1024 and 4096 bytes did no
/// better; docs/performance.md).
const PREFETCH: usize = 2048;

/// Eight-lane sums of `R` rows, in [`by_lanes`]'s order of the group's 16
/// output rows.
type Sums<const R: usize> = [[__m256; 2]; R];

/// How the kernels add `q_w·q_x` products four to a 32-bit lane, `q_w`
/// unsigned bytes and `q_x` signed: the one step the AVX2 and VNNI kernels
/// do differently. Each must give the same integers.
trait Products {
    /// Adds each lane's four products to a block's running sums, in the
    /// width [`Products::widen`] takes them from.
    unsafe fn add(sums: __m256i, w: __m256i, q: __m256i) -> __m256i;
    /// A block's running sums as 32-bit lanes.
    unsafe fn widen(sums: __m256i) -> __m256i;
    /// `sums` (32-bit lanes) plus the products of each of `w` with its
    /// `q`: where pairs are added in 16 bits, all `N` meet there first, so
    /// the caller bounds `N`.
    unsafe fn add_widened<const N: usize>(
        sums: __m256i,
        w: [__m256i; N],
        q: [__m256i; N],
    ) -> __m256i;
}

/// AVX2's `vpmaddubsw`: pair sums in 16 bits, widened by `vpmaddwd`.
struct PairSums;

impl Products for PairSums {
    #[inline(always)]
    unsafe fn add(sums: __m256i, w: __m256i, q: __m256i) -> __m256i {
        // SAFETY: only called from the AVX2 kernels.
        unsafe { _mm256_add_epi16(sums, _mm256_maddubs_epi16(w, q)) }
    }

    #[inline(always)]
    unsafe fn widen(sums: __m256i) -> __m256i {
        // SAFETY: only called from the AVX2 kernels.
        unsafe { _mm256_madd_epi16(sums, _mm256_set1_epi16(1)) }
    }

    #[inline(always)]
    unsafe fn add_widened<const N: usize>(
        sums: __m256i,
        w: [__m256i; N],
        q: [__m256i; N],
    ) -> __m256i {
        // SAFETY: only called from the AVX2 kernels.
        unsafe {
            let mut pairs = _mm256_setzero_si256();
            for (w, q) in w.into_iter().zip(q) {
                pairs = Self::add(pairs, w, q);
            }
            _mm256_add_epi32(sums, Self::widen(pairs))
        }
    }
}

/// AVX-512 VNNI's `vpdpbusd`: all four products into 32 bits at once.
struct Vnni;

impl Products for Vnni {
    #[inline(always)]
    unsafe fn add(sums: __m256i, w: __m256i, q: __m256i) -> __m256i {
        // SAFETY: only called from the VNNI kernels.
        unsafe { _mm256_dpbusd_epi32(sums, w, q) }
    }

    #[inline(always)]
    unsafe fn widen(sums: __m256i) -> __m256i {
        sums
    }

    #[inline(always)]
    unsafe fn add_widened<const N: usize>(
        mut sums: __m256i,
        w: [__m256i; N],
        q: [__m256i; N],
    ) -> __m256i {
        // SAFETY: only called from the VNNI kernels.
        unsafe {
            for (w, q) in w.into_iter().zip(q) {
                sums = Self::add(sums, w, q);
            }
            sums
        }
    }
}

/// The entry point and its one function per encoding family, compiled for
/// `$features` with `$products`' additions.
macro_rules! kernels {
    ($features:literal, $products:ty) => {
        use super::*;

        /// # Safety
        /// The CPU must support the module's instructions, `x` must hold
        /// `R` rows of `matrix.cols` inputs, and the encoding must have an
        /// integer kernel ([`crate::int8::has_int8_kernel`]).
        #[target_feature(enable = $features)]
        pub(crate) unsafe fn dot_group<const R: usize>(
            matrix: &PackedMatrix,
            group: usize,
            x: &Int8Rows,
        ) -> [[f32; GROUP]; R] {
            // SAFETY: the caller upholds this function's contract (its doc).
            unsafe {
                let acc = match matrix.encoding() {
                    Encoding::Q8_0 => bytes_kernel::<R>(matrix, group, x),
                    Encoding::K6 => six_bits_kernel::<R>(matrix, group, x),
                    Encoding::Q4_0 => nibbles_kernel::<R, { Encoding::Q4_0 as u8 }>(matrix, group, x),
                    Encoding::Q4_1 => nibbles_kernel::<R, { Encoding::Q4_1 as u8 }>(matrix, group, x),
                    Encoding::K4 => nibbles_kernel::<R, { Encoding::K4 as u8 }>(matrix, group, x),
                    Encoding::Q5_0 => nibbles_kernel::<R, { Encoding::Q5_0 as u8 }>(matrix, group, x),
                    Encoding::Q5_1 => nibbles_kernel::<R, { Encoding::Q5_1 as u8 }>(matrix, group, x),
                    _ => nibbles_kernel::<R, { Encoding::K5 as u8 }>(matrix, group, x),
                };
                acc.map(|acc| {
                    let [lo, hi] = swap_halves(acc);
                    let mut out = [0f32; GROUP];
                    _mm256_storeu_ps(out.as_mut_ptr(), lo);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
                    out
                })
            }
        }

        #[target_feature(enable = $features)]
        #[inline(never)]
        unsafe fn nibbles_kernel<const R: usize, const ENCODING: u8>(
            matrix: &PackedMatrix,
            group: usize,
            x: &Int8Rows,
        ) -> Sums<R> {
            // SAFETY: as [`dot_group`].
            unsafe { nibbles::<R, $products, ENCODING>(matrix, group, x) }
        }

        kernels!(@ $features, $products, six_bits_kernel six_bits, bytes_kernel bytes);
    };
    (@ $features:literal, $products:ty, $($kernel:ident $body:ident),*) => {
        $(
            #[target_feature(enable = $features)]
            #[inline(never)]
            unsafe fn $kernel<const R: usize>(
                matrix: &PackedMatrix,
                group: usize,
                x: &Int8Rows,
            ) -> Sums<R> {
                // SAFETY: as [`dot_group`].
                unsafe { $body::<R, $products>(matrix, group, x) }
            }
        )*
    };
}

/// The kernel for CPUs with AVX2, FMA and F16C.
pub(crate) mod avx2 {
    kernels!("avx2,fma,f16c", PairSums);
}

/// The kernel for CPUs with AVX-512 VNNI (and VL, BW, whose 256-bit forms
/// it uses), besides AVX2, FMA and F16C.
pub(crate) mod vnni {
    kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", Vnni);
}

/// Q4_0, Q4_1 and Q4_K (K4), and the 5-bit Q5_0, Q5_1 and Q5_K (K5):
/// `d·Σ q_x·q + o·Σ x` a block, the quants nibbles (input `j` low, `j + 16`
/// high) with the fifth bits, where there are some, above them. Each
/// form is compiled for one encoding (`ENCODING`, its `as u8`), so that
/// its record sizes, scales and fifth bits are constants. Compiled per
/// family (4- or 5-bit) with the encoding read at run time, the one-row
/// kernel already ran 1.15–1.5× the form that asked a block at a time
/// whether there were fifth bits; compiled per encoding, one row ran
/// 1.3–1.7× (4-bit) and 1.1–1.25× (5-bit) the per-family forms, and at
/// four and 32 rows the 5-bit ones ran 1.0–1.4× the asking form, the
/// 4-bit ones 0.96–1.15× (`r3 bench kernels --int8`, Zen 3,
/// docs/performance.md).
///
/// # Safety
/// As [`avx2::dot_group`], for the matrix's encoding, which must be the
/// one `ENCODING` stands for ([`Encoding::ALL`]), inlined into a function
/// with `P`'s instructions.
#[inline(always)]
unsafe fn nibbles<const R: usize, P: Products, const ENCODING: u8>(
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> Sums<R> {
    // SAFETY: as above; every read is within a record or its head.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let low = _mm256_set1_epi8(0x0F);
        let encoding = Encoding::ALL[ENCODING as usize];
        let five_bit = encoding.has_fifth_bits();
        for (b, (head, r)) in matrix.records_as(encoding, group).enumerate() {
            let p = r.as_ptr();
            prefetch(r);
            let (d, o) = match encoding {
                Encoding::Q4_0 | Encoding::Q5_0 => {
                    let d = halves(p);
                    let centre = _mm256_set1_ps(-encoding.centre());
                    (d, d.map(|d| _mm256_mul_ps(d, centre)))
                }
                Encoding::Q4_1 | Encoding::Q5_1 => (halves(p), halves(p.add(2 * GROUP))),
                _ => {
                    let head = head.as_ptr().cast::<f32>();
                    let d = scaled(p, head, false);
                    (d, scaled(p.add(GROUP), head.add(GROUP), false))
                }
            };
            // The 5-bit encodings' fifth bits, a word a row, come before
            // the nibbles.
            let fifth = if five_bit {
                by_lanes(p.add(encoding.payload_start()))
            } else {
                [_mm256_setzero_si256(); 2]
            };
            let quants = encoding.nibbles_start();
            let inputs = x.groups.as_ptr().add(b * GROUPS * R);
            // One running sum for the whole block. In 16-bit pairs
            // (AVX2), its eight `vpmaddubsw` results a row are each at
            // most 2·15·127 in magnitude (nibbles times inputs within
            // ±127), so their sum, 30480 at most, cannot overflow, and one
            // `vpmaddwd` a row widens it where each result took one
            // (measured: docs/performance.md, "Sixteen-bit sums in the
            // 4-bit integer kernel").
            // 5-bit quants make each result up to 2·31·127, so their
            // pairs are widened every four results (31496 at most).
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            let mut widened = [[_mm256_setzero_si256(); 2]; R];
            for j in (0..16).step_by(4) {
                let q = by_lanes(p.add(quants + j * GROUP));
                let mut lower = q.map(|q| _mm256_and_si256(q, low));
                let mut upper = q.map(|q| _mm256_and_si256(_mm256_srli_epi16(q, 4), low));
                if five_bit {
                    for h in 0..2 {
                        lower[h] = _mm256_or_si256(lower[h], fifth_bits_at_4(fifth[h], j as i32));
                        let high = fifth_bits_at_4(fifth[h], (j + 16) as i32);
                        upper[h] = _mm256_or_si256(upper[h], high);
                    }
                }
                add_products::<R, P>(&mut sums, inputs.add(j / 4 * R), lower);
                add_products::<R, P>(&mut sums, inputs.add((GROUPS / 2 + j / 4) * R), upper);
                if five_bit && j == 4 {
                    for (widened, sums) in widened.iter_mut().zip(&mut sums) {
                        for i in 0..2 {
                            widened[i] = P::widen(sums[i]);
                            sums[i] = _mm256_setzero_si256();
                        }
                    }
                }
            }
            for row in 0..R {
                let d_x = _mm256_set1_ps(x.scales[b * R + row]);
                let sum = _mm256_set1_ps(x.sums[b * R + row]);
                for i in 0..2 {
                    let s = _mm256_mul_ps(d[i], d_x);
                    let mut dot = P::widen(sums[row][i]);
                    if five_bit {
                        dot = _mm256_add_epi32(dot, widened[row][i]);
                    }
                    acc[row][i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dot), acc[row][i]);
                    acc[row][i] = _mm256_fmadd_ps(o[i], sum, acc[row][i]);
                }
            }
        }
        acc
    }
}

/// Q6_K (K6): `s_h·(Σ q_x·q − 32·Σ q_x)` for each half `h` of a block,
/// the quants a nibble and a bit pair. A block's 16 vectors of quants are
/// made first (inputs `j` and `j + 8` from one read of their bit pairs'
/// bytes), then each half is summed: summing both halves at once needed
/// twice the sums, more than AVX2's 16 registers hold at four rows. Against
/// the form that read each bit pair twice and summed both halves
/// together: the same at one and four rows, 1.06× at 16 and 32 (`r3 bench
/// kernels --int8`, Zen 3, three alternated rounds; docs/performance.md,
/// "The R3 step's profile on a Zen 3").
///
/// # Safety
/// As [`nibbles`], for K6.
#[inline(always)]
unsafe fn six_bits<const R: usize, P: Products>(
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> Sums<R> {
    // SAFETY: as above; every read is within a record or its head.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        // [half][g]: the quants of inputs 4g ..+ 4 of each half.
        let mut quants = [[[_mm256_setzero_si256(); 2]; GROUPS / 2]; 2];
        for (b, (head, r)) in matrix.records_as(Encoding::K6, group).enumerate() {
            let p = r.as_ptr();
            prefetch(r);
            for j in [0, 4] {
                let [first, second] = six_bit_quants(p, j);
                for half in 0..2 {
                    quants[half][j / 4] = first[half];
                    quants[half][j / 4 + 2] = second[half];
                }
            }
            let head = head.as_ptr().cast::<f32>();
            let inputs = x.groups.as_ptr().add(b * GROUPS * R);
            for (half, quants) in quants.iter().enumerate() {
                let scale = scaled(p.add(half * GROUP), head, true);
                let at = |g: usize| inputs.add((half * GROUPS / 2 + g) * R);
                // Inputs j and j + 8 of the half added together (in one
                // 16-bit sum before it is widened, with AVX2: two
                // `vpmaddubsw` results of at most 2·63·127 in magnitude,
                // 32004 at most).
                let mut sums = [[_mm256_setzero_si256(); 2]; R];
                for g in 0..2 {
                    add_two::<R, P>(&mut sums, [at(g), at(g + 2)], [quants[g], quants[g + 2]]);
                }
                for (row, sums) in sums.iter().enumerate() {
                    let d_x = _mm256_set1_ps(x.scales[b * R + row]);
                    let minus = _mm256_set1_epi32(32 * x.half_sums[(b * R + row) * 2 + half]);
                    for i in 0..2 {
                        let sum = _mm256_sub_epi32(sums[i], minus);
                        let s = _mm256_mul_ps(scale[i], d_x);
                        acc[row][i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sum), acc[row][i]);
                    }
                }
            }
        }
        acc
    }
}

/// Q8_0: `d·Σ q_x·q` a block, the quants signed bytes, multiplied as
/// `|q|` times `q_x` with `q`'s sign (`vpmaddubsw` wants one factor
/// unsigned; a pair is at most 2·128·127, within 16 bits).
///
/// # Safety
/// As [`nibbles`], for Q8_0.
#[inline(always)]
unsafe fn bytes<const R: usize, P: Products>(
    matrix: &PackedMatrix,
    group: usize,
    x: &Int8Rows,
) -> Sums<R> {
    // SAFETY: as above; every read is within a record.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, (_, r)) in matrix.records_as(Encoding::Q8_0, group).enumerate() {
            let p = r.as_ptr();
            prefetch(r);
            let d = halves(p);
            let inputs = x.groups.as_ptr().add(b * GROUPS * R);
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..GROUPS {
                let w = transpose(p.add(Encoding::Q8_0.input_bytes(4 * g)));
                let magnitude = w.map(|w| _mm256_abs_epi8(w));
                for (row, sums) in sums.iter_mut().enumerate() {
                    let q = _mm256_set1_epi32(*inputs.add(g * R + row));
                    for i in 0..2 {
                        let signed = _mm256_sign_epi8(q, w[i]);
                        sums[i] = P::add_widened(sums[i], [magnitude[i]], [signed]);
                    }
                }
            }
            for row in 0..R {
                let d_x = _mm256_set1_ps(x.scales[b * R + row]);
                for i in 0..2 {
                    let s = _mm256_mul_ps(d[i], d_x);
                    acc[row][i] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(sums[row][i]), acc[row][i]);
                }
            }
        }
        acc
    }
}

/// The six-bit quants of a Q6_K record at `p`, `j < 8`: of inputs `j
/// ..+ 4` and `j + 16 ..+ 4` (its first and second half), then of inputs
/// `j + 8 ..+ 4` and `j + 24 ..+ 4`, as [`transpose`] lays them out: a
/// nibble and a bit pair each, the four inputs of a row sharing the bytes
/// of their bit pairs.
#[inline(always)]
unsafe fn six_bit_quants(p: *const u8, j: usize) -> [[[__m256i; 2]; 2]; 2] {
    // SAFETY: only called from the kernels above, whose CPU has AVX2, on a
    // Q6_K record.
    unsafe {
        let (low, pair) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
        let h = transpose(p.add(Encoding::k6_pairs(j)));
        let six = |nibble: [__m256i; 2], bits: [__m256i; 2]| {
            [0, 1].map(|i| {
                _mm256_or_si256(
                    _mm256_and_si256(nibble[i], low),
                    _mm256_and_si256(bits[i], pair),
                )
            })
        };
        // The bit pairs of inputs j, j + 8, j + 16 and j + 24 at bits 0,
        // 2, 4 and 6, each moved to bits 4..5 (16-bit shifts, whose spill
        // across bytes the mask drops).
        let first = transpose(p.add(Encoding::K6.input_bytes(j)));
        let second = transpose(p.add(Encoding::K6.input_bytes(j + 8)));
        [
            [
                six(first, h.map(|h| _mm256_slli_epi16::<4>(h))),
                six(first.map(|q| _mm256_srli_epi16::<4>(q)), h),
            ],
            [
                six(second, h.map(|h| _mm256_slli_epi16::<2>(h))),
                six(
                    second.map(|q| _mm256_srli_epi16::<4>(q)),
                    h.map(|h| _mm256_srli_epi16::<2>(h)),
                ),
            ],
        ]
    }
}

/// `Σ q_x·q_w` over the four inputs of each of `w`'s two vectors, for
/// each of `R` rows (their rounded inputs at `inputs[k]`, one `i32` a
/// row), added to the rows' sums; the two products may meet in 16 bits
/// ([`Products::add_widened`]), so each must be at most 16383 in
/// magnitude.
#[inline(always)]
unsafe fn add_two<const R: usize, P: Products>(
    sums: &mut [[__m256i; 2]; R],
    inputs: [*const i32; 2],
    w: [[__m256i; 2]; 2],
) {
    // SAFETY: only called from the kernels above, whose CPU has AVX2, with
    // R rounded inputs at each of `inputs`.
    unsafe {
        for (row, sums) in sums.iter_mut().enumerate() {
            let q = inputs.map(|at| _mm256_set1_epi32(*at.add(row)));
            for i in 0..2 {
                sums[i] = P::add_widened(sums[i], [w[0][i], w[1][i]], q);
            }
        }
    }
}

/// `q_x·q_w` over `w`'s four inputs of each of `R` rows (their rounded
/// inputs at `inputs`, one `i32` a row), added to the rows' block sums
/// ([`Products::add`]; with 16-bit pairs the caller bounds how many).
#[inline(always)]
unsafe fn add_products<const R: usize, P: Products>(
    sums: &mut [[__m256i; 2]; R],
    inputs: *const i32,
    w: [__m256i; 2],
) {
    // SAFETY: only called from the kernels above, whose CPU has AVX2, with
    // R rounded inputs at `inputs`.
    unsafe {
        for (row, sums) in sums.iter_mut().enumerate() {
            let q = _mm256_set1_epi32(*inputs.add(row));
            for i in 0..2 {
                sums[i] = P::add(sums[i], w[i], q);
            }
        }
    }
}

/// Asks for the bytes [`PREFETCH`] ahead of `record`, as many as it has:
/// a group's records lie one after another.
#[inline(always)]
unsafe fn prefetch(record: &[u8]) {
    // SAFETY: only called from the kernels above, whose CPU has SSE; a
    // prefetch of any address is harmless, and the pointer is never read.
    unsafe {
        for line in (0..record.len()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(record.as_ptr().wrapping_add(PREFETCH + line).cast());
        }
    }
}

/// The 16 f16 scalars at `p`, in [`by_lanes`]'s order.
#[inline(always)]
unsafe fn halves(p: *const u8) -> [__m256; 2] {
    // SAFETY: only called from the kernels above, whose CPU has AVX2 and
    // F16C, on 32 bytes of a record.
    unsafe {
        let first = _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
        let second = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast()));
        swap_halves([first, second])
    }
}

/// 16 integer scales at `p` (unsigned or `signed` bytes) times the 16 f32
/// at `d` (a span's head), in [`by_lanes`]'s order: exact products.
#[inline(always)]
unsafe fn scaled(p: *const u8, d: *const f32, signed: bool) -> [__m256; 2] {
    // SAFETY: only called from the kernels above, whose CPU has AVX2, on
    // 16 bytes of a record and 16 f32 of its head. (No closures here: one
    // kept out of line made K4 three times slower, measured.)
    unsafe {
        let (first, second) = (_mm_loadl_epi64(p.cast()), _mm_loadl_epi64(p.add(8).cast()));
        let (first, second) = if signed {
            (_mm256_cvtepi8_epi32(first), _mm256_cvtepi8_epi32(second))
        } else {
            (_mm256_cvtepu8_epi32(first), _mm256_cvtepu8_epi32(second))
        };
        swap_halves([
            _mm256_mul_ps(_mm256_cvtepi32_ps(first), _mm256_loadu_ps(d)),
            _mm256_mul_ps(_mm256_cvtepi32_ps(second), _mm256_loadu_ps(d.add(8))),
        ])
    }
}

/// Four quant rows of 16 bytes at `p` (inputs `j ..+ 4` of the group's 16
/// output rows, as Q6_K and Q8_0 are packed) as 32-bit lanes of four bytes, one output
/// row each: output rows 0-3 and 8-11 in the first vector, 4-7 and 12-15
/// in the second.
#[inline(always)]
unsafe fn transpose(p: *const u8) -> [__m256i; 2] {
    // SAFETY: only called from the kernels above, whose CPU has AVX2, on
    // 64 bytes of a record.
    unsafe {
        let zip = _mm256_setr_epi8(
            0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12,
            5, 13, 6, 14, 7, 15,
        );
        // Rows j and j + 1 byte by byte, output rows 0-7 | 8-15; then j + 2, j + 3.
        let first = _mm256_loadu_si256(p.cast());
        let first = _mm256_shuffle_epi8(_mm256_permute4x64_epi64::<0xD8>(first), zip);
        let second = _mm256_loadu_si256(p.add(2 * GROUP).cast());
        let second = _mm256_shuffle_epi8(_mm256_permute4x64_epi64::<0xD8>(second), zip);
        [
            _mm256_unpacklo_epi16(first, second),
            _mm256_unpackhi_epi16(first, second),
        ]
    }
}
