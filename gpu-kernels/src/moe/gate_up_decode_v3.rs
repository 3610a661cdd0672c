//! `hga_moe_gate_up_decode_v3` (version 3): version 2's gate/up decode ([`super::gate_up_decode`]: same grid,
//! block, products, sums and result, bit for bit) with two changes for the decode layer:
//! 1. **Activation loads first.** Each round's activation loads (the token's bf16 row, L2) are issued before the
//!    id-dependent weight loads (the first round's right after the id load), so they are not queued behind the
//!    round's 8 KB of weights; the quantization then overlaps the weight stream whatever the return order.
//! 2. **Down weights into L2.** As soon as the block knows its expert e, it asks L2 for its share of e's down
//!    weights (`prefetch.global.L2`, fire-and-forget: no registers, nothing waits): the hidden x inter bytes of
//!    `w_down[e]` are split over the inter / 8 blocks of the (token, slot), H / 16 lines of 128 B per block (one
//!    per thread at Qwen3), and block 0 also fetches e's down scales. The down kernel that follows
//!    ([`super::down_decode_v3`]) then reads mostly from L2, and the layer's DRAM stream (25.2 + 12.6 MB at Qwen3)
//!    runs under one kernel instead of two latency-bound ones. Tokens that share an expert prefetch the same
//!    lines again (L2 hits). 37.75 MB fits the 50 MB L2 of an H100 / H200; on a smaller L2 the prefetched lines
//!    may be evicted before use (correct either way, only slower).
//!
//! Grid (inter / 8, tokens * top_k), 128 threads, 256 bytes of shared memory, as version 2 (see its docs for the
//! mapping and the analysis). Assumes hidden % 128 == 0, inter % 128 == 0, ids < experts.
use super::{
    group_frag, ld_group_warp, ld_nc_b32, ld_stream_v4, mma_e4m3_chunk, prefetch_l2, quant_group_vals, silu, unroll,
};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_GATE_UP_DECODE_WARPS};

const WARPS: usize = MOE_GATE_UP_DECODE_WARPS;
/// k blocks per warp per round (loads issued together); the `unroll!` lists below name 0..U.
const U: usize = 4;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_gate_up_decode_v3(p: MoeExpertParams) {
    let (h, inter) = (p.hidden as usize, p.inter_dim as usize);
    let pair = block_y() as usize;
    let token = pair / p.top_k as usize;
    let i0 = block_x() as usize * 8;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, lane % 4);
    let kbs = h / 128;
    let sblk = inter / 128;
    let e = ld_nc_b32((p.ids as *const u32).add(pair)) as usize;
    // Row g of gate and of up, at this lane's 16 bytes of a k block's first 64-byte chunk.
    let wg = (p.w_gate as *const u8).add((e * inter + i0 + g) * h + 16 * t as usize);
    let wu = (p.w_up as *const u8).add((e * inter + i0 + g) * h + 16 * t as usize);
    let sg = (p.s_gate as *const u32).add((e * sblk + i0 / 128) * kbs);
    let su = (p.s_up as *const u32).add((e * sblk + i0 / 128) * kbs);
    let x = (p.x as *const u16).add(token * h);
    let (mut tg, mut tu) = (0f32, 0f32);
    let mut kb0 = warp;
    while kb0 < kbs {
        // 0. The round's activations (they do not wait on the id).
        let mut xv = [[0u32; 2]; U];
        unroll!(u in [0, 1, 2, 3] {
            let kb = kb0 + WARPS * u;
            if kb < kbs {
                xv[u] = ld_group_warp(x.add(kb * 128), lane);
            }
        });
        // 1. The weight stream of the round: [gate lo, gate hi, up lo, up hi] per k block, and the scales.
        let mut a = [[[0u32; 4]; 4]; U];
        let mut ws = [[0f32; 2]; U];
        unroll!(u in [0, 1, 2, 3] {
            let kb = kb0 + WARPS * u;
            if kb < kbs {
                let o = kb * 128;
                a[u][0] = ld_stream_v4(wg.add(o));
                a[u][1] = ld_stream_v4(wg.add(o + 64));
                a[u][2] = ld_stream_v4(wu.add(o));
                a[u][3] = ld_stream_v4(wu.add(o + 64));
                ws[u] = [f32::from_bits(ld_nc_b32(sg.add(kb))), f32::from_bits(ld_nc_b32(su.add(kb)))];
            }
        });
        // The first round also starts expert e's down weights (and scales) towards L2 for the down kernel.
        if kb0 == warp {
            let lines = h / 16; // 128-byte lines of w_down[e] per block: (h * inter / 128) / (inter / 8)
            let base = (p.w_down as *const u8).add(e * h * inter + block_x() as usize * lines * 128);
            let mut l = tid;
            while l < lines {
                prefetch_l2(base.add(l * 128));
                l += 32 * WARPS;
            }
            if block_x() == 0 {
                let sbytes = (h / 128) * sblk * 4;
                let sbase = (p.s_down as *const u8).add(e * sbytes);
                let mut l = tid;
                while l * 128 < sbytes {
                    prefetch_l2(sbase.add(l * 128));
                    l += 32 * WARPS;
                }
            }
        }
        // 2. Quantize the activations of the same k blocks while the weights are on their way.
        let mut q = [0u32; U];
        let mut xs = [0f32; U];
        unroll!(u in [0, 1, 2, 3] {
            if kb0 + WARPS * u < kbs {
                (q[u], xs[u]) = quant_group_vals(xv[u]);
            }
        });
        // 3. Products: rows g = gate, rows g + 8 = up.
        unroll!(u in [0, 1, 2, 3] {
            if kb0 + WARPS * u < kbs {
                let b = group_frag(q[u], t);
                let c = mma_e4m3_chunk(a[u][0], a[u][2], b.0, [0.0; 4]);
                let c = mma_e4m3_chunk(a[u][1], a[u][3], b.1, c);
                tg += c[0] * (ws[u][0] * xs[u]);
                tu += c[2] * (ws[u][1] * xs[u]);
            }
        });
        kb0 += WARPS * U;
    }
    let sm = dyn_smem_ptr::<f32>(); // [WARPS][8 columns][gate, up]
    if t == 0 {
        *sm.add(warp * 16 + 2 * g) = tg;
        *sm.add(warp * 16 + 2 * g + 1) = tu;
    }
    sync_threads();
    if tid < 8 {
        let (mut gs, mut us) = (0f32, 0f32);
        for w in 0..WARPS {
            gs += *sm.add(w * 16 + 2 * tid);
            us += *sm.add(w * 16 + 2 * tid + 1);
        }
        *(p.inter as *mut u16).add(pair * inter + i0 + tid) = f32_to_bf16(silu(gs) * us);
    }
}
