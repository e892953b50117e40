//! What the project's CPU kernels share: candle storage read as plain
//! slices, and loops compiled for the widest vector instructions the CPU
//! has.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

/// Runs `$body` compiled for AVX-512 or AVX2 + FMA when the CPU has them,
/// so that the loops it inlines (written for the compiler to vectorize)
/// become wide vector code; as is otherwise.
macro_rules! with_vector_features {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512<T>(body: impl FnOnce() -> T) -> T {
                body()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2<T>(body: impl FnOnce() -> T) -> T {
                body()
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F.
                unsafe { avx512(|| $body) }
            } else if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA.
                unsafe { avx2(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}
pub(crate) use with_vector_features;

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
