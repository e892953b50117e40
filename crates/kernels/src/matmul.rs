//! Products of activations with weights, split by output columns across
//! threads, for forwards that need no gradient.
//!
//! The gemm crate runs a one-row product on one thread and splits a
//! 32-row one poorly, so a decode step read its weights at one core's
//! memory bandwidth. Here each block of output columns is an independent
//! single-threaded GEMM writing its own columns of the output, and the
//! blocks are shared out by rayon. Packed weights stay compact in memory:
//! for a few rows they are unpacked in registers and used at once; for more
//! rows each block is unpacked into a per-thread panel that stays in cache
//! and gemm runs on it. Forwards that need gradients use candle's matmul.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::bf16::{Bf16Columns, Bf16Rows};
use crate::device_matmul::device_matmul;
use crate::gemm::Mat;
use crate::int8::{has_int8_kernel, Int8Rows};
use crate::int8_tile::has_tile_kernel;
use crate::level::CpuLevel;
use crate::packed::{interleave, interleaved_len, register_rows, Encoding, PackedMatrix, GROUP};
use crate::storage::f32_slice;

/// How a packed product's inputs enter the kernels: as they are (the
/// product of the dequantized weights, to rounding) unless a model opts
/// into a rounding, one for each kind of product.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Activations {
    /// Products that sample round their inputs to 8 bits a block of 32
    /// ([`crate::int8::Int8Rows`]) where the weights' encoding has an
    /// integer kernel at that row count ([`takes_int8`]): decode steps in
    /// registers everywhere, and where the CPU has AVX-512 VNNI and VBMI
    /// every product past one register pass, prefill included
    /// ([`crate::int8_tile`]), as llama.cpp samples. For a model that only
    /// samples.
    pub int8_decode: bool,
    /// Products of many rows (unpacked panels: prefill, a training forward
    /// and its input gradient) round inputs and weights to bf16 and sum in
    /// f32 where the CPU has AVX512_BF16 ([`crate::bf16`]): mixed
    /// precision, for training as well as sampling.
    pub bf16_products: bool,
}

impl Activations {
    /// Every product exact.
    pub const EXACT: Self = Self {
        int8_decode: false,
        bf16_products: false,
    };

    /// The roundings as a run's settings record them (`None`: exact), so
    /// that results and resumed runs say how they were computed.
    pub fn name(&self) -> Option<&'static str> {
        match (self.int8_decode, self.bf16_products) {
            (false, false) => None,
            (true, false) => Some("int8"),
            (false, true) => Some("bf16"),
            (true, true) => Some("int8+bf16"),
        }
    }
}

/// Products with at most this many rows take the split path; larger ones
/// (prefill) have enough rows for gemm's own parallelism.
const MAX_SPLIT_ROWS: usize = 64;

/// The most rows a product with weights in `encoding` keeps them in
/// registers (`PackedMatrix::dot_group`, [`register_rows`] rows a pass);
/// more rows share an unpacked panel and gemm. Every pass unpacks the
/// weights again, so more passes pay where unpacking is cheap beside the
/// multiply-adds. Measured on Qwen2.5-Coder-1.5B Q4_K_M decoding with
/// AVX-512 (16-row passes): two passes, at batch 16 53 against 34 tok/s
/// for the panel, at 32 53 against 43. With AVX2 (4-row passes), `r3
/// bench kernels --rows 9..=32` in cache on a Zen 3 (GFLOP/s, register
/// against panel, two rounds): K4 (Q4_K) 88–133 against 49–118 at every
/// count, and Q4_0, Q4_1 and Q8_0, summed as block dots like K4, 101–143
/// against 80–126, so eight passes; K6 (Q6_K) 47–73 against 34–62 up to
/// 16 rows, 67–74 against 79–90 at 32, and K5 (Q5_K, block dots too) 80
/// against 67–71 at 16, 80–83 against 92–97 at 32, so four, and four for
/// Q5_0 and Q5_1, summed as K5 is (not measured apart); the other
/// encodings 49–82 against 53–119 past 8 rows (they multiply every weight
/// by its scale), so two.
fn max_register_rows(encoding: Encoding) -> usize {
    let passes = match (CpuLevel::current(), encoding) {
        (CpuLevel::Avx2, Encoding::K4 | Encoding::Q4_0 | Encoding::Q4_1 | Encoding::Q8_0) => 8,
        (CpuLevel::Avx2, Encoding::K5 | Encoding::Q5_0 | Encoding::Q5_1 | Encoding::K6) => 4,
        _ => 2,
    };
    passes * register_rows()
}

