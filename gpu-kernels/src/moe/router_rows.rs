//! `hga_moe_router_rows`: the router for few tokens (decode), one expert row per block. Same outputs as
//! [`super::router::hga_moe_router`] (logits in f32 from bf16 products, f32 softmax, top-k with ties to the lower
//! expert index, renormalisation), with the weight stream spread over `experts` blocks (the batch form runs one
//! block per 32 tokens, so one block for a decode step).
//!
//! Why one expert per block: a split-K form with one `mma` n-tile of 8 experts per block ran 16 blocks at Qwen3 (128
//! experts) and measured 6.9 us for 0.5 MB at T = 1 (H200, graph replay; docs/perf-moe.md), i.e. latency, not
//! bandwidth. Here block (e, tile) computes expert e's logit for the (up to 16) tokens of the tile on CUDA cores:
//! warp w, lane L takes the 8-element chunks c = 32 w + L, + 256, ... of hidden (one 16-byte load of the weight
//! row per chunk; at hidden 2048 exactly one per lane, the block's 4 KB in one round trip), multiplies by the
//! token's 8 bf16 (16-byte loads, L1/L2) with f32 FMA (bf16 x bf16 products are exact in f32), then a warp sum per
//! token and the 8 warps' sums in warp order in shared memory (deterministic). Two experts with identical rows get
//! bit-identical logits (same code, same order), which the exact-tie rule of the checks needs.
//!
//! Then every thread fences (`fence.acq_rel.gpu`), thread 0 bumps `counter[tile]`; the block that arrives last (of
//! the `experts` blocks of its token tile) reads the tile's logits back through L2 (`ld.global.cg`), does the
//! softmax and top-k (warp w: tokens w, w + 8) and resets the counter to 0 for the next launch. The top-k reads
//! only finished logits, so the result does not depend on which block came last.
//!
//! Programmatic dependent launch: before the entry prologue's wait, each block asks L2 for its 4 KB weight row
//! (`prefetch_l2_early`; router weights are never written by a kernel), so the row's DRAM latency overlaps the
//! previous kernel; the activations are read after the wait.
//!
//! Fused RMSNorm (`norm_w != 0`, one token, decode): the post-attention norm with its residual add runs inside the
//! router instead of as its own `hga_rmsnorm` launch before it: every block recomputes the 2048-element norm from
//! the sublayer output and the residual (8 KB from L2, loaded together with its weight row), block 0 writes the
//! residual and the normalized row for the expert kernels. Bit-identical to `hga_rmsnorm` + this kernel.
//!
//! Grid: (experts, ceil(tokens / 16)); block = 256 threads (`MOE_ROUTER_ROWS_WARPS` = 8 warps). Shared memory:
//! 32 f32 (block sum) + 8 warps x 16 tokens f32 + 1 word (644 bytes). Cost at T = 16: 16 x 16-byte x loads and 128 FMA per lane per
//! chunk, fine up to the 64 tokens the launcher sends here (`Auto`); more tokens use the batch form.
//! Assumes hidden % 128 == 0, experts <= 256, top_k <= experts; `counter` zero before the first launch.
use super::{last_block_arrives, ld_cg_f32, warp_topk_softmax};
use crate::arch::*;
use crate::params::{MoeRouterParams, MOE_ROUTER_ROWS_WARPS};

pub(crate) const WARPS: usize = MOE_ROUTER_ROWS_WARPS;

/// sum over 8 bf16 pairs of w * x (f32 FMA, in element order).
#[inline(always)]
pub(crate) fn dot8(w: [u32; 4], x: [u32; 4], mut acc: f32) -> f32 {
    for j in 0..4 {
        let (w0, w1) = bf16x2_to_f32(w[j]);
        let (x0, x1) = bf16x2_to_f32(x[j]);
        acc = fma_f32(w0, x0, acc);
        acc = fma_f32(w1, x1, acc);
    }
    acc
}

#[inline(always)]
fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    unsafe {
        core::arch::asm!("fma.rn.f32 {0}, {1}, {2}, {3};", out(reg32) r, in(reg32) a, in(reg32) b, in(reg32) c,
            options(pure, nomem, nostack));
    }
    r
}

