//! `hga_route_stage2`: stage 2 of the default routing, every KV head of a layer in one launch: the int4-sketch
//! score of each candidate group and the top n_g (`selected`, u32 [n_kv][max_groups], absolute group indices
//! ascending, u32::MAX padding; `stats[h][1]` = how many were selected).
//!
//! Candidates: the groups of stage 1's kept chunks (`chunk_stage == 1`; candidate i is group `4 kept[i / 4] + i % 4`,
//! ascending) or every group of the candidate chunks (`chunk_stage == 0`, host/src/hga's `shortlist inf`).
//! Score of group G (host/src/hga's `GroupScore::Sketch4` with normalization and GQA max) = max over query rows r
//! (NaN-ignoring, from -inf) of `ln sum_{j in G} exp(scale * q_r . khat_j) - base[h][r]`, `khat_j = n_j * s_j` the
//! sketch of `crate::params::hga` (`base` from `hga_route_stage1`).
//!
//! Grid (ctas, n_kv), block 256 = 8 warps; a warp scores one group at a time (groups strided over the head's
//! warps) on the tensor cores: the 16 tokens are the rows of A (m16n8k16, f16: the nibbles are exact in f16, made
//! by integer moves: `(n ^ 8) | 0x6400` is 1024 + n + 8, minus 1032), 8 query rows the columns of B, k = 128 in 8
//! steps. The dims are permuted inside each lane's 16 bytes (lane (g, t) loads bytes 16t .. 16t + 15 of tokens g and
//! g + 8 with one 16-byte load each; k-step s takes bytes 2s and 2s + 1, i.e. dims 32t + 4s .. 32t + 4s + 3, and B
//! takes q at the same dims), so A needs no shuffles. q is split as hi = f16(q), lo = f16(q - hi) and both are
//! multiplied (two mma per k-step): about 22 significant bits of q, products exact, f32 accumulation. The token's
//! log-sum-exp over the 16 rows of D is a 3-step shuffle reduction (lanes of equal t), then the max over rows.
//! Rows beyond 8 (prefill blocks, GQA > 8) loop over tiles of 8 columns (q fragments reloaded per tile).
//! Each warp issues the next group's loads before the current group's arithmetic (and, without a chunk stage, asks
//! L2 for the group after that); the hi and lo products accumulate in two chains. Each group's score also counts
//! in the first-level histogram of the select (`red.global.add` into `hist[h][1]`); the last CTA of the head
//! selects (`select_top_k`).
//!
//! q: up to `ROUTE_QS_ROWS` rows the CTA stages q once in shared memory, each row's 16-byte pieces permuted to the
//! fragment order (piece (t, s) at slot 4s + t, 576-byte rows: a fragment load touches distinct bank quads), and
//! every warp builds its fragments from there; larger blocks (prefill) read q from global memory with 4-byte loads
//! as before (16-byte ones there raise the kernel's registers from 125 to 161 on sm_90: one CTA per SM).
//! Versions 1-3 read q with 4-byte loads (`[f32; 4]` is 4-aligned), 32 per lane and warp, each instruction touching
//! 32 sectors: 2.2 M L1 sectors at 64K, 30% of the warps' time stalled on the load queue.
//! Shared memory: `route_stage2_smem(max_cand_groups)`.
use crate::arch::*;
use crate::hga::route::{
    geometry, hist_bin, last_of_head, ld_v4_f32, lse_finish, order_key, q_row, red_global_add, select_top_k, st_v4_u32,
};
use crate::moe::unroll;
use crate::params::{
    RouteParams, HGA_GROUPS_PER_CHUNK, ROUTE_COUNTERS, ROUTE_HIST_BINS, ROUTE_QS2_STRIDE, ROUTE_QS_ROWS, ROUTE_STATS,
    ROUTE_THREADS,
};

