//! `hga_attention_merge_v2` (what every launcher runs) and `hga_attention_merge`: merge the split partials of the
//! decode kernels by log-sum-exp (as FlashInfer's state merge): with M = max_s lse_s and w_s = exp(lse_s - M),
//! out = sum_s w_s o_s / sum_s w_s (bf16) and lse = M + ln(sum_s w_s). Splits with lse = -inf weigh 0.
//! `hga_attention_merge` (one warp per row) stays only as the comparison row of the routed attention's bench
//! (bench_hga, `MergeKernel::V1`); both give the same numbers bit for bit (checked by `check::attention`).
//!
//! Shapes: part_o f32 [n_splits, tokens, n_heads, 128], part_lse f32 [n_splits, tokens, n_heads] -> out bf16
//! [tokens, n_heads, 128], lse f32 [tokens, n_heads].
//! `hga_attention_merge`: one warp per (token, head), 4 warps per block, grid.x = ceil(tokens * n_heads / 4); lane
//! l owns dims 4l..4l+3 (`ld.global.v4`); the partials are read 8 splits at a time (8 independent loads in flight per
//! lane; the accumulation order is still s = 0, 1, ...). Shared memory: none.
//! Fused FP8 quantization (`p.out_q != 0`): the warp's row of 128 is one 128-group of `hga_fp8_quant` on
//! out [tokens, n_heads * 128]: absmax of the bf16-rounded outputs (warp max), scale = max(absmax, 1e-10) / 448,
//! q = e4m3(x / scale) (IEEE division, saturating), scale to `out_scale[t * n_heads + h]`: bit-identical to
//! `hga_fp8_quant` of `out` (the same operations on the same values), one launch and one read of `out` fewer.
//! A warp-uniform branch on a launch constant (not per element).
//!
//! `hga_attention_merge_v2` computes the same numbers bit for bit (the same operations on the same values: max of the
//! LSEs, weights `ex2((lse - M) log2 e)`, products `w * o` rounded to f32, each dim's products and the weights
//! summed in split order with the same zero-weight padding to a multiple of 8 splits, the same end) with the
//! parallelism the first kernel lacks: one CTA of 4 warps per row instead of one warp, so a row's 32 splits are
//! read in ONE round of loads (warp w takes splits w, w + 4, ..., 8 per warp) instead of a serial round per 8 splits
//! plus one for the maximum, and 32 rows use 32 SMs instead of 8. Per chunk of 32 splits the warps put their
//! products into shared memory and thread d sums dim d over the chunk in split order; the weights go to shared
//! memory as well and warp 0 ends the row with `merge_finish`. Shared memory [`ATTN_MERGE_V2_SMEM`]`(n_splits)`.
//! Assumes: n_splits >= 1 and at least one split of every row has a finite LSE (key 0 is visible to every query).
use crate::arch::*;
use crate::num::{E4M3_MAX, FP8_ACT_EPS};
use crate::params::{AttentionParams, ATTN_MERGE_V2_CHUNK};

/// Splits read per batch (independent loads in flight per lane).
const U: usize = 8;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attention_merge(p: AttentionParams) {
    entry_prologue();
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
        // Loads first (indices clamped to the last split, so all are in bounds and unconditional), then the sums.
        let mut lv = [0f32; U];
        let mut v = [[0f32; 4]; U];
        let mut u = 0;
        while u < U {
            let si = if s + u < ns { s + u } else { ns - 1 };
            lv[u] = *lse_in.add(si * stride);
            v[u] = ld_global_v4(po.add(si * stride * 128) as *const u8).map(f32::from_bits);
            u += 1;
        }
        let mut u = 0;
        while u < U {
            // Past the last split: weight 0 on a repeated (finite) partial, branch-free so the loads stay batched.
            let w = ex2((lv[u] - mx) * core::f32::consts::LOG2_E);
            let w = if s + u < ns { w } else { 0.0 };
            acc[0] += w * v[u][0];
            acc[1] += w * v[u][1];
            acc[2] += w * v[u][2];
            acc[3] += w * v[u][3];
            wsum += w;
            u += 1;
        }
        s += U;
    }
    merge_finish(&p, row as usize, lane, acc, mx, wsum);
}

