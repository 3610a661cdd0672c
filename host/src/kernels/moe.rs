//! Launchers of the MoE kernels (gpu-kernels/src/moe/*) and the two composed paths:
//! [`moe_decode`] (router + fused decode expert kernels, 3 launches, no grouping needed: the expert kernels read
//! the router's ids directly; [`moe_decode_residual`] also runs the post-attention norm inside the router for one
//! token) and [`moe_grouped`] (router, grouping, x quantization, grouped gate/up with the SiLU*up epilogue,
//! quantization of the intermediate, grouped down, combine).
//!
//! Which kernel runs (the same on sm_89, sm_90 and sm_120):
//!
//! | path | router (`RouterForm::Auto`) | experts |
//! |---|---|---|
//! | [`moe_decode`], tokens <= [`ROUTER_ROWS_MAX_TOKENS`] (64) | `hga_moe_router_rows` | `hga_moe_gate_up_decode_v3`, `hga_moe_down_decode_v3` |
//! | [`moe_decode`], more tokens | `hga_moe_router` | as above |
//! | [`moe_grouped`] (prefill), tokens <= 64 | `hga_moe_router_rows` | `hga_moe_group`, `hga_fp8_quant`, `hga_moe_gate_up_grouped`, `hga_fp8_quant`, `hga_moe_down_grouped`, `hga_moe_combine` |
//! | [`moe_grouped`], more tokens | `hga_moe_router` | as above |
//!
//! The model runs [`moe_decode_residual`] for decode steps and [`moe_grouped`] for prefill chunks.
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::kernels::hga_rmsnorm;
use crate::memory::DeviceBuf;
use crate::reference::moe::{MoeDims, MoeHostWeights};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::num::FP8_GROUP;
use gpu_kernels::params::{
    MoeExpertParams, MoeGroupParams, MoeRouterParams, MOE_DECODE_ROWS, MOE_DOWN_DECODE_V3_ROWS,
    MOE_DOWN_DECODE_V3_WARPS, MOE_GATE_UP_DECODE_WARPS, MOE_GROUP_TILE_M, MOE_MAX_EXPERTS, MOE_MAX_TOPK,
    MOE_ROUTER_ROWS_NORM_MAX_HIDDEN, MOE_ROUTER_ROWS_WARPS, MOE_ROUTER_TILE,
};
use half::bf16;

/// Up to this many tokens [`hga_moe_router`] (`Auto`) uses the one-expert-per-block form (weights spread over
/// `experts` blocks).
pub const ROUTER_ROWS_MAX_TOKENS: usize = 64;

fn shape_err(s: String) -> RuntimeError {
    RuntimeError::Shape(s)
}

/// Checks the sizes every MoE kernel assumes.
pub fn check_dims(d: &MoeDims) -> Result<(), RuntimeError> {
    if d.hidden == 0 || !d.hidden.is_multiple_of(FP8_GROUP) || d.inter == 0 || !d.inter.is_multiple_of(FP8_GROUP) {
        return Err(shape_err(format!(
            "moe: hidden ({}) and inter ({}) must be positive multiples of 128",
            d.hidden, d.inter
        )));
    }
    if d.experts == 0 || d.experts > MOE_MAX_EXPERTS {
        return Err(shape_err(format!("moe: experts = {} must be in 1..={MOE_MAX_EXPERTS}", d.experts)));
    }
    if d.top_k == 0 || d.top_k > d.experts.min(MOE_MAX_TOPK) {
        return Err(shape_err(format!("moe: top_k = {} must be in 1..=min(experts, {MOE_MAX_TOPK})", d.top_k)));
    }
    let big = d.tokens.checked_mul(d.top_k).and_then(|v| v.checked_mul(d.hidden.max(d.inter)));
    if big.is_none_or(|v| v > u32::MAX as usize) {
        return Err(shape_err(format!("moe: tokens = {} too large for 32-bit indices", d.tokens)));
    }
    Ok(())
}

/// Which router kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterForm {
    /// [`RouterForm::Rows`] up to [`ROUTER_ROWS_MAX_TOKENS`] tokens, else [`RouterForm::Batch`] (what every path
    /// of the model uses)
    Auto,
    /// `hga_moe_router`: 32-token tiles x all experts per block
    Batch,
    /// `hga_moe_router_rows`: one expert per block (CUDA-core dot products), last block does the top-k
    Rows,
}