#[inline(always)]
fn f32x2_to_f16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("cvt.rn.f16x2.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

#[inline(always)]
fn f16x2_to_f32(v: u32) -> (f32, f32) {
    let (a, b): (f32, f32);
    unsafe {
        core::arch::asm!("{{ .reg .b16 l, h; mov.b32 {{l, h}}, {2}; cvt.f32.f16 {0}, l; cvt.f32.f16 {1}, h; }}",
            out(reg32) a, out(reg32) b, in(reg32) v, options(pure, nomem, nostack))
    };
    (a, b)
}

#[inline(always)]
fn f16_to_f32(v: u16) -> f32 {
    let r: f32;
    unsafe { core::arch::asm!("cvt.f32.f16 {0}, {1};", out(reg32) r, in(reg16) v, options(pure, nomem, nostack)) };
    r
}

#[inline(always)]
fn sub_f16x2(a: u32, b: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("sub.rn.f16x2 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(pure, nomem, nostack))
    };
    r
}

/// Two nibbles (bits 0-3 and 4-7 of `b`) -> f16x2 (low half from bits 0-3), exact.
#[inline(always)]
fn nib2_to_f16x2(b: u32) -> u32 {
    let x = (b & 0xF) | ((b & 0xF0) << 12);
    sub_f16x2((x ^ 0x0008_0008) | 0x6400_6400, 0x6408_6408)
}

/// `prefetch.global.L2` of the line holding `p` (a hint: no result, nothing waits).
#[inline(always)]
unsafe fn prefetch_l2(p: *const u8) {
    core::arch::asm!("prefetch.global.L2 [{0}];", in(reg64) p, options(nostack, readonly));
}

/// (hi, lo) f16x2 parts of the pair (x0, x1).
#[inline(always)]
fn split_f16(x0: f32, x1: f32) -> (u32, u32) {
    let hi = f32x2_to_f16x2(x0, x1);
    let (h0, h1) = f16x2_to_f32(hi);
    (hi, f32x2_to_f16x2(x0 - h0, x1 - h1))
}

/// B fragments (hi, lo) of query row `r` (zeros past `rows`) for the 8 k-steps: lane (g, t) holds dims
/// 32t + 4s .. 32t + 4s + 3 of row `tile * 8 + g`. `qs`: the staged rows (null: read global memory).
#[inline(always)]
unsafe fn q_frags(
    p: &RouteParams,
    h: usize,
    r: usize,
    rows: usize,
    t: usize,
    qs: *const f32,
) -> ([[u32; 2]; 8], [[u32; 2]; 8]) {
    let mut hi = [[0u32; 2]; 8];
    let mut lo = [[0u32; 2]; 8];
    if r < rows {
        let staged = !qs.is_null();
        let q = if staged { qs.add(r * ROUTE_QS2_STRIDE + 4 * t) } else { q_row(p, h, r).add(32 * t) };
        unroll!(s in [0, 1, 2, 3, 4, 5, 6, 7] {
            // Global q (more than ROUTE_QS_ROWS rows): 4-byte loads, which keep the registers at 125 (see above).
            let v = if staged { ld_v4_f32(q.add(16 * s)) } else { *(q.add(4 * s) as *const [f32; 4]) };
            let (h0, l0) = split_f16(v[0], v[1]);
            let (h1, l1) = split_f16(v[2], v[3]);
            hi[s] = [h0, h1];
            lo[s] = [l0, l1];
        });
    }
    (hi, lo)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_route_stage2(p: RouteParams) {
    entry_prologue();
    let h = block_y() as usize;
    let tid = thread_x() as usize;
    let (warp, lane) = (tid / 32, tid % 32);
    let (gr, t) = (lane / 4, lane % 4);
    let geo = geometry(&p);
    if !geo.ok {
        if block_x() == 0 {
            let mut i = tid;
            while i < p.max_groups as usize {
                *(p.selected as *mut u32).add(h * p.max_groups as usize + i) = u32::MAX;
                i += 256;
            }
            if tid == 0 {
                *(p.stats as *mut u32).add(h * ROUTE_STATS + 1) = u32::MAX;
            }
        }
        return;
    }
    let rows = (p.q_len * (p.n_heads / p.n_kv_heads)) as usize;
    let gpc = HGA_GROUPS_PER_CHUNK;
    let n_cand = if geo.n_groups == 0 {
        0
    } else if p.chunk_stage != 0 {
        geo.n_chunks * gpc
    } else {
        (geo.end_chunk - geo.first_chunk) * gpc
    };
    let kept = (p.kept as *const u32).add(h * p.max_kept as usize);
    let first_group = geo.first_chunk * gpc;
    let group_of = |i: usize| -> usize {
        if p.chunk_stage != 0 {
            *kept.add(i / gpc) as usize * gpc + i % gpc
        } else {
            first_group + i
        }
    };
    let base = (p.base as *const f32).add(h * p.max_rows as usize);
    let scores = (p.group_scores as *mut f32).add(h * p.max_cand_groups as usize);
    let tiles = rows.div_ceil(8);
    let stride = p.ctas as usize * 8;
    let sc = p.sketch_scale as *const u16;
    // A group's sketch words and scales (lane (g, t): bytes 16t .. 16t + 15 of tokens g and g + 8).
    let load = |i: usize| -> ([u32; 4], [u32; 4], f32, f32) {
        let tok = h * p.max_tokens as usize + group_of(i) * 16;
        let sk = (p.sketch as *const u8).add(tok * 64 + 16 * t);
        (
            ld_global_v4(sk.add(gr * 64)),
            ld_global_v4(sk.add((gr + 8) * 64)),
            f16_to_f32(*sc.add(tok + gr)) * p.scale,
            f16_to_f32(*sc.add(tok + gr + 8)) * p.scale,
        )
    };
    let mut i = block_x() as usize * 8 + warp;
    // The first group's loads are in flight while q is staged.
    let mut cur = if i < n_cand { load(i) } else { ([0; 4], [0; 4], 0.0, 0.0) };
    // q staged in shared memory, 16-byte piece (t, s) of a row (dims 32t + 4s ..) at slot 4s + t.
    let qs = if rows <= ROUTE_QS_ROWS { dyn_smem_ptr::<f32>() } else { core::ptr::null_mut() };
    if !qs.is_null() {
        let mut j = tid;
        while j < rows * 32 {
            let (r, c) = (j / 32, j % 32);
            let slot = 4 * (c % 8) + c / 8;
            st_v4_u32(
                qs.add(r * ROUTE_QS2_STRIDE + 4 * slot) as *mut u32,
                ld_global_v4(q_row(&p, h, r).add(4 * c) as *const u8),
            );
            j += ROUTE_THREADS;
        }
        sync_threads();
    }
    let (mut qhi, mut qlo) = q_frags(&p, h, gr, rows, t, qs);
    // Each lane's two base values per tile (columns 2t, 2t + 1), for the single-tile case.
    let base_of = |c: usize| if c < rows { *base.add(c) } else { f32::NAN };
    let (b0s, b1s) = (base_of(2 * t), base_of(2 * t + 1));
    let l2e = core::f32::consts::LOG2_E;
    let hist = (p.hist as *mut u32).add((2 * h + 1) * ROUTE_HIST_BINS);
    while i < n_cand {
        // The next group's loads are issued before this group's arithmetic (software pipelining); without a chunk
        // stage (addresses known without a load) L2 is asked for the group after it.
        let nxt = if i + stride < n_cand { load(i + stride) } else { cur };
        if p.chunk_stage == 0 && i + 2 * stride < n_cand {
            let tok = h * p.max_tokens as usize + (first_group + i + 2 * stride) * 16;
            prefetch_l2((p.sketch as *const u8).add(tok * 64 + 32 * lane));
            if lane == 0 {
                prefetch_l2(sc.add(tok) as *const u8);
            }
        }
        let (wa, wb, sa, sb) = cur;
        let mut best = f32::NEG_INFINITY;
        let mut tile = 0;
        while tile < tiles {
            if tiles > 1 {
                let f = q_frags(&p, h, tile * 8 + gr, rows, t, qs);
                qhi = f.0;
                qlo = f.1;
            }
            // Two accumulator chains (hi and lo parts of q), added at the end.
            let mut acc_h = [0f32; 4];
            let mut acc_l = [0f32; 4];
            unroll!(s in [0, 1, 2, 3, 4, 5, 6, 7] {
                let ha = (wa[s / 2] >> (16 * (s % 2))) & 0xFFFF;
                let hb = (wb[s / 2] >> (16 * (s % 2))) & 0xFFFF;
                let a = [nib2_to_f16x2(ha), nib2_to_f16x2(hb), nib2_to_f16x2(ha >> 8), nib2_to_f16x2(hb >> 8)];
                acc_h = mma_f16_m16n8k16(a, qhi[s], acc_h);
                acc_l = mma_f16_m16n8k16(a, qlo[s], acc_l);
            });
            let acc = [acc_h[0] + acc_l[0], acc_h[1] + acc_l[1], acc_h[2] + acc_l[2], acc_h[3] + acc_l[3]];
            // acc[0], acc[1]: token gr, columns 2t, 2t + 1; acc[2], acc[3]: token gr + 8.
            let (e0, e1, e2, e3) = (acc[0] * sa, acc[1] * sa, acc[2] * sb, acc[3] * sb);
            let mut m0 = fmax(e0, e2);
            let mut m1 = fmax(e1, e3);
            let mut d = 4;
            while d < 32 {
                m0 = fmax(m0, shfl_xor_f32(m0, d));
                m1 = fmax(m1, shfl_xor_f32(m1, d));
                d <<= 1;
            }
            let mut s0 = ex2((e0 - m0) * l2e) + ex2((e2 - m0) * l2e);
            let mut s1 = ex2((e1 - m1) * l2e) + ex2((e3 - m1) * l2e);
            let mut d = 4;
            while d < 32 {
                s0 += shfl_xor_f32(s0, d);
                s1 += shfl_xor_f32(s1, d);
                d <<= 1;
            }
            let (c0, c1) = (tile * 8 + 2 * t, tile * 8 + 2 * t + 1);
            let (bb0, bb1) = if tiles > 1 { (base_of(c0), base_of(c1)) } else { (b0s, b1s) };
            // Padding columns have a NaN base: NaN-ignoring max drops them.
            best = fmax(best, fmax(lse_finish(m0, s0) - bb0, lse_finish(m1, s1) - bb1));
            tile += 1;
        }
        best = fmax(best, shfl_xor_f32(best, 1));
        best = fmax(best, shfl_xor_f32(best, 2));
        if lane == 0 {
            *scores.add(i) = best;
            red_global_add(hist.add(hist_bin(order_key(best))), 1);
        }
        cur = nxt;
        i += stride;
    }
    if !last_of_head((p.counters as *mut u32).add(h * ROUTE_COUNTERS + 1), p.ctas) {
        return;
    }
    let sel = (p.selected as *mut u32).add(h * p.max_groups as usize);
    let lost = if p.chunk_stage != 0 {
        select_top_k(scores, n_cand, geo.n_groups, hist, sel, p.max_groups as usize, true, |i| {
            (*kept.add(i / gpc) as usize * gpc + i % gpc) as u32
        })
    } else {
        select_top_k(scores, n_cand, geo.n_groups, hist, sel, p.max_groups as usize, false, |i| {
            (first_group + i) as u32
        })
    };
    if tid == 0 {
        let stats = (p.stats as *mut u32).add(h * ROUTE_STATS);
        *stats.add(1) = if geo.n_groups < n_cand { geo.n_groups as u32 } else { n_cand as u32 };
        *stats.add(3) = lost;
    }
}
