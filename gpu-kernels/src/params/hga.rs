//! The formats shared by the HGA-on-GPU kernels (`gpu-kernels/src/hga/`), the K/V working-set kernels
//! (`gpu-kernels/src/kv/`) and the host's K/V tiers (`host/src/kv/`). One definition, used by every side.
//!
//! Geometry: the GPU kernels are specialised for the default HGA geometry (`host/src/hga`, `HgaParams::default()`):
//! head_dim 128, chunks of 64 tokens, groups of 16 tokens (4 groups per chunk). Launchers refuse other geometries.
//!
//! - **Group block** (the unit of the host arena, of disk pages and of the GPU slots): the K/V of 16 consecutive
//!   positions of one (layer, KV head), starting at a multiple of 16: K `bf16 [16][128]` (4096 bytes) followed by
//!   V `bf16 [16][128]` (4096 bytes), [`KV_GROUP_BYTES`] in all. Group `g` holds positions `16g .. 16g + 15`.
//! - **Slot pool** (GPU working set, one per layer): `bf16 [n_slots][2][16][128]`, i.e. `n_slots` group blocks. A
//!   slot index is absolute within the layer's pool.
//! - **Attention entry list** (what routed attention reads, per KV head `h` of a layer): `entry_slot: u32
//!   [n_kv_heads][max_entries]`, `entry_pos: u32 [n_kv_heads][max_entries]` (the first position of the group held
//!   by that slot, a multiple of 16), `n_entries: u32 [n_kv_heads]` (device-resident, so a recorded launch serves
//!   every step). A query at position `p` attends row `r` of entry `e` iff `entry_pos[e] + r <= p` (causal; this also
//!   masks the unfilled rows of the open group). Entries are disjoint groups; their order is free.
//! - **Chunk summary** (stage 1, per (layer, KV head, closed chunk)): elementwise min and max of the chunk's 64
//!   post-RoPE bf16 keys, `bf16 [n_kv_heads][max_chunks][128]` each ([`SUMMARY_BYTES_PER_CHUNK`] per chunk and head).
//!   The keys are bf16, so their min and max are exact in bf16.
//! - **int4 sketch** (stage 2, per (layer, KV head, token)): `s = max_d |k_d| / 7` in f32, `q_d = clamp(round(k_d / s),
//!   -8, 7)` (round half away from zero, the division in f32 by that f32 `s`, as host/src/hga computes it); the stored
//!   scale is `f16(s)` (round to nearest even; NaN if the key has a NaN), two's complement nibbles,
//!   dimension `2i` in the low nibble of byte `i` and `2i + 1` in the high nibble: `u8 [n_kv_heads][max_tokens][64]`
//!   and the scales `f16 [n_kv_heads][max_tokens]` ([`SKETCH_BYTES_PER_TOKEN`] per token and head). The estimated
//!   key is `q_d * f16(s)`; `s = 0` (an all-zero key) gives the zero key.
//! - **Selected groups** (the output of stage 2, per KV head): `u32 [n_kv_heads][n_groups]`, absolute group indices
//!   (`hga_route_stage2`: `n_groups` is the launch's max_groups; the selection ascending, then u32::MAX padding).

/// Head dimension of every HGA kernel.
pub const HGA_HEAD_DIM: usize = 128;
/// Tokens per chunk (stage 1's unit).
pub const HGA_CHUNK: usize = 64;
/// Tokens per group (stage 2's unit and the unit of K/V movement).
pub const HGA_GROUP: usize = 16;
/// Groups per chunk.
pub const HGA_GROUPS_PER_CHUNK: usize = HGA_CHUNK / HGA_GROUP;
/// Bytes of the K half of a group block: 16 x 128 bf16.
pub const KV_GROUP_K_BYTES: usize = HGA_GROUP * HGA_HEAD_DIM * 2;
/// Bytes of one group block (K then V).
pub const KV_GROUP_BYTES: usize = 2 * KV_GROUP_K_BYTES;
/// Bytes of one chunk's min/max summary per KV head (bf16 min and max).
pub const SUMMARY_BYTES_PER_CHUNK: usize = 2 * HGA_HEAD_DIM * 2;
/// Bytes of one token's int4 sketch per KV head: 64 bytes of nibbles and an f16 scale.
pub const SKETCH_BYTES_PER_TOKEN: usize = HGA_HEAD_DIM / 2 + 2;
