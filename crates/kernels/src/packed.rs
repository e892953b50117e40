//! Weight matrices kept in the compact encoding their file uses (GGUF
//! Q4_0, Q4_1, Q8_0, F16, BF16; safetensors F16, BF16), for inference.
//!
//! A decode step reads every weight once. In f32 the default model is
//! 540 MB per step and the step waits on memory; kept as the file's Q4_1 it
//! is 66 MB. Nothing is lost: unpacking computes exactly the f32 values the
//! dequantizer computes (`q·d + m`, whose product is exact), so a product
//! with a packed matrix differs from the f32 one only in summation order.
//!
//! A file's blocks run along one weight row: 32 inputs of one output. Here
//! the blocks of 16 output rows are interleaved, so that one block index
//! unpacks to 32 input rows × 16 outputs — the `[in, out]` layout gemm reads
//! fastest — with one 16-lane vector operation per input row.
//!
//! (Over 500 lines because the block formats, their portable kernel and
//! the bit-exactness tests of every encoding belong together; the kernels
//! per instruction set are in `register_avx512.rs` and `register_avx2.rs`.)

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use crate::level::{with_vector_features, CpuLevel};

/// Inputs per block, in every encoding here.
pub const BLOCK: usize = 32;

/// Output rows interleaved in one record.
pub const GROUP: usize = 16;

/// Blocks of a K-quant super-block (256 weights), which share a head.
const SPAN: usize = 8;

/// How a block of 32 weights of one output row is stored: the GGUF block
/// types, and plain 16-bit floats taken 32 at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// f16 scale `d`, 32 nibbles `q`: `(q − 8)·d`.
    Q4_0,
    /// f16 scale `d` and minimum `m`, 32 nibbles `q`: `q·d + m`.
    Q4_1,
    /// f16 scale `d`, 32 signed bytes `q`: `q·d`.
    Q8_0,
    F16,
    Bf16,
    /// A Q4_K sub-block (see `kquants.rs`): its 6-bit scale `sc` and
    /// minimum `m` as bytes, 32 nibbles `q` as Q4_1 lays them out, under
    /// the super-block's f32 `d` and `n = −dmin` (the span's head):
    /// `q·(d·sc) + n·m`.
    K4,
    /// f16 scale `d`, the 32 fifth bits (bit `i` of quant `i`, as a
    /// little-endian word), 32 nibbles: 5-bit quants `q`, `(q − 16)·d`.
    Q5_0,
    /// As Q5_0 with an f16 minimum `m` after `d`: `q·d + m`.
    Q5_1,
    /// A Q5_K sub-block (see `kquants.rs`): K4's integer scale and minimum
    /// and head, with Q5_0's fifth bits before the nibbles:
    /// `q·(d·sc) + n·m`.
    K5,
    /// A Q6_K sub-block (see `kquants.rs`): signed 8-bit scales `lo`,
    /// `hi`, 32 nibbles as Q4_1 lays them out and 32 bit pairs above them,
    /// making 6-bit quants `q`, under the super-block's f32 `d` (the span's
    /// head): `(q − 32)·(d·lo)` for the first 16, `(q − 32)·(d·hi)` for the
    /// rest.
    K6,
}

