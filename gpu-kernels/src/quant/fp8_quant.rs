//! `hga_fp8_quant` / `hga_fp8_dequant`: dynamic FP8 (e4m3fn) activation quantization per token per 128-wide group,
//! and its inverse. See [`Fp8QuantParams`].
//!
//! Grid: one warp per (row, group): grid.x = ceil(rows * ceil(k/128) / 8), block = 256 threads (8 warps).
//! Each lane handles the elements lane + 32 i, i < 4, of its group (coalesced 2-byte loads; a partial last group
//! is padded with zeros). Quantize: absmax by warp max, `scale = max(absmax, 1e-10) / 448`, `q = e4m3(x / scale)`
//! (IEEE division, so the result is bit-identical to `num::f32_to_e4m3(x / num::fp8_group_scale(absmax))`).
//! No shared memory. Memory-bound; the fused quantizer inside the FP8 GEMM is a later kernel.
use crate::arch::*;
use crate::num::{E4M3_MAX, FP8_ACT_EPS, FP8_GROUP};
use crate::params::Fp8QuantParams;

#[inline(always)]
fn warp_group(p: &Fp8QuantParams) -> Option<(usize, usize, usize)> {
    let groups = (p.k as usize).div_ceil(FP8_GROUP);
    let w = (block_x() * (block_dim_x() / 32) + thread_x() / 32) as usize;
    if w >= p.rows as usize * groups {
        return None;
    }
    Some((w / groups, w % groups, groups))
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_quant(p: Fp8QuantParams) {
    entry_prologue();
    let Some((row, g, groups)) = warp_group(&p) else { return };
    let k = p.k as usize;
    let x = p.x as *const u16;
    let q = p.q as *mut u8;
    let lane = lane_id() as usize;
    let mut v = [0f32; 4];
    let mut amax = 0f32;
    for (i, vi) in v.iter_mut().enumerate() {
        let c = g * FP8_GROUP + lane + 32 * i;
        if c < k {
            *vi = bf16_to_f32(*x.add(row * k + c));
            amax = fmax(amax, fabs(*vi));
        }
    }
    let amax = warp_max(amax);
    let a = if amax > FP8_ACT_EPS { amax } else { FP8_ACT_EPS };
    let scale = a / E4M3_MAX;
    for (i, vi) in v.iter().enumerate() {
        let c = g * FP8_GROUP + lane + 32 * i;
        if c < k {
            *q.add(row * k + c) = f32x2_to_e4m3x2(*vi / scale, 0.0) as u8;
        }
    }
    if lane == 0 {
        *(p.scale as *mut f32).add(row * groups + g) = scale;
    }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_dequant(p: Fp8QuantParams) {
    entry_prologue();
    let Some((row, g, groups)) = warp_group(&p) else { return };
    let k = p.k as usize;
    let x = p.x as *mut u16;
    let q = p.q as *const u8;
    let scale = *(p.scale as *const f32).add(row * groups + g);
    let lane = lane_id() as usize;
    for i in 0..4 {
        let c = g * FP8_GROUP + lane + 32 * i;
        if c < k {
            let (f, _) = e4m3x2_to_f32x2(*q.add(row * k + c) as u16);
            *x.add(row * k + c) = f32_to_bf16(f * scale);
        }
    }
}
