//! `hga_moe_gate_up_decode` (version 2): the few-token (decode) gate/up products of every (token, slot), with the
//! SiLU*up epilogue: `inter[token * top_k + slot, i] = bf16(silu(gate_e(x)_i) * up_e(x)_i)`, e = ids[token, slot].
//! Version 1 ([`super::gate_up_decode_v1`]) measured 0.23x copy bandwidth: it quantized each k block's
//! activations before issuing that block's weight loads, and had 2 k blocks in flight per warp.
//!
//! Grid: (inter / 8, tokens * top_k); block = 128 threads (4 warps, `MOE_GATE_UP_DECODE_WARPS`). Block (bx, pair)
//! owns the 8 intermediate columns i0 = 8 bx .. +8 of one (token, slot): the 16 rows of the `mma.sync m16n8k32
//! e4m3` A operand are gate rows i0 + g (A rows g) and up rows i0 + g (A rows g + 8), so one product does both and
//! lane (g, t = 0) ends with gate in c[0] and up in c[2]. The activation is B (every column the same, see
//! [`super::group_frag`]); k-permuted 16-byte fragments as in the module docs; weights read with
//! `ld.global.nc.L1::no_allocate.v4`. Warp w takes the 128-wide k blocks w, w + 4, ... in rounds of U = 4 k blocks.
//! Each round, in this order:
//! 1. issues all of its weight loads (4 k blocks x gate/up x 2 x 16 B = 16 loads, 256 B per lane, 8 KB per warp)
//!    and the 8 weight-scale loads; nothing of it depends on the activations;
//! 2. quantizes the token's activations of those k blocks with the whole warp ([`super::quant_group_warp`]: one
//!    8-byte L2 load per lane per group, 5-shuffle max, 4 IEEE divisions per lane: the `hga_fp8_quant` rule),
//!    which overlaps the weight stream instead of preceding it;
//! 3. builds the B fragments (8 `shfl.idx` per group) and runs 4 `mma` per k block, scaling each k block's raw
//!    product by weight_scale_inv * activation scale.
//!
//! The 4 warps' sums meet in shared memory and are added in warp order (deterministic, no atomics).
//! Shared memory: 4 warps x 8 columns x (gate, up) f32 = 256 bytes.
//!
//! Analysis at the Qwen3-30B-A3B shape (H 2048, I 768, top-8), T = 1, 132 SMs (H100 / H200):
//! - Bytes: 8 x 2 x 768 x 2048 = 25.2 MB; a block streams 16 rows x 2048 = 32 KB, 768 blocks (5.8 per SM; the
//!   per-SM imbalance is at most one 32 KB block). Each warp has exactly one round (H / 128 = 16 k blocks = 4 warps
//!   x U): the block's whole 32 KB is requested before any activation arrives.
//! - In flight: 32 KB per resident block; at 137-146 registers (ptxas 13.0) 3 blocks of 128 threads fit an SM ->
//!   96 KB per SM, ~12.7 MB GPU-wide (Little's law at ~4 TB/s and ~1 us needs ~4 MB). Loads per lane: 16 x 16 B
//!   weights + 4 x 8 B activations (L2) + 8 scalar scales + 1 id.
//! - Instructions per 8 KB warp round: 16 LDG.128, ~4 x 45 for the quantizations, 32 SHFL.IDX, 16 `mma` (on sm_90
//!   each is 2 HMMA + ~12 conversions, TOOLCHAIN.md: ~220), ~30 scaling/epilogue: ~480 warp-instructions, ~17 B
//!   each. The 25.2 MB stream is ~1.5 M warp-instructions, ~11.5 K per SM, ~2.9 K cycles at 4 per cycle: ~1.5 us
//!   of issue against ~6.5 us of memory time, overlapped with it. (CUDA-core dot products would need ~3x the
//!   instructions per byte: 8 cvt + 16 cvt + 16 FFMA per 16 weight bytes.)
//! - The activation quantization is repeated by every block of a (token, slot) (96 blocks read the same 4 KB row
//!   from L2): 2048 divisions per block of 32 KB, the cost counted above.
//!
//! Assumes hidden % 128 == 0, inter % 128 == 0, ids < experts (launcher checks the shapes).
use super::{group_frag, ld_nc_b32, ld_stream_v4, mma_e4m3_chunk, quant_group_warp, silu, unroll};
use crate::arch::*;
use crate::params::{MoeExpertParams, MOE_GATE_UP_DECODE_WARPS};

const WARPS: usize = MOE_GATE_UP_DECODE_WARPS;
/// k blocks per warp per round (loads issued together); the `unroll!` lists below name 0..U.
const U: usize = 4;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_gate_up_decode(p: MoeExpertParams) {
    entry_prologue();
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
        // 2. The activations of the same k blocks, quantized while the weights are on their way.
        let mut q = [0u32; U];
        let mut xs = [0f32; U];
        unroll!(u in [0, 1, 2, 3] {
            let kb = kb0 + WARPS * u;
            if kb < kbs {
                (q[u], xs[u]) = quant_group_warp(x.add(kb * 128), lane);
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
