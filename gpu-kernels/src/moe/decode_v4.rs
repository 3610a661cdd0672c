//! `hga_moe_decode_v4` (version 4 of the decode layer): router, gate/up and down of up to
//! `MOE_DECODE_V4_MAX_TOKENS` tokens in ONE persistent launch. Same result as version 3 (router
//! [`super::router_rows`], [`super::gate_up_decode_v3`], [`super::down_decode_v3`]) bit for bit: every phase runs
//! version 3's device functions with version 3's mapping of work to (virtual) warps and its summation orders;
//! only who does a unit and when changes.
//!
//! Why: version 3 measured router 6.9 + gate/up 12.1 + down ~6.6 us at T = 1 (H200, graph replay) against a
//! 9.28 us bytes floor. The router is bound by its launch and serial tail, each kernel boundary costs ~1-2 us, and
//! the down weights cannot be requested before gate/up ends. Here the expert weight stream starts as soon as the
//! ids are known, and a down unit waits only for the intermediate rows it reads.
//!
//! Grid: one block of `MOE_DECODE_V4_WARPS` = 8 warps per co-resident slot (the launcher sizes the grid with the
//! occupancy API x SM count and launches cooperatively, so every block is resident: blocks spin on flags that other
//! blocks raise). The kernel is correct for any grid size >= 1 whose blocks are all co-resident.
//! Phases of block b of G:
//! - **0.** Gate/up group r (warps 4r .. 4r + 4) loads the activations of its first unit (they depend on nothing).
//! - **A. Router.** Block b computes the logits of experts b, b + G, ... for all tokens with
//!   [`super::router_rows::row_logits`] (the router's code: same logits bit for bit), stores them in the `logits`
//!   scratch, and publishes: every thread `fence.acq_rel.gpu`, block barrier, thread 0
//!   `red.release.gpu.add(sync[0], experts done)`. Then thread 0 spins (`ld.acquire.gpu`, `nanosleep` backoff)
//!   until sync[0] = experts, block barrier, and warp w < tokens runs [`super::warp_topk_softmax`] (the router's
//!   top-k, same tie rule and f32 math) on token w's logits (read with `ld.global.cg`) into shared memory: every
//!   block holds the routing itself, so there is no second hand-off. Block 0 also writes ids and weights to global
//!   memory (the interface of the other versions).
//! - **B. Gate/up.** Units j = (pair, column block) = (j / (inter / 8), j % (inter / 8)), pair = token * top_k +
//!   slot, exactly version 3's blocks; group slot s = (G - 1 - b) + G r takes units s, s + 2G, ... (so units of
//!   the first slots finish first, and blocks without a down unit take the remainder) and runs
//!   [`super::gate_up_decode_v3::gate_up_unit`] on them (a named barrier per group instead of the block barrier).
//!   Publish per unit: the 8 writer threads fence, the group's barrier, its thread 0
//!   `red.release.gpu.add(ready[pair], 1)`; a pair is complete at ready = inter / 8.
//! - **C. Down.** Units d = (token, 16 output rows) = version 3's blocks, block b takes d = b, b + G, ... Warp w
//!   plays version 3's warps w and w + 8 one after the other (the second one's weight lines are asked of L2 with
//!   `prefetch.global.L2` when the unit starts); per round it issues the weight loads
//!   ([`super::down_decode_v3::round_weights`], which need only the ids), then every lane waits (acquire) for the
//!   readiness of the round's slots, then loads the intermediate with `ld.global.cg` (never `.nc`: other blocks
//!   wrote it in this launch) and runs [`super::down_decode_v3::round_products`]. The 16 virtual warps' sums meet
//!   in shared memory in warp order ([`super::down_decode_v3::sum_rows`]): the fixed order of version 3, no
//!   atomics on floats.
//! - **End.** Every block counts itself in sync[1] ([`super::last_block_arrives`]); the last one (all others have
//!   passed every wait) resets sync[0] and the readiness counters to 0 (sync[1] resets itself), so the next launch,
//!   a graph replay included, starts from zeros without an extra launch.
//!
//! No deadlock: a block only waits for work that never waits itself (router rows; gate/up units, which wait only
//! for the router) and that is assigned to co-resident blocks; a block finishes its own gate/up units before its
//! down units. Shared memory: `MOE_DECODE_V4_SMEM_WORDS` f32 (3 KB).
//! Assumes hidden % 128 == 0, inter % 128 == 0, experts <= 256, top_k <= 32, 1 <= tokens <= 4, zeroed sync words
//! before the first launch (the launcher checks the shapes).
use super::down_decode_v3::{down_round, round_unit, store_rows, sum_rows};
use super::gate_up_decode_v3::{gate_up_unit, load_x};
use super::router_rows::row_logits;

use super::{
    barrier_named, fence_gpu, last_block_arrives, ld_cg_f32, ld_cg_v2, prefetch_l2, red_release_add_u32, unroll,
    wait_count, warp_topk_softmax,
};
use crate::arch::*;
use crate::params::{
    MoeDecodeV4Params, MOE_DECODE_V4_MAX_TOKENS, MOE_DECODE_V4_WARPS, MOE_DOWN_DECODE_V3_WARPS,
    MOE_GATE_UP_DECODE_WARPS, MOE_MAX_TOPK, MOE_ROUTER_ROWS_WARPS, MOE_ROUTER_TILE,
};

