//! `hga_route_base`: the normalization of the default routing, every query row of every KV head of a layer in
//! one launch: `base[h][r]` = ln sum exp over the normalization set (sink + window up to the block start,
//! host/src/hga's `Geometry::always`) of `q_r . k_j / sqrt(d)` with the exact bf16 keys (0 when `normalize == 0`).
//! Stage 1 and stage 2 subtract it from every score of row r (`hga_route_stage1`, `hga_route_stage2`).
//!
//! Also writes `stats[h][0]` (n_c: every candidate chunk) and `stats[h][2]` (0) when there is no chunk stage (stage 1
//! is then not launched), and `stats[h][0] = u32::MAX` for a device position past `max_ctx`.
//!
//! Grid (rows, n_kv), block: one thread per key of the largest normalization set (the launcher's choice, a multiple
//! of 32 up to 1024; threads loop past it). The CTA stages its q row in shared memory (every lane reads the same q
//! words: broadcasts), each thread issues its key's 16 loads of 16 bytes at once, and the CTA merges online
//! log-sum-exp states (a shuffle tree per warp, then one warp over the warps' states). Until version 3 this ran in
//! stage 1: every stage-1 CTA wrote raw key scores and the last CTA of a head reduced them row by row after all the
//! chunk bounds were done; here it is a short, fully parallel launch, so that stage 1's CTAs can finish their own
//! chunk scores. Shared memory: `ROUTE_BASE_SMEM`.
use crate::arch::*;
use crate::hga::route::{geometry, key_row, ld_v4_f32, lse_finish, lse_merge, lse_push, q_row, st_v4_u32};
use crate::moe::unroll;
use crate::params::{RouteParams, ROUTE_STATS};

/// q . k for a bf16 key row (f32, four partial sums over interleaved dims): the 16 loads of the row are issued
/// before the arithmetic; `q` is 16-byte aligned (shared or global).
#[inline(always)]
pub(crate) unsafe fn dot_bf16(q: *const f32, k: *const u16) -> f32 {
    let mut kw = [[0u32; 4]; 16];
    unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        kw[i] = ld_global_v4(k.add(8 * i) as *const u8);
    });
    let mut acc = [0f32; 4];
    unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
        let qa = ld_v4_f32(q.add(8 * i));
        let qb = ld_v4_f32(q.add(8 * i + 4));
        unroll!(w in [0, 1, 2, 3] {
            let (a, b) = bf16x2_to_f32(kw[i][w]);
            let qq = if w < 2 { qa } else { qb };
            acc[w] += qq[(2 * w) % 4] * a;
            acc[w] += qq[(2 * w + 1) % 4] * b;
        });
    });
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_route_base(p: RouteParams) {
    entry_prologue();
    let r = block_x() as usize;
    let h = block_y() as usize;
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;
    let g = geometry(&p);
    if r == 0 && tid == 0 {
        let stats = (p.stats as *mut u32).add(h * ROUTE_STATS);
        if !g.ok {
            *stats = u32::MAX;
        } else if p.chunk_stage == 0 {
            *stats = g.n_chunks as u32;
            *stats.add(2) = 0;
        }
    }
    let rows = (p.q_len * (p.n_heads / p.n_kv_heads)) as usize;
    if !g.ok || r >= rows {
        return;
    }
    let out = (p.base as *mut f32).add(h * p.max_rows as usize + r);
    if p.normalize == 0 {
        if tid == 0 {
            *out = 0.0;
        }
        return;
    }
    let sm = dyn_smem_ptr::<f32>();
    if tid < 32 {
        st_v4_u32(sm.add(4 * tid) as *mut u32, ld_global_v4(q_row(&p, h, r).add(4 * tid) as *const u8));
    }
    sync_threads();
    let n = g.n_always();
    let mut st = (f32::NEG_INFINITY, 0f32);
    let mut j = tid;
    while j < n {
        let k = key_row(&p, h, g.always_pos(j));
        let v = dot_bf16(sm, k) * p.scale;
        st = lse_push(st.0, st.1, v);
        j += nt;
    }
    let mut d = 16;
    while d > 0 {
        let o = (shfl_xor_f32(st.0, d), shfl_xor_f32(st.1, d));
        st = lse_merge(st, o);
        d >>= 1;
    }
    let (warp, lane) = (tid / 32, tid % 32);
    let states = sm.add(128);
    if lane == 0 {
        *states.add(2 * warp) = st.0;
        *states.add(2 * warp + 1) = st.1;
    }
    sync_threads();
    if warp == 0 {
        let nw = nt.div_ceil(32);
        let mut st =
            if lane < nw { (*states.add(2 * lane), *states.add(2 * lane + 1)) } else { (f32::NEG_INFINITY, 0f32) };
        let mut d = 16;
        while d > 0 {
            let o = (shfl_xor_f32(st.0, d), shfl_xor_f32(st.1, d));
            st = lse_merge(st, o);
            d >>= 1;
        }
        if lane == 0 {
            *out = lse_finish(st.0, st.1);
        }
    }
}
