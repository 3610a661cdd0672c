//! `hga_fp8_linear_prefill_f16_v3`: v2's f16-conversion FP8 linear for sm_90 (`fp8_linear_prefill_f16.rs`: same
//! [`Fp8LinearParams`], semantics, block tile, warp tile, shared memory layout, cp.async pipeline, conversions
//! (all of A on the conversion pipe, W on the ALU, as `_f16_cvt`) and epilogue; those device functions are shared,
//! not copied), software-pipelined inside the warp with a register double buffer.
//!
//! Why: ncu of `_f16_cvt` on an H200 (4096x4096x2048) showed 2 warps per scheduler, 0.54 eligible, 0.39 issued
//! per cycle, top stall "fixed latency execution dependency" (34.5%), 47% SM throughput: each warp ran
//! ldmatrix -> convert -> HMMA of one 16-wide k chunk as a serial chain (v2's loop body), so the 32 HMMA of a chunk
//! waited for its own conversions and the conversions for its own ldmatrix; one other warp per scheduler was not
//! enough to fill the gaps.
//!
//! Shapes, grid (n/128, ceil(m/128)), block (4 warps of 64 x 64), shared memory (3 x 33296 = 99888 B, 2 blocks / SM
//! on sm_90), scales, rows past m, a zero weight scale: as v2.
//!
//! Pipeline per warp (k chunk q = 16 k of one 128-wide K block; 8 per K block), two f16 fragment sets x and y
//! (the chunk loop unrolled by 2, so that the sets are different registers):
//! - each half-iteration issues the 4 `ldmatrix.x4` of chunk q + 1, the 32 HMMA of chunk q from one set
//!   (converted in the previous half), and the 48 conversions (16 F2FP + 8 x 6 ALU) of chunk q + 1 into the other.
//!   Nothing in a half depends on another instruction of the same half except chunk q + 1's conversions on its
//!   ldmatrix, so ptxas's list scheduler may interleave the conversions with the HMMA (with one loop-carried set
//!   it could not: the conversions had to wait for the last HMMA reading the registers they overwrite).
//! - K block boundary: chunk 7's fragments are converted during chunk 6's HMMA; then wait for kb + 1's copies,
//!   barrier (every warp has read kb's chunk 7 before it: that ldmatrix ran during chunk 6), ldmatrix of kb + 1's
//!   chunk 0, chunk 7's HMMA, the copy of kb + 3 into kb's buffer, the rescale, chunk 0's conversion. So every
//!   chunk keeps the one-chunk look-ahead, and STAGES - 1 K blocks stay in flight as in v2.
//! - Rescale (accumulator kept in units of the current K block's scale, as v1 / v2): once per K block, one
//!   `mul.f32` per accumulator (128 per thread: the minimum for a rescaled accumulator; sm_90 has no packed f32
//!   multiply) plus 8 `ld.shared` + 8 `mul` + 8 `rcp.approx` + 8 `mul` for the per-row ratios, issued between
//!   chunk 7's HMMA of kb and chunk 0's of kb + 1 (they depend on the first and feed the second). A K block whose
//!   weight scale is 0 (all of its products must be dropped) instead zeroes its W tile in shared memory (one
//!   more barrier; never taken with real checkpoints) and leaves the accumulator's scale as is.
//! Registers: 128 f32 accumulators + 32 f16x2 in x + 32 in y (+ 16 raw e4m3 while they are converted) +
//! addressing; see docs/perf-gemm.md for the ptxas counts (0 spills on sm_89 / sm_90 / sm_120).
//! Cycle count and prediction: docs/perf-gemm.md, "FP8 linear, prefill v3 (sm_90)".
use super::fp8_linear_prefill_f16::{
    a_frag, b_frags, mma_row, Acc, BFrags, Blk, RawFrags, RowScales, BK, SW_OFF, THREADS, TILE,
};
use crate::arch::*;
use crate::params::Fp8LinearParams;

/// A m-tiles converted on the conversion pipe (all four, as `_f16_cvt`, the fastest v2 split on the H200).
const CVT_MT: usize = 4;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_linear_prefill_f16_v3(p: Fp8LinearParams) {
    entry_prologue();
    body(&p);
}

/// The f16 fragments of one chunk: A of the 4 m-tiles, B of the 8 n-tiles.
type Frags = ([[u32; 4]; 4], BFrags);