impl Encoding {
    /// Every encoding in the order declared, so that `ALL[e as usize] ==
    /// e`: a kernel compiled for one encoding takes it as a `u8` constant
    /// and reads it back here, and its sizes fold into constants.
    pub(crate) const ALL: [Encoding; 10] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q8_0,
        Self::F16,
        Self::Bf16,
        Self::K4,
        Self::Q5_0,
        Self::Q5_1,
        Self::K5,
        Self::K6,
    ];

    /// The encoding of a GGUF tensor type, when it has a packed kernel.
    pub fn of_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::F16 => Some(Self::F16),
            GgmlDType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// Scalars (`d`, `m`, …) at the head of a block.
    fn scales(self) -> usize {
        match self {
            Self::Q4_1 | Self::Q5_1 | Self::K4 | Self::K5 | Self::K6 => 2,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => 1,
            Self::F16 | Self::Bf16 => 0,
        }
    }

    /// Bytes of one scalar: f16 in GGUF's blocks, the K-quants' own 6- or
    /// 8-bit integer scales in the re-cut ones.
    fn scalar_bytes(self) -> usize {
        match self {
            Self::K4 | Self::K5 | Self::K6 => 1,
            _ => 2,
        }
    }

    /// Blocks under one head: a K-quant super-block's 8 for K4, K5 and K6,
    /// whose blocks' integer scales multiply the head's; 1 (and no head)
    /// for the rest.
    pub fn span(self) -> usize {
        match self {
            Self::K4 | Self::K5 | Self::K6 => SPAN,
            _ => 1,
        }
    }

    /// f32 scalars per row at the head of a span: `d` and `−dmin` for K4
    /// and K5, `d` for K6. Kept once per 256 weights, not multiplied out
    /// into every block: K4 takes 4.75 bits a weight instead of 6, K5 5.75
    /// instead of 7, K6 6.625 instead of 8, in memory and in what each
    /// decode step reads. The products `d·sc`,
    /// made in registers, are exact (an f16's 11 bits times 6 or 8 bits),
    /// so the values are the ones a stored product would give.
    fn head_scalars(self) -> usize {
        match self {
            Self::K4 | Self::K5 => 2,
            Self::K6 => 1,
            _ => 0,
        }
    }

    /// Bytes of one row's span as the re-cut stream stores it: its head,
    /// then its blocks.
    pub fn span_bytes(self) -> usize {
        4 * self.head_scalars() + self.span() * self.block_bytes()
    }

    /// Bytes of weights after the scales in a file block.
    fn payload_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::K4 => BLOCK / 2,
            Self::Q5_0 | Self::Q5_1 | Self::K5 => BLOCK / 8 + BLOCK / 2,
            Self::K6 => BLOCK / 2 + BLOCK / 4,
            Self::Q8_0 => BLOCK,
            Self::F16 | Self::Bf16 => 2 * BLOCK,
        }
    }

    /// Bytes that stay together when blocks are interleaved: one byte of
    /// quants, or one 16-bit float.
    fn element_bytes(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 2,
            _ => 1,
        }
    }

    /// Whether the payload's bytes are laid out for the integer kernels
    /// ([`lane_offset`]): the 4-bit encodings, whose integer kernel would
    /// otherwise transpose every 64 bytes it reads (its one-row kernel ran
    /// 45% faster in cache and 15-25% streamed without that, measured),
    /// and whose exact kernels read either layout at the same cost; and
    /// the 5-bit ones, whose fifth bits then lie as one 32-bit word a row,
    /// a lane. Not Q6_K: its exact kernel ran 13-30% slower by lanes
    /// (measured).
    pub(crate) fn by_lanes(self) -> bool {
        matches!(
            self,
            Self::Q4_0 | Self::Q4_1 | Self::K4 | Self::Q5_0 | Self::Q5_1 | Self::K5
        )
    }

    /// Bytes of one block as the file (or, re-cut, `kquants.rs`) stores it.
    pub fn block_bytes(self) -> usize {
        self.scalar_bytes() * self.scales() + self.payload_bytes()
    }

    /// The quant that stands for zero in the 4- and 5-bit encodings: 8 in
    /// Q4_0, 16 in Q5_0; 0 in Q4_1, Q5_1, K4 and K5, whose stored minimum
    /// is their offset. The kernels subtract it once a block, as the offset
    /// `−centre·d` (exact), not from each quant.
    pub(crate) fn centre(self) -> f32 {
        match self {
            Self::Q4_0 => 8.0,
            Self::Q5_0 => 16.0,
            _ => 0.0,
        }
    }

    /// Whether the quants have a fifth bit, stored apart from the nibbles.
    pub(crate) fn has_fifth_bits(self) -> bool {
        matches!(self, Self::Q5_0 | Self::Q5_1 | Self::K5)
    }

    /// Where a record's payload starts: after its 16 rows' scales.
    pub(crate) fn payload_start(self) -> usize {
        GROUP * self.scales() * self.scalar_bytes()
    }

    /// Where a record's nibbles start in the 4- and 5-bit encodings: at the
    /// payload, or after the fifth bits (a 32-bit word a row) where there
    /// are any.
    pub(crate) fn nibbles_start(self) -> usize {
        self.payload_start() + if self.has_fifth_bits() { 4 * GROUP } else { 0 }
    }

    /// Where input `j`'s 16 bytes (one a row) start in a Q8_0 or Q6_K
    /// record, whose payloads are input-major: in Q8_0 its quants
    /// (`j < 32`); in Q6_K its nibbles (`j < 16`; the high nibbles are
    /// input `j + 16`'s).
    pub(crate) fn input_bytes(self, j: usize) -> usize {
        self.payload_start() + j * GROUP
    }

    /// Where the 16 bytes (one a row) holding Q6_K input `j`'s high bit
    /// pair start, `j < 16`: after the nibbles, byte `j mod 8`, the pair at
    /// bits `2·(j / 8)`, input `j + 16`'s four bits higher.
    pub(crate) fn k6_pairs(j: usize) -> usize {
        Self::K6.input_bytes(BLOCK / 2 + j % 8)
    }

    /// A 4- or 5-bit record's 16 scales `d` and offsets `o`, each weight
    /// being `q·d + o`: the one place the portable unpacking reads them.
    /// Q4_0's and Q5_0's `o` is `−centre·d`; the products and the sum are
    /// exact, so these are `(q − centre)·d`.
    fn scale_and_offset(self, head: &[u8], record: &[u8]) -> ([f32; GROUP], [f32; GROUP]) {
        match self {
            Self::Q4_0 | Self::Q5_0 => {
                let d = f16_lanes(record);
                (d, each_lane(|c| -self.centre() * d[c]))
            }
            Self::Q4_1 | Self::Q5_1 => (f16_lanes(record), f16_lanes(&record[2 * GROUP..])),
            _ => {
                let (sc, m) = (byte_lanes(record), byte_lanes(&record[GROUP..]));
                let (d, n) = (f32_lanes(head), f32_lanes(&head[4 * GROUP..]));
                (
                    each_lane(|c| d[c] * sc[c] as f32),
                    each_lane(|c| n[c] * m[c] as f32),
                )
            }
        }
    }
}

