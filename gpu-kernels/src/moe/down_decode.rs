//! `hga_moe_down_decode` (version 2): the few-token (decode) down products and the routing-weighted sum over slots:
//! `out[token, n] = bf16(sum over slots s and k blocks of weights[token, s] * down_e(q(inter[token * top_k + s]))_n)`
//! in a fixed order. Version 1 ([`super::down_decode_v1`]) measured 0.10x copy bandwidth: 128 blocks (one per SM),
//! a warp per slot, each k block's intermediate quantized before that block's weight loads.
//!
//! Grid: (hidden / 8, tokens); block = 256 threads (8 warps). Block (bx, token) owns the 8 output rows
//! n0 = 8 bx .. +8 and all of the token's work units u = (slot, k block) = (u / kbs, u % kbs), kbs = inter / 128
//! (each unit: 8 down rows x 128 bytes = 1 KB). K is split across the warps by unit pairs: pair p = units
//! (2p, 2p + 1); one `mma.sync m16n8k32 e4m3` takes unit 2p's rows as A rows g and unit 2p + 1's rows as A rows
//! g + 8, with unit 2p's quantized activation as B column 0 (lanes g = 0 give it) and unit 2p + 1's as column 1
//! (lanes g = 1): lane (g, t = 0) gets C[g][0] (unit 2p, row n0 + g) in c[0] and C[g + 8][1] (unit 2p + 1, row
//! n0 + g) in c[3]. An odd last unit pairs with zeros. Warp w takes pairs w, w + 8, ... in rounds of U = 3 pairs;
//! each round first issues all its weight loads (4 x 16 B per pair: 12 loads, 192 B per lane, 6 KB per warp),
//! then quantizes the pairs' activations with the whole warp ([`super::quant_group_warp`], the `hga_fp8_quant`
//! rule), then runs the products, scaling each unit by weight_scale_inv * activation scale * routing weight.
//!
//! Fixed order, no atomics: each lane adds its pairs in increasing p (unit 2p before 2p + 1), then the 8 warps'
//! sums are added in warp order in shared memory. (Version 1 summed per slot first; the order differs, the
//! result agrees within rounding.) Shared memory: 8 warps x 8 rows f32 = 256 bytes.
//! Block = 256 threads (`MOE_DOWN_DECODE_WARPS` = 8).
//!
//! Analysis at the Qwen3-30B-A3B shape (H 2048, I 768, top-8), T = 1, 132 SMs:
//! - Bytes: 8 x 2048 x 768 = 12.6 MB; a block streams 8 rows x 768 x 8 slots = 48 KB; 256 blocks (version 1: 128),
//!   ~2 per SM, all resident at once at 123-126 registers (ptxas 13.0; <= 128 keeps 2 blocks of 256 threads per
//!   SM). 48 units = 24 pairs = 3 per warp = one round: the block's 48 KB is requested up front, ~96 KB per SM
//!   and the whole 12.6 MB GPU-wide in flight (Little's law needs ~4 MB).
//! - Loads per lane: 12 x 16 B weights, 6 x 8 B activations (L2), 6 scale + 6 routing-weight + 6 id scalars.
//! - Instructions per 6 KB warp round: 12 LDG.128, 6 quantizations (~270), 48 SHFL + selects, 6 `mma` pairs
//!   (12 `mma`, ~170 on sm_90), scaling: ~550 warp-instructions, ~11 B each; ~2.2 K cycles per SM (~1.1 us)
//!   against ~3.3 us of memory time. Each block re-quantizes the token's whole intermediate (8 x 768 values).
//!
//! Assumes hidden % 128 == 0, inter % 128 == 0, ids < experts (launcher checks the shapes).
use super::{group_frag, ld_nc_b32, ld_stream_v4, mma_e4m3_chunk, quant_group_warp, unroll};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_DOWN_DECODE_WARPS};

