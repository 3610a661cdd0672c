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
//! atomic counter that resets itself): per row the log-sum-exp of its key scores (a warp per row, online, 16 loads in flight per lane) to
//! `base` (and to shared memory); the chunk scores (a thread per chunk, max over rows) to `chunk_scores`; the top-k (`select_top_k`,
//! radix select in shared memory). Shared memory: `route_select_smem(max_cand_chunks)` + 4 * ROUTE_MAX_ROWS.
//! Loads are issued in unrolled batches (a row of 16 x 16 bytes per key, 8 x 16 bytes of min and of max per
//! half chunk): a first version with plain loops waited for every load in turn and took 28 us at 64K.
use crate::arch::*;
use crate::hga::route::{geometry, key_row, last_of_head, lse_finish, lse_merge, lse_push, q_row, select_top_k};
use crate::moe::{fence_gpu, ld_cg_f32, unroll};
use crate::params::{route_select_smem, RouteParams, ROUTE_COUNTERS, ROUTE_STATS, ROUTE_THREADS};

/// q . k for a bf16 key row (f32 accumulation, dims in order): the 16 loads of the row are issued before the
/// arithmetic (unrolled; a loop would wait for each load in turn).
#[inline(always)]
unsafe fn dot_bf16(q: *const f32, k: *const u16) -> f32 {
    let mut kw = [[0u32; 4]; 16];
    unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        kw[i] = ld_global_v4(k.add(8 * i) as *const u8);
    });
    let mut acc = 0f32;
    unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        let qa = *(q.add(8 * i) as *const [f32; 4]);
        let qb = *(q.add(8 * i + 4) as *const [f32; 4]);
        unroll!(w in [0, 1, 2, 3] {
            let (a, b) = bf16x2_to_f32(kw[i][w]);
            let qq = if w < 2 { qa } else { qb };
            acc += qq[(2 * w) % 4] * a;
            acc += qq[(2 * w + 1) % 4] * b;
        });
    });
    acc
}

/// sum_d max(q_d m_d, q_d M_d) (f32, dims in order), loads issued 8 rows of 16 bytes at a time.
#[inline(always)]
unsafe fn bound(q: *const f32, mn: *const u16, mx: *const u16) -> f32 {
    let mut acc = 0f32;
    unroll!(h in [0, 1] {
        let mut a = [[0u32; 4]; 8];
        let mut b = [[0u32; 4]; 8];
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            a[i] = ld_global_v4(mn.add(64 * h + 8 * i) as *const u8);
            b[i] = ld_global_v4(mx.add(64 * h + 8 * i) as *const u8);
        });
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7] {
            let qa = *(q.add(64 * h + 8 * i) as *const [f32; 4]);
            let qb = *(q.add(64 * h + 8 * i + 4) as *const [f32; 4]);
            unroll!(w in [0, 1, 2, 3] {
                let (m0, m1) = bf16x2_to_f32(a[i][w]);
                let (x0, x1) = bf16x2_to_f32(b[i][w]);
                let qq = if w < 2 { qa } else { qb };
                let (q0, q1) = (qq[(2 * w) % 4], qq[(2 * w + 1) % 4]);
                acc += fmax(q0 * m0, q0 * x0);
                acc += fmax(q1 * m1, q1 * x1);
            });
        });
    });
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
    // Phase 2, the head's last CTA: base per row (a warp per row, an online log-sum-exp with 16 loads in flight
    // per lane), kept in shared memory behind the select's space.
    let (warp, lane) = (tid / 32, tid % 32);
    let base = (p.base as *mut f32).add(h * mr);
    let base_sm = dyn_smem_ptr::<f32>().add(route_select_smem(mc) / 4);
    // With at most 8 rows (decode) a thread's first chunk's raw bounds are loaded now, their latency hidden
    // behind the base computation; later chunks are loaded one iteration ahead.
    let few = rows <= 8;
    let ld_raw = |i: usize| -> [f32; 8] {
        let mut x = [0f32; 8];
        unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
            if u < rows {
                x[u] = ld_cg_f32(raw.add(u * mc + i));
            }
        });
        x
    };
    let mut cur = if p.chunk_stage != 0 && few && tid < n_cand { ld_raw(tid) } else { [0f32; 8] };
    let mut r = warp;
    while r < rows {
        let row = key_scores.add(r * ma);
        let mut st = (f32::NEG_INFINITY, 0f32);
        // 16 loads in flight per lane; each lane pushes its keys lane, lane + 32, ... in ascending order.
        let mut j0 = 0;
        while j0 < n_always {
            let mut v = [f32::NEG_INFINITY; 16];
            unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                let j = j0 + 32 * u + lane;
                if j < n_always {
                    v[u] = ld_cg_f32(row.add(j));
                }
            });
            unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
                st = lse_push(st.0, st.1, v[u]);
            });
            j0 += 512;
        }
        let mut d = 16;
        while d > 0 {
            let o = (shfl_xor_f32(st.0, d), shfl_xor_f32(st.1, d));
            st = lse_merge(st, o);
            d >>= 1;
        }
        let b = if p.normalize != 0 { lse_finish(st.0, st.1) } else { 0.0 };
        if lane == 0 {
            *base.add(r) = b;
            *base_sm.add(r) = b;
        }
        r += ROUTE_THREADS / 32;
    }
    sync_threads();
    let stats = (p.stats as *mut u32).add(h * ROUTE_STATS);
    if p.chunk_stage == 0 {
        if tid == 0 {
            *stats = g.n_chunks as u32;
            *stats.add(2) = 0;
        }
        return;
    }
    // Chunk scores: a thread per chunk, 8 rows' raw bounds loaded at a time.
    let scores = (p.chunk_scores as *mut f32).add(h * mc);
    let mut i = tid;
    if few {
        while i < n_cand {
            let nxt = if i + ROUTE_THREADS < n_cand { ld_raw(i + ROUTE_THREADS) } else { cur };
            let mut v = f32::NEG_INFINITY;
            unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
                if u < rows {
                    v = fmax(v, cur[u] * p.scale - *base_sm.add(u));
                }
            });
            *scores.add(i) = v;
            cur = nxt;
            i += ROUTE_THREADS;
        }
    }
    while i < n_cand {
        let mut v = f32::NEG_INFINITY;
        let mut r0 = 0;
        while r0 < rows {
            let mut x = [0f32; 8];
            unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
                if r0 + u < rows {
                    x[u] = ld_cg_f32(raw.add((r0 + u) * mc + i));
                }
            });
            unroll!(u in [0, 1, 2, 3, 4, 5, 6, 7] {
                if r0 + u < rows {
                    v = fmax(v, x[u] * p.scale - *base_sm.add(r0 + u));
                }
            });
            r0 += 8;
        }
        *scores.add(i) = v;
        i += ROUTE_THREADS;
    }
    fence_gpu();
    sync_threads();
    let first = g.first_chunk as u32;
    let kept = (p.kept as *mut u32).add(h * p.max_kept as usize);
    let lost = select_top_k(scores, n_cand, g.n_chunks, kept, p.max_kept as usize, false, |i| first + i as u32);
    if tid == 0 {
        *stats = if g.n_chunks < n_cand { g.n_chunks as u32 } else { n_cand as u32 };
        *stats.add(2) = lost;
    }
}