/// A weight `[rows, cols]` (outputs × inputs) as interleaved records: for
/// each group of 16 rows and each block of 32 inputs, the 16 blocks' scales
/// side by side, then their payloads element by element (in the 4-bit
/// encodings four elements of a row together, [`lane_offset`]). In K4 and K6 each
/// span of 8 records is preceded by its head: the 16 rows' f32 super-block
/// scalars, side by side.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    encoding: Encoding,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl PackedMatrix {
    /// Packs `raw`, a matrix of `rows` rows of `cols / 32` blocks each in
    /// the file's layout (in K4 and K6, each span of 8 blocks after its
    /// head, see [`Encoding::span_bytes`]). Output row `r` is read from
    /// source row `source_rows[r]` when given (llama.cpp's rope order,
    /// undone).
    pub fn new(
        encoding: Encoding,
        rows: usize,
        cols: usize,
        raw: &[u8],
        source_rows: Option<&[usize]>,
    ) -> Result<Self, String> {
        let (span, span_bytes) = (encoding.span(), encoding.span_bytes());
        if !cols.is_multiple_of(span * BLOCK) {
            return Err(format!(
                "{cols} inputs is not a multiple of {} in {encoding:?}",
                span * BLOCK
            ));
        }
        let spans = cols / (span * BLOCK);
        if raw.len() != rows * spans * span_bytes {
            return Err(format!(
                "{} bytes for {rows} × {cols} weights in {encoding:?}, expected {}",
                raw.len(),
                rows * spans * span_bytes
            ));
        }
        if source_rows.is_some_and(|s| s.len() != rows || s.iter().any(|&r| r >= rows)) {
            return Err("the row order does not fit the matrix".into());
        }
        let (block_bytes, heads) = (encoding.block_bytes(), encoding.head_scalars());
        let (head, record) = (GROUP * 4 * heads, GROUP * block_bytes);
        let packed_span = head + span * record;
        // Rows past the end stay zero: scales 0 unpack to 0.
        let mut data = vec![0u8; rows.div_ceil(GROUP) * spans * packed_span];
        let (scales, element) = (encoding.scales(), encoding.element_bytes());
        let scalar = encoding.scalar_bytes();
        let elements = encoding.payload_bytes() / element;
        for row in 0..rows {
            let source = source_rows.map_or(row, |s| s[row]);
            let (group, c) = (row / GROUP, row % GROUP);
            for s in 0..spans {
                let src = &raw[(source * spans + s) * span_bytes..][..span_bytes];
                let dst = &mut data[(group * spans + s) * packed_span..][..packed_span];
                for h in 0..heads {
                    dst[(h * GROUP + c) * 4..][..4].copy_from_slice(&src[h * 4..][..4]);
                }
                for b in 0..span {
                    let src = &src[4 * heads + b * block_bytes..][..block_bytes];
                    let dst = &mut dst[head + b * record..][..record];
                    for s in 0..scales {
                        dst[(s * GROUP + c) * scalar..][..scalar]
                            .copy_from_slice(&src[s * scalar..][..scalar]);
                    }
                    let (payload, out) =
                        (&src[scales * scalar..], &mut dst[scales * GROUP * scalar..]);
                    for e in 0..elements {
                        let at = if encoding.by_lanes() {
                            lane_offset(e, c)
                        } else {
                            (e * GROUP + c) * element
                        };
                        out[at..][..element].copy_from_slice(&payload[e * element..][..element]);
                    }
                }
            }
        }
        Ok(Self {
            encoding,
            rows,
            cols,
            data,
        })
    }

    /// `raw`, a GGUF tensor's blocks of `dtype`, packed: as stored where a
    /// kernel reads the type, re-cut first (`kquants.rs`) where one reads
    /// its re-cut form; `None` for types with neither.
    pub fn from_ggml(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        raw: &[u8],
        source_rows: Option<&[usize]>,
    ) -> Option<Result<Self, String>> {
        if let Some(encoding) = Encoding::of_ggml(dtype) {
            return Some(Self::new(encoding, rows, cols, raw, source_rows));
        }
        let recut = crate::kquants::recut(dtype, raw)?;
        Some(
            recut.and_then(|(encoding, blocks)| {
                Self::new(encoding, rows, cols, &blocks, source_rows)
            }),
        )
    }

    /// Outputs.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a product reads: the records, padding rows included.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Groups of 16 output rows; the last may be padded.
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP)
    }

    /// Writes rows `16·group ..` as columns: input `k`, row `16·group + c`
    /// lands at `panel[k · stride + c]`, for all `cols` inputs and 16 rows.
    pub fn unpack_group(&self, group: usize, panel: &mut [f32], stride: usize) {
        let unpack = |k: usize, w: &[f32; GROUP]| *lanes(panel, k * stride) = *w;
        with_vector_features!(self.for_each_input(group, unpack))
    }

    /// Row `row` (all `cols` inputs) into `out`: an embedding lookup
    /// straight from the packed matrix, so no f32 copy of the table exists.
    pub fn unpack_row(&self, row: usize, out: &mut [f32]) {
        let lane = row % GROUP;
        let out = &mut out[..self.cols];
        with_vector_features!(self.for_each_input(row / GROUP, |k, w| out[k] = w[lane]))
    }

    /// `dots[r][c] = Σ_k x[r][k] · W[16·group + c, k]` for the `R` rows of
    /// `x`, given [`interleave`]d (`x[k·R + r]`), with the weights unpacked
    /// in registers and never stored: for the few rows of a decode step,
    /// where writing a panel for gemm costs more than the product itself.
    /// Each row is summed in the same order whatever `R` is, so a row's
    /// dots do not depend on its batch.
    pub fn dot_group<const R: usize>(&self, group: usize, x: &[f32]) -> [[f32; GROUP]; R] {
        self.dot_group_at(CpuLevel::current(), group, x)
    }

    /// [`PackedMatrix::dot_group`] with the kernel of `level` (at most what
    /// the CPU runs): tests compare every level the machine has.
    pub(crate) fn dot_group_at<const R: usize>(
        &self,
        level: CpuLevel,
        group: usize,
        x: &[f32],
    ) -> [[f32; GROUP]; R] {
        assert!(
            x.len() >= interleaved_len(R, self.cols),
            "{R} interleaved rows of {} inputs and their block sums",
            self.cols
        );
        assert!(
            level <= CpuLevel::detected(),
            "{level:?} is beyond this CPU"
        );
        #[cfg(target_arch = "x86_64")]
        match level {
            // SAFETY: the CPU supports AVX-512F (checked above) and `x`
            // holds `cols` inputs of `R` rows.
            CpuLevel::Avx512 if self.encoding != Encoding::K6 => {
                return unsafe { crate::register_avx512::dot_group(self, group, x) }
            }
            // SAFETY: as above, and the CPU has VBMI and BW (checked).
            CpuLevel::Avx512 if crate::register_avx512::has_k6_kernel() => {
                return unsafe { crate::register_avx512::dot_group_k6(self, group, x) }
            }
            // SAFETY: an AVX-512 CPU supports AVX2, FMA and F16C, and `x`
            // holds `cols` inputs of `R` rows.
            CpuLevel::Avx512 => return unsafe { crate::register_avx2::dot_group(self, group, x) },
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above),
            // and `x` holds `cols` inputs of `R` rows.
            CpuLevel::Avx2 => return unsafe { crate::register_avx2::dot_group(self, group, x) },
            CpuLevel::Portable => {}
        }
        self.dot_group_portable(group, x)
    }

    /// [`PackedMatrix::dot_group`] without vector intrinsics: the fallback,
    /// and the reference the intrinsic kernels are tested against.
    pub(crate) fn dot_group_portable<const R: usize>(
        &self,
        group: usize,
        x: &[f32],
    ) -> [[f32; GROUP]; R] {
        let mut dots = [[0f32; GROUP]; R];
        self.for_each_input(group, |k, w| {
            for (r, dot) in dots.iter_mut().enumerate() {
                for c in 0..GROUP {
                    dot[c] += x[k * R + r] * w[c];
                }
            }
        });
        dots
    }

    /// The records of a group of 16 rows, one per block of 32 inputs, each
    /// with the head of its span (empty where the encoding has none).
    pub(crate) fn records(&self, group: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.records_as(self.encoding, group)
    }

    /// [`Self::records`] for a kernel compiled for one encoding, which
    /// passes it as a constant, so that the walk's sizes are constants
    /// too: walked with the matrix's encoding read at run time, the 4- and
    /// 5-bit integer kernels spent about a fifth of their time choosing
    /// and dividing (`perf annotate`, docs/performance.md).
    pub(crate) fn records_as(
        &self,
        encoding: Encoding,
        group: usize,
    ) -> impl Iterator<Item = (&[u8], &[u8])> {
        debug_assert_eq!(encoding, self.encoding);
        let head = GROUP * 4 * encoding.head_scalars();
        let record = GROUP * encoding.block_bytes();
        let packed_span = head + encoding.span() * record;
        let per_group = self.cols / (encoding.span() * BLOCK) * packed_span;
        self.data[group * per_group..][..per_group]
            .chunks_exact(packed_span)
            .flat_map(move |span| {
                let (head, records) = span.split_at(head);
                records.chunks_exact(record).map(move |r| (head, r))
            })
    }

    /// Calls `f(k, w)` for every input `k` in order, `w` holding the weights
    /// of the group's 16 rows for that input. Written for the compiler to
    /// vectorize: every inner loop is the 16 lanes of one input.
    #[inline(always)]
    fn for_each_input(&self, group: usize, mut f: impl FnMut(usize, &[f32; GROUP])) {
        for (b, (head, r)) in self.records(group).enumerate() {
            let k = b * BLOCK;
            match self.encoding {
                Encoding::Q4_0 | Encoding::Q4_1 | Encoding::K4 => {
                    let (d, o) = self.encoding.scale_and_offset(head, r);
                    let nibbles = &r[self.encoding.nibbles_start()..];
                    for j in 0..BLOCK / 2 {
                        let q = lane_bytes(nibbles, j);
                        f(k + j, &each_lane(|c| (q[c] & 0x0F) as f32 * d[c] + o[c]));
                        f(
                            k + j + BLOCK / 2,
                            &each_lane(|c| (q[c] >> 4) as f32 * d[c] + o[c]),
                        );
                    }
                }
                Encoding::Q8_0 => {
                    let d = f16_lanes(&r[..2 * GROUP]);
                    for j in 0..BLOCK {
                        let q = byte_lanes(&r[self.encoding.input_bytes(j)..]);
                        f(k + j, &each_lane(|c| q[c] as i8 as f32 * d[c]));
                    }
                }
                Encoding::F16 => {
                    for j in 0..BLOCK {
                        f(k + j, &f16_lanes(&r[j * 2 * GROUP..]));
                    }
                }
                Encoding::Bf16 => {
                    for j in 0..BLOCK {
                        let h = half_lanes(&r[j * 2 * GROUP..]);
                        f(k + j, &each_lane(|c| f32::from_bits((h[c] as u32) << 16)));
                    }
                }
                Encoding::Q5_0 | Encoding::Q5_1 | Encoding::K5 => {
                    let e = self.encoding;
                    let (d, o) = e.scale_and_offset(head, r);
                    let fifth = fifth_bits(&r[e.payload_start()..]);
                    let five = |c: usize, low: u8, i: usize| {
                        (low | (((fifth[c] >> i) & 1) as u8) << 4) as f32
                    };
                    for j in 0..BLOCK / 2 {
                        let q = lane_bytes(&r[e.nibbles_start()..], j);
                        f(k + j, &each_lane(|c| five(c, q[c] & 0x0F, j) * d[c] + o[c]));
                        f(
                            k + j + BLOCK / 2,
                            &each_lane(|c| five(c, q[c] >> 4, j + BLOCK / 2) * d[c] + o[c]),
                        );
                    }
                }
                Encoding::K6 => {
                    let (lo, hi, d) = (byte_lanes(r), byte_lanes(&r[GROUP..]), f32_lanes(head));
                    let (lo, hi) = (
                        each_lane(|c| d[c] * lo[c] as i8 as f32),
                        each_lane(|c| d[c] * hi[c] as i8 as f32),
                    );
                    for j in 0..BLOCK / 2 {
                        let q = byte_lanes(&r[Encoding::K6.input_bytes(j)..]);
                        let h = byte_lanes(&r[Encoding::k6_pairs(j)..]);
                        let shift = 2 * (j / 8);
                        let six = |low: u8, high: u8| (low | ((high & 3) << 4)) as i32 - 32;
                        f(
                            k + j,
                            &each_lane(|c| six(q[c] & 0x0F, h[c] >> shift) as f32 * lo[c]),
                        );
                        f(
                            k + j + BLOCK / 2,
                            &each_lane(|c| six(q[c] >> 4, h[c] >> (shift + 4)) as f32 * hi[c]),
                        );
                    }
                }
            }
        }
    }

    /// The whole matrix `[rows, cols]` in f32, for export and tests.
    pub fn to_f32(&self) -> candle_core::Result<Tensor> {
        let width = self.groups() * GROUP;
        let mut panel = vec![0f32; self.cols * width];
        for group in 0..self.groups() {
            self.unpack_group(group, &mut panel[group * GROUP..], width);
        }
        Tensor::from_vec(panel, (self.cols, width), &Device::Cpu)?
            .narrow(1, 0, self.rows)?
            .t()?
            .contiguous()
    }
}

