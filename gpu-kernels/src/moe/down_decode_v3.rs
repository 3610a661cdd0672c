//! `hga_moe_down_decode_v3`: the few-token (decode) down products and the routing-weighted sum over slots,
//! `out[token, n] = bf16(sum over slots s and k blocks of weights[token, s] * down_e(q(inter[token * top_k +
//! s]))_n)` in a fixed order. The one decode down kernel (the `_v3` name is that of the measured history,
//! docs/perf-moe.md, where the earlier 8-row form measured 0.31x copy bandwidth).
//!
//! Design:
//! - 16 output rows per block: one 128-value quantization of the token's intermediate (~80 warp-instructions:
//!   load, 5-step max, 4 IEEE divisions per lane, + 8 `shfl` for the fragment) feeds one `mma` A tile of 16 rows
//!   (2 KB of weights), and every B column is the same activation (no column selects), as in gate/up.
//! - The activation loads (L2) and the id / routing-weight loads go out first (they do not depend on anything),
//!   then the id-dependent weight loads, then the quantization, so the quantization overlaps the weight stream
//!   whatever the return order.
//! - In the decode layer the weights are already on their way to L2: [`super::gate_up_decode_v3`] prefetches each
//!   chosen expert's down rows (`prefetch.global.L2`) as soon as it knows the expert id, so this kernel streams
//!   mostly from L2.
//!
//! Grid: (hidden / 16, tokens); block = 512 threads (16 warps, `MOE_DOWN_DECODE_V3_WARPS`). Block (bx, token) owns
//! the 16 output rows n0 = 16 bx .. +16 and all of the token's work units u = (slot, k block) = (u / kbs, u % kbs),
//! kbs = inter / 128 (each unit: 16 down rows x 128 bytes = 2 KB). A unit is one `mma.sync m16n8k32 e4m3` tile
//! pair: A rows g / g + 8 = down rows n0 + g / n0 + g + 8 (k-permuted 16-byte fragments, module docs), B = the
//! unit's quantized activation in every column; lane (g, t = 0) gets row g in c[0] and row g + 8 in c[2]. Warp w
//! takes units w, w + 16, ... in rounds of U = 3 (12 weight loads of 16 B per lane, 192 B; 6 KB per warp).
//!
//! Fixed order, no atomics: each lane adds its units in increasing u, then the 16 warps' sums are added in warp
//! order in shared memory. Shared memory: 16 warps x 16 rows f32 = 1 KB.
//!
//! Analysis at the Qwen3-30B-A3B shape (H 2048, I 768, top-8), T = 1, 132 SMs:
//! - Bytes 12.6 MB; 128 blocks of 96 KB (one per SM; 4 SMs idle), 48 units = 3 per warp = one round: every block
//!   requests its whole 96 KB up front (12.6 MB GPU-wide in flight, Little's law needs ~4-6 MB).
//! - Registers: 512 threads per block need <= 128 per thread (ptxas 13.0: 121 / 118 / 120 on sm_89 / 90 / 120;
//!   a launch with more fails, scripts/ptxas-report shows it). Loads past the last unit repeat the last unit
//!   (clamped index) instead of being branched around: with a branch, LLVM merged each loaded value with its
//!   placeholder right after the load, which waits for it before the weight loads go out.
//! - Instructions per warp: 12 LDG.128 + 3 LDG.64 + 9 scalar loads, 3 quantizations (~240), 3 x 8 SHFL, 12 `mma`
//!   (~170 on sm_90), ~20 scaling: ~480 per 6 KB; ~7.7 K per SM, ~1 us of issue per SM, overlapping the stream.
//!
//! Assumes hidden % 128 == 0, inter % 128 == 0, ids < experts (launcher checks the shapes).
use super::{ld_group_warp, ld_nc_b32, unroll};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_DOWN_DECODE_V3_ROWS, MOE_DOWN_DECODE_V3_WARPS};

pub(crate) const WARPS: usize = MOE_DOWN_DECODE_V3_WARPS;
const ROWS: usize = MOE_DOWN_DECODE_V3_ROWS;
/// Units per warp per round (loads issued together); the `unroll!` lists below name 0..U.
pub(crate) const U: usize = 3;