/// The end of a row's merge, shared by both merge kernels: lane `lane` holds dims 4 lane..4 lane + 3 of the
/// weighted sum `acc` (splits in order), `mx` the largest LSE and `wsum` the sum of the weights (in split order).
/// Writes out (bf16), lse and, when `p.out_q` is set, the fused FP8 quantization of the row.
#[inline(always)]
unsafe fn merge_finish(p: &AttentionParams, row: usize, lane: usize, acc: [f32; 4], mx: f32, wsum: f32) {
    let inv = 1.0 / wsum;
    let b01 = f32x2_to_bf16x2(acc[0] * inv, acc[1] * inv);
    let b23 = f32x2_to_bf16x2(acc[2] * inv, acc[3] * inv);
    let dst = (p.out as *mut u16).add(row * 128 + 4 * lane);
    *(dst as *mut [u32; 2]) = [b01, b23];
    if lane == 0 {
        *(p.lse as *mut f32).add(row) = mx + lg2(wsum) * core::f32::consts::LN_2;
    }
    if p.out_q != 0 {
        // As hga_fp8_quant: the bf16 values, absmax from 0 over the group, IEEE division by the scale.
        let (x0, x1) = bf16x2_to_f32(b01);
        let (x2, x3) = bf16x2_to_f32(b23);
        let amax = fmax(fmax(fmax(fmax(0.0, fabs(x0)), fabs(x1)), fabs(x2)), fabs(x3));
        let amax = warp_max(amax);
        let a = if amax > FP8_ACT_EPS { amax } else { FP8_ACT_EPS };
        let scale = a / E4M3_MAX;
        let q = f32x2_to_e4m3x2(x0 / scale, x1 / scale) as u32 | (f32x2_to_e4m3x2(x2 / scale, x3 / scale) as u32) << 16;
        *((p.out_q as *mut u8).add(row * 128 + 4 * lane) as *mut u32) = q;
        if lane == 0 {
            *(p.out_scale as *mut f32).add(row) = scale;
        }
    }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attention_merge_v2(p: AttentionParams) {
    const C: usize = ATTN_MERGE_V2_CHUNK;
    entry_prologue();
    let row = block_x() as usize;
    let tid = thread_x() as usize;
    let (warp, lane) = (tid / 32, tid % 32);
    let ns = p.n_splits as usize;
    // Splits summed: padded with zero weights to a multiple of U, as the first kernel's batches are.
    let padded = ns.div_ceil(U) * U;
    let stride = (p.tokens * p.n_heads) as usize;
    let lse_in = (p.part_lse as *const f32).add(row);
    let po = (p.part_o as *const f32).add(row * 128 + 4 * lane);
    // Shared memory: warp maxima [4], products [C][128], weights [padded].
    let red = dyn_smem_ptr::<f32>();
    let prod = red.add(4);
    let wts = prod.add(C * 128);
    // Split c0 + warp + 4 u of a chunk, clamped to the last split (loads stay unconditional and in flight together).
    let load = |c0: usize| -> ([[f32; 4]; U], [f32; U]) {
        let mut v = [[0f32; 4]; U];
        let mut l = [0f32; U];
        let mut u = 0;
        while u < U {
            let s = c0 + warp + 4 * u;
            let si = if s < ns { s } else { ns - 1 };
            l[u] = *lse_in.add(si * stride);
            v[u] = ld_global_v4(po.add(si * stride * 128) as *const u8).map(f32::from_bits);
            u += 1;
        }
        (v, l)
    };
    let mut cur = load(0);
    let mut mx = f32::NEG_INFINITY;
    let mut s = tid;
    while s < ns {
        mx = fmax(mx, *lse_in.add(s * stride));
        s += 128;
    }
    let mx_w = warp_max(mx);
    if lane == 0 {
        *red.add(warp) = mx_w;
    }
    sync_threads();
    let mx = fmax(fmax(*red, *red.add(1)), fmax(*red.add(2), *red.add(3)));
    let mut acc = 0f32;
    let mut c0 = 0;
    while c0 < padded {
        let (v, l) = cur;
        let mut u = 0;
        while u < U {
            let s = c0 + warp + 4 * u;
            let w = ex2((l[u] - mx) * core::f32::consts::LOG2_E);
            let w = if s < ns { w } else { 0.0 };
            let dst = prod.add((warp + 4 * u) * 128 + 4 * lane);
            let mut i = 0;
            while i < 4 {
                *dst.add(i) = w * v[u][i];
                i += 1;
            }
            if lane == 0 && s < padded {
                *wts.add(s) = w;
            }
            u += 1;
        }
        sync_threads();
        let n = if padded - c0 < C { padded - c0 } else { C };
        let mut j = 0;
        while j < n {
            acc += *prod.add(j * 128 + tid);
            j += 1;
        }
        c0 += C;
        if c0 < padded {
            cur = load(c0);
        }
        sync_threads();
    }
    // Warp 0 ends the row: dims 4 lane..4 lane + 3 back from shared memory (the products are no longer needed).
    *prod.add(tid) = acc;
    sync_threads();
    if warp != 0 {
        return;
    }
    let mut wsum = 0f32;
    let mut s = 0;
    while s < padded {
        wsum += *wts.add(s);
        s += 1;
    }
    let a = prod.add(4 * lane);
    merge_finish(&p, row, lane, [*a, *a.add(1), *a.add(2), *a.add(3)], mx, wsum);
}
