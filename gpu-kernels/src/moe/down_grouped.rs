//! `hga_moe_down_grouped`: the prefill down products over each expert's token group: for sorted entry p,
//! `ys[perm[p], n] = down_e(q(inter[p]))_n` (f32, not yet weighted), so every (token, slot) gets its own row and
//! [`super::combine`] adds them in slot order (deterministic; no float atomics).
//!
//! Inputs: inter_q e4m3 [tokens * top_k, inter] + inter_s f32 [.., inter/128] (`hga_fp8_quant` of `inter`, sorted
//! rows), the grouping. Grid: (hidden / 32, ceil(tokens * top_k / 64) + experts); block = 128 threads (4 warps);
//! tiles as in [`super::gate_up_grouped`]: warp w = 16 sorted entries x 4 n-tiles of 8 output columns,
//! `mma.sync m16n8k32 e4m3` with k-permuted 16-byte fragments from global, scales per 128-wide k block.
//! No shared memory. Assumes hidden % 128 == 0, inter % 128 == 0.
use super::{grouped_product, tile_expert};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_GROUP_TILE_M};

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_down_grouped(p: MoeExpertParams) {
    entry_prologue();
    let (h, inter, ne) = (p.hidden as usize, p.inter_dim as usize, p.experts as usize);
    let ts = p.tile_start as *const u32;
    let Some(e) = tile_expert(ts, ne, block_y()) else { return };
    let offsets = p.offsets as *const u32;
    let row0 = *offsets.add(e) as usize + (block_y() as usize - *ts.add(e) as usize) * MOE_GROUP_TILE_M;
    let rend = *offsets.add(e + 1) as usize;
    let warp = (thread_x() / 32) as usize;
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let pw = row0 + 16 * warp;
    if pw >= rend {
        return;
    }
    let (pg, pg8) = (pw + g, pw + g + 8);
    let (rg, rg8) = (pg.min(rend - 1), pg8.min(rend - 1));
    let kbs = inter / 128;
    let hblk = h / 128;
    let (aq, as_) = (p.inter_q as *const u8, p.inter_s as *const f32);
    let c0 = block_x() as usize * 32;
    let mut b = [core::ptr::null::<u8>(); 4];
    let mut sb = [core::ptr::null::<f32>(); 4];
    for j in 0..4 {
        b[j] = (p.w_down as *const u8).add((e * h + c0 + 8 * j + g) * inter);
        sb[j] = (p.s_down as *const f32).add((e * hblk + c0 / 128) * kbs);
    }
    let tot = grouped_product::<4>(
        aq.add(rg * inter),
        aq.add(rg8 * inter),
        as_.add(rg * kbs),
        as_.add(rg8 * kbs),
        &b,
        &sb,
        kbs,
        t,
    );
    let perm = p.perm as *const u32;
    let ys = p.ys as *mut f32;
    let (eg, eg8) = (*perm.add(rg) as usize, *perm.add(rg8) as usize);
    for (j, v) in tot.iter().enumerate() {
        let col = c0 + 8 * j + 2 * t;
        if pg < rend {
            *ys.add(eg * h + col) = v[0];
            *ys.add(eg * h + col + 1) = v[1];
        }
        if pg8 < rend {
            *ys.add(eg8 * h + col) = v[2];
            *ys.add(eg8 * h + col + 1) = v[3];
        }
    }
}
