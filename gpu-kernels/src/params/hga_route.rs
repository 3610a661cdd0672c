//! Parameter struct of the routing kernels (`gpu-kernels/src/hga/route/`): `hga_route_summary`,
//! `hga_route_base`, `hga_route_stage1` and `hga_route_stage2`. One struct for the family (they share the key source, the summaries,
//! the query rows, the geometry and the scratch); each kernel's doc header says which fields it reads.
//!
//! Formats of the summaries, sketches and selected groups: `crate::params::hga`. The routing geometry is
//! `host/src/hga::Geometry` evaluated ON THE DEVICE from a device-resident query position (see [`RouteParams::pos`]),
//! so that one recorded launch serves every decode step.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Threads per CTA of every routing kernel.
pub const ROUTE_THREADS: usize = 256;
/// Largest query-row count per KV head (query tokens of the block x query heads of the KV head).
pub const ROUTE_MAX_ROWS: usize = 512;
/// Words of `stats` per KV head: [n_chunks kept (n_c), n_groups selected (n_g), chunk candidates whose score is
/// -inf or NaN, group candidates whose score is -inf or NaN].
pub const ROUTE_STATS: usize = 4;
/// Words of `counters` per KV head (one per kernel that ends with a last-CTA select; self-resetting).
pub const ROUTE_COUNTERS: usize = 2;
/// Bins of the first-level histogram of a select: the top [`ROUTE_HIST_BITS`] bits of a score's order key (sign,
/// exponent and 3 mantissa bits), counted by the scoring CTAs in global memory (`hist`, u32 [n_kv][2][bins]: stage
/// 1's then stage 2's) and reset to zero by the last CTA that reads them.
pub const ROUTE_HIST_BINS: usize = 1 << ROUTE_HIST_BITS;
pub const ROUTE_HIST_BITS: usize = 12;
/// Query rows per KV head up to which the scoring kernels stage q in shared memory (decode: 1 x GQA); larger blocks
/// read q from global memory with 16-byte loads.
pub const ROUTE_QS_ROWS: usize = 16;
/// Row stride (f32) of stage 1's staged q (528 bytes: the rows of one 16-byte column fall in distinct bank quads).
pub const ROUTE_QS1_STRIDE: usize = 132;
/// Row stride (f32) of stage 2's staged q (576 bytes, dims permuted by the tensor-core fragment layout).
pub const ROUTE_QS2_STRIDE: usize = 144;

/// Dynamic shared memory of a routing kernel whose last CTA selects among at most `max_candidates` scores: the keys
/// (4 bytes each), four 256-bin histograms (one per radix pass) and 64 words of scan space.
pub const fn route_select_smem(max_candidates: usize) -> usize {
    4 * (max_candidates + 1024 + 64)
}

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Dynamic shared memory of `hga_route_stage1` with `ctas` scoring CTAs per KV head: the staged q and one word per
/// chunk of a CTA during scoring, the select's space in the last CTA (the two alias).
pub const fn route_stage1_smem(max_cand_chunks: usize, ctas: usize) -> usize {
    let per = max_cand_chunks.div_ceil(if ctas == 0 { 1 } else { ctas });
    max(route_select_smem(max_cand_chunks), 4 * (ROUTE_QS_ROWS * ROUTE_QS1_STRIDE + per))
}

/// Dynamic shared memory of `hga_route_stage2`: the staged q during scoring, the select's space in the last CTA.
pub const fn route_stage2_smem(max_cand_groups: usize) -> usize {
    max(route_select_smem(max_cand_groups), 4 * ROUTE_QS_ROWS * ROUTE_QS2_STRIDE)
}

/// Dynamic shared memory of `hga_route_base` (the q row and one log-sum-exp state per warp).
pub const ROUTE_BASE_SMEM: usize = 4 * (128 + 2 * 32);

