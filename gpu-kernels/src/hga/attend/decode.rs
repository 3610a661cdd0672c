//! `hga_attend_decode_s2` / `_s3`: routed split-K decode attention over the attention entry list (see the module
//! docs of `hga::attend` and `params::HgaAttendParams`), for a few query tokens; per-split partial O and LSE in the
//! dense decode's format, merged by `hga_attention_merge_v2` (or `hga_attention_merge`).
//!
//! Rows: the (token, query head) pairs of one KV head, row r = t * g + j for query head kvh * g + j
//! (g = n_heads / n_kv_heads), 16 rows per CTA: all the query heads of a KV head share each group block load.
//! Grid: (n_splits, n_kv_heads * ceil(tokens * g / 16)); split s takes entries [4 s T, 4 (s + 1) T) of the KV head
//! (T = tiles_per_split), clipped to n_entries (read on the device); a split past n_entries writes O = 0,
//! LSE = -inf. Block: 128 threads = 4 warps; per tile of 4 entries (64 keys), warp w takes entry w (S = Q K^T: 16
//! mma, O += P V: 16 mma) with its own online-softmax state; at the end the 4 warp states are merged through shared
//! memory and the CTA writes its split's normalized O and LSE.
//! Shared memory (dynamic, `hga_attend_decode_smem(S)` = S x 32 KB): an S-stage `cp.async` ring of (K, V) tiles
//! (as the dense `decode_v3`: S - 1 tiles in flight, one barrier per tile); the 16 Q rows are staged in slot S - 1
//! with tile 0's group and read into registers before that slot's first fill; the final merge reuses the ring.
//! With T <= S - 1 every tile of a split is requested at once (the 2K-token decode of the benchmark: T = 1).
//! Causal: token t (position pos + t) sees row r of entry e iff entry_pos + r <= pos + t (the dense mask with the
//! entry's first position as the key base); rows past the CTA's last position are zero-filled, not read.
//! Assumes: head_dim 128, n_heads a multiple of n_kv_heads, every query row sees at least one key of the list (the
//! sink), tokens >= 1.
use super::{entry_pos, load_tile, min_u32, position_and_count, split_entries, NTHREADS, STAGE, TILE};
use crate::arch::*;
use crate::attention::tile::*;
use crate::params::HgaAttendParams;

