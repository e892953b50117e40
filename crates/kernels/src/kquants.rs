//! K-quants (Q4_K, Q5_K, Q6_K) re-cut into the 32-input blocks the packed
//! kernels read (the Q5_0 and Q8_0 a Q4_K_M file also holds are read as
//! stored). The quants keep their own width:
//! - Q4_K → [`Encoding::K4`]: the sub-block's 6-bit scale and minimum as
//!   bytes, 32 nibbles, and per super-block (256 weights) a head of f32
//!   `d`, `−dmin` (4.75 bits a weight);
//! - Q5_K → [`Encoding::K5`]: as K4, with the 32 fifth bits as a word
//!   (5.75 bits a weight);
//! - Q6_K → [`Encoding::K6`]: a signed 8-bit scale per 16 weights, 32
//!   nibbles and 32 bit pairs, and per super-block a head `d` (6.625 bits a
//!   weight).
//!
//! The values are those of GGUF's own dequantization, bit for bit: ggml's
//! `d₁·q − m₁` is `q·(d·sc)` plus `−dmin·m`, and the kernels' `d·sc` and
//! `−dmin·m` are exact products.

use candle_core::quantized::GgmlDType;
use half::f16;

use crate::packed::{Encoding, BLOCK};

/// Weights per K-quant super-block.
const SUPER: usize = 256;

/// Appends the re-cut blocks of one GGUF block.
type Convert = fn(&[u8], &mut Vec<u8>);

/// `raw`, blocks of `dtype` as a GGUF file stores them (any number of
/// rows, each a whole number of blocks), re-cut into blocks of 32 inputs in
/// the same order, with the encoding they are in; `None` for types that
/// are not re-cut.
pub fn recut(dtype: GgmlDType, raw: &[u8]) -> Option<Result<(Encoding, Vec<u8>), String>> {
    // (bytes of a block, weights in it, the encoding, the conversion)
    let (bytes, weights, encoding, convert): (usize, usize, Encoding, Convert) = match dtype {
        GgmlDType::Q4K => (144, SUPER, Encoding::K4, q4k),
        GgmlDType::Q5K => (176, SUPER, Encoding::K5, q5k),
        GgmlDType::Q6K => (210, SUPER, Encoding::K6, q6k),
        _ => return None,
    };
    if !raw.len().is_multiple_of(bytes) {
        return Some(Err(format!(
            "{} bytes is not a whole number of {dtype:?} blocks",
            raw.len()
        )));
    }
    // Spans (8 blocks under a head) a GGUF block becomes.
    let spans = weights / (encoding.span() * BLOCK);
    let mut out = Vec::with_capacity(raw.len() / bytes * spans * encoding.span_bytes());
    for block in raw.chunks_exact(bytes) {
        convert(block, &mut out);
    }
    debug_assert_eq!(out.len(), raw.len() / bytes * spans * encoding.span_bytes());
    Some(Ok((encoding, out)))
}

fn f16_at(bytes: &[u8]) -> f32 {
    f16::from_le_bytes([bytes[0], bytes[1]]).to_f32()
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K block's
/// 12 packed bytes.
fn scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: `d`, `dmin` (f16), 12 bytes of scales, 128 bytes of nibbles; each
/// 64 weights are the low then the high nibbles of 32 bytes. The head is
/// `d` and `−dmin` in f32; each 32 weights become a [`Encoding::K4`]
/// block: scale `sc`, minimum `m`, and byte `i` holding quant `i` (low
/// nibble) and quant `i + 16` (high nibble).
fn q4k(b: &[u8], out: &mut Vec<u8>) {
    let (d, dmin, scales, qs) = (f16_at(&b[0..]), f16_at(&b[2..]), &b[4..16], &b[16..144]);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&(-dmin).to_le_bytes());
    for j in 0..SUPER / BLOCK {
        let (sc, m) = scale_min(j, scales);
        let bytes = &qs[(j / 2) * 32..][..32];
        let shift = 4 * (j % 2);
        let q = |l: usize| (bytes[l] >> shift) & 0xF;
        out.extend([sc, m]);
        out.extend((0..BLOCK / 2).map(|i| q(i) | (q(i + BLOCK / 2) << 4)));
    }
}

/// Q5_K: as Q4_K, with a fifth bit per weight in 32 bytes of `qh` (bit
/// `j` of byte `l`: weight `l` of sub-block `j`). The head is Q4_K's; each
/// 32 weights become a [`Encoding::K5`] block: K4's scale and minimum, the
/// fifth bits of quants `0..32` as a little-endian word, then K4's nibbles.
fn q5k(b: &[u8], out: &mut Vec<u8>) {
    let (d, dmin, scales) = (f16_at(&b[0..]), f16_at(&b[2..]), &b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(&(-dmin).to_le_bytes());
    for j in 0..SUPER / BLOCK {
        let (sc, m) = scale_min(j, scales);
        let bytes = &qs[(j / 2) * 32..][..32];
        let shift = 4 * (j % 2);
        let q = |l: usize| (bytes[l] >> shift) & 0xF;
        let fifth = (0..BLOCK).fold(0u32, |word, l| word | (((qh[l] >> j) & 1) as u32) << l);
        out.extend([sc, m]);
        out.extend(fifth.to_le_bytes());
        out.extend((0..BLOCK / 2).map(|i| q(i) | (q(i + BLOCK / 2) << 4)));
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed scales
/// (one per 16 weights), `d` (f16); quants are stored offset by 32. The
/// head is `d` in f32; each 32 weights become a [`Encoding::K6`] block:
/// the scales of each half, byte `i` of 16 holding the low nibbles of
/// quants `i` and `i + 16`, byte `b` of 8 the high bit pairs of quants `b`,
/// `b + 8`, `b + 16` and `b + 24`.
fn q6k(b: &[u8], out: &mut Vec<u8>) {
    let (ql, qh, scales, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(&b[208..]));
    out.extend_from_slice(&d.to_le_bytes());
    for j in 0..SUPER / BLOCK {
        // Weights 128·half + 32·t + l, for l in 0..32.
        let (part, t) = (j / 4, j % 4);
        let (ql, qh) = (&ql[64 * part..], &qh[32 * part..]);
        let low = |l: usize| match t {
            0 => ql[l] & 0xF,
            1 => ql[l + 32] & 0xF,
            2 => ql[l] >> 4,
            _ => ql[l + 32] >> 4,
        };
        let high = |l: usize| (qh[l] >> (2 * t)) & 3;
        out.extend([scales[2 * j], scales[2 * j + 1]]);
        out.extend((0..BLOCK / 2).map(|i| low(i) | (low(i + BLOCK / 2) << 4)));
        out.extend(
            (0..8).map(|b| high(b) | high(b + 8) << 2 | high(b + 16) << 4 | high(b + 24) << 6),
        );
    }
}