/// Output columns per task, in 16-column units: small enough that a
/// 576-column projection still gives each thread a few blocks to balance
/// (128 columns measured best at batch 32 of 128, 256, 512).
const UNITS_PER_BLOCK: usize = 8;

/// `x [m, k] · w [k, n]`: split by columns when `x` has few rows and
/// nothing needs a gradient; a frozen product when only `x` needs one (a
/// LoRA base) on the CPU; candle's matmul otherwise (every other device
/// and type), through [`device_matmul`].
pub fn matmul(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let few_rows = x.dim(0)? <= MAX_SPLIT_ROWS;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let plain = |t: &Tensor| !t.track_op() && cpu_f32(t);
    if few_rows && plain(x) && plain(w) && w.is_contiguous() {
        return x.contiguous()?.apply_op2_no_bwd(w, &DenseProduct);
    }
    if x.track_op() && !w.track_op() && cpu_f32(x) && cpu_f32(w) {
        return crate::frozen::dense(x, w);
    }
    device_matmul(x, w)
}

/// `x [m, k] · [W₁ᵀ | W₂ᵀ | …]` for packed `W_i [n_i, k]`: the outputs of
/// every part side by side, `[m, Σ n_i]`. Packed weights are frozen: where
/// `x` needs a gradient, the backward pass gives it one through them.
pub fn packed_matmul(x: &Tensor, parts: &Arc<[PackedMatrix]>) -> candle_core::Result<Tensor> {
    packed_matmul_with(x, parts, Activations::EXACT)
}

/// [`packed_matmul`] with the register kernels taking `activations`
/// (rounded to 8 bits for a sampling model's decode steps); products with
/// more rows, or that need a gradient, always take them exact.
pub fn packed_matmul_with(
    x: &Tensor,
    parts: &Arc<[PackedMatrix]>,
    activations: Activations,
) -> candle_core::Result<Tensor> {
    if x.track_op() {
        return crate::frozen::packed(x, parts, activations);
    }
    x.contiguous()?
        .apply_op1_no_bwd(&PackedProduct { parts, activations })
}

/// Rows a pass of the integer kernel takes: its sums fill AVX2's 16
/// vector registers at 4 rows. The VNNI kernel has 32, but 8 rows a pass
/// measured no faster there (`r3 bench kernels --int8`, Zen 4).
const INT8_PASS: usize = 4;

/// The most rows a product with weights in `encoding` takes the integer
/// kernel at: Q8_0's signed weights cost two more operations a row, and
/// past one pass it measured 8% slower than the exact kernel (`r3 bench
/// kernels --rows 8 --int8`, Zen 3), where it is 20% faster at one row
/// (with VNNI, past one pass, within the spread of the exact kernel:
/// 152–198 against 153–178 GFLOP/s at 8–32 rows, Zen 4); K6 up to the
/// register range of the fastest exact kernels (K4's), its exact kernel
/// handing over to the panel at 16 rows on AVX2 and its integer one
/// slower than the f32 panel past that (128–133 against 142–175 GFLOP/s
/// at 64 and 256 rows, Zen 3). At the AVX2 level, with no tile kernel,
/// the 4- and 5-bit encodings take the integer kernel at any count, the
/// prompts' prefill included: at 64 and 256 rows it ran 1.3–2.0× the
/// panel for Q4_0, Q4_1 and K4 and 1.0–1.6× for the 5-bit ones (`r3
/// bench kernels --rows 64 --int8`, Zen 3; docs/performance.md). Past
/// AVX2 the f32 panel is twice as wide, so they stop where K6 does.
fn max_int8_rows(encoding: Encoding) -> usize {
    match (CpuLevel::current(), encoding) {
        _ if !has_int8_kernel(encoding) => 0,
        (_, Encoding::Q8_0) => INT8_PASS,
        (CpuLevel::Avx2, encoding) if encoding != Encoding::K6 => usize::MAX,
        _ => max_register_rows(Encoding::K4),
    }
}

