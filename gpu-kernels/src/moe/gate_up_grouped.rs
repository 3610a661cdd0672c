//! `hga_moe_gate_up_grouped`: the prefill gate/up products over each expert's token group, with the SiLU*up
//! epilogue: for sorted entry p (token = perm[p] / top_k, expert e = the group p falls in),
//! `inter[p, i] = bf16(silu(gate_e(x_token)_i) * up_e(x_token)_i)` — rows in sorted (grouped) order.
//!
//! Inputs: xq e4m3 [tokens, hidden] + xs f32 [tokens, hidden/128] (`hga_fp8_quant` of x), the grouping (perm,
//! offsets, tile_start). Grid: (inter / 32, ceil(tokens * top_k / 64) + experts) (an upper bound on the tiles;
//! blocks past tile_start[experts] exit); block = 128 threads (4 warps). Block (bx, y): expert e with
//! tile_start[e] <= y < tile_start[e+1], entries offsets[e] + 64 (y - tile_start[e]) .. +64 (clipped to the group),
//! intermediate columns 32 bx .. +32. Warp w: 16 entries x (4 gate + 4 up n-tiles of 8 columns), `mma.sync m16n8k32
//! e4m3` with k-permuted 16-byte fragments from global (activation rows gathered through perm; weight tiles shared
//! by the 4 warps through L1), scales per 128-wide k block. Epilogue in registers (gate and up tiles share the C
//! layout). No shared memory. Assumes hidden % 128 == 0, inter % 128 == 0.
use super::{grouped_product, silu, tile_expert};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_GROUP_TILE_M};

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_gate_up_grouped(p: MoeExpertParams) {
    entry_prologue();
    let (h, inter, ne, k) = (p.hidden as usize, p.inter_dim as usize, p.experts as usize, p.top_k as usize);
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
    let perm = p.perm as *const u32;
    let kbs = h / 128;
    let tok_g = *perm.add(pg.min(rend - 1)) as usize / k;
    let tok_g8 = *perm.add(pg8.min(rend - 1)) as usize / k;
    let (xq, xs) = (p.xq as *const u8, p.xs as *const f32);
    let c0 = block_x() as usize * 32;
    let sblk = inter / 128;
    let mut bg = [core::ptr::null::<u8>(); 4];
    let mut bu = [core::ptr::null::<u8>(); 4];
    for j in 0..4 {
        let row = e * inter + c0 + 8 * j + g;
        bg[j] = (p.w_gate as *const u8).add(row * h);
        bu[j] = (p.w_up as *const u8).add(row * h);
    }
    let sg = (p.s_gate as *const f32).add((e * sblk + c0 / 128) * kbs);
    let su = (p.s_up as *const f32).add((e * sblk + c0 / 128) * kbs);
    let (ag, ag8) = (xq.add(tok_g * h), xq.add(tok_g8 * h));
    let (sag, sag8) = (xs.add(tok_g * kbs), xs.add(tok_g8 * kbs));
    // Gate and up as two NT = 4 products (NT = 8 does not stay in registers); the second re-reads the activation
    // rows from L1.
    let tg = grouped_product::<4>(ag, ag8, sag, sag8, &bg, &[sg; 4], kbs, t);
    let tu = grouped_product::<4>(ag, ag8, sag, sag8, &bu, &[su; 4], kbs, t);
    let out = p.inter as *mut u16;
    for j in 0..4 {
        let col = c0 + 8 * j + 2 * t;
        let (gt, ut) = (tg[j], tu[j]);
        if pg < rend {
            let v = f32x2_to_bf16x2(silu(gt[0]) * ut[0], silu(gt[1]) * ut[1]);
            *(out.add(pg * inter + col) as *mut u32) = v;
        }
        if pg8 < rend {
            let v = f32x2_to_bf16x2(silu(gt[2]) * ut[2], silu(gt[3]) * ut[3]);
            *(out.add(pg8 * inter + col) as *mut u32) = v;
        }
    }
}