const WARPS: usize = MOE_DECODE_V4_WARPS;
/// Gate/up units side by side in a block (4 warps each, as version 3's blocks).
const GROUPS: usize = WARPS / MOE_GATE_UP_DECODE_WARPS;
/// Version 3's down warps, played by the block's warps (each plays `VIRT`).
const DWARPS: usize = MOE_DOWN_DECODE_V3_WARPS;
const VIRT: usize = DWARPS / WARPS;
/// Units per down round (version 3's U).
const DU: usize = super::down_decode_v3::U;
const _: () = assert!(WARPS == MOE_ROUTER_ROWS_WARPS && GROUPS == 2 && VIRT == 2);

/// Shared memory offsets (f32 words).
const SM_GU: usize = MOE_ROUTER_ROWS_WARPS * MOE_ROUTER_TILE;
const SM_DN: usize = SM_GU + GROUPS * 64;
const SM_IDS: usize = SM_DN + DWARPS * 16;
const SM_WTS: usize = SM_IDS + MOE_DECODE_V4_MAX_TOKENS * MOE_MAX_TOPK;
const SM_FLAG: usize = SM_WTS + MOE_DECODE_V4_MAX_TOKENS * MOE_MAX_TOPK;

/// `prefetch.global.L2` of `lines` 128-byte lines, line l at `addr(l)`, shared by `n` threads from `first`.
#[inline(always)]
unsafe fn prefetch_lines(lines: usize, first: usize, n: usize, addr: impl Fn(usize) -> *const u8) {
    let mut l = first;
    while l < lines {
        prefetch_l2(addr(l));
        l += n;
    }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_decode_v4(p: MoeDecodeV4Params) {
    let (r, q) = (&p.router, &p.expert);
    let (nt, h, ne, k, inter) =
        (r.tokens as usize, r.hidden as usize, r.experts as usize, r.top_k as usize, q.inter_dim as usize);
    let (b, nb) = (block_x() as usize, grid_dim_x() as usize);
    let tid = thread_x() as usize;
    // Launched cooperatively, without the PDL attribute (the driver must see the whole grid resident), so the wait
    // is a no-op here; it stays for the rule that every entry waits first (tests/pdl_ptx.rs).
    entry_prologue();
    let warp = tid / 32;
    let lane = lane_id();
    let sm = dyn_smem_ptr::<f32>();
    let ids_sm = sm.add(SM_IDS) as *mut u32;
    let wts_sm = sm.add(SM_WTS);
    let sync = r.counter as *mut u32; // [router arrivals, finished blocks, ready[tokens * top_k]]
    let ready = sync.add(2);
    let x = q.x as *const u16;
    let kbs = h / 128;

    // 0. The first gate/up unit's activations (clamped index: no branch around a load).
    let (grp, gw, gtid) = (warp / MOE_GATE_UP_DECODE_WARPS, warp % MOE_GATE_UP_DECODE_WARPS, tid % 128);
    let cols = inter / 8;
    let n_gu = nt * k * cols;
    let slots = nb * GROUPS;
    let gs = (nb - 1 - b) + nb * grp;
    let x_of = |j: usize| x.add(j.min(n_gu - 1) / cols / k * h);
    let mut xv = load_x(x_of(gs), gw, kbs, lane);

    // A. Router rows b, b + G, ...; publish; wait for all; top-k per token in every block.
    let mut mine = 0u32;
    let mut ex = b;
    while ex < ne {
        let wrow = (r.w as *const u16).add(ex * h) as *const u8;
        let (rx, lane_u) = (r.x as *const u8, lane as usize);
        row_logits!(rx, wrow, h, nt, sm, (tid, warp, lane_u), s => *(r.logits as *mut f32).add(tid * ne + ex) = s);
        mine += 1;
        ex += nb;
        sync_threads(); // the partials are rewritten by the next row
    }
    if mine > 0 {
        fence_gpu();
        sync_threads();
        if tid == 0 {
            red_release_add_u32(sync, mine);
        }
    }
    if tid == 0 {
        wait_count(sync, ne as u32);
        fence_gpu();
    }
    sync_threads();
    if warp < nt {
        let row = (r.logits as *const f32).add(warp * ne);
        warp_topk_softmax(
            |e| ld_cg_f32(row.add(e)),
            ne,
            k,
            r.norm_topk != 0,
            ids_sm.add(warp * k),
            wts_sm.add(warp * k),
        );
    }
    sync_threads();
    if b == 0 && tid < nt * k {
        *(r.ids as *mut u32).add(tid) = *ids_sm.add(tid);
        *(r.weights as *mut f32).add(tid) = *wts_sm.add(tid);
    }

    // B. Gate/up units gs, gs + 2G, ... of this group.
    let gsm = sm.add(SM_GU + 64 * grp);
    let bar = || barrier_named(1 + grp as u32, 128);
    let mut j = gs;
    while j < n_gu {
        let pair = j / cols;
        let e = *ids_sm.add(pair) as usize;
        // Towards L2 while this unit streams: the group's next unit (16 rows of h bytes), or after the last one
        // this group's half of the block's first down unit (16 rows x top_k slots of inter bytes).
        let next = j + slots;
        if next < n_gu {
            let (en, r0) = (*ids_sm.add(next / cols) as usize, (next % cols) * 8);
            prefetch_lines(16 * kbs, gtid, 128, |l| {
                let (r, kb) = (l / kbs, l % kbs);
                let w = if r < 8 { q.w_gate } else { q.w_up } as *const u8;
                w.add((en * inter + r0 + r % 8) * h + kb * 128)
            });
        } else if b < nt * (h / 16) {
            let (token, n0, dk) = (b / (h / 16), (b % (h / 16)) * 16, inter / 128);
            prefetch_lines(k * 16 * dk, gtid + 128 * grp, 256, |l| {
                let (sl, r, kb) = (l / (16 * dk), (l / dk) % 16, l % dk);
                let ed = *ids_sm.add(token * k + sl) as usize;
                (q.w_down as *const u8).add((ed * h + n0 + r) * inter + kb * 128)
            });
        }
        gate_up_unit::<false>(q, pair, (j % cols) * 8, e, xv, gw, gtid, gsm, bar);
        if gtid < 8 {
            fence_gpu(); // this thread's inter store, before the group's release below
        }
        bar(); // also: the group's shared memory is read before the next unit rewrites it
        if gtid == 0 {
            red_release_add_u32(ready.add(pair), 1);
        }
        j += slots;
        xv = load_x(x_of(j), gw, kbs, lane);
    }

    // C. Down units b, b + G, ...: weights first, then wait for the slots' readiness, then the intermediate.
    let hb = h / 16;
    let n_dn = nt * hb;
    let dkbs = inter / 128;
    let hblk = h / 128;
    let units = k * dkbs;
    let (g, t) = ((lane / 4) as usize, lane % 4);
    let dsm = sm.add(SM_DN);
    let sd0 = q.s_down as *const u32;
    let mut d = b;
    while d < n_dn {
        let token = d / hb;
        let n0 = (d % hb) * 16;
        let wd = (q.w_down as *const u8).add((n0 + g) * inter + 16 * t as usize);
        let act = (q.inter as *const u16).add(token * k * inter);
        let (idt, wtt, rdy) = (ids_sm.add(token * k), wts_sm.add(token * k), ready.add(token * k));
        // The second virtual warp's first round towards L2 (lanes t = 0: rows g and g + 8 of each unit).
        if warp + WARPS < units && t == 0 {
            unroll!(u in [0, 1, 2] {
                let (sl, kb) = round_unit(warp + WARPS, u, units, dkbs);
                let row = (q.w_down as *const u8).add((*idt.add(sl) as usize * h + n0 + g) * inter + kb * 128);
                prefetch_l2(row);
                prefetch_l2(row.add(8 * inter));
            });
        }
        unroll!(v in [0, 1] {
            let vw = warp + WARPS * v;
            let (mut tg, mut tg8) = (0f32, 0f32);
            let mut u0 = vw;
            while u0 < units {
                let mut sl = [0usize; DU];
                let mut kb = [0usize; DU];
                let mut e = [0u32; DU];
                let mut rw = [0f32; DU];
                unroll!(u in [0, 1, 2] {
                    (sl[u], kb[u]) = round_unit(u0, u, units, dkbs);
                    e[u] = *idt.add(sl[u]);
                    rw[u] = *wtt.add(sl[u]);
                });
                // Weights first (they need only the ids; the macro issues them before it evaluates its `xv`
                // argument), then the readiness of the round's slots, then the intermediate.
                down_round!(wd, sd0, e, kb, rw, (h, inter, n0, hblk, dkbs), (u0, units, t), {
                    let mut xv = [[0u32; 2]; DU];
                    unroll!(u in [0, 1, 2] {
                        if u0 + DWARPS * u < units {
                            wait_count(rdy.add(sl[u]), cols as u32);
                        }
                        xv[u] = ld_cg_v2(act.add(sl[u] * inter + kb[u] * 128 + 4 * lane as usize) as *const u8);
                    });
                    xv
                }, tg, tg8);
                u0 += DWARPS * DU;
            }
            store_rows(dsm, vw, tg, tg8);
        });
        sync_threads();
        sum_rows(dsm, tid, (q.out as *mut u16).add(token * h + n0));
        sync_threads(); // the row sums are rewritten by the next unit
        d += nb;
    }

    // End: the last block to finish resets the counters for the next launch.
    if last_block_arrives(sync.add(1), nb as u32, sm.add(SM_FLAG) as *mut u32) {
        if tid == 0 {
            *sync = 0;
        }
        let mut i = tid;
        while i < nt * k {
            *ready.add(i) = 0;
            i += 32 * WARPS;
        }
    }
}