/// Whether a product of `rows` rows with weights in `encoding` takes an
/// integer kernel when its activations round sampling inputs to 8 bits:
/// the tile kernel past one register pass where the CPU has it, otherwise
/// the register kernel where the encoding has one that pays at that count.
pub fn takes_int8(encoding: Encoding, rows: usize) -> bool {
    int8_in_tiles(encoding, rows) || int8_in_registers(encoding, rows)
}

/// Whether such a product takes the register kernel.
fn int8_in_registers(encoding: Encoding, rows: usize) -> bool {
    register_rows() > 0 && rows <= max_int8_rows(encoding) && !int8_in_tiles(encoding, rows)
}

/// Whether such a product takes the tile kernel ([`crate::int8_tile`]):
/// past one pass of the register kernel, which unpacks the weights again
/// for every pass.
fn int8_in_tiles(encoding: Encoding, rows: usize) -> bool {
    rows > INT8_PASS && has_tile_kernel(encoding) && crate::int8_tile::available()
}

/// Whether a product of `rows` rows with weights in `encoding` runs in
/// bf16 when its activations ask for bf16 products: past the register
/// kernels' rows (their products stay exact), where the CPU has the
/// instruction.
pub fn takes_bf16(encoding: Encoding, rows: usize) -> bool {
    crate::bf16::available() && !in_registers(encoding, rows)
}

/// Whether a product of `rows` rows keeps weights in `encoding` in
/// registers ([`PackedMatrix::dot_group`]) rather than a panel and gemm.
fn in_registers(encoding: Encoding, rows: usize) -> bool {
    register_rows() > 0 && rows <= max_register_rows(encoding)
}

/// Splits `units` into contiguous blocks of about `UNITS_PER_BLOCK`, as
/// many as a multiple of the thread count, sizes differing by at most one.
pub(crate) fn blocks(units: usize) -> impl Iterator<Item = Range<usize>> {
    let threads = rayon::current_num_threads().max(1);
    let count = threads * units.div_ceil(threads * UNITS_PER_BLOCK);
    let count = count.clamp(1, units.max(1));
    (0..count).map(move |i| i * units / count..(i + 1) * units / count)
}

/// The output matrix, written by many tasks at once, each to its own columns.
#[derive(Clone, Copy)]
struct SharedOutput {
    ptr: *mut f32,
    row_stride: usize,
}

