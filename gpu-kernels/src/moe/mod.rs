//! Mixture-of-experts kernels (Qwen3-MoE: bf16 router, block-scaled FP8 experts, SwiGLU). One kernel per job;
//! where two do the same job, the launcher (host/src/kernels/moe.rs) picks by shape:
//!
//! | job | kernel | picked when |
//! |---|---|---|
//! | router | [`router_rows`] `hga_moe_router_rows` | tokens <= 64 (`RouterForm::Auto`; the decode path) |
//! | router | [`router`] `hga_moe_router` | tokens > 64 (`RouterForm::Auto`; prefill) |
//! | decode gate/up | [`gate_up_decode_v3`] `hga_moe_gate_up_decode_v3` | `moe_decode` (every card) |
//! | decode down | [`down_decode_v3`] `hga_moe_down_decode_v3` | `moe_decode` (every card) |
//! | grouping | [`group`] `hga_moe_group` | `moe_grouped` (prefill) |
//! | grouped gate/up, down, combine | [`gate_up_grouped`], [`down_grouped`], [`combine`] | `moe_grouped` (prefill) |
//!
//! - [`router_rows`]: one expert row per block (CUDA-core dot products, `experts` blocks), the last block of a
//!   token tile does the softmax and top-k; optionally runs the post-attention RMSNorm first (one token).
//! - [`router`]: bf16 GEMM on `mma.sync m16n8k16` over 32-token tiles, logits in shared memory, f32 softmax, top-k,
//!   renormalisation.
//! - [`group`]: counts, offsets and a deterministic permutation of the (token, slot) entries by expert.
//! - [`gate_up_decode_v3`] / [`down_decode_v3`]: the few-token path; every (token, slot) streams its expert's
//!   weights once with 16-byte loads, all experts of the step in one launch each; activation loads first, the
//!   activation quantization (warp-cooperative) overlapping the weight stream; gate/up prefetches the chosen
//!   experts' down weights into L2; down owns 16 rows per block (one quantization per 2 KB of weights) and sums the
//!   slots of a token in fixed order in shared memory (no atomics). The `_v3` names are those of the measured
//!   history (docs/perf-moe.md; the earlier versions and the one-kernel layer are in git history).
//! - [`gate_up_grouped`] / [`down_grouped`] / [`combine`]: the prefill path over each expert's token group, tiled
//!   on `mma.sync m16n8k32 e4m3`, with the SiLU*up epilogue, and a fixed-order weighted sum over slots.
//!
//! Fragment trick shared by all the FP8 products here ("k-permuted fragments"): a dot product does not care about
//! the order of k, so instead of the PTX layout's 4-byte pieces each lane loads 16 contiguous bytes of its row (at
//! byte 16 t of a 64-byte chunk, t = lane % 4) for both operands, and feeds bytes 0..8 to one `m16n8k32` and bytes
//! 8..16 to the next (a[0]/a[2] of A and b[0]/b[1] of B then name the same physical k). Operands come straight from
//! global memory (L1/L2), no shared-memory staging: one 16-byte load per lane per row per 64 k.
use crate::arch::*;

pub mod combine;
pub mod down_decode_v3;
pub mod down_grouped;
pub mod gate_up_decode_v3;
pub mod gate_up_grouped;
pub mod group;
pub mod router;
pub mod router_rows;

/// `unroll!(u in [0, 1, 2] { body })`: the body once per listed literal, with `u: usize` bound to it, so arrays
/// indexed by `u` stay in registers (a `for` loop with a large body is not always unrolled by LLVM, and a
/// dynamically indexed array goes to local memory).
macro_rules! unroll {
    ($u:ident in [$($i:literal),*] $body:block) => { $( { let $u: usize = $i; $body } )* };
}
pub(crate) use unroll;

/// f32 load that bypasses L1 (`ld.global.cg`): for values other blocks of the same launch wrote.
///
/// # Safety
/// `p` is a readable, aligned global f32.
#[inline(always)]
pub(crate) unsafe fn ld_cg_f32(p: *const f32) -> f32 {
    let v: f32;
    core::arch::asm!("ld.global.cg.f32 {0}, [{1}];", out(reg32) v, in(reg64) p, options(nostack, readonly));
    v
}

