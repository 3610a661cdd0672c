//! `hga_rmsnorm_fp8_quant`: RMSNorm (optionally with the fused residual add) followed by dynamic FP8 quantization
//! per token per 128-wide group, in one pass; the quantizer that feeds the FP8 linear layers (the input norm feeds
//! q/k/v, the post-attention norm feeds the MoE). See [`RmsNormQuantParams`].
//!
//! Shapes: x, residual, residual_out bf16 [rows, dim]; weight bf16 [dim]; q e4m3 [rows, dim]; scale f32
//! [rows, ceil(dim/128)]. Grid: one block per row; block = 256 threads (8 warps).
//! Phase 1 is `hga_rmsnorm`'s, thread for thread (same element order, same block sum, same `1 / sqrt.rn`), so the
//! normalized bf16 row `h = bf16(weight * bf16(x' * inv))` is bit-identical to what `hga_rmsnorm` writes. Phase 2:
//! warp w quantizes groups w, w + 8, ... exactly as `hga_fp8_quant` does (lane handles elements lane + 32 i of the
//! group, warp absmax, `scale = max(absmax, 1e-10) / 448`, `q = e4m3(h / scale)`): the output equals
//! `hga_fp8_quant(hga_rmsnorm(x))` bit for bit, without the bf16 round trip through memory (reads x (and residual)
//! twice, the second time from L1/L2; writes 1 byte per element instead of 2 + 2 + 1).
//! Shared memory: 32 f32 (the block sum); launch with >= 128 bytes.
use crate::arch::*;
use crate::num::{E4M3_MAX, FP8_ACT_EPS, FP8_GROUP};
use crate::params::RmsNormQuantParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_rmsnorm_fp8_quant(p: RmsNormQuantParams) {
    let row = block_x();
    if row >= p.rows {
        return;
    }
    let dim = p.dim as usize;
    let base = row as usize * dim;
    let x = (p.x as *const u16).add(base);
    let fused = p.residual != 0;
    let res = (p.residual as *const u16).wrapping_add(base);
    let res_out = (p.residual_out as *mut u16).wrapping_add(base);
    let w = p.weight as *const u16;
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;

    let load = |i: usize| -> f32 {
        let v = bf16_to_f32(*x.add(i));
        if fused {
            bf16_to_f32(f32_to_bf16(v + bf16_to_f32(*res.add(i))))
        } else {
            v
        }
    };

    let mut ss = 0f32;
    let mut i = tid;
    while i < dim {
        let v = load(i);
        if fused {
            *res_out.add(i) = f32_to_bf16(v);
        }
        ss += v * v;
        i += nt;
    }
    let total = block_sum(ss);
    let inv = 1.0 / sqrt_rn(total / dim as f32 + p.eps);

    let groups = dim.div_ceil(FP8_GROUP);
    let q = (p.q as *mut u8).add(base);
    let sc = (p.scale as *mut f32).add(row as usize * groups);
    let lane = lane_id() as usize;
    let nwarps = nt / 32;
    let mut gi = tid / 32;
    while gi < groups {
        let mut v = [0f32; 4];
        let mut amax = 0f32;
        for (e, ve) in v.iter_mut().enumerate() {
            let c = gi * FP8_GROUP + lane + 32 * e;
            if c < dim {
                let h = bf16_to_f32(f32_to_bf16(load(c) * inv));
                *ve = bf16_to_f32(f32_to_bf16(bf16_to_f32(*w.add(c)) * h));
                amax = fmax(amax, fabs(*ve));
            }
        }
        let amax = warp_max(amax);
        let a = if amax > FP8_ACT_EPS { amax } else { FP8_ACT_EPS };
        let scale = a / E4M3_MAX;
        for (e, ve) in v.iter().enumerate() {
            let c = gi * FP8_GROUP + lane + 32 * e;
            if c < dim {
                *q.add(c) = f32x2_to_e4m3x2(*ve / scale, 0.0) as u8;
            }
        }
        if lane == 0 {
            *sc.add(gi) = scale;
        }
        gi += nwarps;
    }
}