/// The 16 output lanes of one input row of a panel.
#[inline(always)]
fn lanes(panel: &mut [f32], at: usize) -> &mut [f32; GROUP] {
    (&mut panel[at..at + GROUP]).try_into().expect("16 lanes")
}

/// `[f(0), …, f(15)]`, inlined so that the lanes vectorize (the standard
/// `from_fn` is not always inlined into a `target_feature` function).
#[inline(always)]
fn each_lane<T: Copy + Default>(f: impl Fn(usize) -> T) -> [T; GROUP] {
    let mut out = [T::default(); GROUP];
    for (c, lane) in out.iter_mut().enumerate() {
        *lane = f(c);
    }
    out
}

/// Where a payload laid out by lanes ([`Encoding::by_lanes`]) keeps byte
/// `e` of output row `c`: every 4 bytes of the 16 rows (64) are two 32-byte
/// vectors of 32-bit lanes, one row's 4 bytes a lane, rows 0-3 and 8-11 in
/// the first, 4-7 and 12-15 in the second (the order AVX2's 128-bit halves
/// make cheapest; [`ROW_OF_LANE`]).
pub(crate) fn lane_offset(e: usize, c: usize) -> usize {
    let lane = c % 4 + c / 8 * 4;
    e / 4 * 4 * GROUP + c / 4 % 2 * 2 * GROUP + lane * 4 + e % 4
}

