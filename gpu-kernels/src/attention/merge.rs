//! `hga_attention_merge`: merges the split partials of `hga_attention_decode` by log-sum-exp (as FlashInfer's
//! state merge): with M = max_s lse_s and w_s = exp(lse_s - M), out = sum_s w_s o_s / sum_s w_s (bf16) and
//! lse = M + ln(sum_s w_s). Splits with lse = -inf weigh 0.
//!
//! Shapes: part_o f32 [n_splits, tokens, n_heads, 128], part_lse f32 [n_splits, tokens, n_heads] -> out bf16
//! [tokens, n_heads, 128], lse f32 [tokens, n_heads].
//! Grid / block: one warp per (token, head), 4 warps per block, grid.x = ceil(tokens * n_heads / 4); lane l owns
//! dims 4l..4l+3 (16-byte loads). Shared memory: none.
//! Assumes: n_splits >= 1 and at least one split of every row has a finite LSE (key 0 is visible to every query).
use crate::arch::*;
use crate::params::AttentionParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attention_merge(p: AttentionParams) {
    let rows = p.tokens * p.n_heads;
    let row = block_x() * 4 + thread_x() / 32;
    if row >= rows {
        return;
    }
    let lane = lane_id() as usize;
    let lse_in = (p.part_lse as *const f32).add(row as usize);
    let ns = p.n_splits as usize;
    let stride = rows as usize;
    let mut mx = f32::NEG_INFINITY;
    let mut s = lane;
    while s < ns {
        mx = fmax(mx, *lse_in.add(s * stride));
        s += 32;
    }
    let mx = warp_max(mx);
    let mut acc = [0f32; 4];
    let mut wsum = 0f32;
    let po = (p.part_o as *const f32).add(row as usize * 128 + 4 * lane);
    let mut s = 0;
    while s < ns {
        let w = ex2((*lse_in.add(s * stride) - mx) * core::f32::consts::LOG2_E);
        let v = *(po.add(s * stride * 128) as *const [f32; 4]);
        acc[0] += w * v[0];
        acc[1] += w * v[1];
        acc[2] += w * v[2];
        acc[3] += w * v[3];
        wsum += w;
        s += 1;
    }
    let inv = 1.0 / wsum;
    let dst = (p.out as *mut u16).add(row as usize * 128 + 4 * lane);
    *(dst as *mut [u32; 2]) =
        [f32x2_to_bf16x2(acc[0] * inv, acc[1] * inv), f32x2_to_bf16x2(acc[2] * inv, acc[3] * inv)];
    if lane == 0 {
        *(p.lse as *mut f32).add(row as usize) = mx + lg2(wsum) * core::f32::consts::LN_2;
    }
}
