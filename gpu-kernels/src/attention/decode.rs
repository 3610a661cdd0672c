//! `hga_attention_decode_v2`: split-K (flash-decoding) causal GQA attention for a few query tokens; writes per-split
//! partial outputs and their LSE, merged by `hga_attention_merge`. Superseded by the deeper-ring v3
//! ([`super::decode_v3`], same semantics and split), kept for the benchmark and as a tested alternative; the
//! cross-warp merge epilogue ([`write_split`]) is shared with v3.
//!
//! Rows: the (token, query head) pairs of one KV head, row r = t * g + j for query head kvh * g + j
//! (g = n_heads / n_kv_heads): all the query heads of a KV head share every K/V load (8 rows for Qwen3's 32/4 at
//! one token), 16 rows per CTA.
//! Grid: (n_kv_heads * ceil(tokens * g / 16), n_splits). Split s takes the keys
//! [s * tiles_per_split * 64, min(ctx, (s + 1) * tiles_per_split * 64)), ctx = start + tokens (the plain launcher
//! makes every split non-empty; with `start_dev`, start is read from the device and splits past ctx are empty). Block: 128 threads = 4 warps; per 64-key tile, warp w takes keys 16w..16w+15 for the
//! CTA's 16 rows (S = Q K^T: 16 mma, O += P V: 16 mma) with its own online-softmax state; at the end the 4 warp
//! states are merged through shared memory and the CTA writes O / l (f32) and the LSE of its split.
//! Shared memory (dynamic, `ATTN_DECODE_SMEM` = 68 KB): 16 Q rows, 2 stages of (K, V) tiles of 64 keys (swizzled,
//! `cp.async` double-buffered); the final merge reuses the stages (32 KB of O + 512 B of m, l).
//! Causal: token t sees keys < start + t + 1; a split with no visible key for a row writes O = 0, LSE = -inf
//! (weight 0 in the merge). Partial last tile: rows past the end repeat the last key and are masked.
//! Assumes: head_dim 128, n_heads a multiple of n_kv_heads, start + tokens <= capacity.
use super::tile::*;
use crate::arch::*;
use crate::params::AttentionParams;

const BN: u32 = 64;
const ROWS: u32 = 16;
const NTHREADS: u32 = 128;
const TILE: u32 = BN * ROW_BYTES;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attention_decode_v2(p: AttentionParams) {
    entry_prologue();
    let g = p.n_heads / p.n_kv_heads;
    let rows_total = p.tokens * g;
    let rgroups = rows_total.div_ceil(ROWS);
    let kvh = block_x() / rgroups;
    let rg = block_x() % rgroups;
    let sp = block_y();
    let tid = thread_x();
    let warp = tid / 32;
    let lane = lane_id();
    let (start, k_begin, k_end, n_tiles) = split_keys(&p, sp);

    let smem = dyn_smem_addr();
    let q_s = smem;
    let stage = |i: u32| smem + ROWS * ROW_BYTES + i * 2 * TILE;
    // Q rows: row r -> (token, head); rows past the end repeat the last one (not stored).
    let q_row_ptr = |r: u32| -> *const u16 {
        let rr = min_u32(rg * ROWS + r, rows_total - 1);
        let t = rr / g;
        let h = kvh * g + rr % g;
        (p.q as *const u16).add((t as usize * p.n_heads as usize + h as usize) * D)
    };
    let mut id = tid;
    while id < ROWS * 16 {
        let (r, c) = (id / 16, id % 16);
        cp_async_16(q_s + swz(r, c), q_row_ptr(r).add(c as usize * 8) as *const u8);
        id += NTHREADS;
    }
    let kbase = (p.k_cache as *const u16).add(kvh as usize * p.capacity as usize * D);
    let vbase = (p.v_cache as *const u16).add(kvh as usize * p.capacity as usize * D);
    if n_tiles > 0 {
        load_rows::<BN, NTHREADS>(stage(0), kbase, k_begin, k_end, D, tid);
        load_rows::<BN, NTHREADS>(stage(0) + TILE, vbase, k_begin, k_end, D, tid);
    }
    cp_async_commit();

    // Key limits (exclusive) of this lane's rows g and g+8.
    let row_tok = |r: u32| min_u32(rg * ROWS + r, rows_total - 1) / g;
    let lim = [min_u32(k_end, start + row_tok(lane / 4) + 1), min_u32(k_end, start + row_tok(lane / 4 + 8) + 1)];

    let mut qf = [[0u32; 4]; 8];
    let mut o = [[0f32; 4]; 16];
    let mut m = [f32::NEG_INFINITY; 2];
    let mut l = [0f32; 2];
    let mut kt = 0;
    while kt < n_tiles {
        if kt + 1 < n_tiles {
            let st = stage((kt + 1) & 1);
            let r0 = k_begin + (kt + 1) * BN;
            load_rows::<BN, NTHREADS>(st, kbase, r0, k_end, D, tid);
            load_rows::<BN, NTHREADS>(st + TILE, vbase, r0, k_end, D, tid);
            cp_async_commit();
            cp_async_wait::<1>();
        } else {
            cp_async_wait::<0>();
        }
        sync_threads();
        if kt == 0 {
            qf = q_frags(q_s, 0);
        }
        let kpos0 = k_begin + kt * BN + warp * 16;
        if kpos0 < k_end {
            let st = stage(kt & 1);
            // Always the masked variant: a second (unmasked) copy costs registers (172 vs 168 on sm_90: 2 CTAs
            // per SM instead of 3), and the compare / select per score is free in this memory-bound kernel.
            attend_tile::<2, 1, true, false>(
                &qf,
                st,
                st + TILE,
                warp * 16,
                kpos0,
                lim,
                p.scale_log2,
                &mut m,
                &mut l,
                &mut o,
            );
        }
        sync_threads();
        kt += 1;
    }

    // The cross-warp merge reuses the stages (after the Q rows).
    write_split(&p, dyn_smem_ptr::<f32>().add((ROWS * ROW_BYTES / 4) as usize), &o, m, l, kvh, rg, sp, g, rows_total);
}

