//! `hga_fp8_linear_decode`: block-scaled FP8 linear for few rows (m <= 16), memory-bound. See [`Fp8LinearParams`].
//!
//! Shapes: a e4m3 [m, k], a_scale f32 [m, k/128], w e4m3 [n, k], w_scale f32 [ceil(n/128), k/128], out bf16 [m, n].
//! Assumes (the launcher checks): 1 <= m <= 16, k % 128 == 0, a and w 16-byte aligned.
//! Grid: one block per 8 output features (grid.x = ceil(n/8)); block = 4 warps (128 threads) that split the K blocks
//! (warp w takes K blocks w, w+4, ...); their partial 16x8 tiles are summed through shared memory by warp 0.
//! Each warp streams its 8 weight rows once with 16-byte `ld.global.nc.L1::no_allocate` loads, BATCH K blocks of
//! loads in flight before the first product, and multiplies them with all m activation rows at once on the tensor
//! cores (`mma.sync m16n8k32 e4m3`; rows >= m are zero fragments): lane (g, t) loads 16 bytes of weight row g at
//! k = 64 r + 16 t of each K block (r = 0, 1), and the same 16 bytes of activation rows g and g + 8; since a dot
//! product does not care about the order of k, the k of those bytes are simply relabelled into the mma fragment
//! slots (words 0,1 -> first product, words 2,3 -> second), identically for A and B. Per K block the 4 products go
//! into a zeroed tile that is then scaled by a_scale[row, kb] * w_scale[n/128, kb] and added to the accumulator
//! (f32). Shared memory: 4 x 32 x 4 f32 = 2 KiB (dynamic).
//! Rows n >= the weight's rows are clamped to the last row (loaded, computed, never stored).
//! Programmatic dependent launch: before the entry prologue's `griddepcontrol.wait`, the block asks L2 for its 8
//! weight rows (`prefetch_l2_early`; weights are never written by a kernel), so the weight stream overlaps the
//! previous kernel's tail; activations and scales are read after the wait.
use super::{ld_ro_v4, ld_stream_v4};
use crate::arch::*;
use crate::params::Fp8LinearParams;

/// Warps per block (they split K).
pub const WARPS: usize = 4;
/// K blocks per warp whose weights are loaded before the first product.
const BATCH: usize = 4;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_linear_decode(p: Fp8LinearParams) {
    let warp = (thread_x() / 32) as usize;
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    let kbs = k / 128;
    let n0 = block_x() as usize * 8;
    let rows = n.saturating_sub(n0).min(8);
    prefetch_l2_early((p.w as *const u8).add(n0 * k), rows * k, thread_x() as usize, 32 * WARPS);
    entry_prologue();
    let wrow = (n0 + g).min(n - 1);
    let w = (p.w as *const u8).add(wrow * k + 16 * t);
    let a = p.a as *const u8;
    let sa = p.a_scale as *const f32;
    let sw = (p.w_scale as *const f32).add((n0 / 128) * kbs);
    let (lo_ok, hi_ok) = (g < m, g + 8 < m);
    let a_lo = a.add(g.min(m - 1) * k + 16 * t);
    let a_hi = a.add((g + 8).min(m - 1) * k + 16 * t);

    let mut acc = [0f32; 4];
    let mut kb0 = warp;
    while kb0 < kbs {
        let mut wr = [[0u32; 4]; 2 * BATCH];
        for j in 0..BATCH {
            let kb = kb0 + WARPS * j;
            if kb < kbs {
                wr[2 * j] = ld_stream_v4(w.add(kb * 128));
                wr[2 * j + 1] = ld_stream_v4(w.add(kb * 128 + 64));
            }
        }
        for j in 0..BATCH {
            let kb = kb0 + WARPS * j;
            if kb < kbs {
                let mut c = [0f32; 4];
                for r in 0..2 {
                    let off = kb * 128 + 64 * r;
                    let x0 = if lo_ok { ld_ro_v4(a_lo.add(off)) } else { [0; 4] };
                    let x1 = if hi_ok { ld_ro_v4(a_hi.add(off)) } else { [0; 4] };
                    let b = wr[2 * j + r];
                    c = mma_e4m3_m16n8k32([x0[0], x1[0], x0[1], x1[1]], [b[0], b[1]], c);
                    c = mma_e4m3_m16n8k32([x0[2], x1[2], x0[3], x1[3]], [b[2], b[3]], c);
                }
                let s = *sw.add(kb);
                let s_lo = if lo_ok { *sa.add(g * kbs + kb) * s } else { 0.0 };
                let s_hi = if hi_ok { *sa.add((g + 8) * kbs + kb) * s } else { 0.0 };
                acc[0] += c[0] * s_lo;
                acc[1] += c[1] * s_lo;
                acc[2] += c[2] * s_hi;
                acc[3] += c[3] * s_hi;
            }
        }
        kb0 += WARPS * BATCH;
    }

    // Sum the warps' tiles.
    let red = dyn_smem_ptr::<f32>();
    for (i, v) in acc.iter().enumerate() {
        *red.add((warp * 32 + lane) * 4 + i) = *v;
    }
    sync_threads();
    if warp != 0 {
        return;
    }
    let mut s = [0f32; 4];
    for wi in 0..WARPS {
        for (i, v) in s.iter_mut().enumerate() {
            *v += *red.add((wi * 32 + lane) * 4 + i);
        }
    }
    let out = p.out as *mut u16;
    for (h, row) in [(0usize, g), (1, g + 8)] {
        if row < m {
            for e in 0..2 {
                let col = n0 + 2 * t + e;
                if col < n {
                    *out.add(row * n + col) = f32_to_bf16(s[2 * h + e]);
                }
            }
        }
    }
}
