//! `hga_route_stage1`: the normalization of every query row and stage 1 of the default routing, for every KV head
//! of a layer in one launch.
//!
//! For KV head h with query rows r (the block's tokens x the query heads of h, `R = q_len * n_heads / n_kv`):
//! - `base[h][r]` = ln sum exp over the normalization set (sink + window up to the block start, host/src/hga's
//!   `Geometry::always`) of `q_r . k_j / sqrt(d)` with the exact bf16 keys (0 when `normalize == 0`);
//! - chunk score (candidate chunks `first_chunk .. end_chunk`) = max over r (NaN-ignoring, from -inf) of
//!   `scale * sum_d max(q_rd m_d, q_rd M_d) - base[h][r]` with the chunk's min m and max M;
//! - `kept[h][0 .. n_c]` = the n_c best chunks (absolute chunk indices, ascending; u32::MAX up to max_kept), by
//!   the rule of `crate::hga::route`.
//! With no chunk stage (`chunk_stage == 0`) only `base` is computed (stage 2 then scores every candidate group).
//! n_c and n_g come from the device-resident position (`geometry`), so one recorded launch serves every step.
//!
//! Grid (ctas, n_kv), block 256. Phase 1 (every CTA): the work items of head h, (normalization key j, row r) dot
//! products then (candidate chunk c, row r) bounds, flattened as `unit * R + r` and split evenly over the head's
//! CTAs; one item per thread at a time (neighbouring threads share a unit: its key or summary loads coalesce into
//! one request); raw values to the scratch `key_scores` / `raw`. Phase 2 (the head's last CTA to finish, by an
//! atomic counter that resets itself): per row the two-pass log-sum-exp of its key scores (a warp per row) to
//! `base`; the chunk scores (a thread per chunk, max over rows) to `chunk_scores`; the top-k (`select_top_k`,
//! radix select in shared memory). Shared memory: `route_select_smem(max_cand_chunks)`.
use crate::arch::*;
use crate::hga::route::{geometry, key_row, last_of_head, lse_finish, q_row, select_top_k};
use crate::moe::{fence_gpu, ld_cg_f32};
use crate::params::{RouteParams, ROUTE_COUNTERS, ROUTE_STATS, ROUTE_THREADS};

/// q . k for a bf16 key row (f32 accumulation, dims in order).
#[inline(always)]
unsafe fn dot_bf16(q: *const f32, k: *const u16) -> f32 {
    let mut acc = 0f32;
    let mut i = 0;
    while i < 16 {
        let kw = ld_global_v4(k.add(8 * i) as *const u8);
        let qa = *(q.add(8 * i) as *const [f32; 4]);
        let qb = *(q.add(8 * i + 4) as *const [f32; 4]);
        let mut w = 0;
        while w < 4 {
            let (a, b) = bf16x2_to_f32(kw[w]);
            let qq = if w < 2 { qa } else { qb };
            acc += qq[(2 * w) % 4] * a;
            acc += qq[(2 * w + 1) % 4] * b;
            w += 1;
        }
        i += 1;
    }
    acc
}

