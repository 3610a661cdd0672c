//! `hga_attention_prefill`: causal GQA attention for a chunk of query tokens, FlashAttention-2 style.
//!
//! Shapes: see [`AttentionParams`] (q/out [tokens, n_heads, 128], K/V cache [n_kv_heads, capacity, 128],
//! lse [tokens, n_heads]); queries at positions [start, start + tokens) against cache positions [0, start + tokens)
//! (chunked prefill: earlier chunks are already in the cache).
//! Grid: (ceil(tokens / 64), n_heads); x is walked backwards so that the longest (last) query tiles start first.
//! Block: 128 threads = 4 warps, warp w owns query rows 16w..16w+15 of the tile.
//! Shared memory (dynamic, `ATTN_PREFILL_SMEM` = 80 KB): Q tile 64x128 bf16, then 2 stages of (K, V) tiles of
//! 64 keys x 128, all XOR-swizzled (see `tile`). K/V tiles come in by `cp.async` (16 B), double-buffered: the copy of
//! tile j+1 overlaps the math of tile j.
//! Per tile and warp: S = Q K^T (64 mma, K through `ldmatrix`), online softmax in f32 in the log2 domain
//! (`ex2` on scores prescaled by log2(e)/sqrt(d)), O += P V (64 mma, V through `ldmatrix.trans`). Causal skipping:
//! the CTA loads only key tiles up to its last row; a warp skips tiles entirely past its rows and masks only tiles
//! that cross its diagonal (or the context end).
//! Assumes: head_dim 128, n_heads a multiple of n_kv_heads, start + tokens <= capacity, tokens >= 1.
use super::tile::*;
use crate::arch::*;
use crate::params::AttentionParams;

const BM: u32 = 64;
const BN: u32 = 64;
const NTHREADS: u32 = 128;
const TILE: u32 = BN * ROW_BYTES;

/// FlashAttention-2's eager rescaling of O every key tile (measured faster on the H100 than lazy rescaling: 311 vs
/// 297 TFLOP/s at T=16K, docs/perf-attention.md; `prefill`'s `LAZY` stays false).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attention_prefill(p: AttentionParams) {
    entry_prologue();
    prefill::<false>(p)
}

#[inline(always)]
unsafe fn prefill<const LAZY: bool>(p: AttentionParams) {
    let qt = grid_dim_x() - 1 - block_x();
    let h = block_y();
    let g = p.n_heads / p.n_kv_heads;
    let kvh = h / g;
    let tid = thread_x();
    let warp = tid / 32;
    let lane = lane_id();
    let q0 = qt * BM;
    let ctx = p.start + p.tokens;
    let kv_end = min_u32(ctx, p.start + q0 + BM);
    let n_tiles = kv_end.div_ceil(BN);

    let smem = dyn_smem_addr();
    let q_s = smem;
    let stage = |i: u32| smem + BM * ROW_BYTES + i * 2 * TILE;
    let q_stride = p.n_heads as usize * D;
    let kbase = (p.k_cache as *const u16).add(kvh as usize * p.capacity as usize * D);
    let vbase = (p.v_cache as *const u16).add(kvh as usize * p.capacity as usize * D);
    load_rows::<BM, NTHREADS>(q_s, (p.q as *const u16).add(h as usize * D), q0, p.tokens, q_stride, tid);
    load_rows::<BN, NTHREADS>(stage(0), kbase, 0, kv_end, D, tid);
    load_rows::<BN, NTHREADS>(stage(0) + TILE, vbase, 0, kv_end, D, tid);
    cp_async_commit();

    // This lane's rows (tile rows) and their key limits (exclusive).
    let wrow0 = q0 + warp * 16;
    let r_lo = wrow0 + lane / 4;
    let lim = [min_u32(p.start + r_lo + 1, ctx), min_u32(p.start + r_lo + 9, ctx)];
    let warp_min_lim = min_u32(p.start + wrow0 + 1, ctx);
    let warp_max_pos = p.start + wrow0 + 15;
    let warp_active = wrow0 < p.tokens;

    let mut qf = [[0u32; 4]; 8];
    let mut o = [[0f32; 4]; 16];
    let mut m = [f32::NEG_INFINITY; 2];
    let mut l = [0f32; 2];
    let mut kt = 0;
    while kt < n_tiles {
        if kt + 1 < n_tiles {
            let st = stage((kt + 1) & 1);
            load_rows::<BN, NTHREADS>(st, kbase, (kt + 1) * BN, kv_end, D, tid);
            load_rows::<BN, NTHREADS>(st + TILE, vbase, (kt + 1) * BN, kv_end, D, tid);
            cp_async_commit();
            cp_async_wait::<1>();
        } else {
            cp_async_wait::<0>();
        }
        sync_threads();
        if kt == 0 {
            qf = q_frags(q_s, warp * 16);
        }
        let key0 = kt * BN;
        if warp_active && key0 <= warp_max_pos {
            let st = stage(kt & 1);
            if key0 + BN > warp_min_lim {
                attend_tile::<8, 4, true, LAZY>(&qf, st, st + TILE, 0, key0, lim, p.scale_log2, &mut m, &mut l, &mut o);
            } else {
                attend_tile::<8, 4, false, LAZY>(
                    &qf,
                    st,
                    st + TILE,
                    0,
                    key0,
                    lim,
                    p.scale_log2,
                    &mut m,
                    &mut l,
                    &mut o,
                );
            }
        }
        sync_threads();
        kt += 1;
    }

    let ls = row_sums(l);
    let t4 = lane % 4;
    let mut r = 0;
    while r < 2 {
        let row = r_lo + 8 * r as u32;
        if row < p.tokens {
            let inv = 1.0 / ls[r];
            let dst = (p.out as *mut u16).add((row as usize * p.n_heads as usize + h as usize) * D + 2 * t4 as usize);
            let mut j = 0;
            while j < 16 {
                *(dst.add(8 * j) as *mut u32) = f32x2_to_bf16x2(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
                j += 1;
            }
            if t4 == 0 {
                *(p.lse as *mut f32).add(row as usize * p.n_heads as usize + h as usize) =
                    (m[r] + lg2(ls[r])) * core::f32::consts::LN_2;
            }
        }
        r += 1;
    }
}

#[inline(always)]
fn min_u32(a: u32, b: u32) -> u32 {
    if a < b {
        a
    } else {
        b
    }
}