/// The output row of each 32-bit lane of a 64-byte lanes-laid chunk.
pub(crate) const ROW_OF_LANE: [usize; GROUP] =
    [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];

/// Byte `e` of the 16 rows of a payload laid out by lanes, in row order.
#[inline(always)]
fn lane_bytes(payload: &[u8], e: usize) -> [u8; GROUP] {
    let chunk: &[u8; 4 * GROUP] = payload[e / 4 * 4 * GROUP..][..4 * GROUP]
        .try_into()
        .expect("64 bytes");
    each_lane(|c| chunk[lane_offset(e % 4, c)])
}

/// The fifth bits of a 5-bit payload laid out by lanes (its first 4
/// bytes a row): bit `i` of row `c`'s word is quant `i`'s.
#[inline(always)]
fn fifth_bits(payload: &[u8]) -> [u32; GROUP] {
    let bytes = [0, 1, 2, 3].map(|e| lane_bytes(payload, e));
    each_lane(|c| u32::from_le_bytes(bytes.map(|b| b[c])))
}

/// The 16 bytes at the start of `bytes`.
#[inline(always)]
fn byte_lanes(bytes: &[u8]) -> [u8; GROUP] {
    bytes[..GROUP].try_into().expect("16 bytes")
}

/// The 16 little-endian 16-bit words at the start of `bytes`.
#[inline(always)]
fn half_lanes(bytes: &[u8]) -> [u16; GROUP] {
    let bytes: &[u8; 2 * GROUP] = bytes[..2 * GROUP].try_into().expect("32 bytes");
    each_lane(|c| u16::from_le_bytes([bytes[2 * c], bytes[2 * c + 1]]))
}

