//! r3's CPU kernels, apart from the decoder that uses them: each is here
//! because it measured faster than candle's or gemm's general path (see the
//! docs/performance.md), and each is tested against a plain
//! product or libm at every vector level the machine runs. Products that
//! are not r3's own go through `device_matmul`, in a layout every device
//! reads.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod attention;
pub mod bf16;
pub mod device_matmul;
pub mod exp;
pub mod frozen;
pub mod gemm;
pub mod int8;
pub mod int8_tile;
pub mod kquants;
pub mod level;
pub mod machine;
pub mod matmul;
pub mod packed;
pub mod pool;
pub mod reduce;
mod register_avx2;
mod register_avx512;
mod register_int8;
pub mod rms_norm;
pub mod rope;
pub mod softmax;
pub mod storage;
pub mod swiglu;
#[cfg(test)]
mod test_support;

pub use level::CpuLevel;
