//! Parameter struct of the rope family: `hga_qk_norm_rope` (gpu-kernels/src/rope/qk_norm_rope.rs).

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Head dimension of the rope kernels (Qwen3: 128). Pairs are `(i, i + ROPE_HEAD_DIM / 2)` (NeoX).
pub const ROPE_HEAD_DIM: usize = 128;

/// Per-head q/k RMSNorm + NeoX RoPE, writing q and the K/V cache.
///
/// Inputs (bf16): `q_in` [tokens, n_heads, 128], `k_in` and `v_in` [tokens, n_kv_heads, 128], each with a row
/// stride per token (`*_stride` elements, >= the row width; a fused qkv projection output works with offsets).
/// `positions`: u32 [tokens]. Weights bf16 [128]. Outputs: `q_out` bf16 [tokens, n_heads, 128] (contiguous);
/// `k_cache`, `v_cache` bf16 [n_kv_heads, capacity, 128]: token t goes to slot `positions[t]` of every KV head
/// (positions >= capacity are not written), or with `cache_by_token` != 0 to slot `t` (the cache is then a staging
/// buffer of the chunk's rows, e.g. `[n_kv_heads, 1, 128]` for one decode token whose K/V goes on to the HGA tiers).
/// `inv_freq[i] = f32(1 / theta^(2i/128))` (the host launcher fills it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct QkNormRopeParams {
    pub q_in: u64,
    pub k_in: u64,
    pub v_in: u64,
    pub q_norm_w: u64,
    pub k_norm_w: u64,
    /// u32 [tokens]
    pub positions: u64,
    pub q_out: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub tokens: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub capacity: u32,
    pub q_stride: u32,
    pub k_stride: u32,
    pub v_stride: u32,
    /// Nonzero: token t is written to cache slot t instead of slot `positions[t]`.
    pub cache_by_token: u32,
    pub eps: f32,
    pub inv_freq: [f32; ROPE_HEAD_DIM / 2],
    pub _pad: u32,
}
