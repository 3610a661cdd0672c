//! Parameter struct of `hga_cast_bf16_f32` (gpu-kernels/src/hga/cast.rs), used by the embeddable HGA layer.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// `dst[i] = f32(src[i])` for `i < n`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct HgaCastParams {
    /// bf16 [n]
    pub src: u64,
    /// f32 [n]
    pub dst: u64,
    pub n: u32,
    pub _pad: u32,
}
