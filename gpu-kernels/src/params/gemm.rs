//! Parameter structs of the gemm kernels: block-scaled FP8 linear (decode and prefill), the fused
//! RMSNorm -> FP8 quantizer that feeds it, and the bf16 mma.sync peak microbenchmark.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Block-scaled FP8 linear: `out[m, n] = bf16(sum_kb (sum_{k in kb} qa[m, k] qw[n, k]) * sa[m, kb] * sw[n/128, kb])`
/// with 128-wide K blocks (the checkpoint's `weight_scale_inv`, multiplied, and the per-token-group activation
/// scales of `hga_fp8_quant`). Used by `hga_fp8_linear_decode` (m <= 16) and `hga_fp8_linear_prefill`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct Fp8LinearParams {
    /// e4m3 [m, k] (activations)
    pub a: u64,
    /// f32 [m, k / 128]
    pub a_scale: u64,
    /// e4m3 [n, k] (weight, row-major: one output feature per row)
    pub w: u64,
    /// f32 [ceil(n / 128), k / 128]
    pub w_scale: u64,
    /// bf16 [m, n]
    pub out: u64,
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub _pad: u32,
}

/// Dynamic shared memory of `hga_fp8_linear_prefill_f16_v3`: 3 stages of (A 128 x 128 e4m3, W 128 x 128
/// e4m3, 128 f32 A row scales, one f32 weight scale padded to 16 bytes).
pub const FP8_PREFILL_F16_SMEM_BYTES: usize = 3 * (2 * 128 * 128 + 4 * 128 + 16);

/// Fused RMSNorm (optionally with the residual add) and dynamic FP8 quantization per token per 128-wide group:
/// the bf16 normalized row `h` of `hga_rmsnorm` (same math) is quantized as `hga_fp8_quant` would quantize it,
/// without writing `h` to memory. With `residual != 0`, `bf16(x + residual)` is also written to `residual_out`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct RmsNormQuantParams {
    /// bf16 [rows, dim]
    pub x: u64,
    /// bf16 [rows, dim] or 0
    pub residual: u64,
    /// bf16 [rows, dim] (written when `residual != 0`)
    pub residual_out: u64,
    /// bf16 [dim]
    pub weight: u64,
    /// e4m3 [rows, dim]
    pub q: u64,
    /// f32 [rows, ceil(dim / 128)]
    pub scale: u64,
    pub rows: u32,
    pub dim: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// bf16 `mma.sync` peak microbenchmark: each warp runs `iters` x 8 dependent-chain-free m16n8k16 products whose
/// operands change every iteration (so ptxas cannot hoist them), and writes one f32 per thread to `out`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct MmaPeakParams {
    /// f32 [grid * block threads]
    pub out: u64,
    pub iters: u32,
    pub seed: u32,
}
