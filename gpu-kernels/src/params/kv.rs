//! Parameter struct of the GPU working-set cache kernels (`gpu-kernels/src/kv/`): one struct for the family
//! (append, lookup, gather, advance), describing one layer's cache. Formats: `params/hga.rs` (group block, slot
//! pool, attention entry list, selected groups).
//!
//! Slot pool of a layer: `bf16 [n_kv_heads * slots_per_head][2][16][128]`. KV head `h` owns the slots
//! `h * slots_per_head ..`: first [`KV_SINK_SLOTS`] sink slots (groups 0..3, positions 0..63), then
//! [`KV_WINDOW_SLOTS`] window-ring slots (group `g` in ring slot `g % 20`), then `cache_slots` cache slots
//! (routed groups, replaced by CLOCK on the GPU).
//!
//! Per-head state, device resident (`h` = KV head):
//! - `table: u32 [n_kv][table_groups]`: group -> cache slot (0 .. cache_slots, relative to the head's cache
//!   region) or `u32::MAX` (absent).
//! - `slot_group: u32 [n_kv][cache_slots]`: the group a cache slot holds, `u32::MAX` when empty.
//! - `slot_ref: u32 [n_kv][cache_slots]`: the CLOCK reference count (set to `ref_hit` on a hit, `ref_fill` on a
//!   fill, decremented when the hand passes).
//! - `slot_used: u32 [n_kv][cache_slots]`: `p + 1` when used at the step of position `p` (never a victim then).
//! - `seen: u32 [n_kv][table_groups]`: `p + 1` when the group was already taken at this step (deduplication).
//! - `hand: u32 [n_kv]`: the CLOCK hand.
//! - `miss_group`, `miss_slot: u32 [n_kv][max_groups]`, `n_miss: u32 [n_kv]`: this step's misses (group, absolute
//!   slot of the pool), the gather's work list.
//! - `counters: u64 [n_kv][4]`: hits, misses, bytes gathered, steps; `counters_host` (0 or mapped pinned host
//!   memory of the same shape) receives a copy at every step, readable without synchronizing the stream.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Sink slots per KV head: groups 0..3 (positions 0..63).
pub const KV_SINK_SLOTS: usize = 4;
/// Window-ring slots per KV head: the local window (256 tokens) plus the open chunk, chunk aligned, spans at most
/// 20 groups (`local_start = floor((p - 256) / 64) * 64`, so `p - local_start <= 319`).
pub const KV_WINDOW_SLOTS: usize = 20;
/// Tokens of the local window (`HgaParams::default().local`).
pub const KV_LOCAL: usize = 256;
/// Warps (one group each) per block of `hga_kv_gather`.
pub const KV_GATHER_WARPS: usize = 8;
/// Counters per KV head: hits, misses, bytes, steps.
pub const KV_COUNTERS: usize = 4;

/// The first position of the local window of a query at `p` (the sink excluded): `floor((p - 256) / 64) * 64`,
/// 0 while `p < 256`.
pub const fn kv_local_start(p: u32) -> u32 {
    if p < KV_LOCAL as u32 {
        0
    } else {
        (p - KV_LOCAL as u32) / 64 * 64
    }
}

/// One layer of the working-set cache (see the module docs).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct KvCacheParams {
    /// u32 [1]: the current query position `p` (device resident).
    pub pos: u64,
    /// bf16 [n_kv][128] each: the new token's K (after qk-norm and RoPE) and V (append only).
    pub k_new: u64,
    pub v_new: u64,
    /// bf16 slot pool of the layer.
    pub slots: u64,
    /// u64 [n_extents]: device addresses of the arena's extents (layout: `host/src/kv/mod.rs`).
    pub extents: u64,
    /// u32 [n_kv][max_groups]: selected groups, `u32::MAX` = padding.
    pub selected: u64,
    pub table: u64,
    pub slot_group: u64,
    pub slot_ref: u64,
    pub slot_used: u64,
    pub seen: u64,
    pub hand: u64,
    pub miss_group: u64,
    pub miss_slot: u64,
    pub n_miss: u64,
    /// u32 [n_kv][max_entries], u32 [n_kv][max_entries], u32 [n_kv]: the attention entry list.
    pub entry_slot: u64,
    pub entry_pos: u64,
    pub n_entries: u64,
    /// u64 [n_kv][4]
    pub counters: u64,
    /// u64 [n_kv][4] in mapped host memory, or 0.
    pub counters_host: u64,
    /// This layer's index in the arena and the arena's KV heads (= n_kv) and groups per extent.
    pub layer: u32,
    pub n_kv: u32,
    pub groups_per_extent: u32,
    /// Extents in the table (groups `>= n_extents * groups_per_extent` are not in the arena).
    pub n_extents: u32,
    pub slots_per_head: u32,
    pub cache_slots: u32,
    pub table_groups: u32,
    pub max_groups: u32,
    pub max_entries: u32,
    /// CLOCK reference count given on a hit and on a fill.
    pub ref_hit: u32,
    pub ref_fill: u32,
    /// Append: also write the arena (1) or only the GPU slots (0).
    pub write_arena: u32,
    /// u64 [layers][n_kv][table_groups] in mapped host memory, or 0: the address of each group's block, written by
    /// the host (the disk tier's RAM cache, whose pages are not laid out as extents); when set it replaces the
    /// extents' arithmetic, and a 0 entry is a group not in RAM.
    pub group_addr: u64,
}
