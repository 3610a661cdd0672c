//! Parameter structs of the MoE kernels (`crate::moe`): router, grouping, and the expert kernels.
#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Token tile of the routers: 16 tokens (one mma m-tile) per warp tile.
pub const MOE_ROUTER_TILE: usize = 16;
/// Largest number of experts the routers and the grouping kernel accept (their shared-memory tables).
pub const MOE_MAX_EXPERTS: usize = 256;
/// Largest top-k.
pub const MOE_MAX_TOPK: usize = 32;
/// Warps per block of `hga_moe_gate_up_decode_v3`; a block owns `MOE_DECODE_ROWS` intermediate columns of one
/// (token, slot).
pub const MOE_GATE_UP_DECODE_WARPS: usize = 4;
/// Intermediate columns per block of `hga_moe_gate_up_decode_v3`.
pub const MOE_DECODE_ROWS: usize = 8;
/// Warps per block of `hga_moe_down_decode_v3`; a block owns `MOE_DOWN_DECODE_V3_ROWS` output rows of one token.
/// 512 threads: the kernel must stay at <= 128 registers (scripts/ptxas-report).
pub const MOE_DOWN_DECODE_V3_WARPS: usize = 16;
/// Output rows per block of `hga_moe_down_decode_v3` (one `mma` A tile: rows g and g + 8).
pub const MOE_DOWN_DECODE_V3_ROWS: usize = 16;
/// Warps per block of `hga_moe_router_rows` (one expert row per block, K split over the warps).
pub const MOE_ROUTER_ROWS_WARPS: usize = 8;
/// Rows (sorted (token, slot) entries) per block tile of the grouped (prefill) expert kernels.
pub const MOE_GROUP_TILE_M: usize = 64;

/// Router: `logits = x W^T` (bf16 inputs, f32 accumulation), softmax over the experts in f32, top-k (ties: lower
/// expert index), weights renormalised over the chosen k when `norm_topk != 0`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct MoeRouterParams {
    /// bf16 [tokens, hidden]
    pub x: u64,
    /// bf16 [experts, hidden] (`mlp.gate.weight`)
    pub w: u64,
    /// f32 [tokens, experts] scratch (rows router only)
    pub logits: u64,
    /// u32 [ceil(tokens / 16)] arrival counters, zero before the first launch; the kernel leaves them zero
    /// (rows router only)
    pub counter: u64,
    /// u32 [tokens, top_k]: chosen experts, best first
    pub ids: u64,
    /// f32 [tokens, top_k]: their routing weights
    pub weights: u64,
    pub tokens: u32,
    pub hidden: u32,
    pub experts: u32,
    pub top_k: u32,
    pub norm_topk: u32,
    /// `hga_moe_router_rows` only, one token only: f32 epsilon of the fused RMSNorm (used when `norm_w != 0`).
    pub eps: f32,
    /// `hga_moe_router_rows` only, one token only: when not 0, bf16 [hidden], the weight of an RMSNorm the router
    /// runs first (the post-attention norm with its residual add): every block computes `x' = bf16(norm_in +
    /// res_in)` and `x = bf16(norm_w * bf16(x' * rsqrt(mean(x'^2) + eps)))` exactly as `hga_rmsnorm`'s vector path
    /// does (same per-thread vectors, same block sum), takes its logit from those registers, and block 0 writes
    /// `x'` to `res_out` and `x` to `x` (for the expert kernels). Needs hidden <= 8 x 256 and 16-byte alignment.
    pub norm_w: u64,
    /// bf16 [hidden]: the sublayer output entering the fused norm (when `norm_w != 0`).
    pub norm_in: u64,
    /// bf16 [hidden]: the residual stream entering the fused norm (when `norm_w != 0`).
    pub res_in: u64,
    /// bf16 [hidden]: the residual stream after the add, written by block 0 (when `norm_w != 0`).
    pub res_out: u64,
}

/// Threads of `hga_moe_router_rows`: hidden sizes up to this x 8 can use its fused RMSNorm (one 16-byte vector per
/// thread, as `hga_rmsnorm`'s vector path at its 256 threads).
pub const MOE_ROUTER_ROWS_NORM_MAX_HIDDEN: usize = 8 * 32 * MOE_ROUTER_ROWS_WARPS;

/// Grouping of (token, slot) entries by expert.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct MoeGroupParams {
    /// u32 [tokens, top_k] expert ids (each < experts)
    pub ids: u64,
    /// u32 [experts]: entries per expert
    pub counts: u64,
    /// u32 [experts + 1]: exclusive prefix of counts (offsets[experts] = tokens * top_k)
    pub offsets: u64,
    /// u32 [experts + 1]: exclusive prefix of ceil(counts / MOE_GROUP_TILE_M) (block tiles of the grouped kernels)
    pub tile_start: u64,
    /// u32 [tokens * top_k]: entry `token * top_k + slot`, sorted by expert, then by entry (so by token)
    pub perm: u64,
    pub tokens: u32,
    pub experts: u32,
    pub top_k: u32,
    pub _pad: u32,
}

/// The expert kernels (decode and grouped prefill) and the final combine. Weights are stacked per expert:
/// `w_gate`, `w_up` e4m3 [experts, inter, hidden] with f32 scales [experts, inter/128, hidden/128];
/// `w_down` e4m3 [experts, hidden, inter] with scales [experts, hidden/128, inter/128] (`weight_scale_inv`,
/// multiplied). Each kernel reads the fields its doc names; the others may be 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct MoeExpertParams {
    /// bf16 [tokens, hidden] (decode gate/up: quantized in the kernel)
    pub x: u64,
    /// e4m3 [tokens, hidden] and f32 [tokens, hidden/128] (grouped gate/up)
    pub xq: u64,
    pub xs: u64,
    pub w_gate: u64,
    pub s_gate: u64,
    pub w_up: u64,
    pub s_up: u64,
    pub w_down: u64,
    pub s_down: u64,
    /// u32 [tokens, top_k] and f32 [tokens, top_k] (router outputs)
    pub ids: u64,
    pub weights: u64,
    /// grouping outputs (grouped kernels)
    pub perm: u64,
    pub offsets: u64,
    pub tile_start: u64,
    /// bf16 [rows, inter]: silu(gate) * up; rows are (token, slot) entries (decode) or sorted entries (grouped)
    pub inter: u64,
    /// e4m3 [rows, inter] and f32 [rows, inter/128]: `inter` quantized (grouped down)
    pub inter_q: u64,
    pub inter_s: u64,
    /// f32 [tokens * top_k, hidden]: unweighted expert outputs per (token, slot) (grouped down -> combine)
    pub ys: u64,
    /// bf16 [tokens, hidden]: the MoE output
    pub out: u64,
    pub tokens: u32,
    pub hidden: u32,
    pub inter_dim: u32,
    pub experts: u32,
    pub top_k: u32,
    pub _pad: u32,
}