#[inline(always)]
fn convert(raw: &RawFrags) -> Frags {
    let (ra, rb) = raw;
    ([a_frag::<CVT_MT>(ra, 0), a_frag::<CVT_MT>(ra, 1), a_frag::<CVT_MT>(ra, 2), a_frag::<CVT_MT>(ra, 3)], b_frags(rb))
}

/// The 32 HMMA of one chunk over the warp tile (ptxas orders them m-tile by m-tile, reusing the A operand).
#[inline(always)]
fn mma_chunk(acc: &mut Acc, f: &Frags) {
    unroll!(i in [0, 1, 2, 3] {
        mma_row(&mut acc[i], f.0[i], &f.1);
    });
}

/// Zeroes the W tile of the stage at `base` (a K block whose weight scale is 0 adds nothing), then a barrier.
#[inline(always)]
unsafe fn zero_w_tile(base: u32, tid: usize) {
    for j in 0..TILE / 4 / THREADS {
        st_shared_f32(base + (TILE + 4 * (tid + THREADS * j)) as u32, 0.0);
    }
    sync_threads();
}

#[inline(always)]
unsafe fn body(p: &Fp8LinearParams) {
    let b = Blk::new(p);
    b.prologue();
    let mut acc: Acc = [[[0f32; 4]; 8]; 4];
    // The scale acc is currently expressed in, per (m-tile, half) row of this lane; 0 at first (acc is 0).
    let mut s_prev: RowScales = [[0f32; 2]; 4];
    // 8 + (k >> 31) = 8 chunks per K block (k < 2^31, the launcher checks): a bound neither LLVM nor ptxas can
    // prove constant, so the chunk loop stays a loop (v2: unrolled, conversions get hoisted and registers spill).
    let chunks = (BK / 16) as u32 + (p.k >> 31);
    let mut kb = 0;
    let mut base = b.sync_k_block(0);
    b.prefetch(0);
    let mut s_w = ld_shared_f32(base + SW_OFF as u32);
    if s_w == 0.0 {
        zero_w_tile(base, thread_x() as usize);
    }
    b.rescale(base, s_w, s_w == 0.0, &mut acc, &mut s_prev);
    // x: the f16 fragments of the chunk about to be multiplied; y: the next one's, converted meanwhile. Two named
    // sets (the chunk loop unrolled by 2) so that the conversions of one write other registers than the HMMA of
    // the other read: with one loop-carried set they could only start after its last HMMA.
    let mut x = convert(&b.ld_frags(base, 0));
    loop {
        // Chunks 0..5 in pairs: ldmatrix c, HMMA c - 1 (x), convert c (y); ldmatrix c + 1, HMMA c (y), convert
        // c + 1 (x).
        let mut c = 1u32;
        while c + 1 < chunks {
            let raw = b.ld_frags(base, c);
            mma_chunk(&mut acc, &x);
            let y = convert(&raw);
            let raw = b.ld_frags(base, c + 1);
            mma_chunk(&mut acc, &y);
            x = convert(&raw);
            c += 2;
        }
        // Chunk 6 (x) with chunk 7's conversion, then chunk 7 (y) with the next K block's entry and chunk 0.
        let raw = b.ld_frags(base, chunks - 1);
        mma_chunk(&mut acc, &x);
        let y = convert(&raw);
        kb += 1;
        if kb >= b.kbs {
            mma_chunk(&mut acc, &y);
            break;
        }
        // K block kb: wait for its copies, barrier (every warp has issued its ldmatrix of kb - 1's chunk 7),
        // chunk 0's ldmatrix and chunk 7 of kb - 1 (its HMMA first: the barrier left the tensor pipe idle); then
        // the copies of kb + 2 (issued while those HMMA run), the rescale to kb's scales (it needs chunk 7's
        // results) and chunk 0's conversion. A K block whose weight scale is 0 zeroes its W tile (cold path).
        base = b.sync_k_block(kb);
        s_w = ld_shared_f32(base + SW_OFF as u32);
        if s_w == 0.0 {
            zero_w_tile(base, thread_x() as usize);
        }
        let raw = b.ld_frags(base, 0);
        mma_chunk(&mut acc, &y);
        b.prefetch(kb);
        b.rescale(base, s_w, s_w == 0.0, &mut acc, &mut s_prev);
        x = convert(&raw);
    }
    cp_async_wait::<0>();
    b.store::<CVT_MT>(p.out as *mut u16, &acc, &s_prev);
}
