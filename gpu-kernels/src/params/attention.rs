//! Parameter struct of the attention family: `hga_attention_prefill`, `hga_attention_decode_v3_s3` and
//! `hga_attention_merge_v2` / `hga_attention_merge` (gpu-kernels/src/attention/). One struct for all: they share shapes and buffers.

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
/// Bytes of one stage of the decode ring: a K and a V tile of 64 keys.
pub const ATTN_DECODE_STAGE_BYTES: usize = 2 * ATTN_BN * 256;
/// Stages of the decode ring of `hga_attention_decode_v3_s3`.
pub const ATTN_DECODE_V3_STAGES: usize = 3;
/// Dynamic shared memory of the decode kernel with `stages` stages: the ring only (the Q rows are staged in the
/// last slot before its first K/V fill; the final cross-warp merge reuses the ring). 3 stages = 96 KB fits the
/// 99 KB per-block limit of sm_89 / sm_120.
pub const fn attn_decode_v3_smem(stages: usize) -> usize {
    stages * ATTN_DECODE_STAGE_BYTES
}

/// Splits per chunk of `hga_attention_merge_v2` (their products are staged in shared memory, 128 f32 each).
pub const ATTN_MERGE_V2_CHUNK: usize = 32;
/// Dynamic shared memory of `hga_attention_merge_v2` for `n_splits` splits: 4 warp maxima, one chunk of products,
/// and the weights of the splits padded to a multiple of 8. 17 KB for 32 splits; under the 48 KB default up to
/// ~7800 splits.
pub const fn attn_merge_v2_smem(n_splits: usize) -> usize {
    4 * (4 + ATTN_MERGE_V2_CHUNK * ATTN_HEAD_DIM + n_splits.div_ceil(8) * 8)
}

/// Causal GQA attention of the query tokens at positions `[start, start + tokens)` over the cache positions
/// `[0, start + tokens)`: query token t attends to cache positions `0..=start + t`; query head h uses KV head
/// `h / (n_heads / n_kv_heads)`.
///
/// - `q`, `out`: bf16 [tokens, n_heads, 128]; `lse`: f32 [tokens, n_heads] (natural log of the softmax
///   denominator of the scaled scores).
/// - `k_cache`, `v_cache`: bf16 [n_kv_heads, capacity, 128].
/// - decode only: `part_o` f32 [n_splits, tokens, n_heads, 128] and `part_lse` f32 [n_splits, tokens, n_heads], the
///   partial results of split s (keys `[s * tiles_per_split * 64, (s + 1) * tiles_per_split * 64)`), written by
///   `hga_attention_decode` and read by `hga_attention_merge_v2`.
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
    /// merge only: if not 0, e4m3 [tokens, n_heads * 128], the FP8 quantization of `out` with one 128-group per
    /// (token, head) row, exactly as `hga_fp8_quant` of the bf16 `out` (scale = max(absmax, 1e-10) / 448, IEEE
    /// division); `out_scale` (f32 [tokens, n_heads]) must then be non-zero too.
    pub out_q: u64,
    /// merge only: f32 [tokens, n_heads], the group scales of `out_q` (used when `out_q` is not 0).
    pub out_scale: u64,
    pub tokens: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub capacity: u32,
    pub start: u32,
    pub n_splits: u32,
    pub tiles_per_split: u32,
    pub scale_log2: f32,
}