// SAFETY: tasks write disjoint columns (see `SharedOutput::gemm`).
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// `out[.., first..first + cols] = x [m, k] · rhs [k, cols]`, where `rhs`
    /// has row stride `rhs_stride`, on this thread.
    ///
    /// # Safety
    /// The output must have `m` rows of `row_stride` columns with
    /// `first + cols <= row_stride`, no other task may write those columns,
    /// `x` must hold `m · k` values and `rhs` `k` rows of `rhs_stride`.
    unsafe fn gemm(
        &self,
        first: usize,
        cols: usize,
        x: &[f32],
        k: usize,
        rhs: &[f32],
        rhs_stride: usize,
    ) {
        // SAFETY: the caller upholds this function's contract (its doc),
        // which is all its raw reads, writes and intrinsics rely on.
        unsafe {
            let m = x.len() / k.max(1);
            crate::gemm::gemm_unchecked(
                m,
                cols,
                k,
                self.ptr.add(first),
                self.row_stride,
                false,
                Mat::rows(x, k),
                Mat::rows(rhs, rhs_stride),
                1,
            )
        }
    }

    /// `out[.., first..first + cols] = x · w` in bf16 products
    /// ([`crate::bf16::product`]), on this thread.
    ///
    /// # Safety
    /// bf16 products must be available, the output must have `x.rows` rows
    /// of `row_stride` columns with `first + cols <= row_stride`, and no
    /// other task may write those columns.
    unsafe fn bf16_product(&self, first: usize, cols: usize, x: &Bf16Rows, w: &Bf16Columns) {
        // SAFETY: the caller upholds this function's contract (its doc).
        unsafe { crate::bf16::product(x, w, cols, self.ptr.add(first), self.row_stride, false) }
    }

    /// `out[.., first..] = x [m, k] · Wᵀ` for the rows `16·groups` of `part`
    /// (whose first output column is `first`), with `PackedMatrix::dot_group`
    /// on the passes of [`passes`], `x` interleaved pass by pass
    /// ([`interleaved_passes`]).
    ///
    /// # Safety
    /// The output must have `m` rows of `row_stride` columns, the part's
    /// columns `first..first + part.rows()` must lie within them, and no
    /// other task may write the columns of these groups.
    unsafe fn dot_groups(
        &self,
        part: &PackedMatrix,
        first: usize,
        groups: Range<usize>,
        x: &[f32],
        k: usize,
        pass: usize,
    ) {
        // SAFETY: the caller upholds this function's contract (its doc),
        // which is all its raw reads, writes and intrinsics rely on.
        unsafe {
            let m = x.len() / interleaved_len(1, k).max(1);
            for group in groups {
                let column = group * GROUP;
                let valid = GROUP.min(part.rows() - column);
                let write = |r: usize, dots: &[f32; GROUP]| {
                    let dst = self.ptr.add(r * self.row_stride + first + column);
                    std::ptr::copy_nonoverlapping(dots.as_ptr(), dst, valid);
                };
                let row = interleaved_len(1, k);
                for (r0, rows) in passes(m, pass) {
                    let x = &x[r0 * row..(r0 + rows) * row];
                    // One monomorph per pass width: a pass of any width
                    // unpacks the weights once.
                    macro_rules! widths {
                        ($($r:literal)*) => {
                            match rows {
                                $($r => dots_into(part.dot_group::<$r>(group, x), r0, &write),)*
                                _ => unreachable!("a pass has 1 to 16 rows"),
                            }
                        };
                    }
                    widths!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
                }
            }
        }
    }

    /// [`SharedOutput::dot_groups`] with the integer kernel, on rows
    /// rounded pass by pass ([`INT8_PASS`] rows each, [`Int8Rows::passes`]).
    ///
    /// # Safety
    /// As [`SharedOutput::dot_groups`]; `part`'s encoding has an integer
    /// kernel.
    unsafe fn int8_dot_groups(
        &self,
        part: &PackedMatrix,
        first: usize,
        groups: Range<usize>,
        x: &[Int8Rows],
    ) {
        // SAFETY: the caller upholds this function's contract (its doc),
        // which is all its raw reads, writes and intrinsics rely on.
        unsafe {
            for group in groups {
                let column = group * GROUP;
                let valid = GROUP.min(part.rows() - column);
                let write = |r: usize, dots: &[f32; GROUP]| {
                    let dst = self.ptr.add(r * self.row_stride + first + column);
                    std::ptr::copy_nonoverlapping(dots.as_ptr(), dst, valid);
                };
                for (pass, rows) in x.iter().enumerate() {
                    let r0 = pass * INT8_PASS;
                    macro_rules! widths {
                        ($($r:literal)*) => {
                            match rows.rows() {
                                $($r => crate::int8::dot_group::<$r>(part, group, rows)
                                    .map(|dots| dots_into(dots, r0, &write)),)*
                                _ => unreachable!("a pass has 1 to {INT8_PASS} rows"),
                            }
                        };
                    }
                    widths!(1 2 3 4).expect("an encoding with an integer kernel");
                }
            }
        }
    }
}

/// The passes of a register product over `m` rows: (first row, rows),
/// `pass` rows each and the rest in one last pass. Every pass unpacks the
/// weights once, so the fewest passes win: 15 rows cut into passes of 8,
/// 4, 2 and 1 made a decode step of Qwen2.5-Coder-1.5B cost 389 ms against
/// 308 for 16 rows in one pass (7 rows 251 against 170 for 8; 2026-12-04,
/// AVX-512), at every row count a rollout's tail passes through.
fn passes(m: usize, pass: usize) -> impl Iterator<Item = (usize, usize)> {
    let pass = pass.max(1);
    (0..m).step_by(pass).map(move |r0| (r0, pass.min(m - r0)))
}

/// `x [m, k]` with each pass's rows [`interleave`]d (with their block
/// sums), pass after pass, `interleaved_len(1, k)` values a row: made once
/// per product, read by every task.
fn interleaved_passes(x: &[f32], m: usize, k: usize, pass: usize) -> Vec<f32> {
    let row = interleaved_len(1, k);
    let mut out = vec![0f32; m * row];
    for (r0, rows) in passes(m, pass) {
        interleave(
            &x[r0 * k..(r0 + rows) * k],
            k,
            &mut out[r0 * row..(r0 + rows) * row],
        );
    }
    out
}