/// The 16 little-endian f32s at the start of `bytes`.
#[inline(always)]
fn f32_lanes(bytes: &[u8]) -> [f32; GROUP] {
    let bytes: &[u8; 4 * GROUP] = bytes[..4 * GROUP].try_into().expect("64 bytes");
    each_lane(|c| {
        f32::from_le_bytes([
            bytes[4 * c],
            bytes[4 * c + 1],
            bytes[4 * c + 2],
            bytes[4 * c + 3],
        ])
    })
}

/// 16 little-endian f16s as f32, exactly, in a form that vectorizes: the
/// magnitude bits shifted into an f32 are the value times 2⁻¹¹², so one
/// multiplication by 2¹¹² rescales normal and subnormal halves alike.
#[inline(always)]
fn f16_lanes(bytes: &[u8]) -> [f32; GROUP] {
    let h = half_lanes(bytes);
    each_lane(|c| f16_to_f32(h[c]))
}

#[inline(always)]
fn f16_to_f32(half: u16) -> f32 {
    let h = half as u32;
    let sign = (h & 0x8000) << 16;
    let two_pow_112 = f32::from_bits((127 + 112) << 23);
    let finite = (f32::from_bits((h & 0x7FFF) << 13) * two_pow_112).to_bits();
    let infinite_or_nan = 0x7F80_0000 | ((h & 0x03FF) << 13);
    let magnitude = if h & 0x7C00 == 0x7C00 {
        infinite_or_nan
    } else {
        finite
    };
    f32::from_bits(sign | magnitude)
}

