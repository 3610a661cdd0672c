//! `hga_moe_gate_up_decode_v3`: the few-token (decode) gate/up products of every (token, slot), with the SiLU*up
//! epilogue: `inter[token * top_k + slot, i] = bf16(silu(gate_e(x)_i) * up_e(x)_i)`, e = ids[token, slot]. The one
//! decode gate/up kernel (the `_v3` name is that of the measured history, docs/perf-moe.md).
//!
//! Grid: (inter / 8, tokens * top_k); block = 128 threads (4 warps, `MOE_GATE_UP_DECODE_WARPS`). Block (bx, pair)
//! owns the 8 intermediate columns i0 = 8 bx .. +8 of one (token, slot): the 16 rows of the `mma.sync m16n8k32
//! e4m3` A operand are gate rows i0 + g (A rows g) and up rows i0 + g (A rows g + 8), so one product does both and
//! lane (g, t = 0) ends with gate in c[0] and up in c[2]. The activation is B (every column the same, see
//! [`super::group_frag`]); k-permuted 16-byte fragments as in the module docs; weights read with
//! `ld.global.nc.L1::no_allocate.v4`. Warp w takes the 128-wide k blocks w, w + 4, ... in rounds of U = 4 k blocks.
//! Each round, in this order:
//! 1. **Activation loads first.** The round's activation loads (the token's bf16 row, L2; one 8-byte load per
//!    lane per group, [`super::ld_group_warp`]) are issued before the id-dependent weight loads (the first
//!    round's even before the id load, so no instruction that waits on the id precedes them), so they are not
//!    queued behind the round's 8 KB of weights. Loads past the last k block repeat the last one instead of being
//!    branched around (a branch made LLVM merge a loaded value with its placeholder right after the load, i.e.
//!    wait for it).
//! 2. all of its weight loads (4 k blocks x gate/up x 2 x 16 B = 16 loads, 256 B per lane, 8 KB per warp) and the
//!    8 weight-scale loads;
//! 3. the quantization of those activations with the whole warp ([`super::quant_group_vals`]: 5-shuffle max, 4
//!    IEEE divisions per lane, the `hga_fp8_quant` rule), which overlaps the weight stream whatever the return
//!    order;
//! 4. the B fragments (8 `shfl.idx` per group) and 4 `mma` per k block, each k block's raw product scaled by
//!    weight_scale_inv * activation scale.
//!
//! The 4 warps' sums meet in shared memory and are added in warp order (deterministic, no atomics).
//! Shared memory: 4 warps x 8 columns x (gate, up) f32 = 256 bytes.
//!
//! **Down weights into L2.** As soon as the block knows its expert e, it asks L2 for its share of e's down weights
//! (`prefetch.global.L2`, fire-and-forget: no registers, nothing waits): the hidden x inter bytes of `w_down[e]`
//! are split over the inter / 8 blocks of the (token, slot), H / 16 lines of 128 B per block (one per thread at
//! Qwen3), and block 0 also fetches e's down scales. The down kernel that follows ([`super::down_decode_v3`]) then
//! reads mostly from L2, and the layer's DRAM stream (25.2 + 12.6 MB at Qwen3) runs under one kernel instead of
//! two latency-bound ones. Tokens that share an expert prefetch the same lines again (L2 hits). 37.75 MB fits the
//! 50 MB L2 of an H100 / H200; on a smaller L2 (sm_89, sm_120) the prefetched lines may be evicted before use
//! (correct either way, only slower).
//!
//! Analysis at the Qwen3-30B-A3B shape (H 2048, I 768, top-8), T = 1, 132 SMs (H100 / H200):
//! - Bytes: 8 x 2 x 768 x 2048 = 25.2 MB; a block streams 16 rows x 2048 = 32 KB, 768 blocks (5.8 per SM; the
//!   per-SM imbalance is at most one 32 KB block). Each warp has exactly one round (H / 128 = 16 k blocks = 4 warps
//!   x U): the block's whole 32 KB is requested before any activation is quantized.
//! - Instructions per 8 KB warp round: 16 LDG.128, ~4 x 45 for the quantizations, 32 SHFL.IDX, 16 `mma` (on sm_90
//!   each is 2 HMMA + ~12 conversions, TOOLCHAIN.md: ~220), ~30 scaling/epilogue: ~480 warp-instructions, ~17 B
//!   each, overlapped with the memory time.
//! - The activation quantization is repeated by every block of a (token, slot) (96 blocks read the same 4 KB row
//!   from L2): 2048 divisions per block of 32 KB, the cost counted above.
//!
//! Assumes hidden % 128 == 0, inter % 128 == 0, ids < experts (launcher checks the shapes).
use super::{group_frag, ld_group_warp, ld_nc_b32, ld_stream_v4, mma_e4m3_chunk, quant_group_vals, silu, unroll};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_GATE_UP_DECODE_WARPS};

