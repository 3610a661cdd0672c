//! Parameter struct of the routed-attention kernels (`gpu-kernels/src/hga/attend/`): `hga_attend_decode_s{2,3}`
//! and `hga_attend_prefill`. Both write split partials in the format of the dense decode kernels
//! (`AttentionParams::part_o` / `part_lse`), merged by `hga_attention_merge` / `hga_attention_merge_v2`.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Attention entries per K/V tile of the routed kernels (4 group blocks = 64 keys: one entry per warp in decode).
pub const HGA_ATTEND_ENTRIES_PER_TILE: usize = 4;
/// Bytes of one ring stage of the routed kernels: the K and the V of one tile (4 x 8 KB).
pub const HGA_ATTEND_STAGE_BYTES: usize = 2 * HGA_ATTEND_ENTRIES_PER_TILE * 16 * 128 * 2;
/// Stage counts of the decode entry points `hga_attend_decode_s{N}`.
pub const HGA_ATTEND_DECODE_STAGES: [usize; 2] = [2, 3];
/// Dynamic shared memory of `hga_attend_decode_s{stages}`: the ring only (the 16 Q rows are staged in the last
/// slot before its first K/V fill; the cross-warp merge of the end reuses the ring). 3 stages = 96 KB fits the
/// 99 KB per-block limit of sm_89 / sm_120.
pub const fn hga_attend_decode_smem(stages: usize) -> usize {
    stages * HGA_ATTEND_STAGE_BYTES
}
/// Query rows (token, query head of the KV head) per prefill CTA: 4 warps of 16.
pub const HGA_ATTEND_PREFILL_ROWS: usize = 64;
/// Most query tokens of one prefill block (the routing unit of a prefill step).
pub const HGA_ATTEND_PREFILL_MAX_TOKENS: usize = 64;
/// Dynamic shared memory of `hga_attend_prefill`: 64 Q rows (16 KB) and a double-buffered ring of tiles (64 KB).
pub const HGA_ATTEND_PREFILL_SMEM: usize = HGA_ATTEND_PREFILL_ROWS * 256 + 2 * HGA_ATTEND_STAGE_BYTES;

/// Routed (HGA) attention of the query tokens at positions `pos .. pos + tokens` of one layer over the attention
/// entry list of `params::hga`: query token t of KV head h attends row r of entry e (slot `entry_slot[h][e]`,
/// first position `entry_pos[h][e]`) iff `entry_pos[h][e] + r <= pos + t`, for e < min(n_entries[h], max_entries).
///
/// - `q`: bf16 [tokens, n_heads, 128]; query head `i` uses KV head `i / (n_heads / n_kv_heads)`.
/// - `pool`: the layer's slot pool, bf16 [n_slots][2][16][128] (a slot = one group block, K then V).
/// - `entry_slot`, `entry_pos`: u32 [n_kv_heads][max_entries]; `n_entries`: u32 [n_kv_heads] (device-resident).
/// - `pos_dev`: if not 0, a device u32 holding `pos` (read instead of the field: one recorded launch per step).
/// - `part_o` f32 [n_splits, tokens, n_heads, 128], `part_lse` f32 [n_splits, tokens, n_heads]: split s covers
///   the entries `[s * tiles_per_split * 4, (s + 1) * tiles_per_split * 4)`; a split with no visible key for a
///   row writes O = 0, LSE = -inf (weight 0 in the merge).
/// - `scale_log2` = log2(e) / sqrt(128).
///
/// A slot index `>= n_slots` is read as slot `n_slots - 1` (the kernels never read outside the pool whatever the
/// device-resident list holds).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct HgaAttendParams {
    pub q: u64,
    pub pool: u64,
    pub entry_slot: u64,
    pub entry_pos: u64,
    pub n_entries: u64,
    pub pos_dev: u64,
    pub part_o: u64,
    pub part_lse: u64,
    pub tokens: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub n_slots: u32,
    pub max_entries: u32,
    pub tiles_per_split: u32,
    pub n_splits: u32,
    pub pos: u32,
    pub scale_log2: f32,
    pub _pad: u32,
}