/// Router: x bf16 [tokens, hidden], w bf16 [experts, hidden] -> ids u32 [tokens, top_k], weights f32 [tokens,
/// top_k]. The rows form also needs `logits` f32 [tokens, experts] scratch and `counter` u32
/// [ceil(tokens / 16)], zero before the first use (the kernel leaves it zero).
#[allow(clippy::too_many_arguments)]
pub fn hga_moe_router(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    logits: &mut impl DevicePtrMut<f32>,
    counter: &mut impl DevicePtrMut<u32>,
    ids: &mut impl DevicePtrMut<u32>,
    weights: &mut impl DevicePtrMut<f32>,
    d: &MoeDims,
    form: RouterForm,
) -> Result<(), RuntimeError> {
    router_launch(gpu, x, w, logits, counter, ids, weights, d, form, None)
}

/// The RMSNorm that `hga_moe_router_rows` can run first (`MoeRouterParams::norm_w`): device addresses, already
/// checked (hidden bf16 each, 16-byte aligned), and epsilon.
#[derive(Clone, Copy)]
struct RouterNorm {
    weight: u64,
    input: u64,
    res_in: u64,
    res_out: u64,
    eps: f32,
}

/// [`hga_moe_router`], optionally with the fused norm (then `x` is where block 0 writes the normalized row, and the
/// form is `Rows`). `x` is taken by shared reference either way: the one caller of the fused form
/// ([`moe_decode_residual`]) holds it mutably, and all of it runs on the GPU's one stream.
#[allow(clippy::too_many_arguments)]
fn router_launch(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    logits: &mut impl DevicePtrMut<f32>,
    counter: &mut impl DevicePtrMut<u32>,
    ids: &mut impl DevicePtrMut<u32>,
    weights: &mut impl DevicePtrMut<f32>,
    d: &MoeDims,
    form: RouterForm,
    norm: Option<RouterNorm>,
) -> Result<(), RuntimeError> {
    check_dims(d)?;
    let (t, h, ne, k) = (d.tokens, d.hidden, d.experts, d.top_k);
    check_len("moe router x", x.len(), t * h)?;
    check_len("moe router w", w.len(), ne * h)?;
    check_len("moe router ids", ids.len(), t * k)?;
    check_len("moe router weights", weights.len(), t * k)?;
    if t == 0 {
        return Ok(());
    }
    let form = match form {
        RouterForm::Auto if t <= ROUTER_ROWS_MAX_TOKENS => RouterForm::Rows,
        RouterForm::Auto => RouterForm::Batch,
        f => f,
    };
    let rows = form == RouterForm::Rows;
    if rows {
        check_len("moe router logits", logits.len(), t * ne)?;
        check_len("moe router counter", counter.len(), t.div_ceil(MOE_ROUTER_TILE))?;
    }
    let (px, _a) = dptr(gpu, x);
    let (pw, _b) = dptr(gpu, w);
    let (pl, _c) = dptr_mut(gpu, logits);
    let (pc, _d) = dptr_mut(gpu, counter);
    let (pi, _e) = dptr_mut(gpu, ids);
    let (pwt, _f) = dptr_mut(gpu, weights);
    let p = MoeRouterParams {
        x: px,
        w: pw,
        logits: if rows { pl } else { 0 },
        counter: if rows { pc } else { 0 },
        ids: pi,
        weights: pwt,
        tokens: dim_u32("moe tokens", t)?,
        hidden: h as u32,
        experts: ne as u32,
        top_k: k as u32,
        norm_topk: d.norm_topk as u32,
        eps: norm.map_or(0.0, |n| n.eps),
        norm_w: norm.map_or(0, |n| n.weight),
        norm_in: norm.map_or(0, |n| n.input),
        res_in: norm.map_or(0, |n| n.res_in),
        res_out: norm.map_or(0, |n| n.res_out),
    };
    if norm.is_some() && (form != RouterForm::Rows || t != 1 || h > MOE_ROUTER_ROWS_NORM_MAX_HIDDEN) {
        return Err(shape_err(format!(
            "moe router: the fused norm needs the rows form, 1 token, hidden <= 2048 ({t}, {h})"
        )));
    }
    if rows {
        let cfg = LaunchConfig {
            grid_dim: (ne as u32, dim_u32("moe router tiles", t.div_ceil(MOE_ROUTER_TILE))?, 1),
            block_dim: (32 * MOE_ROUTER_ROWS_WARPS as u32, 1, 1),
            // block sum [32] f32, partial logits [warps][16] f32, flag
            shared_mem_bytes: (4 * 32 + MOE_ROUTER_ROWS_WARPS * MOE_ROUTER_TILE * 4 + 16) as u32,
        };
        // SAFETY: lengths checked above.
        unsafe { launch(gpu, "hga_moe_router_rows", cfg, p) }
    } else {
        let cfg = LaunchConfig {
            grid_dim: (dim_u32("moe router blocks", t.div_ceil(32))?, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (32 * ne * 4) as u32,
        };
        // SAFETY: lengths checked above.
        unsafe { launch(gpu, "hga_moe_router", cfg, p) }
    }
}

/// Grouping of ids u32 [tokens, top_k] by expert: counts [experts], offsets [experts + 1], tile_start
/// [experts + 1], perm [tokens * top_k] (see `MoeGroupParams`).
#[allow(clippy::too_many_arguments)]
pub fn hga_moe_group(
    gpu: &Gpu,
    ids: &impl DevicePtr<u32>,
    counts: &mut impl DevicePtrMut<u32>,
    offsets: &mut impl DevicePtrMut<u32>,
    tile_start: &mut impl DevicePtrMut<u32>,
    perm: &mut impl DevicePtrMut<u32>,
    tokens: usize,
    experts: usize,
    top_k: usize,
) -> Result<(), RuntimeError> {
    if experts == 0 || experts > MOE_MAX_EXPERTS || top_k == 0 || top_k > MOE_MAX_TOPK {
        return Err(shape_err(format!("moe group: experts = {experts}, top_k = {top_k} out of range")));
    }
    let n = tokens.checked_mul(top_k).ok_or_else(|| shape_err("moe group: tokens * top_k overflows".into()))?;
    check_len("moe group ids", ids.len(), n)?;
    check_len("moe group counts", counts.len(), experts)?;
    check_len("moe group offsets", offsets.len(), experts + 1)?;
    check_len("moe group tile_start", tile_start.len(), experts + 1)?;
    check_len("moe group perm", perm.len(), n)?;
    let (pi, _a) = dptr(gpu, ids);
    let (pc, _b) = dptr_mut(gpu, counts);
    let (po, _c) = dptr_mut(gpu, offsets);
    let (pt, _d) = dptr_mut(gpu, tile_start);
    let (pp, _e) = dptr_mut(gpu, perm);
    let p = MoeGroupParams {
        ids: pi,
        counts: pc,
        offsets: po,
        tile_start: pt,
        perm: pp,
        tokens: dim_u32("moe group tokens", tokens)?,
        experts: experts as u32,
        top_k: top_k as u32,
        _pad: 0,
    };
    dim_u32("moe group entries", n)?;
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (10 * experts * 4) as u32 };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_moe_group", cfg, p) }
}