/// End of a decode split: merges the 4 warps' online-softmax states through shared memory at `o_s` (f32: O
/// [4][16][128] unnormalized, then m and l [4][16]: 33280 bytes) and writes the split's normalized partial O and
/// its LSE (O = 0, LSE = -inf for a row with no visible key). All 128 threads call, after every warp's last read
/// of the shared memory it overwrites (the caller's barrier).
///
/// # Safety
/// `o_s` is 33280 bytes of the launch's shared memory; `p.part_o` / `p.part_lse` hold split `sp`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn write_split(
    p: &AttentionParams,
    o_s: *mut f32,
    o: &[[f32; 4]; 16],
    m: [f32; 2],
    l: [f32; 2],
    kvh: u32,
    rg: u32,
    sp: u32,
    g: u32,
    rows_total: u32,
) {
    let tid = thread_x();
    let warp = tid / 32;
    let lane = lane_id();
    // O (unnormalized) f32 [warp][16][128], then m and l [warp][16].
    let ls = row_sums(l);
    let m_s = o_s.add(4 * 16 * D);
    let l_s = m_s.add(64);
    let t4 = lane % 4;
    let mut r = 0;
    while r < 2 {
        let row = lane / 4 + 8 * r as u32;
        let dst = o_s.add(((warp * 16 + row) as usize) * D + 2 * t4 as usize);
        let mut j = 0;
        while j < 16 {
            *dst.add(8 * j) = o[j][2 * r];
            *dst.add(8 * j + 1) = o[j][2 * r + 1];
            j += 1;
        }
        if t4 == 0 {
            *m_s.add((warp * 16 + row) as usize) = m[r];
            *l_s.add((warp * 16 + row) as usize) = ls[r];
        }
        r += 1;
    }
    sync_threads();
    let row = tid / 8;
    let d0 = (tid % 8) as usize * 16;
    let mut mx = f32::NEG_INFINITY;
    let mut w = 0;
    while w < 4 {
        mx = fmax(mx, *m_s.add((w * 16 + row) as usize));
        w += 1;
    }
    let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
    let mut a = [0f32; 4];
    let mut lsum = 0f32;
    let mut w = 0;
    while w < 4 {
        a[w] = ex2(*m_s.add(w * 16 + row as usize) - base);
        lsum += a[w] * *l_s.add(w * 16 + row as usize);
        w += 1;
    }
    let rr = rg * ROWS + row;
    if rr < rows_total {
        let t = rr / g;
        let h = kvh * g + rr % g;
        let idx = (sp as usize * p.tokens as usize + t as usize) * p.n_heads as usize + h as usize;
        let inv = if lsum > 0.0 { 1.0 / lsum } else { 0.0 };
        let dst = (p.part_o as *mut f32).add(idx * D + d0);
        let mut d = 0;
        while d < 16 {
            let mut v = 0f32;
            let mut w = 0;
            while w < 4 {
                v += a[w] * *o_s.add((w * 16 + row as usize) * D + d0 + d);
                w += 1;
            }
            *dst.add(d) = v * inv;
            d += 1;
        }
        if tid % 8 == 0 {
            *(p.part_lse as *mut f32).add(idx) =
                if lsum > 0.0 { (mx + lg2(lsum)) * core::f32::consts::LN_2 } else { f32::NEG_INFINITY };
        }
    }
}

/// The keys of split `sp`: (start, first key, end key (exclusive), 64-key tiles). `start` comes from `start_dev`
/// when set; the context is clamped to the cache capacity (never read past it, whatever `start_dev` holds), and a
/// split past the context (only with `start_dev`) has no tiles: it writes O = 0, LSE = -inf.
///
/// # Safety
/// `p.start_dev` is 0 or points at a readable u32.
#[inline(always)]
pub(super) unsafe fn split_keys(p: &AttentionParams, sp: u32) -> (u32, u32, u32, u32) {
    let start = if p.start_dev != 0 { *(p.start_dev as *const u32) } else { p.start };
    let ctx = min_u32(start + p.tokens, p.capacity);
    let span = p.tiles_per_split * BN;
    let k_begin = sp * span;
    let k_end = if k_begin < ctx { min_u32(ctx, k_begin + span) } else { k_begin };
    (start, k_begin, k_end, (k_end - k_begin).div_ceil(BN))
}

#[inline(always)]
pub(super) fn min_u32(a: u32, b: u32) -> u32 {
    if a < b {
        a
    } else {
        b
    }
}
