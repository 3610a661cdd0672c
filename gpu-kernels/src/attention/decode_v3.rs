//! `hga_attention_decode_v3_s3`: split-K (flash-decoding) causal GQA decode attention for a few query tokens
//! (rows, split, masking, partial outputs and LSE: [`super::decode`]; merged by `hga_attention_merge_v2`), with a
//! `cp.async` ring of S = 3 stages, so that a CTA keeps S - 1 tiles of K and V (S - 1 x 32 KB) in flight. The one
//! decode kernel (the `_v3_s3` name is that of the measured history, docs/perf-attention.md: the double-buffered
//! form, and 4 / 6 stages, measured slower on the H200).
//!
//! Why a ring: at one CTA per SM (the fastest split, docs/perf-attention.md) a double buffer has ~32 KB per SM in
//! flight; by Little's law at ~1.5 us of loaded DRAM latency that streams at most ~132 x 32 KB / 1.5 us = 2.8 TB/s,
//! below the ~4.1 TB/s an H200 copies at. The ring is the multi-stage pipeline of CUTLASS / FlashAttention-2's sm80
//! kernels: one barrier per tile. `decode_ring` is written for any S >= 3; the entry instantiates S = 3.
//!
//! Grid (n_kv_heads * ceil(tokens * g / 16), n_splits), block 128 threads = 4 warps, warp w takes keys 16w..16w+15
//! of each 64-key tile for the CTA's 16 rows (row r = t * g + j).
//! Shared memory (dynamic, `attn_decode_v3_smem(S)` = S x 32 KB: 96 KB for S = 3, which fits the 99 KB per-block
//! limit of sm_89 / sm_120): S slots of (K, V) tiles of 64 keys (swizzled). The 16 Q rows (4 KB) are staged in slot
//! S - 1 with tile 0's group and read into registers before that slot's first K/V fill (one extra barrier per
//! CTA); the final cross-warp merge reuses the ring.
//! Pipeline: prologue issues tiles 0..S-2 (one commit group each, empty groups past the split's end keep the count
//! uniform); iteration kt waits for tile kt (`cp.async.wait_group S-2`), barriers (every warp is then done with
//! tile kt - 1), refills tile kt - 1's slot with tile kt + S - 1 and computes tile kt.
//! Causal / bounds: start from `start_dev` when set; keys < min(start + tokens, capacity); splits past the context
//! write O = 0, LSE = -inf; rows past a split's end repeat its last key and are masked.
//! Programmatic dependent launch: before the wait, each CTA asks L2 for the K/V rows of its first S - 1 tiles
//! (`prefetch_first_tiles`), overlapping their DRAM latency with the previous kernel (q/k norm + RoPE).
//! Assumes: head_dim 128, n_heads a multiple of n_kv_heads, start + tokens <= capacity.
use super::decode::{min_u32, split_keys, write_split};
use super::tile::*;
use crate::arch::*;
use crate::params::AttentionParams;

const BN: u32 = 64;
const ROWS: u32 = 16;
const NTHREADS: u32 = 128;
const TILE: u32 = BN * ROW_BYTES;
const STAGE: u32 = 2 * TILE;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_attention_decode_v3_s3(p: AttentionParams) {
    prefetch_first_tiles::<3>(&p);
    entry_prologue();
    decode_ring::<3, 1>(p)
}

/// Before the PDL wait: asks L2 for the K and V rows of the first S - 1 tiles of this CTA's split (what the
/// ring's prologue loads first), so that their DRAM latency overlaps the previous kernel (`prefetch_l2_early_kv`).
/// The split is taken from the launch's `start` (the bound of a device-start launch, never below the real start:
/// at worst rows past the context are asked for), not from `start_dev`, which must not be read before the wait.
#[inline(always)]
unsafe fn prefetch_first_tiles<const S: u32>(p: &AttentionParams) {
    let rgroups = (p.tokens * (p.n_heads / p.n_kv_heads)).div_ceil(ROWS);
    let kvh = block_x() / rgroups;
    let ctx = min_u32(p.start + p.tokens, p.capacity);
    let k_begin = block_y() * p.tiles_per_split * BN;
    let k_end = min_u32(min_u32(ctx, k_begin + p.tiles_per_split * BN), k_begin + (S - 1) * BN);
    if k_begin >= k_end {
        return;
    }
    let off = (kvh as usize * p.capacity as usize + k_begin as usize) * D * 2;
    let bytes = (k_end - k_begin) as usize * D * 2;
    let tid = thread_x() as usize;
    prefetch_l2_early_kv((p.k_cache as *const u8).add(off), bytes, tid, NTHREADS as usize);
    prefetch_l2_early_kv((p.v_cache as *const u8).add(off), bytes, tid, NTHREADS as usize);
}

