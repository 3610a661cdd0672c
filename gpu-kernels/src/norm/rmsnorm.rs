//! `hga_rmsnorm`: RMSNorm over rows of bf16, f32 math, optional fused residual add.
//!
//! Shapes: x, residual, residual_out, out: bf16 [rows, dim]; weight: bf16 [dim]. See [`RmsNormParams`].
//! Grid: one block per row (grid.x = rows), block = 256 threads (any multiple of 32 up to 1024 works).
//! Two paths, chosen once per launch: 16-byte vectors held in registers (dim % 8 == 0, 16-byte aligned buffers,
//! dim <= 8192 at 256 threads: the row is read once), else a scalar loop that reads the row twice.
//! Shared memory: 32 f32 (static use of the dynamic area: the per-warp partial sums); launch with >= 128 bytes.
//! Math (transformers' Qwen3RMSNorm): `x' = bf16(x + residual)` when fused (and written to residual_out),
//! `h = bf16(x' * rsqrt(mean(x'^2) + eps))`, `out = bf16(weight * h)`. Sum of squares in f32.
//! Cost: memory-bound; the vector path moves each byte once (the weight comes from L2).
use crate::arch::*;
use crate::params::RmsNormParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_rmsnorm(p: RmsNormParams) {
    // The norm weight (constant) towards L2 while the previous kernel finishes: read after the block sum.
    prefetch_l2_early(p.weight as *const u8, 2 * p.dim as usize, thread_x() as usize, block_dim_x() as usize);
    entry_prologue();
    if block_x() >= p.rows {
        return;
    }
    // One uniform choice per launch: 16-byte vectors kept in registers when the row fits (dim % 8 == 0, aligned,
    // dim <= 8 * VPT * blockDim), else the scalar two-pass loop.
    let aligned = (p.x | p.residual | p.residual_out | p.weight | p.out) % 16 == 0;
    if aligned && p.dim % 8 == 0 && p.dim / 8 <= VPT as u32 * block_dim_x() {
        rmsnorm_vec(&p)
    } else {
        rmsnorm_scalar(&p)
    }
}

/// 16-byte vectors per thread held in registers by the vector path (dim <= 8 * 4 * 256 = 8192 at 256 threads).
const VPT: usize = 4;

/// Vector path: each thread owns up to VPT vectors of 8 bf16 (v = tid + j * blockDim); the row is read once. The
/// VPT slots are separate variables (not an indexed array) so that they stay in registers.
#[inline(always)]
unsafe fn rmsnorm_vec(p: &RmsNormParams) {
    let nv = (p.dim / 8) as usize;
    let base = 2 * block_x() as usize * p.dim as usize; // byte offset of the row
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;
    let (x0, s0) = load_vec(p, base, nv, tid);
    let (x1, s1) = load_vec(p, base, nv, tid + nt);
    let (x2, s2) = load_vec(p, base, nv, tid + 2 * nt);
    let (x3, s3) = load_vec(p, base, nv, tid + 3 * nt);
    let total = block_sum((s0 + s1) + (s2 + s3));
    let inv = 1.0 / sqrt_rn(total / p.dim as f32 + p.eps);
    store_vec(p, base, nv, tid, x0, inv);
    store_vec(p, base, nv, tid + nt, x1, inv);
    store_vec(p, base, nv, tid + 2 * nt, x2, inv);
    store_vec(p, base, nv, tid + 3 * nt, x3, inv);
}

/// Loads vector `v` of the row (x, plus the residual when fused, writing residual_out); returns it and its sum of
/// squares. Out-of-range `v` gives zeros.
#[inline(always)]
unsafe fn load_vec(p: &RmsNormParams, base: usize, nv: usize, v: usize) -> ([u32; 4], f32) {
    load_residual_vec(p.x, p.residual, p.residual_out, base, nv, v)
}

/// 16-byte vector `v` (bytes `base + 16 v`) of a row: x, or bf16(x + residual) written to `residual_out` when
/// `residual != 0`; with its sum of squares (f32, in element order). Out-of-range `v` (>= nv) gives zeros. Shared
/// by `hga_rmsnorm` and `hga_rmsnorm_fp8_quant`, whose vector paths must sum alike (bit-identical outputs).
///
/// # Safety
/// The pointers are 16-byte aligned global addresses holding the row.
#[inline(always)]
pub(crate) unsafe fn load_residual_vec(
    x: u64,
    residual: u64,
    residual_out: u64,
    base: usize,
    nv: usize,
    v: usize,
) -> ([u32; 4], f32) {
    if v >= nv {
        return ([0; 4], 0.0);
    }
    let off = base + 16 * v;
    let mut w = ld_global_v4((x as *const u8).add(off));
    if residual != 0 {
        w = add_bf16x8(w, ld_global_v4((residual as *const u8).add(off)));
        st_global_v4((residual_out as *mut u8).add(off), w);
    }
    (w, sum_sq_bf16x8(w))
}

/// bf16(a + b) of 8 bf16 pairs (f32 sums, one rounding): the fused residual add.
#[inline(always)]
pub(crate) fn add_bf16x8(a: [u32; 4], b: [u32; 4]) -> [u32; 4] {
    let mut w = a;
    for k in 0..4 {
        let (a0, a1) = bf16x2_to_f32(a[k]);
        let (b0, b1) = bf16x2_to_f32(b[k]);
        w[k] = f32x2_to_bf16x2(a0 + b0, a1 + b1);
    }
    w
}

/// Sum of squares of 8 bf16 in element order (f32).
#[inline(always)]
pub(crate) fn sum_sq_bf16x8(w: [u32; 4]) -> f32 {
    let mut ss = 0f32;
    for &wk in &w {
        let (a0, a1) = bf16x2_to_f32(wk);
        ss += a0 * a0 + a1 * a1;
    }
    ss
}

/// `bf16(weight * bf16(x * inv))` of 8 elements: the normalized output of the vector path.
#[inline(always)]
pub(crate) fn norm_bf16x8(x: [u32; 4], wt: [u32; 4], inv: f32) -> [u32; 4] {
    let mut o = [0u32; 4];
    for k in 0..4 {
        let (a0, a1) = bf16x2_to_f32(x[k]);
        let (w0, w1) = bf16x2_to_f32(wt[k]);
        let (h0, h1) = bf16x2_to_f32(f32x2_to_bf16x2(a0 * inv, a1 * inv));
        o[k] = f32x2_to_bf16x2(w0 * h0, w1 * h1);
    }
    o
}

#[inline(always)]
unsafe fn store_vec(p: &RmsNormParams, base: usize, nv: usize, v: usize, x: [u32; 4], inv: f32) {
    if v >= nv {
        return;
    }
    let wt = ld_global_v4((p.weight as *const u8).add(16 * v));
    st_global_v4((p.out as *mut u8).add(base + 16 * v), norm_bf16x8(x, wt, inv));
}

/// Scalar path: any dim and alignment; the row is read twice (the second pass from L1/L2).
#[inline(always)]
unsafe fn rmsnorm_scalar(p: &RmsNormParams) {
    let row = block_x();
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
