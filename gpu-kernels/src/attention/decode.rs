//! The pieces of the split-K (flash-decoding) decode kernel [`super::decode_v3`]: the keys of a split
//! ([`split_keys`]) and the end of a split, the cross-warp merge of the 4 warps' online-softmax states and the
//! write of the split's partial output and LSE ([`write_split`]), merged by `hga_attention_merge_v2`.
//!
//! Rows: the (token, query head) pairs of one KV head, row r = t * g + j for query head kvh * g + j
//! (g = n_heads / n_kv_heads): all the query heads of a KV head share every K/V load (8 rows for Qwen3's 32/4 at
//! one token), 16 rows per CTA.
//! Grid: (n_kv_heads * ceil(tokens * g / 16), n_splits). Split s takes the keys
//! [s * tiles_per_split * 64, min(ctx, (s + 1) * tiles_per_split * 64)), ctx = start + tokens (the plain launcher
//! makes every split non-empty; with `start_dev`, start is read from the device and splits past ctx are empty).
//! Causal: token t sees keys < start + t + 1; a split with no visible key for a row writes O = 0, LSE = -inf
//! (weight 0 in the merge). Partial last tile: rows past the end repeat the last key and are masked.
use super::tile::*;
use crate::arch::*;
use crate::params::AttentionParams;

const BN: u32 = 64;
const ROWS: u32 = 16;

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