/// Hands each of `R` rows of dots, the first being row `r0`, to `write`.
fn dots_into<const R: usize>(
    dots: [[f32; GROUP]; R],
    r0: usize,
    write: &impl Fn(usize, &[f32; GROUP]),
) {
    for (i, row) in dots.iter().enumerate() {
        write(r0 + i, row);
    }
}

struct DenseProduct;

impl CustomOp2 for DenseProduct {
    fn name(&self) -> &'static str {
        "dense-product"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (k_w, n) = w_layout.shape().dims2()?;
        if k != k_w {
            candle_core::bail!("dense product: [{m}, {k}] · [{k_w}, {n}]")
        }
        let (x, w) = (
            f32_slice(x_storage, x_layout)?,
            f32_slice(w_storage, w_layout)?,
        );
        let mut out = vec![0f32; m * n];
        let output = SharedOutput {
            ptr: out.as_mut_ptr(),
            row_stride: n,
        };
        let units = n.div_ceil(GROUP);
        blocks(units)
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|block| {
                let first = block.start * GROUP;
                let cols = (block.end * GROUP).min(n) - first;
                // SAFETY: `out` is m × n and this block alone writes columns
                // first..first + cols < n; x is m × k and w from column `first`
                // is k rows of stride n holding `cols` columns each.
                unsafe { output.gemm(first, cols, x, k, &w[first..], n) }
            });
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

thread_local! {
    /// Each thread's unpacked weight columns, reused from task to task.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Unpacks the 16-row `groups` of `part` into this thread's panel, `[k,
/// width]` with the rows of W as columns, and hands `f` the panel, its
/// width, and the first row of W and the number of real (not padding) rows
/// it holds.
pub(crate) fn with_panel<T>(
    part: &PackedMatrix,
    groups: Range<usize>,
    f: impl FnOnce(&[f32], usize, usize, usize) -> T,
) -> T {
    let (k, width) = (part.cols(), groups.len() * GROUP);
    PANEL.with_borrow_mut(|panel| {
        if panel.len() < k * width {
            panel.resize(k * width, 0.0);
        }
        for (i, group) in groups.clone().enumerate() {
            part.unpack_group(group, &mut panel[i * GROUP..], width);
        }
        let first = groups.start * GROUP;
        let rows = (groups.end * GROUP).min(part.rows()) - first;
        f(&panel[..k * width], width, first, rows)
    })
}

/// One block of rows of a packed weight `W [rows, cols]`, unpacked for
/// gemm: `data` is `[cols, width]` holding rows `first .. first + rows` of
/// W (numbered across all parts) as its first `rows` columns.
pub struct Panel<'a> {
    pub data: &'a [f32],
    pub width: usize,
    pub first: usize,
    pub rows: usize,
}

/// Folds `f` over every block of rows of `parts` (stacked), each unpacked
/// once into a per-thread panel, in parallel: one pass over a large packed
/// matrix, such as the vocabulary, serves any number of input rows. Each
/// thread's accumulator starts as `init()`; they are combined by `merge`,
/// in an order fixed by the thread count ([`crate::pool::fold_in_order`]).
pub fn fold_panels<T: Send>(
    parts: &[PackedMatrix],
    init: impl Fn() -> T + Sync + Send,
    f: impl Fn(&mut T, Panel<'_>) + Sync + Send,
    merge: impl Fn(T, T) -> T + Sync + Send,
) -> T {
    let mut tasks = Vec::new();
    let mut offset = 0;
    for part in parts {
        tasks.extend(blocks(part.groups()).map(|groups| (part, offset, groups)));
        offset += part.rows();
    }
    crate::pool::fold_in_order(
        tasks.into_par_iter(),
        &init,
        |mut acc, (part, offset, groups)| {
            with_panel(part, groups, |data, width, first, rows| {
                let panel = Panel {
                    data,
                    width,
                    first: offset + first,
                    rows,
                };
                f(&mut acc, panel)
            });
            acc
        },
        merge,
    )
}

pub(crate) struct PackedProduct<'a> {
    pub(crate) parts: &'a [PackedMatrix],
    pub(crate) activations: Activations,
}