/// The accountant's label of the routed experts' weights and scales ([`MoeExpertWeights::upload`]).
pub const EXPERT_WEIGHTS: &str = "expert weights";
/// The accountant's label of [`MoeWorkspace`].
pub const MOE_WORKSPACE: &str = "moe workspace";

/// Stacked expert weights on the device (layouts of [`MoeHostWeights`]).
pub struct MoeExpertWeights {
    pub w_gate: DeviceBuf<u8>,
    pub s_gate: DeviceBuf<f32>,
    pub w_up: DeviceBuf<u8>,
    pub s_up: DeviceBuf<f32>,
    pub w_down: DeviceBuf<u8>,
    pub s_down: DeviceBuf<f32>,
}

impl MoeExpertWeights {
    /// Uploads host weights (booked as [`EXPERT_WEIGHTS`]).
    pub fn upload(gpu: &Gpu, w: &MoeHostWeights) -> Result<Self, RuntimeError> {
        let l = EXPERT_WEIGHTS;
        Ok(MoeExpertWeights {
            w_gate: gpu.upload(l, &w.w_gate)?,
            s_gate: gpu.upload(l, &w.s_gate)?,
            w_up: gpu.upload(l, &w.w_up)?,
            s_up: gpu.upload(l, &w.s_up)?,
            w_down: gpu.upload(l, &w.w_down)?,
            s_down: gpu.upload(l, &w.s_down)?,
        })
    }

    fn check(&self, d: &MoeDims) -> Result<(), RuntimeError> {
        let (h, i, e) = (d.hidden, d.inter, d.experts);
        let sc = e * (h / FP8_GROUP) * (i / FP8_GROUP);
        check_len("moe w_gate", self.w_gate.len(), e * i * h)?;
        check_len("moe w_up", self.w_up.len(), e * i * h)?;
        check_len("moe w_down", self.w_down.len(), e * h * i)?;
        check_len("moe s_gate", self.s_gate.len(), sc)?;
        check_len("moe s_up", self.s_up.len(), sc)?;
        check_len("moe s_down", self.s_down.len(), sc)
    }