/// `fence.acq_rel.gpu`: orders this thread's earlier and later memory operations at GPU scope.
#[inline(always)]
pub(crate) fn fence_gpu() {
    unsafe { core::arch::asm!("fence.acq_rel.gpu;", options(nostack)) };
}

#[inline(always)]
unsafe fn atomic_add_u32(p: *mut u32, v: u32) -> u32 {
    let r: u32;
    core::arch::asm!("atom.global.add.u32 {0}, [{1}], {2};", out(reg32) r, in(reg64) p, in(reg32) v, options(nostack));
    r
}

/// The hand-off of [`router_rows`]: every block publishes its global writes (gpu-scope fence) and counts itself
/// in `counter`; the block that completes the count of `blocks` resets it to 0 (ready for the next launch, so the
/// kernels stay graph-replayable) and returns true in all its threads, after an acquire fence, so it reads every
/// other block's writes. Every thread of the block calls it; `flag` is one word of shared memory.
///
/// # Safety
/// `counter` is a global u32 shared by exactly `blocks` blocks of this launch; `flag` points into shared memory.
#[inline(always)]
pub(crate) unsafe fn last_block_arrives(counter: *mut u32, blocks: u32, flag: *mut u32) -> bool {
    fence_gpu();
    sync_threads();
    if thread_x() == 0 {
        let last = atomic_add_u32(counter, 1) == blocks - 1;
        if last {
            *counter = 0;
        }
        *flag = last as u32;
    }
    sync_threads();
    if *flag == 0 {
        return false;
    }
    fence_gpu();
    true
}

