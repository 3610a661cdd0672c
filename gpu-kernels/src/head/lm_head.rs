//! `hga_lm_head`: bf16 GEMV for few rows, `out[m, v] = sum_h x[m, h] w[v, h]` (f32 out, f32 accumulation), the
//! lm_head (151936 x 2048 at full size) of decode steps. Memory-bound. See [`LmHeadParams`].
//!
//! Shapes: x bf16 [m, hidden], w bf16 [vocab, hidden], out f32 [m, vocab]. Assumes (launcher): 1 <= m <= 16,
//! hidden % 32 == 0, x and w 16-byte aligned.
//! Grid: one block per 8 vocabulary rows (grid.x = ceil(vocab/8)); block = 4 warps splitting hidden in 32-wide
//! rounds (warp w takes rounds w, w+4, ...), summed through shared memory (2 KiB) by warp 0.
//! The same scheme as `hga_fp8_linear_decode`: lane (g, t) streams 16 bytes (8 bf16) of weight row g per round at
//! h = 32 r + 8 t with `ld.global.nc.L1::no_allocate`, BATCH rounds in flight, and the tensor cores multiply them
//! with all m rows (`mma.sync m16n8k16 bf16`; the 8 k of each lane are relabelled into fragment slots identically
//! for A and B: words 0,1 -> first product, words 2,3 -> second). Rows of w beyond vocab are clamped (not stored).
//! Programmatic dependent launch: before the entry prologue's `griddepcontrol.wait`, the block asks L2 for its 8
//! weight rows (`prefetch_l2_early`; the weight is never written by a kernel); x is read after the wait.
use crate::arch::*;
use crate::gemm::{ld_ro_v4, ld_stream_v4};
use crate::params::LmHeadParams;

const WARPS: usize = 4;
const BATCH: usize = 8;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_lm_head(p: LmHeadParams) {
    let warp = (thread_x() / 32) as usize;
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let (m, v, h) = (p.m as usize, p.vocab as usize, p.hidden as usize);
    let rounds = h / 32;
    let n0 = block_x() as usize * 8;
    let rows = v.saturating_sub(n0).min(8);
    prefetch_l2_early((p.w as *const u8).add(n0 * h * 2), rows * h * 2, thread_x() as usize, 32 * WARPS);
    entry_prologue();
    let wrow = (n0 + g).min(v - 1);
    let w = (p.w as *const u8).add((wrow * h + 8 * t) * 2);
    let x = p.x as *const u8;
    let (lo_ok, hi_ok) = (g < m, g + 8 < m);
    let x_lo = x.add((g.min(m - 1) * h + 8 * t) * 2);
    let x_hi = x.add(((g + 8).min(m - 1) * h + 8 * t) * 2);

    let mut c = [0f32; 4];
    let mut r0 = warp;
    while r0 < rounds {
        let mut wr = [[0u32; 4]; BATCH];
        for (j, wj) in wr.iter_mut().enumerate() {
            let r = r0 + WARPS * j;
            if r < rounds {
                *wj = ld_stream_v4(w.add(r * 64));
            }
        }
        for (j, b) in wr.iter().enumerate() {
            let r = r0 + WARPS * j;
            if r < rounds {
                let a0 = if lo_ok { ld_ro_v4(x_lo.add(r * 64)) } else { [0; 4] };
                let a1 = if hi_ok { ld_ro_v4(x_hi.add(r * 64)) } else { [0; 4] };
                c = mma_bf16_m16n8k16([a0[0], a1[0], a0[1], a1[1]], [b[0], b[1]], c);
                c = mma_bf16_m16n8k16([a0[2], a1[2], a0[3], a1[3]], [b[2], b[3]], c);
            }
        }
        r0 += WARPS * BATCH;
    }

    let red = dyn_smem_ptr::<f32>();
    for (i, val) in c.iter().enumerate() {
        *red.add((warp * 32 + lane) * 4 + i) = *val;
    }
    sync_threads();
    if warp != 0 {
        return;
    }
    let mut s = [0f32; 4];
    for wi in 0..WARPS {
        for (i, val) in s.iter_mut().enumerate() {
            *val += *red.add((wi * 32 + lane) * 4 + i);
        }
    }
    let out = p.out as *mut f32;
    for (hh, row) in [(0usize, g), (1, g + 8)] {
        if row < m {
            for e in 0..2 {
                let col = n0 + 2 * t + e;
                if col < v {
                    *out.add(row * v + col) = s[2 * hh + e];
                }
            }
        }
    }
}