/// `R` rows of `cols` inputs, stored one after the other in `rows`,
/// interleaved input by input into `out`: `out[k·R + r] = rows[r·cols + k]`,
/// the layout [`PackedMatrix::dot_group`] reads. Its kernels then broadcast
/// every row's input from one pointer at a constant offset: with a pointer
/// per row, eight rows spilled pointers to the stack inside the hottest
/// loop (batch-8 decoding ~10% slower, seen in a profile). After them,
/// `out[R·cols + b·R + r]` holds row `r`'s sum over block `b`'s 32 inputs
/// (summed in order): a block of weights `d·q + o` adds `d·Σ x·q + o·Σ x`,
/// and `Σ x` is the same for every group of rows. `out` holds
/// [`interleaved_len`] values.
pub fn interleave(rows: &[f32], cols: usize, out: &mut [f32]) {
    let r_count = rows.len() / cols.max(1);
    let (inputs, sums) = out.split_at_mut(r_count * cols);
    for (r, row) in rows.chunks_exact(cols).enumerate() {
        for (k, &v) in row.iter().enumerate() {
            inputs[k * r_count + r] = v;
        }
        for (b, block) in row.chunks_exact(BLOCK).enumerate() {
            sums[b * r_count + r] = block.iter().sum();
        }
    }
}

/// The values [`interleave`] writes for `rows` rows of `cols` inputs.
pub fn interleaved_len(rows: usize, cols: usize) -> usize {
    rows * cols + rows * (cols / BLOCK)
}

