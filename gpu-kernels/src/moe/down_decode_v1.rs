//! `hga_moe_down_decode_v1`: version 1 of [`super::down_decode`], kept for comparison (bench_moe prints both).
//! The few-token (decode) down products and the routing-weighted sum over slots:
//! `out[token, n] = bf16(sum over slots s in order of weights[token, s] * down_e(q(inter[token * top_k + s]))_n)`.
//!
//! Grid: (hidden / 16, tokens); block = 256 threads (8 warps). Block (bx, token) owns output rows 16 bx .. +16;
//! warp w takes slots w, w + 8, ...: it streams the 16 down rows of that slot's expert (16 x inter bytes), each
//! 128-wide k block of the slot's intermediate row quantized in registers (the `hga_fp8_quant` rule), weights as
//! the A operand of `mma.sync m16n8k32 e4m3` (k-permuted 16-byte loads), scales applied per k block; two k blocks'
//! loads in flight. Each slot's weighted rows go to shared memory [top_k][16] and are summed in slot order
//! (deterministic, no atomics). All of a step's down weights stream in this one launch.
//! Shared memory: top_k * 16 f32 (<= 2 KB). Assumes hidden % 128 == 0, inter % 128 == 0, top_k <= 32.
use super::{decode_block_product, quant_group_frag};
use crate::arch::*;
use crate::params::MoeExpertParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_down_decode_v1(p: MoeExpertParams) {
    entry_prologue();
    let (h, inter, k) = (p.hidden as usize, p.inter_dim as usize, p.top_k as usize);
    let token = block_y() as usize;
    let n0 = block_x() as usize * 16;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, (lane % 4) as usize);
    let kbs = inter / 128;
    let hblk = h / 128;
    let sm = dyn_smem_ptr::<f32>(); // [top_k][16]
    let mut s = warp;
    while s < k {
        let pair = token * k + s;
        let e = *(p.ids as *const u32).add(pair) as usize;
        let rw = *(p.weights as *const f32).add(pair);
        let wd = (p.w_down as *const u8).add((e * h + n0) * inter);
        let sd = (p.s_down as *const f32).add((e * hblk + n0 / 128) * kbs);
        let a = (p.inter as *const u16).add(pair * inter);
        let mut tot = [0f32; 4];
        let mut kb = 0;
        while kb < kbs {
            let two = kb + 1 < kbs;
            let b = quant_group_frag(a.add(kb * 128), lane);
            let c =
                decode_block_product(wd.add(g * inter + kb * 128), wd.add((g + 8) * inter + kb * 128), &(b.0, b.1), t);
            let (mut c2, mut s2) = ([0f32; 4], 0f32);
            if two {
                let kb2 = kb + 1;
                let b2 = quant_group_frag(a.add(kb2 * 128), lane);
                c2 = decode_block_product(
                    wd.add(g * inter + kb2 * 128),
                    wd.add((g + 8) * inter + kb2 * 128),
                    &(b2.0, b2.1),
                    t,
                );
                s2 = b2.2 * *sd.add(kb2);
            }
            let f = b.2 * *sd.add(kb);
            for r in 0..4 {
                tot[r] += c[r] * f + c2[r] * s2;
            }
            kb += 2;
        }
        if t == 0 {
            *sm.add(s * 16 + g) = tot[0] * rw;
            *sm.add(s * 16 + g + 8) = tot[2] * rw;
        }
        s += 8;
    }
    sync_threads();
    if tid < 16 {
        let mut acc = 0f32;
        for s in 0..k {
            acc += *sm.add(s * 16 + tid);
        }
        *(p.out as *mut u16).add(token * h + n0 + tid) = f32_to_bf16(acc);
    }
}
