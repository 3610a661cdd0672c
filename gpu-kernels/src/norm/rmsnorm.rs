//! `hga_rmsnorm`: RMSNorm over rows of bf16, f32 math, optional fused residual add.
//!
//! Shapes: x, residual, residual_out, out: bf16 [rows, dim]; weight: bf16 [dim]. See [`RmsNormParams`].
//! Grid: one block per row (grid.x = rows), block = 256 threads (any multiple of 32 up to 1024 works).
//! Shared memory: 32 f32 (static use of the dynamic area: the per-warp partial sums); launch with >= 128 bytes.
//! Math (transformers' Qwen3RMSNorm): `x' = bf16(x + residual)` when fused (and written to residual_out),
//! `h = bf16(x' * rsqrt(mean(x'^2) + eps))`, `out = bf16(weight * h)`. Sum of squares in f32.
//! Cost: reads the row twice (the second pass hits L1/L2), one write; memory-bound.
use crate::arch::*;
use crate::params::RmsNormParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_rmsnorm(p: RmsNormParams) {
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
    let out = (p.out as *mut u16).add(base);
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
    let mut i = tid;
    while i < dim {
        let h = bf16_to_f32(f32_to_bf16(load(i) * inv));
        *out.add(i) = f32_to_bf16(bf16_to_f32(*w.add(i)) * h);
        i += nt;
    }
}

/// Sum over the block (up to 32 warps) through the dynamic shared memory; every thread gets the result.
#[inline(always)]
unsafe fn block_sum(v: f32) -> f32 {
    let s = dyn_smem_ptr::<f32>();
    let warp = (thread_x() / 32) as usize;
    let nwarps = (block_dim_x() as usize).div_ceil(32);
    let v = warp_sum(v);
    if lane_id() == 0 {
        *s.add(warp) = v;
    }
    sync_threads();
    let mut t = 0f32;
    for k in 0..nwarps {
        t += *s.add(k);
    }
    t
}

/// Correctly rounded square root (`sqrt.rn.f32`).
#[inline(always)]
fn sqrt_rn(x: f32) -> f32 {
    let r: f32;
    unsafe { core::arch::asm!("sqrt.rn.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(pure, nomem, nostack)) };
    r
}
