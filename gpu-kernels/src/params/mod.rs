//! Kernel parameter structs, one per kernel family, `#[repr(C)]` and shared by the kernels and the host launchers.
//! Passed by value as the kernel's single parameter (the PTX `.param` space), so the layout must match on both
//! sides: only `u32`/`u64`/`f32` fields, 8-byte aligned pointers as `u64`, explicit padding.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// RMSNorm over rows of `dim` bf16 values: `out = bf16(x / rms(x)) * w` (transformers' order: normalize in f32,
/// cast to bf16, multiply by the bf16 weight in f32, cast again). With `residual != 0`, `x` is first replaced by
/// `bf16(x + residual)`, which is also written to `residual_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct RmsNormParams {
    /// bf16 [rows, dim]
    pub x: u64,
    /// bf16 [rows, dim] or 0
    pub residual: u64,
    /// bf16 [rows, dim] (written when `residual != 0`)
    pub residual_out: u64,
    /// bf16 [dim]
    pub weight: u64,
    /// bf16 [rows, dim]
    pub out: u64,
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// Dynamic FP8 activation quantization per token per 128-wide group along K, and its inverse.
/// Quantize: `scale[r, g] = max(absmax, eps) / 448`, `q[r, k] = e4m3(x[r, k] / scale[r, g])`.
/// Dequantize: `x[r, k] = bf16(e4m3_to_f32(q[r, k]) * scale[r, g])`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct Fp8QuantParams {
    /// bf16 [rows, k]: input of quantize, output of dequantize
    pub x: u64,
    /// e4m3 [rows, k]
    pub q: u64,
    /// f32 [rows, ceil(k / 128)]
    pub scale: u64,
    pub rows: u32,
    pub k: u32,
}

/// Self-test kernels of the building blocks in `arch`: generic in/out buffers and a length.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct SelfTestParams {
    pub input: u64,
    pub output: u64,
    pub n: u32,
    pub _pad: u32,
}

mod attention;
mod gemm;
mod head;
mod hga;
mod hga_attend;
mod hga_layer;
mod hga_route;
mod kv;
mod moe;
mod rope;
// The families of issue 4 fill these files; until then some are empty.
#[allow(unused_imports)]
pub use attention::*;
#[allow(unused_imports)]
pub use gemm::*;
#[allow(unused_imports)]
pub use head::*;
#[allow(unused_imports)]
pub use hga::*;
#[allow(unused_imports)]
pub use hga_attend::*;
#[allow(unused_imports)]
pub use hga_layer::*;
#[allow(unused_imports)]
pub use hga_route::*;
#[allow(unused_imports)]
pub use kv::*;
#[allow(unused_imports)]
pub use moe::*;
#[allow(unused_imports)]
pub use rope::*;