/// The decode with an `S`-stage ring; `W` = S - 2 (the `cp.async.wait_group` count: tile kt is complete while
/// the S - 2 younger groups may still be in flight).
#[inline(always)]
unsafe fn decode_ring<const S: u32, const W: u32>(p: AttentionParams) {
    const { assert!(S >= 3 && W + 2 == S) };
    let g = p.n_heads / p.n_kv_heads;
    let rows_total = p.tokens * g;
    let rgroups = rows_total.div_ceil(ROWS);
    let kvh = block_x() / rgroups;
    let rg = block_x() % rgroups;
    let sp = block_y();
    let tid = thread_x();
    let warp = tid / 32;
    let lane = lane_id();
    let (start, k_begin, k_end, n_tiles) = split_keys(&p, sp);

    let smem = dyn_smem_addr();
    let slot = |i: u32| smem + i * STAGE;
    // Q rows in the last slot (row r -> (token, head); rows past the end repeat the last one, not stored).
    let q_s = slot(S - 1);
    let q_row_ptr = |r: u32| -> *const u16 {
        let rr = min_u32(rg * ROWS + r, rows_total - 1);
        let t = rr / g;
        let h = kvh * g + rr % g;
        (p.q as *const u16).add((t as usize * p.n_heads as usize + h as usize) * D)
    };
    let mut id = tid;
    while id < ROWS * 16 {
        let (r, c) = (id / 16, id % 16);
        cp_async_16(q_s + swz(r, c), q_row_ptr(r).add(c as usize * 8) as *const u8);
        id += NTHREADS;
    }
    let kbase = (p.k_cache as *const u16).add(kvh as usize * p.capacity as usize * D);
    let vbase = (p.v_cache as *const u16).add(kvh as usize * p.capacity as usize * D);
    // Prologue: tiles 0..S-2 into slots 0..S-2, one group each (group 0 also holds Q).
    let mut i = 0;
    while i < S - 1 {
        if i < n_tiles {
            let r0 = k_begin + i * BN;
            load_rows::<BN, NTHREADS>(slot(i), kbase, r0, k_end, D, tid);
            load_rows::<BN, NTHREADS>(slot(i) + TILE, vbase, r0, k_end, D, tid);
        }
        cp_async_commit();
        i += 1;
    }

    // Key limits (exclusive) of this lane's rows g and g+8.
    let row_tok = |r: u32| min_u32(rg * ROWS + r, rows_total - 1) / g;
    let lim = [min_u32(k_end, start + row_tok(lane / 4) + 1), min_u32(k_end, start + row_tok(lane / 4 + 8) + 1)];

    // Q fragments (group 0 complete), then a barrier: slot S - 1 is refilled in the first iteration.
    cp_async_wait::<W>();
    sync_threads();
    let qf = q_frags(q_s, 0);
    sync_threads();

    let mut o = [[0f32; 4]; 16];
    let mut m = [f32::NEG_INFINITY; 2];
    let mut l = [0f32; 2];
    let mut rd = 0; // slot of tile kt
    let mut wr = S - 1; // slot of tile kt + S - 1 (= the slot of tile kt - 1)
    let mut kt = 0;
    while kt < n_tiles {
        cp_async_wait::<W>();
        sync_threads();
        let nt = kt + S - 1;
        if nt < n_tiles {
            let r0 = k_begin + nt * BN;
            load_rows::<BN, NTHREADS>(slot(wr), kbase, r0, k_end, D, tid);
            load_rows::<BN, NTHREADS>(slot(wr) + TILE, vbase, r0, k_end, D, tid);
        }
        cp_async_commit();
        let kpos0 = k_begin + kt * BN + warp * 16;
        if kpos0 < k_end {
            let st = slot(rd);
            // Masked variant always (one copy of the tile code; the compare / select is free in this memory-bound
            // kernel, and a second, unmasked copy costs registers).
            attend_tile::<2, 1, true, false>(
                &qf,
                st,
                st + TILE,
                warp * 16,
                kpos0,
                lim,
                p.scale_log2,
                &mut m,
                &mut l,
                &mut o,
            );
        }
        rd = if rd + 1 == S { 0 } else { rd + 1 };
        wr = if wr + 1 == S { 0 } else { wr + 1 };
        kt += 1;
    }
    // Only empty groups can be pending here; the barrier orders every warp's last tile read before the merge.
    cp_async_wait::<0>();
    sync_threads();
    write_split(&p, dyn_smem_ptr::<f32>(), &o, m, l, kvh, rg, sp, g, rows_total);
}
