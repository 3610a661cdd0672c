//! `hga_moe_gate_up_decode_v1`: version 1 of [`super::gate_up_decode`], kept for comparison (bench_moe prints both).
//! The few-token (decode) gate/up products of every (token, slot), with the SiLU*up
//! epilogue: `inter[token * top_k + slot, i] = bf16(silu(gate_e(x)_i) * up_e(x)_i)`, e = ids[token, slot].
//!
//! Grid: (inter / 16, tokens * top_k); block = 128 threads (4 warps). Block (bx, pair) owns intermediate columns
//! 16 bx .. +16 of one (token, slot): 16 gate rows and 16 up rows of its expert (2 x 16 x hidden bytes of FP8,
//! each byte read once in the whole launch: all the step's experts stream in this one launch). Warp w takes the
//! 128-wide k blocks w, w + 4, ...; per block it quantizes the token's 128 activations (the `hga_fp8_quant` rule,
//! in registers) and runs the weights as the A operand of `mma.sync m16n8k32 e4m3` (k-permuted 16-byte loads,
//! `ld.global.nc.L1::no_allocate`) against the activation as column 0 of B; the raw product is scaled by
//! weight_scale_inv * activation scale per k block. Two k blocks' loads are in flight per warp.
//! The 4 warps' sums meet in shared memory and are added in warp order (deterministic).
//! Shared memory: 4 * 16 * 2 f32 (512 bytes). Assumes hidden % 128 == 0, inter % 128 == 0 (launcher checks).
use super::{decode_block_product, quant_group_frag, silu};
use crate::arch::*;
use crate::params::MoeExpertParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_gate_up_decode_v1(p: MoeExpertParams) {
    entry_prologue();
    let (h, inter) = (p.hidden as usize, p.inter_dim as usize);
    let pair = block_y() as usize;
    let token = pair / p.top_k as usize;
    let e = *(p.ids as *const u32).add(pair) as usize;
    let i0 = block_x() as usize * 16;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, (lane % 4) as usize);
    let kbs = h / 128;
    let sblk = inter / 128;
    let wg = (p.w_gate as *const u8).add((e * inter + i0) * h);
    let wu = (p.w_up as *const u8).add((e * inter + i0) * h);
    let sg = (p.s_gate as *const f32).add((e * sblk + i0 / 128) * kbs);
    let su = (p.s_up as *const f32).add((e * sblk + i0 / 128) * kbs);
    let x = (p.x as *const u16).add(token * h);
    let (mut tg, mut tu) = ([0f32; 4], [0f32; 4]);
    let mut kb = warp;
    while kb < kbs {
        let kb2 = kb + 4;
        let two = kb2 < kbs;
        let b = quant_group_frag(x.add(kb * 128), lane);
        let ag = decode_block_product(wg.add(g * h + kb * 128), wg.add((g + 8) * h + kb * 128), &(b.0, b.1), t);
        let au = decode_block_product(wu.add(g * h + kb * 128), wu.add((g + 8) * h + kb * 128), &(b.0, b.1), t);
        let (mut ag2, mut au2, mut s2) = ([0f32; 4], [0f32; 4], 0f32);
        if two {
            let b2 = quant_group_frag(x.add(kb2 * 128), lane);
            ag2 = decode_block_product(wg.add(g * h + kb2 * 128), wg.add((g + 8) * h + kb2 * 128), &(b2.0, b2.1), t);
            au2 = decode_block_product(wu.add(g * h + kb2 * 128), wu.add((g + 8) * h + kb2 * 128), &(b2.0, b2.1), t);
            s2 = b2.2;
        }
        let (fg, fu) = (*sg.add(kb) * b.2, *su.add(kb) * b.2);
        for r in 0..4 {
            tg[r] += ag[r] * fg;
            tu[r] += au[r] * fu;
        }
        if two {
            let (fg, fu) = (*sg.add(kb2) * s2, *su.add(kb2) * s2);
            for r in 0..4 {
                tg[r] += ag2[r] * fg;
                tu[r] += au2[r] * fu;
            }
        }
        kb += 8;
    }
    let sm = dyn_smem_ptr::<f32>(); // [4 warps][16 rows][gate, up]
    if t == 0 {
        let s = sm.add(warp * 32);
        *s.add(2 * g) = tg[0];
        *s.add(2 * g + 1) = tu[0];
        *s.add(2 * (g + 8)) = tg[2];
        *s.add(2 * (g + 8) + 1) = tu[2];
    }
    sync_threads();
    if tid < 16 {
        let (mut gs, mut us) = (0f32, 0f32);
        for w in 0..4 {
            gs += *sm.add(w * 32 + 2 * tid);
            us += *sm.add(w * 32 + 2 * tid + 1);
        }
        *(p.inter as *mut u16).add(pair * inter + i0 + tid) = f32_to_bf16(silu(gs) * us);
    }
}
