//! gemm, the crate every large product here runs on, behind one entry that
//! checks every extent before its unsafe call.

/// A strided matrix operand: its elements and strides (in elements).
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Mat<'_> {
    /// A row-major `rows × cols` matrix with rows `row_stride` apart.
    pub fn rows(data: &[f32], row_stride: usize) -> Mat<'_> {
        Mat {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// Whether a `rows × cols` matrix at these strides lies within `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1)
                .checked_mul(self.row_stride)
                .zip((cols - 1).checked_mul(self.col_stride))
                .and_then(|(r, c)| r.checked_add(c))
                .is_some_and(|last| last < self.data.len())
    }
}

/// The output of a product: `rows` rows `row_stride` apart, of which
/// columns `first .. first + cols` are written.
pub struct Out<'a> {
    pub data: &'a mut [f32],
    pub row_stride: usize,
}

/// `out[m × n] (+)= a[m × k] · b[k × n]` (`accumulate` adds to `out`),
/// threaded by gemm when `threads > 1`. Panics if an operand is shorter
/// than its strides reach: a caller's bug, never user input.
pub fn gemm(
    (m, n, k): (usize, usize, usize),
    out: Out<'_>,
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    let dst = Mat {
        data: out.data,
        row_stride: out.row_stride,
        col_stride: 1,
    };
    assert!(
        dst.holds(m, n) && a.holds(m, k) && b.holds(k, n),
        "gemm: an operand is out of bounds for [{m}, {k}] · [{k}, {n}]"
    );
    // SAFETY: every element the strides reach lies within the slices
    // (checked above), and the output is an exclusive borrow.
    unsafe {
        gemm_unchecked(
            m,
            n,
            k,
            out.data.as_mut_ptr(),
            out.row_stride,
            accumulate,
            a,
            b,
            threads,
        )
    }
}

/// [`gemm`] into an output only a raw pointer reaches (threads writing
/// disjoint columns of one matrix).
///
/// # Safety
/// `out` must be valid for writes of `m` rows `out_row_stride` apart, `n`
/// columns each, that no other thread reads or writes meanwhile; `a` and
/// `b` must hold their extents.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_unchecked(
    m: usize,
    n: usize,
    k: usize,
    out: *mut f32,
    out_row_stride: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    threads: usize,
) {
    // SAFETY: the caller upholds this function's contract (its doc),
    // which is all its raw reads, writes and intrinsics rely on.
    unsafe {
        debug_assert!(a.holds(m, k) && b.holds(k, n));
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        )
    }
}
