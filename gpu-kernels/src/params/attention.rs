//! Parameter struct of the attention family: `hga_attention_prefill`, `hga_attention_decode` and
//! `hga_attention_merge` (gpu-kernels/src/attention/). One struct for the three: they share shapes and buffers.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Head dimension of the attention kernels.
pub const ATTN_HEAD_DIM: usize = 128;
/// Query rows per prefill CTA (4 warps of 16 rows).
pub const ATTN_PREFILL_BM: usize = 64;
/// Keys per K/V tile (prefill and decode).
pub const ATTN_BN: usize = 64;
/// Query rows (token, query head of the KV head) per decode CTA.
pub const ATTN_DECODE_ROWS: usize = 16;
/// Dynamic shared memory of the prefill kernel: Q tile + 2 stages of (K, V) tiles.
pub const ATTN_PREFILL_SMEM: usize = ATTN_PREFILL_BM * 256 + 2 * 2 * ATTN_BN * 256;
/// Dynamic shared memory of the decode kernel: Q rows + 2 stages of (K, V) tiles (the final cross-warp merge
/// reuses the stages).
pub const ATTN_DECODE_SMEM: usize = ATTN_DECODE_ROWS * 256 + 2 * 2 * ATTN_BN * 256;

/// Causal GQA attention of the query tokens at positions `[start, start + tokens)` over the cache positions
/// `[0, start + tokens)`: query token t attends to cache positions `0..=start + t`; query head h uses KV head
/// `h / (n_heads / n_kv_heads)`.
///
/// - `q`, `out`: bf16 [tokens, n_heads, 128]; `lse`: f32 [tokens, n_heads] (natural log of the softmax
///   denominator of the scaled scores).
/// - `k_cache`, `v_cache`: bf16 [n_kv_heads, capacity, 128].
/// - decode only: `part_o` f32 [n_splits, tokens, n_heads, 128] and `part_lse` f32 [n_splits, tokens, n_heads], the
///   partial results of split s (keys `[s * tiles_per_split * 64, (s + 1) * tiles_per_split * 64)`), written by
///   `hga_attention_decode` and read by `hga_attention_merge`.
/// - `scale_log2` = log2(e) / sqrt(128).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct AttentionParams {
    pub q: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub out: u64,
    pub lse: u64,
    pub part_o: u64,
    pub part_lse: u64,
    /// decode only: if not 0, a device `u32` holding `start` (read by the kernel instead of the `start` field), so
    /// that one recorded launch (a CUDA graph of the decode step) serves every position. The launch must then
    /// cover `n_splits * tiles_per_split * 64 >= start + tokens` keys; splits past the context write O = 0 and
    /// LSE = -inf.
    pub start_dev: u64,
    pub tokens: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub capacity: u32,
    pub start: u32,
    pub n_splits: u32,
    pub tiles_per_split: u32,
    pub scale_log2: f32,
}