    fn params<'a>(
        &'a self,
        gpu: &'a Gpu,
        d: &MoeDims,
    ) -> Result<(MoeExpertParams, [cudarc::driver::SyncOnDrop<'a>; 6]), RuntimeError> {
        self.check(d)?;
        let (wg, g1) = dptr(gpu, &self.w_gate);
        let (wu, g2) = dptr(gpu, &self.w_up);
        let (wd, g3) = dptr(gpu, &self.w_down);
        let (sg, g4) = dptr(gpu, &self.s_gate);
        let (su, g5) = dptr(gpu, &self.s_up);
        let (sd, g6) = dptr(gpu, &self.s_down);
        let guards = [g1, g2, g3, g4, g5, g6];
        let p = MoeExpertParams {
            x: 0,
            xq: 0,
            xs: 0,
            w_gate: wg,
            s_gate: sg,
            w_up: wu,
            s_up: su,
            w_down: wd,
            s_down: sd,
            ids: 0,
            weights: 0,
            perm: 0,
            offsets: 0,
            tile_start: 0,
            inter: 0,
            inter_q: 0,
            inter_s: 0,
            ys: 0,
            out: 0,
            tokens: dim_u32("moe tokens", d.tokens)?,
            hidden: d.hidden as u32,
            inter_dim: d.inter as u32,
            experts: d.experts as u32,
            top_k: d.top_k as u32,
            _pad: 0,
        };
        Ok((p, guards))
    }
}

/// Largest grid.y of a launch.
const GRID_Y_MAX: usize = 65535;

/// Decode gate/up: x bf16 [tokens, hidden], ids [tokens, top_k] -> inter bf16 [tokens * top_k, inter]
/// (row = token * top_k + slot): `hga_moe_gate_up_decode_v3`, which also prefetches the chosen experts' down
/// weights into L2.
pub fn hga_moe_gate_up_decode(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &MoeExpertWeights,
    ids: &impl DevicePtr<u32>,
    inter: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
) -> Result<(), RuntimeError> {
    check_dims(d)?;
    let n = d.tokens * d.top_k;
    check_len("moe gate_up x", x.len(), d.tokens * d.hidden)?;
    check_len("moe gate_up ids", ids.len(), n)?;
    check_len("moe gate_up inter", inter.len(), n * d.inter)?;
    if n == 0 {
        return Ok(());
    }
    if n > GRID_Y_MAX {
        return Err(shape_err(format!(
            "moe gate_up decode: tokens * top_k = {n} > {GRID_Y_MAX} (use the grouped path)"
        )));
    }
    let (mut p, _g) = w.params(gpu, d)?;
    let (px, _a) = dptr(gpu, x);
    let (pi, _b) = dptr(gpu, ids);
    let (ph, _c) = dptr_mut(gpu, inter);
    (p.x, p.ids, p.inter) = (px, pi, ph);
    let (cols, threads) = (MOE_DECODE_ROWS, 32 * MOE_GATE_UP_DECODE_WARPS);
    let cfg = LaunchConfig {
        grid_dim: ((d.inter / cols) as u32, n as u32, 1),
        block_dim: (threads as u32, 1, 1),
        // [warps][columns][gate, up] f32
        shared_mem_bytes: (threads / 32 * cols * 2 * 4) as u32,
    };
    // SAFETY: lengths checked above; ids must be < experts (router output).
    unsafe { launch(gpu, "hga_moe_gate_up_decode_v3", cfg, p) }
}

