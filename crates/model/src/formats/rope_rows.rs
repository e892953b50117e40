//! llama.cpp stores q and k rows in another order than HF for its rope;
//! the permutation and its inverse, shared by GGUF reading (undone while
//! packing) and writing.

use candle_core::Tensor;

/// The inverse of llama.cpp's rope permutation, also used to write GGUF
/// files in tests: `permute(unpermute(w)) == w`.
pub fn unpermute_rope_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, rows / n_head / 2, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// llama.cpp's permutation of q/k rows (HF layout → GGUF layout).
pub fn permute_rope_rows(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    w.reshape((n_head, 2, rows / n_head / 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}