/// sum_d max(q_d m_d, q_d M_d) (f32, dims in order).
#[inline(always)]
unsafe fn bound(q: *const f32, mn: *const u16, mx: *const u16) -> f32 {
    let mut acc = 0f32;
    let mut i = 0;
    while i < 16 {
        let a = ld_global_v4(mn.add(8 * i) as *const u8);
        let b = ld_global_v4(mx.add(8 * i) as *const u8);
        let qa = *(q.add(8 * i) as *const [f32; 4]);
        let qb = *(q.add(8 * i + 4) as *const [f32; 4]);
        let mut w = 0;
        while w < 4 {
            let (m0, m1) = bf16x2_to_f32(a[w]);
            let (x0, x1) = bf16x2_to_f32(b[w]);
            let qq = if w < 2 { qa } else { qb };
            let (q0, q1) = (qq[(2 * w) % 4], qq[(2 * w + 1) % 4]);
            acc += fmax(q0 * m0, q0 * x0);
            acc += fmax(q1 * m1, q1 * x1);
            w += 1;
        }
        i += 1;
    }
    acc
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_route_stage1(p: RouteParams) {
    entry_prologue();
    let h = block_y() as usize;
    let tid = thread_x() as usize;
    let g = geometry(&p);
    if !g.ok {
        if block_x() == 0 && tid == 0 {
            *(p.stats as *mut u32).add(h * ROUTE_STATS) = u32::MAX;
        }
        return;
    }
    let rows = (p.q_len * (p.n_heads / p.n_kv_heads)) as usize;
    let n_always = if p.normalize != 0 { g.n_always() } else { 0 };
    let n_cand = if p.chunk_stage != 0 && g.n_groups > 0 { g.end_chunk - g.first_chunk } else { 0 };
    let items = (n_always + n_cand) * rows;
    let per = items.div_ceil(p.ctas as usize);
    let lo = block_x() as usize * per;
    let hi = if lo + per < items { lo + per } else { items };
    let (mr, ma, mc) = (p.max_rows as usize, p.max_always as usize, p.max_cand_chunks as usize);
    let key_scores = (p.key_scores as *mut f32).add(h * mr * ma);
    let raw = (p.raw as *mut f32).add(h * mr * mc);
    let mut it = lo + tid;
    while it < hi {
        let (u, r) = (it / rows, it % rows);
        let q = q_row(&p, h, r);
        if u < n_always {
            let k = key_row(&p, h, g.always_pos(u));
            *key_scores.add(r * ma + u) = dot_bf16(q, k) * p.scale;
        } else {
            let c = g.first_chunk + (u - n_always);
            let o = (h * p.max_chunks as usize + c) * 128;
            let v = bound(q, (p.chunk_min as *const u16).add(o), (p.chunk_max as *const u16).add(o));
            *raw.add(r * mc + (u - n_always)) = v;
        }
        it += ROUTE_THREADS;
    }
    if !last_of_head((p.counters as *mut u32).add(h * ROUTE_COUNTERS), p.ctas) {
        return;
    }
    // Phase 2, the head's last CTA: base per row (a warp per row).
    let (warp, lane) = (tid / 32, tid % 32);
    let base = (p.base as *mut f32).add(h * mr);
    let mut r = warp;
    while r < rows {
        let row = key_scores.add(r * ma);
        let mut m = f32::NEG_INFINITY;
        let mut j = lane;
        while j < n_always {
            m = fmax(m, ld_cg_f32(row.add(j)));
            j += 32;
        }
        let m = warp_max(m);
        let mut s = 0f32;
        let mut j = lane;
        while j < n_always {
            s += ex2((ld_cg_f32(row.add(j)) - m) * core::f32::consts::LOG2_E);
            j += 32;
        }
        let s = warp_sum(s);
        if lane == 0 {
            *base.add(r) = if p.normalize != 0 { lse_finish(m, s) } else { 0.0 };
        }
        r += ROUTE_THREADS / 32;
    }
    fence_gpu();
    sync_threads();
    let stats = (p.stats as *mut u32).add(h * ROUTE_STATS);
    if p.chunk_stage == 0 {
        if tid == 0 {
            *stats = g.n_chunks as u32;
            *stats.add(2) = 0;
        }
        return;
    }
    let scores = (p.chunk_scores as *mut f32).add(h * mc);
    let mut i = tid;
    while i < n_cand {
        let mut v = f32::NEG_INFINITY;
        let mut r = 0;
        while r < rows {
            v = fmax(v, ld_cg_f32(raw.add(r * mc + i)) * p.scale - ld_cg_f32(base.add(r)));
            r += 1;
        }
        *scores.add(i) = v;
        i += ROUTE_THREADS;
    }
    fence_gpu();
    sync_threads();
    let first = g.first_chunk as u32;
    let kept = (p.kept as *mut u32).add(h * p.max_kept as usize);
    let lost = select_top_k(scores, n_cand, g.n_chunks, kept, p.max_kept as usize, |i| first + i as u32);
    if tid == 0 {
        *stats = if g.n_chunks < n_cand { g.n_chunks as u32 } else { n_cand as u32 };
        *stats.add(2) = lost;
    }
}