/// Decode down + weighted slot sum: inter bf16 [tokens * top_k, inter], ids / weights [tokens, top_k] ->
/// out bf16 [tokens, hidden]: `hga_moe_down_decode_v3`.
#[allow(clippy::too_many_arguments)]
pub fn hga_moe_down_decode(
    gpu: &Gpu,
    inter: &impl DevicePtr<bf16>,
    w: &MoeExpertWeights,
    ids: &impl DevicePtr<u32>,
    weights: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
) -> Result<(), RuntimeError> {
    check_dims(d)?;
    let n = d.tokens * d.top_k;
    check_len("moe down inter", inter.len(), n * d.inter)?;
    check_len("moe down ids", ids.len(), n)?;
    check_len("moe down weights", weights.len(), n)?;
    check_len("moe down out", out.len(), d.tokens * d.hidden)?;
    if n == 0 {
        return Ok(());
    }
    if d.tokens > GRID_Y_MAX {
        return Err(shape_err(format!("moe down decode: tokens = {} > {GRID_Y_MAX}", d.tokens)));
    }
    let (mut p, _g) = w.params(gpu, d)?;
    let (ph, _a) = dptr(gpu, inter);
    let (pi, _b) = dptr(gpu, ids);
    let (pw, _c) = dptr(gpu, weights);
    let (po, _d) = dptr_mut(gpu, out);
    (p.inter, p.ids, p.weights, p.out) = (ph, pi, pw, po);
    let cfg = LaunchConfig {
        grid_dim: ((d.hidden / MOE_DOWN_DECODE_V3_ROWS) as u32, d.tokens as u32, 1),
        block_dim: (32 * MOE_DOWN_DECODE_V3_WARPS as u32, 1, 1),
        shared_mem_bytes: (MOE_DOWN_DECODE_V3_WARPS * MOE_DOWN_DECODE_V3_ROWS * 4) as u32, // [warps][rows] f32
    };
    // SAFETY: lengths checked above; ids must be < experts (router output).
    unsafe { launch(gpu, "hga_moe_down_decode_v3", cfg, p) }
}

/// Upper bound of the grouped kernels' block tiles: ceil(tokens * top_k / 64) + experts.
pub fn grouped_tiles(d: &MoeDims) -> usize {
    (d.tokens * d.top_k).div_ceil(MOE_GROUP_TILE_M) + d.experts
}

/// The grouping outputs, as the grouped kernels read them.
pub struct MoeGrouping<'a, P: DevicePtr<u32>> {
    pub perm: &'a P,
    pub offsets: &'a P,
    pub tile_start: &'a P,
}

