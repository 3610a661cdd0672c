//! `hga_route_stage1`: stage 1 of the default routing (the chunk shortlist), for every KV head of a layer in one
//! launch. Runs after `hga_route_base` (which writes `base`) and only with a chunk stage (`chunk_stage == 1`; the
//! launcher does not launch it otherwise, and it returns at once if it is).
//!
//! For KV head h with query rows r (the block's tokens x the query heads of h, `R = q_len * n_heads / n_kv`):
//! - chunk score (candidate chunks `first_chunk .. end_chunk`) = max over r (NaN-ignoring, from -inf) of
//!   `scale * sum_d max(q_rd m_d, q_rd M_d) - base[h][r]` with the chunk's min m and max M, to `chunk_scores`;
//! - `kept[h][0 .. n_c]` = the n_c best chunks (absolute chunk indices, ascending; u32::MAX up to max_kept), by
//!   the rule of `crate::hga::route`; `stats[h][0]` = n_c, `stats[h][2]` = the chunks scoring -inf or NaN.
//! n_c comes from the device-resident position (`geometry`), so one recorded launch serves every step.
//!
//! Grid (ctas, n_kv), block 256. Every CTA owns a contiguous range of whole chunks (`ceil(candidates / ctas)`):
//! it stages q in shared memory (up to `ROUTE_QS_ROWS` rows, 528-byte rows: the 8 rows that one load instruction
//! reads lie in distinct bank quads; larger blocks read q from global memory, 16 bytes per load), computes its
//! (chunk, row) bounds one item per thread at a time (neighbouring threads share a chunk: its summary loads
//! coalesce into one request), folds the rows into a per-chunk order key with a shared-memory atomic max (the
//! order key of a NaN is that of -inf: the NaN-ignoring max), and writes its chunk scores and their first-level
//! histogram bins (`red.global.add` into `hist[h][0]`). The head's last CTA to finish (an atomic counter that resets
//! itself) runs the select (`select_top_k`) on the histogram and the scores. Shared memory:
//! `route_stage1_smem(max_cand_chunks, ctas)`.
//!
//! Versions 1-3 computed the raw bounds here, and the normalization and the max over rows in the last CTA (14 us of
//! serial tail at 64K); q was read with 4-byte loads (a `[f32; 4]` is 4-aligned), 128 per item, which kept the L1
//! busy (73% of its throughput) for the whole scoring phase.
use crate::arch::*;
use crate::hga::route::{
    geometry, hist_bin, key_score, last_of_head, ld_v4_f32, order_key, q_row, red_global_add, red_shared_max,
    select_top_k, st_v4_u32,
};
use crate::moe::unroll;
use crate::params::{
    RouteParams, ROUTE_COUNTERS, ROUTE_HIST_BINS, ROUTE_QS1_STRIDE, ROUTE_QS_ROWS, ROUTE_STATS, ROUTE_THREADS,
};

