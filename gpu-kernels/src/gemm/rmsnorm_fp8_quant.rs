//! `hga_rmsnorm_fp8_quant`: RMSNorm (optionally with the fused residual add) followed by dynamic FP8 quantization
//! per token per 128-wide group, in one pass; the quantizer that feeds the FP8 linear layers (the input norm feeds
//! q/k/v, the post-attention norm feeds the MoE). See [`RmsNormQuantParams`].
//!
//! Shapes: x, residual, residual_out bf16 [rows, dim]; weight bf16 [dim]; q e4m3 [rows, dim]; scale f32
//! [rows, ceil(dim/128)]. Grid: one block per row; block = 256 threads (8 warps).
//! Two paths, chosen per launch (uniformly): when dim is whole 128-groups of aligned 16-byte vectors that fit 4 per
//! thread, the vector path (`rmsnorm_quant_vec`: the row in registers, one round trip to memory, a half-warp per
//! group); else the scalar path: phase 1 is `hga_rmsnorm`'s scalar loop, then warp w quantizes groups w, w + 8, ...
//! (lane handles elements lane + 32 i of the group). Both: warp/half-warp absmax, `scale = max(absmax, 1e-10) / 448`,
//! `q = e4m3(h / scale)` with h = bf16(weight * bf16(x' * inv)): the output is `hga_fp8_quant(hga_rmsnorm(x))`
//! up to the f32 order of the sum of squares, without the bf16 round trip through memory.
//! Shared memory: 32 f32 (the block sum); launch with >= 128 bytes.
use crate::arch::*;
use crate::num::{E4M3_MAX, FP8_ACT_EPS, FP8_GROUP};
use crate::params::RmsNormQuantParams;

/// 16-byte vectors (8 elements) per thread held in registers by the vector path.
const VPT: usize = 4;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_rmsnorm_fp8_quant(p: RmsNormQuantParams) {
    // The norm weight (constant) towards L2 while the previous kernel finishes: read after the block sum.
    prefetch_l2_early(p.weight as *const u8, 2 * p.dim as usize, thread_x() as usize, block_dim_x() as usize);
    entry_prologue();
    if block_x() >= p.rows {
        return;
    }
    // One uniform choice per launch: the register-resident vector path when the row is whole 128-groups of
    // aligned 16-byte vectors that fit VPT per thread (Qwen3: dim 2048, one vector per thread), else the scalar
    // two-pass loop.
    let aligned = (p.x | p.residual | p.residual_out | p.weight) % 16 == 0 && p.q % 8 == 0;
    if aligned && p.dim % FP8_GROUP as u32 == 0 && p.dim / 8 <= VPT as u32 * block_dim_x() && block_dim_x() % 32 == 0 {
        rmsnorm_quant_vec(&p)
    } else {
        rmsnorm_quant_scalar(&p)
    }
}

/// The vector path: every thread loads its (up to VPT) 16-byte vectors of x (and the residual) at once, writes the
/// sum, and keeps it in registers; after the block sum each 128-group is 16 consecutive vectors, i.e. one half-warp,
/// whose absmax is a 4-step shuffle; each thread then writes its 8 e4m3 bytes (one 8-byte store). One round trip to
/// memory instead of one per element loop step (the scalar loop's loads cannot pass its residual stores: they may
/// alias). Sums: per thread in vector order, then `block_sum` (the f32 order differs from the scalar path's; the
/// reference takes the mean of squares in f64).
#[inline(always)]
unsafe fn rmsnorm_quant_vec(p: &RmsNormQuantParams) {
    let nv = (p.dim / 8) as usize;
    let row = block_x() as usize;
    let base = 2 * row * p.dim as usize; // byte offset of the row (bf16)
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;
    let (x0, s0) = load_sum(p, base, nv, tid);
    let (x1, s1) = load_sum(p, base, nv, tid + nt);
    let (x2, s2) = load_sum(p, base, nv, tid + 2 * nt);
    let (x3, s3) = load_sum(p, base, nv, tid + 3 * nt);
    let total = block_sum((s0 + s1) + (s2 + s3));
    let inv = 1.0 / sqrt_rn(total / p.dim as f32 + p.eps);
    quant_vec(p, row, nv, tid, x0, inv);
    quant_vec(p, row, nv, tid + nt, x1, inv);
    quant_vec(p, row, nv, tid + 2 * nt, x2, inv);
    quant_vec(p, row, nv, tid + 3 * nt, x3, inv);
}

/// Vector `v` of the row: bf16(x + residual) (written to residual_out) or x, and its sum of squares (the code of
/// `hga_rmsnorm`'s vector path).
#[inline(always)]
unsafe fn load_sum(p: &RmsNormQuantParams, base: usize, nv: usize, v: usize) -> ([u32; 4], f32) {
    crate::norm::rmsnorm::load_residual_vec(p.x, p.residual, p.residual_out, base, nv, v)
}

/// Normalizes vector `v` (h = bf16(weight * bf16(x * inv))) and quantizes it with its 128-group's scale: the group
/// is the half-warp holding vectors 16 g .. 16 g + 15 (all 16 in range or none, as dim % 128 == 0).
#[inline(always)]
unsafe fn quant_vec(p: &RmsNormQuantParams, row: usize, nv: usize, v: usize, x: [u32; 4], inv: f32) {
    let live = v < nv;
    let mut h = [0f32; 8];
    let mut amax = 0f32;
    if live {
        let wt = ld_global_v4((p.weight as *const u8).add(16 * v));
        for k in 0..4 {
            let (a0, a1) = bf16x2_to_f32(x[k]);
            let (w0, w1) = bf16x2_to_f32(wt[k]);
            let (n0, n1) = bf16x2_to_f32(f32x2_to_bf16x2(a0 * inv, a1 * inv));
            let (h0, h1) = bf16x2_to_f32(f32x2_to_bf16x2(w0 * n0, w1 * n1));
            h[2 * k] = h0;
            h[2 * k + 1] = h1;
            amax = fmax(amax, fmax(fabs(h0), fabs(h1)));
        }
    }
    // Every lane shuffles (the whole warp is converged here); lanes of a half-warp share one group.
    amax = fmax(amax, shfl_xor_f32(amax, 8));
    amax = fmax(amax, shfl_xor_f32(amax, 4));
    amax = fmax(amax, shfl_xor_f32(amax, 2));
    amax = fmax(amax, shfl_xor_f32(amax, 1));
    if !live {
        return;
    }
    let a = if amax > FP8_ACT_EPS { amax } else { FP8_ACT_EPS };
    let scale = a / E4M3_MAX;
    let q2 = |k: usize| f32x2_to_e4m3x2(h[2 * k] / scale, h[2 * k + 1] / scale) as u32;
    let lo = q2(0) | (q2(1) << 16);
    let hi = q2(2) | (q2(3) << 16);
    let dst = (p.q as *mut u8).add(row * p.dim as usize + 8 * v);
    core::arch::asm!("st.global.v2.u32 [{0}], {{{1}, {2}}};", in(reg64) dst, in(reg32) lo, in(reg32) hi,
        options(nostack));
    if v % 16 == 0 {
        *(p.scale as *mut f32).add(row * (p.dim as usize / FP8_GROUP) + v / 16) = scale;
    }
}

#[inline(always)]
unsafe fn rmsnorm_quant_scalar(p: &RmsNormQuantParams) {
    let p = *p;
    let row = block_x();
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