const WARPS: usize = MOE_GATE_UP_DECODE_WARPS;
/// k blocks per warp per round (loads issued together); the `unroll!` lists below name 0..U.
const U: usize = 4;

/// Per-block pointers of the round function (row g of gate / up at this lane's 16 bytes, the scale rows).
struct Rows {
    wg: *const u8,
    wu: *const u8,
    sg: *const u32,
    su: *const u32,
}

/// Issues `lines` `prefetch.global.L2` from `base` (128 bytes apart), `stride` threads sharing them from `tid`.
#[inline(always)]
unsafe fn prefetch_lines(base: *const u8, bytes: usize, tid: usize, stride: usize) {
    let mut l = tid;
    while l * 128 < bytes {
        super::prefetch_l2(base.add(l * 128));
        l += stride;
    }
}

/// Expert e's down weights (and, from block 0, its down scales) towards L2 for the down kernel: this block's
/// share, H / 16 lines of 128 B ((H x I / 128 lines of w_down[e]) / (I / 8 blocks)), one per thread at Qwen3.
#[inline(always)]
unsafe fn prefetch_down(p: &MoeExpertParams, e: usize, tid: usize) {
    let (h, inter) = (p.hidden as usize, p.inter_dim as usize);
    let share = h / 16 * 128;
    let base = (p.w_down as *const u8).add(e * h * inter + block_x() as usize * share);
    prefetch_lines(base, share, tid, 32 * WARPS);
    if block_x() == 0 {
        let sbytes = (h / 128) * (inter / 128) * 4;
        prefetch_lines((p.s_down as *const u8).add(e * sbytes), sbytes, tid, 32 * WARPS);
    }
}

/// One round of U k blocks (kb0 + 4 u) of one warp, given the round's activation values `xv`; adds the scaled
/// gate / up sums to `tg` / `tu`. With `FIRST`, the down-weight prefetch goes out right after the weight loads.
/// An inlined function rather than a loop body, so the first round's activations (loaded before the id) are not
/// loop-carried registers whose merge would wait for the loads before the weight stream is issued.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn round<const FIRST: bool>(
    p: &MoeExpertParams,
    r: &Rows,
    e: usize,
    kb0: usize,
    xv: [[u32; 2]; U],
    t: u32,
    tid: usize,
    acc: &mut (f32, f32),
) {
    let kbs = p.hidden as usize / 128;
    // 1. The weight stream of the round: [gate lo, gate hi, up lo, up hi] per k block, and the scales. Past the
    // last k block the loads repeat the last one (no branch around a load; the products skip those k blocks).
    let mut a = [[[0u32; 4]; 4]; U];
    let mut ws = [[0f32; 2]; U];
    unroll!(u in [0, 1, 2, 3] {
        let kb = (kb0 + WARPS * u).min(kbs - 1);
        let o = kb * 128;
        a[u][0] = ld_stream_v4(r.wg.add(o));
        a[u][1] = ld_stream_v4(r.wg.add(o + 64));
        a[u][2] = ld_stream_v4(r.wu.add(o));
        a[u][3] = ld_stream_v4(r.wu.add(o + 64));
        ws[u] = [f32::from_bits(ld_nc_b32(r.sg.add(kb))), f32::from_bits(ld_nc_b32(r.su.add(kb)))];
    });
    if FIRST {
        prefetch_down(p, e, tid);
    }
    // 2. Quantize the activations of the same k blocks while the weights are on their way.
    let mut q = [0u32; U];
    let mut xs = [0f32; U];
    unroll!(u in [0, 1, 2, 3] {
        if kb0 + WARPS * u < kbs {
            (q[u], xs[u]) = quant_group_vals(xv[u]);
        }
    });
    // 3. Products: rows g = gate, rows g + 8 = up.
    unroll!(u in [0, 1, 2, 3] {
        if kb0 + WARPS * u < kbs {
            let b = group_frag(q[u], t);
            let c = mma_e4m3_chunk(a[u][0], a[u][2], b.0, [0.0; 4]);
            let c = mma_e4m3_chunk(a[u][1], a[u][3], b.1, c);
            acc.0 += c[0] * (ws[u][0] * xs[u]);
            acc.1 += c[2] * (ws[u][1] * xs[u]);
        }
    });
}