/// How many rows one pass of [`PackedMatrix::dot_group`] should take here
/// (as many as the vector registers hold accumulators for), or 0 when it
/// runs in its portable form, which is correct but slower than unpacking
/// into a panel.
pub(crate) fn register_rows() -> usize {
    match CpuLevel::current() {
        CpuLevel::Avx512 => 16,
        CpuLevel::Avx2 => 4,
        CpuLevel::Portable => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_encoding_is_at_its_own_code() {
        for e in Encoding::ALL {
            assert_eq!(Encoding::ALL[e as usize], e);
        }
    }

    /// A random `[rows, cols]` matrix in `dtype`, packed, and its values as
    /// the dequantizer gives them.
    fn random_matrix(dtype: GgmlDType, rows: usize, cols: usize) -> (PackedMatrix, Vec<f32>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rows as u64);
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let raw = q.data().unwrap();
        let packed = PackedMatrix::from_ggml(dtype, rows, cols, &raw, None)
            .unwrap()
            .unwrap();
        let dequantized = q.dequantize(&Device::Cpu).unwrap();
        (
            packed,
            dequantized.flatten_all().unwrap().to_vec1().unwrap(),
        )
    }

    /// The bound on the rounding error of an f32 dot product of `n` terms
    /// summed in any order (Higham's γₙ·Σ|xₖwₖ|, with the unpacking exact),
    /// so that the test holds on every machine rather than fitting one.
    fn dot_error_bound(n: usize, magnitude: f64) -> f64 {
        let u = f32::EPSILON as f64 / 2.0;
        let gamma = n as f64 * u / (1.0 - n as f64 * u);
        gamma * magnitude
    }

    /// The AVX-512 kernel puts a lanes-laid chunk in row order with
    /// [`ROW_OF_LANE`] (a machine without AVX-512 never runs it): lane `l`
    /// of the 16 holds that row's four bytes, and the order is its own
    /// inverse, as that permute needs.
    #[test]
    fn row_of_lane_names_the_row_each_lane_holds() {
        for (lane, &row) in ROW_OF_LANE.iter().enumerate() {
            assert_eq!(ROW_OF_LANE[row], lane, "an involution");
            for e in 0..BLOCK / 2 {
                let chunk = e / 4 * 4 * GROUP;
                assert_eq!(
                    lane_offset(e, row),
                    chunk + 4 * lane + e % 4,
                    "row {row}, byte {e}"
                );
            }
        }
    }

    /// Every encoding, K-quants (re-cut) included: unpacking (a
    /// group, or one row) gives the dequantizer's values bit for bit, and every kernel the product
    /// with them within f32 rounding.
    #[test]
    fn register_kernels_compute_the_product_with_the_dequantized_weights() {
        let rows = 40;
        let x: Vec<Vec<f32>> = (0..16)
            .map(|r| {
                (0..512)
                    .map(|k| ((r * 96 + k) % 13) as f32 / 6.0 - 1.0)
                    .collect()
            })
            .collect();
        let levels = CpuLevel::available();
        for (dtype, cols) in [
            (GgmlDType::Q4_0, 96),
            (GgmlDType::Q4_1, 96),
            (GgmlDType::Q8_0, 96),
            (GgmlDType::F16, 96),
            (GgmlDType::BF16, 96),
            (GgmlDType::Q4K, 512),
            (GgmlDType::Q5K, 512),
            (GgmlDType::Q6K, 256),
            (GgmlDType::Q5_0, 96),
            (GgmlDType::Q5_1, 96),
        ] {
            let (packed, w) = random_matrix(dtype, rows, cols);
            // K4, K5 and K6 keep their integer scales, and the f32 ones
            // once per 256 weights; the 5-bit GGUF blocks are read as
            // stored.
            let bits = packed.bytes() as f64 * 8.0 / (packed.groups() * GROUP * cols) as f64;
            match dtype {
                GgmlDType::Q4K => assert_eq!(bits, 4.75),
                GgmlDType::Q5K => assert_eq!(bits, 5.75),
                GgmlDType::Q6K => assert_eq!(bits, 6.625),
                GgmlDType::Q5_0 => assert_eq!(bits, 5.5),
                GgmlDType::Q5_1 => assert_eq!(bits, 6.0),
                _ => {}
            }
            let mut panel = vec![0f32; cols * packed.groups() * GROUP];
            for group in 0..packed.groups() {
                let width = packed.groups() * GROUP;
                packed.unpack_group(group, &mut panel[group * GROUP..], width);
                let interleaved = |from: usize, n: usize| {
                    let rows: Vec<f32> = x[from..from + n]
                        .iter()
                        .flat_map(|row| &row[..cols])
                        .copied()
                        .collect();
                    let mut out = vec![f32::NAN; interleaved_len(n, cols)];
                    interleave(&rows, cols, &mut out);
                    out
                };
                let sixteen = interleaved(0, 16);
                let eights = [0, 8].map(|from| interleaved(from, 8));
                let fours = [0, 4, 8, 12].map(|from| interleaved(from, 4));
                let one = interleaved(5, 1);
                // Per level: 16 rows at once, 8 + 8, 4 × 4, and row 5 alone.
                let runs: Vec<_> = levels
                    .iter()
                    .map(|&level| {
                        let eight = eights
                            .each_ref()
                            .map(|x| packed.dot_group_at::<8>(level, group, x));
                        let four = fours
                            .each_ref()
                            .map(|x| packed.dot_group_at::<4>(level, group, x));
                        (
                            level,
                            packed.dot_group_at::<16>(level, group, &sixteen),
                            eight.concat(),
                            four.concat(),
                            packed.dot_group_at::<1>(level, group, &one),
                        )
                    })
                    .collect();
                for c in 0..GROUP.min(rows - group * GROUP) {
                    let row = group * GROUP + c;
                    let w = &w[row * cols..][..cols];
                    let mut single = vec![f32::NAN; cols];
                    packed.unpack_row(row, &mut single);
                    for k in 0..cols {
                        assert_eq!(panel[k * width + row], w[k], "{dtype:?} unpack");
                        assert_eq!(single[k], w[k], "{dtype:?} unpack_row");
                    }
                    // A 4- or 5-bit block sums d·Σ x·q + o·Σ x: its
                    // rounding scales with |d·q| + |o| ≤ |w| + 2·|o|, and
                    // |o| (the block's offset: −min, or −8·d, −16·d) is at
                    // most its largest |w|.
                    let scale: Vec<f64> = w
                        .chunks_exact(BLOCK)
                        .flat_map(|block| {
                            let largest = block.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                            block.iter().map(move |&v| match dtype {
                                GgmlDType::Q4K
                                | GgmlDType::Q5K
                                | GgmlDType::Q4_0
                                | GgmlDType::Q4_1
                                | GgmlDType::Q5_0
                                | GgmlDType::Q5_1 => v.abs() as f64 + 2.0 * largest,
                                _ => v.abs() as f64,
                            })
                        })
                        .collect();
                    for (r, x) in x.iter().enumerate() {
                        let exact: f64 = (0..cols).map(|k| x[k] as f64 * w[k] as f64).sum();
                        let magnitude = (0..cols).map(|k| (x[k] as f64).abs() * scale[k]).sum();
                        let bound = dot_error_bound(cols, magnitude);
                        for (level, sixteen, eight, four, one) in &runs {
                            let err = (sixteen[r][c] as f64 - exact).abs();
                            assert!(
                                err <= bound,
                                "{dtype:?} {level:?} row {r} col {row}: {err} > {bound}"
                            );
                            for (rows, other) in [(8, eight), (4, four)] {
                                assert_eq!(
                                    sixteen[r][c].to_bits(),
                                    other[r][c].to_bits(),
                                    "{dtype:?} {level:?}: row {r} in a batch of 16 or of {rows}"
                                );
                            }
                            if r == 5 {
                                assert_eq!(
                                    one[0][c].to_bits(),
                                    sixteen[r][c].to_bits(),
                                    "{dtype:?} {level:?}: one row alone"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_half_converts_exactly() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            assert!(
                want.to_bits() == got.to_bits() || (want.is_nan() && got.is_nan()),
                "{bits:#06x}: {got} != {want}"
            );
        }
    }
}