/// The logits of expert row `$wrow` for the `$ntile` (<= 16) tokens of the tile at `$x` (bf16 rows of `$h`),
/// computed by the whole block of `MOE_ROUTER_ROWS_WARPS` warps as the module docs say; thread `$tid` < `$ntile`
/// binds token `$tid`'s logit to `$s` and evaluates `$store`. `$part` is `[WARPS][16]` f32 of shared memory; every
/// thread runs it (one block barrier inside). A macro, not a function: as a function the same code changed LLVM's
/// output for this kernel (82 -> 104 registers on sm_90); expanded, the kernel is its original code.
macro_rules! row_logits {
    ($x:ident, $wrow:ident, $h:ident, $ntile:ident, $part:ident, ($tid:ident, $warp:ident, $lane:ident),
     $s:ident => $store:expr) => {{
        let chunks = $h / 8;
        let mut acc = [0f32; 16];
        let mut c = $tid;
        while c < chunks {
            let w = $crate::moe::ld_nc_v4($wrow.add(16 * c));
            $crate::moe::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                if i < $ntile {
                    acc[i] = $crate::moe::router_rows::dot8(w, $crate::moe::ld_nc_v4($x.add(i * 2 * $h + 16 * c)), acc[i]);
                }
            });
            c += 32 * $crate::moe::router_rows::WARPS;
        }
        $crate::moe::unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            if i < $ntile {
                let s = $crate::arch::warp_sum(acc[i]);
                if $lane == 0 {
                    *$part.add($warp * 16 + i) = s;
                }
            }
        });
        $crate::arch::sync_threads();
        if $tid < $ntile {
            let mut $s = 0f32;
            for wi in 0..$crate::moe::router_rows::WARPS {
                $s += *$part.add(wi * 16 + $tid);
            }
            $store;
        }
    }};
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_router_rows(p: MoeRouterParams) {
    let (nt, h, ne, k) = (p.tokens as usize, p.hidden as usize, p.experts as usize, p.top_k as usize);
    let ex = block_x() as usize;
    // The block's weight row (constant) towards L2 while the previous kernel (the norm) finishes.
    prefetch_l2_early((p.w as *const u16).add(ex * h) as *const u8, 2 * h, thread_x() as usize, 32 * WARPS);
    if p.norm_w != 0 && ex == 0 {
        prefetch_l2_early(p.norm_w as *const u8, 2 * h, thread_x() as usize, 32 * WARPS);
    }
    entry_prologue();
    let tile = block_y() as usize;
    let tok0 = tile * 16;
    let ntile = (nt - tok0).min(16);
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id() as usize;
    let x = (p.x as *const u16).add(tok0 * h) as *const u8;
    let wrow = (p.w as *const u16).add(ex * h) as *const u8;
    // Shared memory: 32 f32 for the fused norm's block sum, then [WARPS][16 tokens] partial logits, then a flag.
    let part = dyn_smem_ptr::<f32>().add(32);
    let flag = part.add(WARPS * 16) as *mut u32;

    if p.norm_w != 0 {
        norm_then_logit(&p, wrow, part, (tid, warp, lane));
    } else {
        row_logits!(x, wrow, h, ntile, part, (tid, warp, lane), s => *(p.logits as *mut f32).add((tok0 + tid) * ne + ex) = s);
    }
    if !last_block_arrives((p.counter as *mut u32).add(tile), grid_dim_x(), flag) {
        return;
    }
    let mut i = warp;
    while i < ntile {
        let tok = tok0 + i;
        let row = (p.logits as *const f32).add(tok * ne);
        warp_topk_softmax(
            |e| ld_cg_f32(row.add(e)),
            ne,
            k,
            p.norm_topk != 0,
            (p.ids as *mut u32).add(tok * k),
            (p.weights as *mut f32).add(tok * k),
        );
        i += WARPS;
    }
}

/// The fused RMSNorm of one token, then this block's logit (see `MoeRouterParams::norm_w`). Thread `tid` owns the
/// 16-byte vector `tid` of the row (hidden <= 8 x 256), as `hga_rmsnorm`'s vector path at 256 threads does, so
/// the block sum and every normalized element are that kernel's bit for bit; the logit is `row_logits!` for one
/// token with the activation taken from registers instead of memory (same products, same order).
#[inline(always)]
unsafe fn norm_then_logit(
    p: &MoeRouterParams,
    wrow: *const u8,
    part: *mut f32,
    (tid, warp, lane): (usize, usize, usize),
) {
    use crate::norm::rmsnorm::{add_bf16x8, norm_bf16x8, sum_sq_bf16x8};
    let nv = p.hidden as usize / 8;
    let live = tid < nv;
    let writer = block_x() == 0;
    let off = 16 * if live { tid } else { 0 };
    // All loads of the block at once: the two addends, the norm weight, the router row (asked of L2 before the wait).
    let a = ld_global_v4((p.norm_in as *const u8).add(off));
    let r = ld_global_v4((p.res_in as *const u8).add(off));
    let nw = ld_global_v4((p.norm_w as *const u8).add(off));
    let w = super::ld_nc_v4(wrow.add(off));
    let xr = add_bf16x8(a, r);
    if writer && live {
        st_global_v4((p.res_out as *mut u8).add(off), xr);
    }
    // hga_rmsnorm sums (s0 + s1) + (s2 + s3) with s1 = s2 = s3 = +0 here: exactly s0 (a sum of squares, never -0).
    let total = block_sum(if live { sum_sq_bf16x8(xr) } else { 0.0 });
    let inv = 1.0 / sqrt_rn(total / p.hidden as f32 + p.eps);
    let xn = norm_bf16x8(xr, nw, inv);
    if writer && live {
        st_global_v4((p.x as *mut u8).add(off), xn);
    }
    let s = warp_sum(if live { dot8(w, xn, 0.0) } else { 0.0 });
    if lane == 0 {
        *part.add(warp * 16) = s;
    }
    sync_threads();
    if tid == 0 {
        let mut s = 0f32;
        for wi in 0..WARPS {
            s += *part.add(wi * 16);
        }
        *(p.logits as *mut f32).add(block_x() as usize) = s;
    }
}