impl CustomOp1 for PackedProduct<'_> {
    fn name(&self) -> &'static str {
        "packed-product"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = layout.shape().dims2()?;
        if let Some(bad) = self.parts.iter().find(|p| p.cols() != k) {
            candle_core::bail!(
                "packed product: [{m}, {k}] · [{}, {}]ᵀ",
                bad.rows(),
                bad.cols()
            )
        }
        let x = f32_slice(storage, layout)?;
        let n: usize = self.parts.iter().map(PackedMatrix::rows).sum();
        let mut out = vec![0f32; m * n];
        let output = SharedOutput {
            ptr: out.as_mut_ptr(),
            row_stride: n,
        };
        // (part, its first output column, a block of its 16-row groups)
        let mut tasks = Vec::new();
        let mut offset = 0;
        for part in self.parts {
            tasks.extend(blocks(part.groups()).map(|groups| (part, offset, groups)));
            offset += part.rows();
        }
        let pass = register_rows();
        let registers = |part: &PackedMatrix| in_registers(part.encoding(), m);
        let int8 = |part: &PackedMatrix| {
            self.activations.int8_decode && int8_in_registers(part.encoding(), m)
        };
        let tiles =
            |part: &PackedMatrix| self.activations.int8_decode && int8_in_tiles(part.encoding(), m);
        let exact = |part: &PackedMatrix| registers(part) && !int8(part) && !tiles(part);
        let interleaved = if self.parts.iter().any(exact) {
            interleaved_passes(x, m, k, pass)
        } else {
            Vec::new()
        };
        let rounded = if self.parts.iter().any(int8) {
            Int8Rows::passes(x, m, k, INT8_PASS)
        } else {
            Vec::new()
        };
        let rounded_tiles = match self.parts.iter().any(tiles) {
            true => Int8Rows::passes(x, m, k, crate::int8_tile::TILE_ROWS),
            false => Vec::new(),
        };
        let bf16 = |part: &PackedMatrix| {
            self.activations.bf16_products && !tiles(part) && takes_bf16(part.encoding(), m)
        };
        let pairs = match self.parts.iter().any(bf16) {
            true => Bf16Rows::new(x, m, k, k),
            false => Bf16Rows::empty(),
        };
        tasks.into_par_iter().for_each(|(part, offset, groups)| {
            #[cfg(target_arch = "x86_64")]
            if tiles(part) {
                // SAFETY: the tile kernel runs here and has this encoding
                // (`int8_in_tiles`); `rounded_tiles` holds x's m rows of k
                // inputs in tiles; `out` is m × n and this task alone
                // writes columns offset + 16·groups, within its part's
                // columns.
                return unsafe {
                    crate::int8_tile::product(
                        part,
                        groups,
                        &rounded_tiles,
                        output.ptr.add(offset),
                        output.row_stride,
                    )
                };
            }
            if int8(part) {
                // SAFETY: as below, for columns offset + 16·groups; the
                // encoding has an integer kernel.
                return unsafe { output.int8_dot_groups(part, offset, groups, &rounded) };
            }
            if registers(part) {
                // SAFETY: as below, for columns offset + 16·groups.
                return unsafe { output.dot_groups(part, offset, groups, &interleaved, k, pass) };
            }
            with_panel(part, groups, |panel, width, first, cols| {
                if bf16(part) {
                    return crate::bf16::with_scratch(|_, columns| {
                        columns.fill_down(panel, k, width, cols);
                        // SAFETY: bf16 products are available; `out` is
                        // m × n and this task alone writes columns offset +
                        // first .. offset + first + cols < n.
                        unsafe { output.bf16_product(offset + first, cols, &pairs, columns) }
                    });
                }
                // SAFETY: `out` is m × n and this task alone writes columns
                // offset + first .. offset + first + cols, within its part's
                // n_i columns; x is m × k; the panel holds k rows of `width`
                // unpacked columns.
                unsafe { output.gemm(offset + first, cols, x, k, panel, width) }
            })
        });
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{max_relative_difference, random};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, IndexOp};

    #[test]
    fn passes_cover_every_row_once_in_the_fewest_passes() {
        for pass in [1, 4, 16] {
            for m in 0..=40 {
                let cut: Vec<_> = passes(m, pass).collect();
                assert_eq!(cut.len(), m.div_ceil(pass), "{m} rows, {pass} a pass");
                let mut next = 0;
                for (r0, rows) in cut {
                    assert_eq!(r0, next);
                    assert!(
                        (1..=pass).contains(&rows),
                        "{rows} rows in a pass of {pass}"
                    );
                    next += rows;
                }
                assert_eq!(next, m);
            }
        }
    }

    /// A random 48-row matrix of `cols` inputs in `dtype`, packed as one
    /// part, with its encoding and its dequantized values.
    fn packed_parts(
        dtype: GgmlDType,
        cols: usize,
        seed: u64,
    ) -> (Encoding, Arc<[PackedMatrix]>, Tensor) {
        let rows = 48;
        let q = QTensor::quantize(&random(&[rows, cols], seed, 1.0), dtype).unwrap();
        let packed = PackedMatrix::from_ggml(dtype, rows, cols, &q.data().unwrap(), None)
            .expect("a kept or re-cut type")
            .unwrap();
        let encoding = packed.encoding();
        (
            encoding,
            vec![packed].into(),
            q.dequantize(&Device::Cpu).unwrap(),
        )
    }

    /// Every batch size from 1 to 33 rows (every pass width, and the panel
    /// past the register range), for each encoding with a register range
    /// of its own (Q4_K, Q5_K, Q6_K, Q4_1, Q5_0, Q8_0): the
    /// product with the dequantized weights, and in the register range
    /// each row's bits as when it is alone, so that a row's tokens do not
    /// depend on how many rows decode beside it.
    #[test]
    fn a_packed_product_of_any_batch_size_is_the_dequantized_product() {
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let cols = 256;
            let (encoding, parts, dequantized) = packed_parts(dtype, cols, 7);
            let x = random(&[33, cols], 11, 1.0);
            let alone: Vec<Vec<f32>> = (0..33)
                .map(|r| {
                    let row = x.i(r..r + 1).unwrap();
                    packed_matmul(&row, &parts)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            let in_registers = max_register_rows(encoding);
            for m in 1..=33 {
                let x = x.i(0..m).unwrap();
                let got = packed_matmul(&x, &parts).unwrap();
                let want = x.matmul(&dequantized.t().unwrap()).unwrap();
                let difference = max_relative_difference(&got, &want);
                assert!(difference < 1e-5, "{dtype:?}, {m} rows: {difference}");
                if m <= in_registers {
                    for (r, row) in got.to_vec2::<f32>().unwrap().iter().enumerate() {
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(row), bits(&alone[r]), "{dtype:?}, row {r} of {m}");
                    }
                }
            }
        }
    }

    /// With inputs rounded to 8 bits, every batch size that takes an
    /// integer kernel (in registers, or in tiles past one pass where the
    /// CPU has them) gives each row the bits it has alone (within the
    /// inputs' rounding of the exact product); any other is exact.
    #[test]
    fn an_int8_product_of_any_batch_size_gives_each_row_its_bits_alone() {
        const INT8: Activations = Activations {
            int8_decode: true,
            bf16_products: false,
        };
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q5_0,
            GgmlDType::Q8_0,
        ] {
            let cols = 256;
            let (encoding, parts, dequantized) = packed_parts(dtype, cols, 3);
            let x = random(&[70, cols], 13, 1.0);
            let product = |x: &Tensor| packed_matmul_with(x, &parts, INT8).unwrap();
            let alone: Vec<Vec<u32>> = (0..70)
                .map(|r| {
                    let row = product(&x.i(r..r + 1).unwrap()).flatten_all().unwrap();
                    row.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|f| f.to_bits())
                        .collect()
                })
                .collect();
            // Past the register passes too: 70 rows is a short prompt's prefill.
            for m in (1..=33).chain([70]) {
                let x = x.i(0..m).unwrap();
                let got = product(&x);
                let want = x.matmul(&dequantized.t().unwrap()).unwrap();
                let difference = max_relative_difference(&got, &want);
                if takes_int8(encoding, m) {
                    assert!(difference < 0.02, "{dtype:?}, {m} rows: {difference}");
                    for (r, row) in got.to_vec2::<f32>().unwrap().iter().enumerate() {
                        let bits: Vec<u32> = row.iter().map(|f| f.to_bits()).collect();
                        assert_eq!(bits, alone[r], "{dtype:?}, row {r} of {m}");
                    }
                } else {
                    assert!(difference < 1e-5, "{dtype:?}, {m} rows: {difference}");
                }
            }
        }
    }
}