/// The round's activation values (one 8-byte load per lane per k block; past the last k block, the last one).
#[inline(always)]
unsafe fn load_x(x: *const u16, kb0: usize, kbs: usize, lane: u32) -> [[u32; 2]; U] {
    let mut xv = [[0u32; 2]; U];
    unroll!(u in [0, 1, 2, 3] {
        xv[u] = ld_group_warp(x.add((kb0 + WARPS * u).min(kbs - 1) * 128), lane);
    });
    xv
}

/// The 8 intermediate columns i0 .. i0 + 8 of (token, slot) `pair` for expert `e`, by the 4 warps (`warp` 0..4,
/// `tid` 0..128 within them) that call it: every round, the warp sums in warp order through `sm` (`[4][8][2]` f32
/// of shared memory, `bar` the barrier of those 4 warps), silu(gate) * up rounded to bf16 into `inter` by
/// `tid` < 8. `xv0` is the first round's activations ([`load_x`] of k block `warp`), loaded by the caller before
/// the id. With `PREFETCH`, the block's share of `w_down[e]` goes to L2 (the module docs); the kernel always
/// passes true (a const parameter because the PTX of that form is the measured one: folding it in changes LLVM's
/// block layout).
///
/// # Safety
/// As the kernel (shapes, e < experts); `sm` is this group's shared memory and `bar` synchronizes exactly the 4
/// warps that call.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gate_up_unit<const PREFETCH: bool>(
    p: &MoeExpertParams,
    pair: usize,
    i0: usize,
    e: usize,
    xv0: [[u32; 2]; U],
    warp: usize,
    tid: usize,
    sm: *mut f32,
    bar: impl Fn(),
) {
    let (h, inter) = (p.hidden as usize, p.inter_dim as usize);
    let token = pair / p.top_k as usize;
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, lane % 4);
    let kbs = h / 128;
    let sblk = inter / 128;
    let x = (p.x as *const u16).add(token * h);
    let r = Rows {
        wg: (p.w_gate as *const u8).add((e * inter + i0 + g) * h + 16 * t as usize),
        wu: (p.w_up as *const u8).add((e * inter + i0 + g) * h + 16 * t as usize),
        sg: (p.s_gate as *const u32).add((e * sblk + i0 / 128) * kbs),
        su: (p.s_up as *const u32).add((e * sblk + i0 / 128) * kbs),
    };
    let mut acc = (0f32, 0f32);
    if warp < kbs {
        round::<PREFETCH>(p, &r, e, warp, xv0, t, tid, &mut acc);
    } else if PREFETCH {
        prefetch_down(p, e, tid); // a warp without k blocks (hidden < 512) still takes its share of the lines
    }
    let mut kb0 = warp + WARPS * U;
    while kb0 < kbs {
        let xv = load_x(x, kb0, kbs, lane);
        round::<false>(p, &r, e, kb0, xv, t, tid, &mut acc);
        kb0 += WARPS * U;
    }
    let (tg, tu) = acc;
    if t == 0 {
        *sm.add(warp * 16 + 2 * g) = tg;
        *sm.add(warp * 16 + 2 * g + 1) = tu;
    }
    bar();
    if tid < 8 {
        let (mut gs, mut us) = (0f32, 0f32);
        for w in 0..WARPS {
            gs += *sm.add(w * 16 + 2 * tid);
            us += *sm.add(w * 16 + 2 * tid + 1);
        }
        *(p.inter as *mut u16).add(pair * inter + i0 + tid) = f32_to_bf16(silu(gs) * us);
    }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_gate_up_decode_v3(p: MoeExpertParams) {
    entry_prologue();
    let h = p.hidden as usize;
    let pair = block_y() as usize;
    let token = pair / p.top_k as usize;
    let i0 = block_x() as usize * 8;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id();
    let kbs = h / 128;
    let x = (p.x as *const u16).add(token * h);
    // The first round's activations before the id load: nothing before them waits on the id.
    let xv0 = load_x(x, warp, kbs, lane);
    let e = ld_nc_b32((p.ids as *const u32).add(pair)) as usize;
    gate_up_unit::<true>(&p, pair, i0, e, xv0, warp, tid, dyn_smem_ptr::<f32>(), sync_threads);
}