const ROWS: u32 = 16;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attend_decode_s2(p: HgaAttendParams) {
    entry_prologue();
    decode_ring::<2, 0>(p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attend_decode_s3(p: HgaAttendParams) {
    entry_prologue();
    decode_ring::<3, 1>(p)
}

/// The decode with an `S`-stage ring; `W` = S - 2 (the `cp.async.wait_group` count).
#[inline(always)]
unsafe fn decode_ring<const S: u32, const W: u32>(p: HgaAttendParams) {
    const { assert!(S >= 2 && W + 2 == S) };
    let g = p.n_heads / p.n_kv_heads;
    let rows_total = p.tokens * g;
    let rgroups = rows_total.div_ceil(ROWS);
    let sp = block_x();
    let kvh = block_y() / rgroups;
    let rg = block_y() % rgroups;
    let tid = thread_x();
    let warp = tid / 32;
    let lane = lane_id();
    let (pos, ne) = position_and_count(&p, kvh);
    let (e_begin, e_end, n_tiles) = split_entries(&p, sp, ne);
    // The CTA's last query position (its last row's token).
    let pmax = pos + min_u32(rg * ROWS + ROWS - 1, rows_total - 1) / g;
    if n_tiles == 0 {
        write_empty(&p, kvh, rg, sp, g, rows_total);
        return;
    }
    let smem = dyn_smem_addr();
    let slot = |i: u32| smem + i * STAGE;
    let q_s = slot(S - 1);
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
    // Prologue: tiles 0..S-2 into slots 0..S-2, one group each (group 0 also holds Q).
    let mut i = 0;
    while i < S - 1 {
        if i < n_tiles {
            load_tile(slot(i), &p, kvh, e_begin + i * 4, e_end, pmax, tid);
        }
        cp_async_commit();
        i += 1;
    }
    let row_tok = |r: u32| min_u32(rg * ROWS + r, rows_total - 1) / g;
    let lim = [pos + row_tok(lane / 4) + 1, pos + row_tok(lane / 4 + 8) + 1];

    cp_async_wait::<W>();
    sync_threads();
    let qf = q_frags(q_s, 0);
    sync_threads();

    let mut o = [[0f32; 4]; 16];
    let mut m = [f32::NEG_INFINITY; 2];
    let mut l = [0f32; 2];
    let mut rd = 0;
    let mut wr = S - 1;
    let mut kt = 0;
    while kt < n_tiles {
        // This warp's entry of tile kt: its position is loaded before the wait (the latency overlaps it).
        let e = e_begin + kt * 4 + warp;
        let epos = entry_pos(&p, kvh, min_u32(e, e_end - 1));
        cp_async_wait::<W>();
        sync_threads();
        let nt = kt + S - 1;
        if nt < n_tiles {
            load_tile(slot(wr), &p, kvh, e_begin + nt * 4, e_end, pmax, tid);
        }
        cp_async_commit();
        if e < e_end && epos <= pmax {
            let st = slot(rd);
            attend_tile::<2, 1, true, false>(
                &qf,
                st,
                st + TILE,
                warp * 16,
                epos,
                lim,
                p.scale_log2,
                &mut m,
                &mut l,
                &mut o,
            );
        }
        rd = if rd + 1 == S { 0 } else { rd + 1 };
        wr = if wr + 1 == S { 0 } else { wr + 1 };
        kt += 1;
    }
    cp_async_wait::<0>();
    sync_threads();
    write_split(&p, dyn_smem_ptr::<f32>(), &o, m, l, kvh, rg, sp, g, rows_total);
}

/// Index of (split, token, head) in the partials.
#[inline(always)]
fn part_index(p: &HgaAttendParams, sp: u32, rr: u32, kvh: u32, g: u32) -> usize {
    let t = rr / g;
    let h = kvh * g + rr % g;
    (sp as usize * p.tokens as usize + t as usize) * p.n_heads as usize + h as usize
}

/// A split with no entry: O = 0, LSE = -inf for the CTA's rows (thread tid: row tid / 8, dims 16 (tid % 8) ..).
#[inline(always)]
unsafe fn write_empty(p: &HgaAttendParams, kvh: u32, rg: u32, sp: u32, g: u32, rows_total: u32) {
    let tid = thread_x();
    let rr = rg * ROWS + tid / 8;
    if rr >= rows_total {
        return;
    }
    let idx = part_index(p, sp, rr, kvh, g);
    let dst = (p.part_o as *mut f32).add(idx * D + (tid % 8) as usize * 16);
    let mut d = 0;
    while d < 16 {
        st_global_v4(dst.add(d) as *mut u8, [0; 4]);
        d += 4;
    }
    if tid % 8 == 0 {
        *(p.part_lse as *mut f32).add(idx) = f32::NEG_INFINITY;
    }
}

/// End of a split: merges the 4 warps' online-softmax states through shared memory at `o_s` (O f32 [4][16][128]
/// unnormalized, then m and l [4][16]: 33280 bytes) and writes the split's normalized O and its LSE (O = 0,
/// LSE = -inf for a row with no visible key). All 128 threads call, after the barrier that ends the ring.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn write_split(
    p: &HgaAttendParams,
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
    let rr = rg * ROWS + row;
    if rr >= rows_total {
        return;
    }
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
    let idx = part_index(p, sp, rr, kvh, g);
    let inv = if lsum > 0.0 { 1.0 / lsum } else { 0.0 };
    let dst = (p.part_o as *mut f32).add(idx * D + d0);
    let mut d = 0;
    while d < 16 {
        let mut v = [0f32; 4];
        let mut k = 0;
        while k < 4 {
            let mut w = 0;
            while w < 4 {
                v[k] += a[w] * *o_s.add((w * 16 + row as usize) * D + d0 + d + k);
                w += 1;
            }
            v[k] *= inv;
            k += 1;
        }
        st_global_v4(dst.add(d) as *mut u8, v.map(f32::to_bits));
        d += 4;
    }
    if tid % 8 == 0 {
        *(p.part_lse as *mut f32).add(idx) =
            if lsum > 0.0 { (mx + lg2(lsum)) * core::f32::consts::LN_2 } else { f32::NEG_INFINITY };
    }
}