/// 16-byte read-only global load (`ld.global.nc.v4.u32`).
///
/// # Safety
/// `p` is 16-byte aligned and readable.
#[inline(always)]
pub(crate) unsafe fn ld_nc_v4(p: *const u8) -> [u32; 4] {
    let mut r = [0u32; 4];
    core::arch::asm!("ld.global.nc.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) r[0], out(reg32) r[1], out(reg32) r[2], out(reg32) r[3], in(reg64) p, options(nostack, readonly));
    r
}

/// 16-byte streaming load of weights read once (`ld.global.nc.L1::no_allocate.v4.u32`).
///
/// # Safety
/// `p` is 16-byte aligned and readable.
#[inline(always)]
pub(crate) unsafe fn ld_stream_v4(p: *const u8) -> [u32; 4] {
    let mut r = [0u32; 4];
    core::arch::asm!("ld.global.nc.L1::no_allocate.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) r[0], out(reg32) r[1], out(reg32) r[2], out(reg32) r[3], in(reg64) p, options(nostack, readonly));
    r
}

/// 8-byte read-only global load (`ld.global.nc.v2.u32`); not `pure`, so it stays after the loads issued before it
/// in program order (the decode kernels issue their weight stream first).
///
/// # Safety
/// `p` is 8-byte aligned and readable.
#[inline(always)]
pub(crate) unsafe fn ld_nc_v2(p: *const u8) -> [u32; 2] {
    let mut r = [0u32; 2];
    core::arch::asm!("ld.global.nc.v2.u32 {{{0}, {1}}}, [{2}];",
        out(reg32) r[0], out(reg32) r[1], in(reg64) p, options(nostack, readonly));
    r
}

/// 4-byte read-only global load (`ld.global.nc.b32`) of small per-block values (ids, scales, routing weights).
///
/// # Safety
/// `p` is 4-byte aligned and readable.
#[inline(always)]
pub(crate) unsafe fn ld_nc_b32(p: *const u32) -> u32 {
    let r: u32;
    core::arch::asm!("ld.global.nc.b32 {0}, [{1}];", out(reg32) r, in(reg64) p, options(nostack, readonly));
    r
}

/// Warp-cooperative load of one 128-wide bf16 activation group (`row` points at its first element): lane L's 4
/// bf16 (elements 4L..4L+4; one 8-byte load, the warp reads the group's 256 bytes once). Lets a kernel issue its
/// activation loads before loads that wait on something else; [`quant_group_vals`] quantizes them.
///
/// # Safety
/// `row` is 8-byte aligned with 128 readable bf16; all 32 lanes call.
#[inline(always)]
pub(crate) unsafe fn ld_group_warp(row: *const u16, lane: u32) -> [u32; 2] {
    ld_nc_v2(row.add(4 * lane as usize) as *const u8)
}

/// Quantization of one activation group from [`ld_group_warp`]'s values: returns this lane's 4 e4m3 bytes in
/// element order (= bytes 4L..4L+4 of the quantized group) and the group scale (every lane). The rule is
/// `hga_fp8_quant`'s: `scale = max(absmax, 1e-10) / 448`, `q = e4m3(x / scale)` (IEEE division). All 32 lanes call.
#[inline(always)]
pub(crate) fn quant_group_vals(v: [u32; 2]) -> (u32, f32) {
    let (a, b) = bf16x2_to_f32(v[0]);
    let (c, d) = bf16x2_to_f32(v[1]);
    let amax = warp_max(fmax(fmax(fabs(a), fabs(b)), fmax(fabs(c), fabs(d))));
    let m = if amax > crate::num::FP8_ACT_EPS { amax } else { crate::num::FP8_ACT_EPS };
    let scale = m / crate::num::E4M3_MAX;
    let lo = f32x2_to_e4m3x2(a / scale, b / scale) as u32;
    let hi = f32x2_to_e4m3x2(c / scale, d / scale) as u32;
    (lo | (hi << 16), scale)
}

/// `prefetch.global.L2`: asks L2 to fetch the 128-byte line holding `p` (no register result, nothing waits).
///
/// # Safety
/// `p` points into a global allocation.
#[inline(always)]
pub(crate) unsafe fn prefetch_l2(p: *const u8) {
    core::arch::asm!("prefetch.global.L2 [{0}];", in(reg64) p, options(nostack, readonly));
}

/// The B fragment (k-permuted, as [`mma_e4m3_chunk`] takes it) of lane (g, t) from [`quant_group_vals`]'s
/// per-lane bytes `q`: bytes 16 t .. 16 t + 16 (lanes 4t .. 4t+4) and 64 + 16 t .. (lanes 16 + 4t ..) of the
/// quantized group, by 8 `shfl.idx`. Every lane gets the fragment of its t, so every column of B is the activation.
#[inline(always)]
pub(crate) fn group_frag(q: u32, t: u32) -> ([u32; 4], [u32; 4]) {
    let s = 4 * t;
    (
        [shfl_idx_u32(q, s), shfl_idx_u32(q, s + 1), shfl_idx_u32(q, s + 2), shfl_idx_u32(q, s + 3)],
        [shfl_idx_u32(q, 16 + s), shfl_idx_u32(q, 17 + s), shfl_idx_u32(q, 18 + s), shfl_idx_u32(q, 19 + s)],
    )
}

/// Two m16n8k32 e4m3 products over one 64-byte k chunk with k-permuted fragments: `ag` / `ag8` are the 16 bytes
/// of A rows g and g+8 at byte 16 t of the chunk, `b` the 16 bytes of B column g at the same bytes.
#[inline(always)]
pub(crate) fn mma_e4m3_chunk(ag: [u32; 4], ag8: [u32; 4], b: [u32; 4], c: [f32; 4]) -> [f32; 4] {
    let c = mma_e4m3_m16n8k32([ag[0], ag8[0], ag[1], ag8[1]], [b[0], b[1]], c);
    mma_e4m3_m16n8k32([ag[2], ag8[2], ag[3], ag8[3]], [b[2], b[3]], c)
}

/// Two m16n8k16 bf16 products over one 32-element k chunk with k-permuted fragments (16 bytes = 8 bf16 per lane
/// at element 8 t of the chunk).
#[inline(always)]
pub(crate) fn mma_bf16_chunk(ag: [u32; 4], ag8: [u32; 4], b: [u32; 4], c: [f32; 4]) -> [f32; 4] {
    let c = mma_bf16_m16n8k16([ag[0], ag8[0], ag[1], ag8[1]], [b[0], b[1]], c);
    mma_bf16_m16n8k16([ag[2], ag8[2], ag[3], ag8[3]], [b[2], b[3]], c)
}

/// silu(x) = x / (1 + e^-x) with `ex2.approx` and `rcp.approx` (relative error ~1e-6).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x * rcp(1.0 + ex2(-x * core::f32::consts::LOG2_E))
}

/// Warp top-k over one token's `experts` logits (`logit(e)`), then softmax in f32 over all experts and the weights
/// of the chosen ones (renormalised over them when `norm`). Ties go to the lower expert index. Lane 0 writes
/// `ids[0..k]` (best first) and `weights[0..k]`. `experts <= 256`.
///
/// # Safety
/// `ids`, `weights` writable for `k` elements; all 32 lanes call.
#[inline(always)]
pub(crate) unsafe fn warp_topk_softmax(
    logit: impl Fn(usize) -> f32,
    experts: usize,
    k: usize,
    norm: bool,
    ids: *mut u32,
    weights: *mut f32,
) {
    const J: usize = crate::params::MOE_MAX_EXPERTS / 32;
    let lane = lane_id() as usize;
    let mut v = [f32::NEG_INFINITY; J];
    for (j, vj) in v.iter_mut().enumerate() {
        let e = lane + 32 * j;
        if e < experts {
            *vj = logit(e);
        }
    }
    // Softmax denominator over all experts: max, then sum of exp.
    let mut m = f32::NEG_INFINITY;
    for vj in v {
        m = fmax(m, vj);
    }
    let m = warp_max(m);
    let mut s = 0f32;
    for vj in v {
        if vj != f32::NEG_INFINITY {
            s += exp(vj - m);
        }
    }
    let s = warp_sum(s);
    let mut chosen_sum = 0f32;
    for i in 0..k {
        // Lane-local best (ascending e, strict >: the lowest index among equals).
        let mut bv = f32::NEG_INFINITY;
        let mut bi = u32::MAX;
        for (j, vj) in v.iter().enumerate() {
            let e = (lane + 32 * j) as u32;
            if e < experts as u32 && (bi == u32::MAX || *vj > bv) {
                bv = *vj;
                bi = e;
            }
        }
        let mut mask = 16;
        while mask > 0 {
            let ov = shfl_xor_f32(bv, mask);
            let oi = shfl_xor_u32(bi, mask);
            if ov > bv || (ov == bv && oi < bi) {
                bv = ov;
                bi = oi;
            }
            mask >>= 1;
        }
        // Remove the winner (its owner lane), with a sentinel below every logit so it is never chosen again.
        for (j, vj) in v.iter_mut().enumerate() {
            if (lane + 32 * j) as u32 == bi {
                *vj = f32::NEG_INFINITY;
            }
        }
        let p = exp(bv - m) / s;
        chosen_sum += p;
        if lane == 0 {
            *ids.add(i) = bi;
            *weights.add(i) = p;
        }
    }
    if norm && lane == 0 {
        for i in 0..k {
            *weights.add(i) /= chosen_sum;
        }
    }
}

/// `shfl.sync.bfly` of a u32.
#[inline(always)]
pub(crate) fn shfl_xor_u32(v: u32, mask: u32) -> u32 {
    f32::to_bits(shfl_xor_f32(f32::from_bits(v), mask))
}

/// The router's bf16 product for one warp: 16 token rows (row g at `xa`, row g+8 at `xb`) times `NT` tiles of 8
/// expert rows (`wr[j]` = row g of tile j), over the 32-element chunks `first + stride * q`, `q < cnt`.
/// Loads of 4 chunks are issued before their products. Lane layout of the result as `mma` C fragments.
///
/// # Safety
/// Every row pointer is 16-byte aligned and readable over all chunks named.
#[inline(always)]
pub(crate) unsafe fn router_product<const NT: usize>(
    xa: *const u8,
    xb: *const u8,
    wr: &[*const u8; NT],
    first: usize,
    stride: usize,
    cnt: usize,
    t: usize,
) -> [[f32; 4]; NT] {
    const U: usize = 4;
    let mut acc = [[0f32; 4]; NT];
    let mut q = 0;
    while q < cnt {
        let mut a = [[0u32; 4]; U];
        let mut a8 = [[0u32; 4]; U];
        let mut b = [[[0u32; 4]; NT]; U];
        for u in 0..U {
            if q + u < cnt {
                let off = (first + stride * (q + u)) * 64 + 16 * t;
                a[u] = ld_nc_v4(xa.add(off));
                a8[u] = ld_nc_v4(xb.add(off));
                for j in 0..NT {
                    b[u][j] = ld_nc_v4(wr[j].add(off));
                }
            }
        }
        for u in 0..U {
            for j in 0..NT {
                acc[j] = mma_bf16_chunk(a[u], a8[u], b[u][j], acc[j]);
            }
        }
        q += U;
    }
    acc
}

/// The grouped (prefill) FP8 product of one warp over every 128-wide k block: A = 16 activation rows (row g at
/// `ag`, row g+8 at `ag8`, e4m3, with per-k-block scales at `sag` / `sag8`), B = `NT` tiles of 8 weight rows
/// (`b[j]` = row g of tile j, scales per k block at `sb[j]`). Each k block's raw product is scaled by
/// `scale_a(row) * scale_w(tile)` and added to the result (C fragment layout).
///
/// # Safety
/// Row pointers 16-byte aligned and readable for `kbs * 128` bytes; scale pointers readable for `kbs` floats.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn grouped_product<const NT: usize>(
    ag: *const u8,
    ag8: *const u8,
    sag: *const f32,
    sag8: *const f32,
    b: &[*const u8; NT],
    sb: &[*const f32; NT],
    kbs: usize,
    t: usize,
) -> [[f32; 4]; NT] {
    let mut tot = [[0f32; 4]; NT];
    for kb in 0..kbs {
        let o0 = kb * 128 + 16 * t;
        let o1 = o0 + 64;
        let (a0, a1, c0, c1) =
            (ld_nc_v4(ag.add(o0)), ld_nc_v4(ag.add(o1)), ld_nc_v4(ag8.add(o0)), ld_nc_v4(ag8.add(o1)));
        let mut b0 = [[0u32; 4]; NT];
        let mut b1 = [[0u32; 4]; NT];
        for j in 0..NT {
            b0[j] = ld_nc_v4(b[j].add(o0));
            b1[j] = ld_nc_v4(b[j].add(o1));
        }
        let (sg, sg8) = (*sag.add(kb), *sag8.add(kb));
        for j in 0..NT {
            let acc = mma_e4m3_chunk(a0, c0, b0[j], [0.0; 4]);
            let acc = mma_e4m3_chunk(a1, c1, b1[j], acc);
            let sw = *sb[j].add(kb);
            let (f, f8) = (sg * sw, sg8 * sw);
            tot[j][0] += acc[0] * f;
            tot[j][1] += acc[1] * f;
            tot[j][2] += acc[2] * f8;
            tot[j][3] += acc[3] * f8;
        }
    }
    tot
}

/// The expert of grouped block tile `y` (tile_start is an exclusive prefix over `experts`), or None past the
/// last tile.
///
/// # Safety
/// `tile_start` readable for `experts + 1` values.
#[inline(always)]
pub(crate) unsafe fn tile_expert(tile_start: *const u32, experts: usize, y: u32) -> Option<usize> {
    if y >= *tile_start.add(experts) {
        return None;
    }
    let mut e = 0;
    while *tile_start.add(e + 1) <= y {
        e += 1;
    }
    Some(e)
}