/// Steps 1-3 of a round of warp-unit `u0`: lane (g, t)'s weight loads of the round's units (unit u: k block
/// `kb[u]` of expert `e[u]`, routing weight `rw[u]`; `wd` = rows n0 + g of expert 0 at this lane's 16 bytes, `sd0`
/// the down scales), then the activation values `$xv` (an expression evaluated after the weight loads; the kernel
/// passes values loaded before them), their quantization, and the products of the units below `units`, added to
/// rows g / g + 8 in `tg` / `tg8`. A macro, not a function: as a function the same code changed LLVM's output for this kernel
/// (118 -> 120 registers on sm_90).
macro_rules! down_round {
    ($wd:ident, $sd0:ident, $e:ident, $kb:ident, $rw:ident, ($h:ident, $inter:ident, $n0:ident, $hblk:ident, $kbs:ident),
     ($u0:ident, $units:ident, $t:ident), $xv:expr, $tg:ident, $tg8:ident) => {{
        // 1. The weight stream of the round (after the ids): [rows g lo, rows g hi, rows g+8 lo, rows g+8 hi].
        let mut a = [[[0u32; 4]; 4]; $crate::moe::down_decode_v3::U];
        let mut f = [0f32; $crate::moe::down_decode_v3::U];
        $crate::moe::unroll!(u in [0, 1, 2] {
            let w = $wd.add($e[u] as usize * $h * $inter + $kb[u] * 128);
            let w8 = w.add(8 * $inter);
            a[u][0] = $crate::moe::ld_stream_v4(w);
            a[u][1] = $crate::moe::ld_stream_v4(w.add(64));
            a[u][2] = $crate::moe::ld_stream_v4(w8);
            a[u][3] = $crate::moe::ld_stream_v4(w8.add(64));
            let si = ($e[u] as usize * $hblk + $n0 / 128) * $kbs + $kb[u];
            f[u] = f32::from_bits($crate::moe::ld_nc_b32($sd0.add(si))) * $rw[u];
        });
        let xv: [[u32; 2]; $crate::moe::down_decode_v3::U] = $xv;
        // 2. Quantize the activations while the weights are on their way; f becomes the unit's whole factor.
        let mut q = [0u32; $crate::moe::down_decode_v3::U];
        $crate::moe::unroll!(u in [0, 1, 2] {
            if $u0 + $crate::moe::down_decode_v3::WARPS * u < $units {
                let (qq, xs) = $crate::moe::quant_group_vals(xv[u]);
                q[u] = qq;
                f[u] *= xs;
            }
        });
        // 3. Products: A rows g / g + 8 = output rows n0 + g / n0 + g + 8; every B column = the activation.
        $crate::moe::unroll!(u in [0, 1, 2] {
            if $u0 + $crate::moe::down_decode_v3::WARPS * u < $units {
                let b = $crate::moe::group_frag(q[u], $t);
                let c = $crate::moe::mma_e4m3_chunk(a[u][0], a[u][2], b.0, [0.0; 4]);
                let c = $crate::moe::mma_e4m3_chunk(a[u][1], a[u][3], b.1, c);
                $tg += c[0] * f[u];
                $tg8 += c[2] * f[u];
            }
        });
    }};
}

/// The (slot, k block) of unit u0 + 16 u of a round (past the last unit: the last unit, see the module docs).
#[inline(always)]
pub(crate) fn round_unit(u0: usize, u: usize, units: usize, kbs: usize) -> (usize, usize) {
    let unit = (u0 + WARPS * u).min(units - 1);
    (unit / kbs, unit % kbs)
}

/// The end of a block: (virtual) warp `vw`'s row sums `tg` / `tg8` into `sm` (`[16 warps][16 rows]` f32 of shared
/// memory); after a block barrier, [`sum_rows`] adds them in warp order.
///
/// # Safety
/// `sm` is shared memory, `vw` < 16.
#[inline(always)]
pub(crate) unsafe fn store_rows(sm: *mut f32, vw: usize, tg: f32, tg8: f32) {
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, lane % 4);
    if t == 0 {
        *sm.add(vw * ROWS + g) = tg;
        *sm.add(vw * ROWS + g + 8) = tg8;
    }
}

/// The fixed-order sum of [`store_rows`]' values after the block barrier: thread `tid` < 16 writes row `tid` as
/// bf16 to `out` (the block's 16 rows).
///
/// # Safety
/// As [`store_rows`]; `out` writable for 16 bf16.
#[inline(always)]
pub(crate) unsafe fn sum_rows(sm: *const f32, tid: usize, out: *mut u16) {
    if tid < ROWS {
        let mut acc = 0f32;
        for w in 0..WARPS {
            acc += *sm.add(w * ROWS + tid);
        }
        *out.add(tid) = f32_to_bf16(acc);
    }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_down_decode_v3(p: MoeExpertParams) {
    entry_prologue();
    let (h, inter, k) = (p.hidden as usize, p.inter_dim as usize, p.top_k as usize);
    let token = block_y() as usize;
    let n0 = block_x() as usize * ROWS;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, lane % 4);
    let kbs = inter / 128;
    let hblk = h / 128;
    let units = k * kbs;
    let ids = (p.ids as *const u32).add(token * k);
    let rws = (p.weights as *const u32).add(token * k);
    let act = (p.inter as *const u16).add(token * k * inter);
    // Rows g and g + 8 of the block at this lane's 16 bytes of a k block's first 64-byte chunk, from an expert base.
    let wd = (p.w_down as *const u8).add((n0 + g) * inter + 16 * t as usize);
    let sd0 = p.s_down as *const u32;
    let (mut tg, mut tg8) = (0f32, 0f32);
    let mut u0 = warp;
    while u0 < units {
        // 0. Nothing here waits on anything: the round's activation loads (L2), ids and routing weights. Past the
        // last unit the loads repeat the last unit (no branch around a load, so no value is merged with a
        // placeholder before it arrives; the products skip those units).
        let mut sl = [0usize; U];
        let mut kb = [0usize; U];
        let mut e = [0u32; U];
        let mut rw = [0f32; U];
        let mut xv = [[0u32; 2]; U];
        unroll!(u in [0, 1, 2] {
            (sl[u], kb[u]) = round_unit(u0, u, units, kbs);
            xv[u] = ld_group_warp(act.add(sl[u] * inter + kb[u] * 128), lane);
            e[u] = ld_nc_b32(ids.add(sl[u]));
            rw[u] = f32::from_bits(ld_nc_b32(rws.add(sl[u])));
        });
        // 1. The weight stream of the round (after the ids), 2. quantization, 3. products.
        down_round!(wd, sd0, e, kb, rw, (h, inter, n0, hblk, kbs), (u0, units, t), xv, tg, tg8);
        u0 += WARPS * U;
    }
    let sm = dyn_smem_ptr::<f32>(); // [WARPS][ROWS]
    store_rows(sm, warp, tg, tg8);
    sync_threads();
    sum_rows(sm, tid, (p.out as *mut u16).add(token * h + n0));
}