/// Parameters of the routing kernels. All pointers are device addresses (0 = absent where allowed).
///
/// Key source (summary kernel: the closing chunks' keys; stage 1: the sink and local-window keys of the
/// normalization). Row `j` (absolute position) of KV head `h`, bf16 `[128]`:
/// - dense (`k_table == 0`): `k + h * k_head_stride + j * k_row_stride` (elements), e.g. a prefill buffer
///   `[tokens][n_kv][128]` (head stride 128, row stride n_kv * 128) or a cache `[n_kv][capacity][128]`;
/// - group blocks (`k_table != 0`): `k_table[h * k_table_len + j / 16] + (j % 16) * k_row_stride` elements, where
///   the table (u64 [n_kv][k_table_len], absolute group index) holds the address of group `j / 16`'s K half
///   (`bf16 [16][128]`, a slot of the pool or a host-mapped block; row stride 128).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct RouteParams {
    pub k: u64,
    pub k_table: u64,
    pub k_head_stride: u64,
    /// bf16 [n_kv][max_chunks][128] each.
    pub chunk_min: u64,
    pub chunk_max: u64,
    /// u8 [n_kv][max_tokens][64] and f16 [n_kv][max_tokens].
    pub sketch: u64,
    pub sketch_scale: u64,
    /// f32 [q_len][n_heads][128]: the block's post-RoPE queries (the rows of KV head h are
    /// `(t, h * per_kv + i)`, query-major, as host/src/hga orders them).
    pub q: u64,
    /// If not 0, a device u32: the first query position of the block (decode: the query's position) replacing
    /// `b0`; the summary kernel reads it as the number of keys written so far.
    pub pos: u64,
    /// Scratch (see `host/src/kernels/hga_route.rs`, `RouteWorkspace`); `hist` is zero between launches.
    pub hist: u64,
    pub base: u64,
    pub chunk_scores: u64,
    pub kept: u64,
    pub group_scores: u64,
    pub counters: u64,
    pub stats: u64,
    /// Output: u32 [n_kv][max_groups], absolute group indices ascending, u32::MAX padding.
    pub selected: u64,
    /// Budget as a share of the context `b0 + q_len` (used when `budget_tokens == 0`).
    pub budget_frac: f64,
    /// Chunk shortlist factor; not finite (or `chunk_stage == 0`) means no chunk stage.
    pub shortlist: f64,
    pub k_row_stride: u32,
    pub k_table_len: u32,
    pub max_chunks: u32,
    pub max_tokens: u32,
    /// Summary kernel: first chunk and chunk count of the launch (prefill); with `pos` set, the launch summarizes
    /// the chunk that the key at `*pos - 1` closed, if any.
    pub chunk0: u32,
    pub n_sum_chunks: u32,
    pub b0: u32,
    pub q_len: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub sink: u32,
    pub local: u32,
    /// Budget in tokens (0: use `budget_frac`).
    pub budget_tokens: u32,
    /// 1: normalize each row's scores by its sink + window log-sum-exp.
    pub normalize: u32,
    /// 1: stage 1 shortlists chunks; 0: stage 2 scores every candidate group.
    pub chunk_stage: u32,
    pub max_groups: u32,
    pub max_kept: u32,
    /// Row strides (elements) of the scratch: base `[n_kv][max_rows]`, chunk_scores `[n_kv][max_cand_chunks]`,
    /// group_scores `[n_kv][max_cand_groups]`.
    pub max_rows: u32,
    pub max_cand_chunks: u32,
    pub max_cand_groups: u32,
    /// Scoring CTAs per KV head (grid.x).
    pub ctas: u32,
    /// Softmax scale of the scores (1/sqrt(128)).
    pub scale: f32,
    /// The largest `b0 + q_len` the scratch was sized for: a device position past it routes nothing
    /// (`stats[h][0]` = `stats[h][1]` = u32::MAX, `selected` all padding) instead of writing out of bounds.
    pub max_ctx: u32,
    /// Explicit padding (the struct is `Pod`: no implicit padding); 0.
    pub pad: u32,
}