const WARPS: usize = MOE_DOWN_DECODE_WARPS;
/// Unit pairs per warp per round (loads issued together); the `unroll!` lists below name 0..U.
const U: usize = 3;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_down_decode(p: MoeExpertParams) {
    entry_prologue();
    let (h, inter, k) = (p.hidden as usize, p.inter_dim as usize, p.top_k as usize);
    let token = block_y() as usize;
    let n0 = block_x() as usize * 8;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = lane_id();
    let (g, t) = ((lane / 4) as usize, lane % 4);
    let kbs = inter / 128;
    let hblk = h / 128;
    let units = k * kbs;
    let pairs = units.div_ceil(2);
    let ids = (p.ids as *const u32).add(token * k);
    let rws = (p.weights as *const u32).add(token * k);
    let act = (p.inter as *const u16).add(token * k * inter);
    // Row g's 16 bytes at this lane's offset of a k block's first 64-byte chunk, from any expert row base.
    let wd = (p.w_down as *const u8).add(16 * t as usize);
    let sd0 = p.s_down as *const u32;
    let mut tot = 0f32;
    let mut p0 = warp;
    while p0 < pairs {
        // 0. The round's units: slot, k block and expert (one dependent L2 round trip before the weight stream).
        let mut sl = [[0u32; 2]; U];
        let mut kb = [[0u32; 2]; U];
        let mut e = [[0u32; 2]; U];
        unroll!(u in [0, 1, 2] {
            unroll!(j in [0, 1] {
                let unit = 2 * (p0 + WARPS * u) + j;
                if unit < units {
                    (sl[u][j], kb[u][j]) = ((unit / kbs) as u32, (unit % kbs) as u32);
                    e[u][j] = ld_nc_b32(ids.add(sl[u][j] as usize));
                }
            });
        });
        // 1. The weight stream of the round: [unit 2p lo, unit 2p hi, unit 2p+1 lo, unit 2p+1 hi] per pair.
        let mut a = [[[0u32; 4]; 4]; U];
        unroll!(u in [0, 1, 2] {
            unroll!(j in [0, 1] {
                if 2 * (p0 + WARPS * u) + j < units {
                    let row = e[u][j] as usize * h + n0 + g;
                    let w = wd.add(row * inter + kb[u][j] as usize * 128);
                    a[u][2 * j] = ld_stream_v4(w);
                    a[u][2 * j + 1] = ld_stream_v4(w.add(64));
                }
            });
        });
        // Per unit: weight_scale_inv * routing weight.
        let mut f = [[0f32; 2]; U];
        unroll!(u in [0, 1, 2] {
            unroll!(j in [0, 1] {
                if 2 * (p0 + WARPS * u) + j < units {
                    let si = (e[u][j] as usize * hblk + n0 / 128) * kbs + kb[u][j] as usize;
                    let sd = f32::from_bits(ld_nc_b32(sd0.add(si)));
                    f[u][j] = sd * f32::from_bits(ld_nc_b32(rws.add(sl[u][j] as usize)));
                }
            });
        });
        // 2. The activations of the same units, quantized while the weights are on their way; f becomes the
        // unit's whole factor.
        let mut q = [[0u32; 2]; U];
        unroll!(u in [0, 1, 2] {
            unroll!(j in [0, 1] {
                if 2 * (p0 + WARPS * u) + j < units {
                    let (qq, xs) = quant_group_warp(act.add(sl[u][j] as usize * inter + kb[u][j] as usize * 128), lane);
                    q[u][j] = qq;
                    f[u][j] *= xs;
                }
            });
        });
        // 3. Products: B column 0 = unit 2p (lanes g = 0), column 1 = unit 2p + 1 (lanes g = 1).
        unroll!(u in [0, 1, 2] {
            if p0 + WARPS * u < pairs {
                let b0 = group_frag(q[u][0], t);
                let b1 = group_frag(q[u][1], t);
                let (lo, hi) = if g == 1 { b1 } else { b0 };
                let c = mma_e4m3_chunk(a[u][0], a[u][2], lo, [0.0; 4]);
                let c = mma_e4m3_chunk(a[u][1], a[u][3], hi, c);
                tot += c[0] * f[u][0];
                tot += c[3] * f[u][1];
            }
        });
        p0 += WARPS * U;
    }
    let sm = dyn_smem_ptr::<f32>(); // [8 warps][8 rows]
    if t == 0 {
        *sm.add(warp * 8 + g) = tot;
    }
    sync_threads();
    if tid < 8 {
        let mut acc = 0f32;
        for w in 0..WARPS {
            acc += *sm.add(w * 8 + tid);
        }
        *(p.out as *mut u16).add(token * h + n0 + tid) = f32_to_bf16(acc);
    }
}