/// sum_d max(q_d m_d, q_d M_d) (f32, four partial sums over interleaved dims), loads issued 8 rows of 16 bytes at
/// a time; `q` is 16-byte aligned (shared or global).
#[inline(always)]
unsafe fn bound(q: *const f32, mn: *const u16, mx: *const u16) -> f32 {
    let mut acc = [0f32; 4];
    unroll!(h in [0, 1] {
        let mut a = [[0u32; 4]; 8];
        let mut b = [[0u32; 4]; 8];
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            a[i] = ld_global_v4(mn.add(64 * h + 8 * i) as *const u8);
            b[i] = ld_global_v4(mx.add(64 * h + 8 * i) as *const u8);
        });
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            let qa = ld_v4_f32(q.add(64 * h + 8 * i));
            let qb = ld_v4_f32(q.add(64 * h + 8 * i + 4));
            unroll!(w in [0, 1, 2, 3] {
                let (m0, m1) = bf16x2_to_f32(a[i][w]);
                let (x0, x1) = bf16x2_to_f32(b[i][w]);
                let qq = if w < 2 { qa } else { qb };
                let (q0, q1) = (qq[(2 * w) % 4], qq[(2 * w + 1) % 4]);
                acc[w] += fmax(q0 * m0, q0 * x0);
                acc[w] += fmax(q1 * m1, q1 * x1);
            });
        });
    });
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_route_stage1(p: RouteParams) {
    entry_prologue();
    let h = block_y() as usize;
    let tid = thread_x() as usize;
    let g = geometry(&p);
    let stats = (p.stats as *mut u32).add(h * ROUTE_STATS);
    if !g.ok {
        if block_x() == 0 && tid == 0 {
            *stats = u32::MAX;
        }
        return;
    }
    if p.chunk_stage == 0 {
        return;
    }
    let rows = (p.q_len * (p.n_heads / p.n_kv_heads)) as usize;
    let n_cand = if g.n_groups > 0 { g.end_chunk - g.first_chunk } else { 0 };
    let per = n_cand.div_ceil(p.ctas as usize);
    let c_lo = (block_x() as usize * per).min(n_cand);
    let c_hi = (c_lo + per).min(n_cand);
    // Shared memory during scoring: q rows [ROUTE_QS_ROWS][ROUTE_QS1_STRIDE], then one order key per chunk.
    let qs = dyn_smem_ptr::<f32>();
    let ckey = qs.add(ROUTE_QS_ROWS * ROUTE_QS1_STRIDE) as *mut u32;
    let staged = rows <= ROUTE_QS_ROWS;
    if staged {
        let mut i = tid;
        while i < rows * 32 {
            let (r, c) = (i / 32, i % 32);
            st_v4_u32(
                qs.add(r * ROUTE_QS1_STRIDE + 4 * c) as *mut u32,
                ld_global_v4(q_row(&p, h, r).add(4 * c) as *const u8),
            );
            i += ROUTE_THREADS;
        }
    }
    let mut i = tid;
    while i < c_hi - c_lo {
        *ckey.add(i) = 0;
        i += ROUTE_THREADS;
    }
    sync_threads();
    let base = (p.base as *const f32).add(h * p.max_rows as usize);
    let items = (c_hi - c_lo) * rows;
    let mut it = tid;
    while it < items {
        let (u, r) = (it / rows, it % rows);
        let q = if staged { qs.add(r * ROUTE_QS1_STRIDE) as *const f32 } else { q_row(&p, h, r) };
        let o = (h * p.max_chunks as usize + g.first_chunk + c_lo + u) * 128;
        let v = bound(q, (p.chunk_min as *const u16).add(o), (p.chunk_max as *const u16).add(o));
        red_shared_max(ckey.add(u), order_key(v * p.scale - *base.add(r)));
        it += ROUTE_THREADS;
    }
    sync_threads();
    let scores = (p.chunk_scores as *mut f32).add(h * p.max_cand_chunks as usize);
    let hist = (p.hist as *mut u32).add(h * 2 * ROUTE_HIST_BINS);
    let mut u = tid;
    while u < c_hi - c_lo {
        let key = *ckey.add(u);
        *scores.add(c_lo + u) = key_score(key);
        red_global_add(hist.add(hist_bin(key)), 1);
        u += ROUTE_THREADS;
    }
    if !last_of_head((p.counters as *mut u32).add(h * ROUTE_COUNTERS), p.ctas) {
        return;
    }
    let first = g.first_chunk as u32;
    let kept = (p.kept as *mut u32).add(h * p.max_kept as usize);
    let lost = select_top_k(scores, n_cand, g.n_chunks, hist, kept, p.max_kept as usize, false, |i| first + i as u32);
    if tid == 0 {
        *stats = if g.n_chunks < n_cand { g.n_chunks as u32 } else { n_cand as u32 };
        *stats.add(2) = lost;
    }
}
