//! candle's CPU storage read as plain slices, without copies: how every
//! kernel here (and the optimizer and sampler) reaches a tensor's elements.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// The elements of a contiguous f32 tensor's storage.
pub fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("this CPU kernel needs contiguous f32 tensors"),
    }
}

/// The elements of a contiguous f32 tensor's storage, to update in place.
pub fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("this CPU kernel needs contiguous f32 tensors"),
    }
}

/// Runs `f` on the elements of `t` (contiguous, f32, on the CPU), borrowed
/// where they lie rather than copied out.
pub fn with_f32_elements<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> T) -> candle_core::Result<T> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("this CPU kernel needs tensors on the CPU")
    };
    Ok(f(f32_slice(cpu, layout)?))
}
