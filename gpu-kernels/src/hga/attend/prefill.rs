//! `hga_attend_prefill`: routed attention of a prefill block of up to 64 consecutive query tokens (positions
//! pos .. pos + tokens - 1) that share one entry list per KV head (routed jointly), causal per query by the rule of
//! `params::HgaAttendParams` (inside the local window and the open group this is the dense causal mask); per-split
//! partial O and LSE merged by `hga_attention_merge_v2` (rows = tokens x n_heads).
//!
//! Rows: row r = t * g + j (token t, query head kvh * g + j), 64 rows per CTA, warp w owns rows 16w..16w+15 (the
//! layout of the dense prefill, with the query heads of a KV head side by side so that they share the K/V tiles).
//! Grid: (n_splits, n_kv_heads * ceil(tokens * g / 64)); split s takes entries [4 s T, 4 (s + 1) T) clipped to
//! n_entries (T = tiles_per_split); a split past n_entries writes O = 0, LSE = -inf. Block: 128 threads = 4 warps;
//! per tile of 4 entries every warp runs the FlashAttention-2 step (`attention::tile::attend_tile`, 16 keys) on each
//! entry with that entry's first position as the key base. No cross-warp merge: each warp writes its own rows.
//! Shared memory (dynamic, `HGA_ATTEND_PREFILL_SMEM` = 80 KB): the 64 Q rows (16 KB) and 2 stages of (K, V) tiles
//! (`cp.async` double buffer).
//! Rows of an entry past the CTA's last query position are zero-filled, not read.
//! Assumes: head_dim 128, n_heads a multiple of n_kv_heads, 1 <= tokens, every query row sees at least one key of
//! the list (the sink).
use super::{entry_pos, load_tile, min_u32, position_and_count, split_entries, EPT, NTHREADS, STAGE, TILE};
use crate::arch::*;
use crate::attention::tile::*;
use crate::params::HgaAttendParams;

const ROWS: u32 = 64;
const Q_BYTES: u32 = ROWS * ROW_BYTES;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attend_prefill(p: HgaAttendParams) {
    entry_prologue();
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
    let row_tok = |r: u32| min_u32(rg * ROWS + r, rows_total - 1) / g;
    let pmax = pos + row_tok(ROWS - 1);

    let smem = dyn_smem_addr();
    let q_s = smem;
    let stage = |i: u32| smem + Q_BYTES + i * STAGE;
    if n_tiles > 0 {
        let mut id = tid;
        while id < ROWS * 16 {
            let (r, c) = (id / 16, id % 16);
            let rr = min_u32(rg * ROWS + r, rows_total - 1);
            let (t, h) = (rr / g, kvh * g + rr % g);
            let src = (p.q as *const u16).add((t as usize * p.n_heads as usize + h as usize) * D + c as usize * 8);
            cp_async_16(q_s + swz(r, c), src as *const u8);
            id += NTHREADS;
        }
        load_tile(stage(0), &p, kvh, e_begin, e_end, pmax, tid);
    }
    cp_async_commit();
    let lim = [pos + row_tok(warp * 16 + lane / 4) + 1, pos + row_tok(warp * 16 + lane / 4 + 8) + 1];

    let mut qf = [[0u32; 4]; 8];
    let mut o = [[0f32; 4]; 16];
    let mut m = [f32::NEG_INFINITY; 2];
    let mut l = [0f32; 2];
    let mut kt = 0;
    while kt < n_tiles {
        let e0 = e_begin + kt * EPT;
        let mut ep = [0u32; EPT as usize];
        let mut i = 0;
        while i < EPT {
            ep[i as usize] = entry_pos(&p, kvh, min_u32(e0 + i, e_end - 1));
            i += 1;
        }
        if kt + 1 < n_tiles {
            load_tile(stage((kt + 1) & 1), &p, kvh, e0 + EPT, e_end, pmax, tid);
            cp_async_commit();
            cp_async_wait::<1>();
        } else {
            cp_async_wait::<0>();
        }
        sync_threads();
        if kt == 0 {
            qf = q_frags(q_s, warp * 16);
        }
        let st = stage(kt & 1);
        let mut i = 0;
        while i < EPT {
            // Uniform over the CTA: the entry exists and some row of the CTA sees its first key.
            if e0 + i < e_end && ep[i as usize] <= pmax {
                attend_tile::<2, 1, true, false>(
                    &qf,
                    st,
                    st + TILE,
                    i * 16,
                    ep[i as usize],
                    lim,
                    p.scale_log2,
                    &mut m,
                    &mut l,
                    &mut o,
                );
            }
            i += 1;
        }
        sync_threads();
        kt += 1;
    }

    // Each warp writes its 16 rows: normalized O and the LSE (O = 0, LSE = -inf for a row with no visible key).
    let ls = row_sums(l);
    let t4 = lane % 4;
    let mut r = 0;
    while r < 2 {
        let rr = rg * ROWS + warp * 16 + lane / 4 + 8 * r as u32;
        if rr < rows_total {
            let (t, h) = (rr / g, kvh * g + rr % g);
            let idx = (sp as usize * p.tokens as usize + t as usize) * p.n_heads as usize + h as usize;
            let inv = if ls[r] > 0.0 { 1.0 / ls[r] } else { 0.0 };
            let dst = (p.part_o as *mut f32).add(idx * D + 2 * t4 as usize);
            let mut j = 0;
            while j < 16 {
                *(dst.add(8 * j) as *mut [f32; 2]) = [o[j][2 * r] * inv, o[j][2 * r + 1] * inv];
                j += 1;
            }
            if t4 == 0 {
                *(p.part_lse as *mut f32).add(idx) =
                    if ls[r] > 0.0 { (m[r] + lg2(ls[r])) * core::f32::consts::LN_2 } else { f32::NEG_INFINITY };
            }
        }
        r += 1;
    }
}