fn grouping_ptrs<'a, P: DevicePtr<u32>>(
    gpu: &'a Gpu,
    g: &'a MoeGrouping<'a, P>,
    d: &MoeDims,
) -> Result<(u64, u64, u64, [cudarc::driver::SyncOnDrop<'a>; 3]), RuntimeError> {
    check_len("moe perm", g.perm.len(), d.tokens * d.top_k)?;
    check_len("moe offsets", g.offsets.len(), d.experts + 1)?;
    check_len("moe tile_start", g.tile_start.len(), d.experts + 1)?;
    let (a, ga) = dptr(gpu, g.perm);
    let (b, gb) = dptr(gpu, g.offsets);
    let (c, gc) = dptr(gpu, g.tile_start);
    Ok((a, b, c, [ga, gb, gc]))
}

/// Grouped gate/up: xq e4m3 [tokens, hidden] + xs f32 [tokens, hidden/128] -> inter bf16 [tokens * top_k, inter]
/// in sorted (grouped) row order.
#[allow(clippy::too_many_arguments)]
pub fn hga_moe_gate_up_grouped<P: DevicePtr<u32>>(
    gpu: &Gpu,
    xq: &impl DevicePtr<u8>,
    xs: &impl DevicePtr<f32>,
    w: &MoeExpertWeights,
    grouping: &MoeGrouping<'_, P>,
    inter: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
) -> Result<(), RuntimeError> {
    check_dims(d)?;
    check_len("moe grouped xq", xq.len(), d.tokens * d.hidden)?;
    check_len("moe grouped xs", xs.len(), d.tokens * d.hidden / FP8_GROUP)?;
    check_len("moe grouped inter", inter.len(), d.tokens * d.top_k * d.inter)?;
    if d.tokens == 0 {
        return Ok(());
    }
    let (mut p, _g) = w.params(gpu, d)?;
    let (pp, po, pt, _gg) = grouping_ptrs(gpu, grouping, d)?;
    let (pq, _a) = dptr(gpu, xq);
    let (ps, _b) = dptr(gpu, xs);
    let (ph, _c) = dptr_mut(gpu, inter);
    (p.xq, p.xs, p.perm, p.offsets, p.tile_start, p.inter) = (pq, ps, pp, po, pt, ph);
    let cfg = LaunchConfig {
        grid_dim: ((d.inter / 32) as u32, dim_u32("moe grouped tiles", grouped_tiles(d))?, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: lengths checked above; the grouping must come from `hga_moe_group` over the same ids.
    unsafe { launch(gpu, "hga_moe_gate_up_grouped", cfg, p) }
}

/// Grouped down: inter_q e4m3 [tokens * top_k, inter] + inter_s f32 [.., inter/128] (sorted rows) -> ys f32
/// [tokens * top_k, hidden] (row = token * top_k + slot, unweighted).
#[allow(clippy::too_many_arguments)]
pub fn hga_moe_down_grouped<P: DevicePtr<u32>>(
    gpu: &Gpu,
    inter_q: &impl DevicePtr<u8>,
    inter_s: &impl DevicePtr<f32>,
    w: &MoeExpertWeights,
    grouping: &MoeGrouping<'_, P>,
    ys: &mut impl DevicePtrMut<f32>,
    d: &MoeDims,
) -> Result<(), RuntimeError> {
    check_dims(d)?;
    let n = d.tokens * d.top_k;
    check_len("moe grouped inter_q", inter_q.len(), n * d.inter)?;
    check_len("moe grouped inter_s", inter_s.len(), n * d.inter / FP8_GROUP)?;
    check_len("moe grouped ys", ys.len(), n * d.hidden)?;
    if n == 0 {
        return Ok(());
    }
    let (mut p, _g) = w.params(gpu, d)?;
    let (pp, po, pt, _gg) = grouping_ptrs(gpu, grouping, d)?;
    let (pq, _a) = dptr(gpu, inter_q);
    let (ps, _b) = dptr(gpu, inter_s);
    let (py, _c) = dptr_mut(gpu, ys);
    (p.inter_q, p.inter_s, p.perm, p.offsets, p.tile_start, p.ys) = (pq, ps, pp, po, pt, py);
    let cfg = LaunchConfig {
        grid_dim: ((d.hidden / 32) as u32, dim_u32("moe grouped tiles", grouped_tiles(d))?, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: lengths checked above; the grouping must come from `hga_moe_group` over the same ids.
    unsafe { launch(gpu, "hga_moe_down_grouped", cfg, p) }
}

/// Combine: out bf16 [tokens, hidden] = sum over slots in order of weights[t, s] * ys[t * top_k + s].
pub fn hga_moe_combine(
    gpu: &Gpu,
    ys: &impl DevicePtr<f32>,
    weights: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
) -> Result<(), RuntimeError> {
    check_dims(d)?;
    check_len("moe combine ys", ys.len(), d.tokens * d.top_k * d.hidden)?;
    check_len("moe combine weights", weights.len(), d.tokens * d.top_k)?;
    check_len("moe combine out", out.len(), d.tokens * d.hidden)?;
    if d.tokens == 0 {
        return Ok(());
    }
    let (py, _a) = dptr(gpu, ys);
    let (pw, _b) = dptr(gpu, weights);
    let (po, _c) = dptr_mut(gpu, out);
    let p = MoeExpertParams {
        ys: py,
        weights: pw,
        out: po,
        tokens: d.tokens as u32,
        hidden: d.hidden as u32,
        inter_dim: d.inter as u32,
        experts: d.experts as u32,
        top_k: d.top_k as u32,
        ..bytemuck::Zeroable::zeroed()
    };
    let blocks = dim_u32("moe combine blocks", (d.tokens * d.hidden).div_ceil(256))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_moe_combine", cfg, p) }
}

/// Scratch of the composed paths, sized for up to `max_tokens` tokens of `d`'s shape.
pub struct MoeWorkspace {
    pub max_tokens: usize,
    pub logits: DeviceBuf<f32>,
    pub counter: DeviceBuf<u32>,
    pub ids: DeviceBuf<u32>,
    pub weights: DeviceBuf<f32>,
    pub counts: DeviceBuf<u32>,
    pub offsets: DeviceBuf<u32>,
    pub tile_start: DeviceBuf<u32>,
    pub perm: DeviceBuf<u32>,
    pub xq: DeviceBuf<u8>,
    pub xs: DeviceBuf<f32>,
    pub inter: DeviceBuf<bf16>,
    pub inter_q: DeviceBuf<u8>,
    pub inter_s: DeviceBuf<f32>,
    /// f32 [max_tokens * top_k, hidden]: only allocated when `grouped`
    pub ys: DeviceBuf<f32>,
}

impl MoeWorkspace {
    /// Allocates (booked as [`MOE_WORKSPACE`]) for `max_tokens` tokens (`d.tokens` is ignored); `grouped` adds
    /// the prefill path's buffers.
    pub fn new(gpu: &Gpu, d: &MoeDims, max_tokens: usize, grouped: bool) -> Result<Self, RuntimeError> {
        let l = MOE_WORKSPACE;
        let (t, k, h, i, e) = (max_tokens.max(1), d.top_k, d.hidden, d.inter, d.experts);
        let g = |n: usize| if grouped { n } else { 1 };
        Ok(MoeWorkspace {
            max_tokens,
            logits: gpu.alloc_zeros(l, t * e)?,
            counter: gpu.alloc_zeros(l, t.div_ceil(MOE_ROUTER_TILE))?,
            ids: gpu.alloc_zeros(l, t * k)?,
            weights: gpu.alloc_zeros(l, t * k)?,
            counts: gpu.alloc_zeros(l, e)?,
            offsets: gpu.alloc_zeros(l, e + 1)?,
            tile_start: gpu.alloc_zeros(l, e + 1)?,
            perm: gpu.alloc_zeros(l, t * k)?,
            xq: gpu.alloc_zeros(l, g(t * h))?,
            xs: gpu.alloc_zeros(l, g(t * h / FP8_GROUP))?,
            inter: gpu.alloc_zeros(l, t * k * i)?,
            inter_q: gpu.alloc_zeros(l, g(t * k * i))?,
            inter_s: gpu.alloc_zeros(l, g(t * k * i / FP8_GROUP))?,
            ys: gpu.alloc_zeros(l, g(t * k * h))?,
        })
    }

    /// Checks that a call of shape `d` fits this workspace.
    pub fn fits(&self, d: &MoeDims) -> Result<(), RuntimeError> {
        if d.tokens > self.max_tokens {
            return Err(shape_err(format!("moe workspace holds {} tokens, {} asked", self.max_tokens, d.tokens)));
        }
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
/// The decode path: router (one expert per block for few tokens with `Auto`) + gate/up decode + down decode
/// (gate/up also prefetches the chosen experts' down weights into L2). x bf16 [tokens, hidden], router_w bf16
/// [experts, hidden] -> out bf16 [tokens, hidden]; ids/weights stay in `ws`.
pub fn moe_decode(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    router_w: &impl DevicePtr<bf16>,
    w: &MoeExpertWeights,
    ws: &mut MoeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
    form: RouterForm,
) -> Result<(), RuntimeError> {
    ws.fits(d)?;
    decode_layer(gpu, x, router_w, w, ws, out, d, form, None)
}

/// The MoE block of a decode step together with the norm in front of it: `io` holds the attention block's output
/// on entry and the MoE output on return; `residual_out = bf16(io + residual)`, `xn = RMSNorm(residual_out) *
/// norm_w` (the post-attention norm, transformers' Qwen3RMSNorm), then [`moe_decode`] of `xn`. For one token with
/// hidden <= 2048 (and 16-byte aligned buffers) the norm runs inside the router (`hga_moe_router_rows` with `norm_w`): one launch
/// fewer, the same numbers bit for bit as `hga_rmsnorm` + [`moe_decode`], which is what runs otherwise. Returns
/// whether the norm was fused.
#[allow(clippy::too_many_arguments)]
pub fn moe_decode_residual(
    gpu: &Gpu,
    io: &mut (impl DevicePtrMut<bf16> + DevicePtr<bf16>),
    residual: &impl DevicePtr<bf16>,
    residual_out: &mut impl DevicePtrMut<bf16>,
    norm_w: &impl DevicePtr<bf16>,
    eps: f32,
    xn: &mut (impl DevicePtrMut<bf16> + DevicePtr<bf16>),
    router_w: &impl DevicePtr<bf16>,
    w: &MoeExpertWeights,
    ws: &mut MoeWorkspace,
    d: &MoeDims,
) -> Result<bool, RuntimeError> {
    let (t, h) = (d.tokens, d.hidden);
    let n = t * h;
    check_len("moe residual", residual.len(), n)?;
    check_len("moe residual_out", residual_out.len(), n)?;
    check_len("moe norm weight", norm_w.len(), h)?;
    check_len("moe xn", xn.len(), n)?;
    check_len("moe io", io.len(), n)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(shape_err(format!("moe norm: eps must be finite and >= 0, got {eps}")));
    }
    let fused = {
        let (pi, _a) = dptr_mut(gpu, io);
        let (pr, _b) = dptr(gpu, residual);
        let (pro, _c) = dptr_mut(gpu, residual_out);
        let (pn, _d) = dptr(gpu, norm_w);
        let (px, _e) = dptr_mut(gpu, xn);
        let aligned = [pi, pr, pro, pn, px].iter().all(|p| p % 16 == 0);
        let fusable = t == 1 && h <= MOE_ROUTER_ROWS_NORM_MAX_HIDDEN && h % 8 == 0 && aligned;
        fusable.then_some(RouterNorm { weight: pn, input: pi, res_in: pr, res_out: pro, eps })
    };
    let Some(norm) = fused else {
        hga_rmsnorm(gpu, io, Some((residual, residual_out)), norm_w, xn, t, h, eps)?;
        moe_decode(gpu, xn, router_w, w, ws, io, d, RouterForm::Auto)?;
        return Ok(false);
    };
    ws.fits(d)?;
    decode_layer(gpu, xn, router_w, w, ws, io, d, RouterForm::Rows, Some(norm))?;
    Ok(true)
}

/// The decode layer in three launches, into `ws` and `out`: the router (with the fused norm when
/// `norm` is set: then block 0 writes `x` before the expert kernels read it), gate/up, down.
#[allow(clippy::too_many_arguments)]
fn decode_layer(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    router_w: &impl DevicePtr<bf16>,
    w: &MoeExpertWeights,
    ws: &mut MoeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
    form: RouterForm,
    norm: Option<RouterNorm>,
) -> Result<(), RuntimeError> {
    let (t, k) = (d.tokens, d.top_k);
    router_launch(
        gpu,
        x,
        router_w,
        &mut ws.logits.slice_mut(0..t * d.experts),
        &mut ws.counter.slice_mut(0..t.div_ceil(MOE_ROUTER_TILE)),
        &mut ws.ids.slice_mut(0..t * k),
        &mut ws.weights.slice_mut(0..t * k),
        d,
        form,
        norm,
    )?;
    hga_moe_gate_up_decode(gpu, x, w, &ws.ids.slice(0..t * k), &mut ws.inter.slice_mut(0..t * k * d.inter), d)?;
    hga_moe_down_decode(
        gpu,
        &ws.inter.slice(0..t * k * d.inter),
        w,
        &ws.ids.slice(0..t * k),
        &ws.weights.slice(0..t * k),
        out,
        d,
    )
}

#[allow(clippy::too_many_arguments)]
/// The grouped (prefill) path: router, grouping, x quantization, grouped gate/up, intermediate quantization,
/// grouped down, combine.
pub fn moe_grouped(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    router_w: &impl DevicePtr<bf16>,
    w: &MoeExpertWeights,
    ws: &mut MoeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    d: &MoeDims,
    form: RouterForm,
) -> Result<(), RuntimeError> {
    ws.fits(d)?;
    if ws.ys.len() < d.tokens * d.top_k * d.hidden {
        return Err(shape_err("moe workspace was not allocated for the grouped path".into()));
    }
    let (t, k, h, i, e) = (d.tokens, d.top_k, d.hidden, d.inter, d.experts);
    let n = t * k;
    hga_moe_router(
        gpu,
        x,
        router_w,
        &mut ws.logits.slice_mut(0..t * e),
        &mut ws.counter.slice_mut(0..t.div_ceil(MOE_ROUTER_TILE)),
        &mut ws.ids.slice_mut(0..n),
        &mut ws.weights.slice_mut(0..n),
        d,
        form,
    )?;
    hga_moe_group(
        gpu,
        &ws.ids.slice(0..n),
        &mut ws.counts,
        &mut ws.offsets,
        &mut ws.tile_start,
        &mut ws.perm.slice_mut(0..n),
        t,
        e,
        k,
    )?;
    super::hga_fp8_quant(gpu, x, &mut ws.xq.slice_mut(0..t * h), &mut ws.xs.slice_mut(0..t * h / FP8_GROUP), t, h)?;
    let perm = ws.perm.slice(0..n);
    let offsets = ws.offsets.slice(0..e + 1);
    let tile_start = ws.tile_start.slice(0..e + 1);
    let grouping = MoeGrouping { perm: &perm, offsets: &offsets, tile_start: &tile_start };
    hga_moe_gate_up_grouped(
        gpu,
        &ws.xq.slice(0..t * h),
        &ws.xs.slice(0..t * h / FP8_GROUP),
        w,
        &grouping,
        &mut ws.inter.slice_mut(0..n * i),
        d,
    )?;
    super::hga_fp8_quant(
        gpu,
        &ws.inter.slice(0..n * i),
        &mut ws.inter_q.slice_mut(0..n * i),
        &mut ws.inter_s.slice_mut(0..n * i / FP8_GROUP),
        n,
        i,
    )?;
    hga_moe_down_grouped(
        gpu,
        &ws.inter_q.slice(0..n * i),
        &ws.inter_s.slice(0..n * i / FP8_GROUP),
        w,
        &grouping,
        &mut ws.ys.slice_mut(0..n * h),
        d,
    )?;
    hga_moe_combine(gpu, &ws.ys.slice(0..n * h), &ws.weights.slice(0..n), out, d)
}
