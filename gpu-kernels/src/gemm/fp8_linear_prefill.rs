//! `hga_fp8_linear_prefill`: block-scaled FP8 linear for many rows, tiled on `mma.sync m16n8k32 e4m3` (native
//! e4m3 tensor cores: the kernel for sm_89 and sm_120) with a 3-stage `cp.async` shared-memory pipeline. See
//! [`Fp8LinearParams`].
//!
//! Shapes: a e4m3 [m, k], a_scale f32 [m, k/128], w e4m3 [n, k], w_scale f32 [n/128, k/128], out bf16 [m, n].
//! Assumes (the launcher checks): n % 128 == 0, k % 128 == 0, m >= 1 arbitrary; a and w 16-byte aligned.
//! Grid: (n/128, ceil(m/128)); block = 8 warps (256 threads) in a 2 (m) x 4 (n) layout, each warp a 64 x 32 tile
//! (4 m-tiles of 16 x 4 n-tiles of 8: 16 products per 32-wide k step).
//! Block tile 128 x 128 x 128: one K step is exactly one scale block s = a_scale[row, kb] * w_scale[n/128, kb].
//! Rather than a second f32 tile per K block (128 more registers: ptxas spilled on sm_90, where the e4m3 operands
//! are converted to f16 for HMMA and need registers too), the accumulator is kept in units of the current block's
//! scale: before K block kb it is multiplied by s_{kb-1} / s_kb per row, the tensor cores then add the raw products,
//! and the epilogue multiplies by the last s. One extra f32 rounding per K block (2^-24 relative). Assumes scales
//! are positive normal floats (hga_fp8_quant's are >= 1e-10/448; a K block whose weight scale is 0 is skipped).
//! Rows of A beyond m are clamped to row m-1 (computed, not stored).
//! Shared memory: STAGES x (A 128 x 128 B + W 128 x 128 B) = 32 KiB per stage (96 KiB), rows of 128 bytes
//! whose 16-byte chunks are XOR-swizzled by (row % 8), so that cp.async stores and ldmatrix reads (8 rows at one
//! chunk column) hit 8 different bank groups. Fragments come from `ldmatrix.x4` (an 8 x 8 b16 matrix is 8 rows of
//! 16 e4m3 bytes: lane (g, t) receives bytes 4t..4t+3 of row g, which is the m16n8k32 A / B fragment layout).
//! Pipeline: STAGES-1 K blocks in flight; per K block: wait for the oldest group, barrier, issue the copy of
//! K block kb + STAGES - 1 into the buffer freed by kb - 1, compute kb.
//! Epilogue: bf16 pairs (4-byte stores) straight from the accumulator fragments.
use crate::arch::*;
use crate::params::Fp8LinearParams;

const BM: usize = 128;
const BN: usize = 128;
const BK: usize = 128;
const THREADS: usize = 256;
/// Bytes of one stage (A tile then W tile).
pub const STAGE_BYTES: usize = (BM + BN) * BK;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_linear_prefill(p: Fp8LinearParams) {
    entry_prologue();
    body::<3, 1>(&p);
}

/// `v`, hidden from LLVM's constant folding (a `mov` in asm).
#[inline(always)]
fn opaque_usize(v: usize) -> usize {
    let r: u64;
    unsafe { core::arch::asm!("mov.u64 {0}, {1};", out(reg64) r, in(reg64) v as u64, options(pure, nomem, nostack)) };
    r as usize
}

/// Swizzled byte offset of (row, 16-byte chunk) in a tile of 128-byte rows.
#[inline(always)]
fn swz(row: usize, chunk: usize) -> u32 {
    (row * 128 + ((chunk ^ (row & 7)) << 4)) as u32
}

#[inline(always)]
unsafe fn body<const STAGES: usize, const WAIT: u32>(p: &Fp8LinearParams) {
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let lane = tid % 32;
    let (g, t) = (lane / 4, lane % 4);
    let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
    let kbs = k / BK;
    let n0 = block_x() as usize * BN;
    let m0 = block_y() as usize * BM;
    let (wm, wn) = (warp / 4, warp % 4);
    let a = p.a as *const u8;
    let w = p.w as *const u8;
    let smem = dyn_smem_addr();

    // This thread's 4 + 4 copy chunks per stage: chunk i = tid + 256 j, row i / 8, column i % 8.
    let load_stage = |stage: usize, kb: usize| {
        let base = smem + (stage * STAGE_BYTES) as u32;
        for j in 0..4 {
            let i = tid + THREADS * j;
            let (row, ch) = (i / 8, i % 8);
            let arow = (m0 + row).min(m - 1);
            cp_async_16(base + swz(row, ch), a.add(arow * k + kb * BK + ch * 16));
            cp_async_16(base + (BM * BK) as u32 + swz(row, ch), w.add((n0 + row) * k + kb * BK + ch * 16));
        }
    };

    for s in 0..STAGES - 1 {
        if s < kbs {
            load_stage(s, s);
        }
        cp_async_commit();
    }

    let mut acc = [[[0f32; 4]; 4]; 4];
    // The scale acc is currently expressed in, per (m-tile, half) row of this lane; 0 at first (acc is 0).
    let mut s_prev = [[0f32; 2]; 4];
    let sa = p.a_scale as *const f32;
    let sw = (p.w_scale as *const f32).add((n0 / BN) * kbs);
    // ldmatrix lane roles: matrix l / 8, row l % 8 of it.
    let (mat, mrow) = (lane / 8, lane % 8);
    // A m-tile: matrices (rows 0-7 | 8-15) x (k chunk 0 | 1) in the order a[0..4].
    let a_row = wm * 64 + mrow + 8 * (mat & 1);
    let a_ch = mat >> 1;
    // W pair of n-tiles: matrices (n 0-7 k0, n 0-7 k1, n 8-15 k0, n 8-15 k1) = (b0, b1) of tile 2jp, 2jp+1.
    let b_row = wn * 32 + mrow + 8 * (mat >> 1);
    let b_ch = mat & 1;

    for kb in 0..kbs {
        cp_async_wait::<WAIT>();
        sync_threads();
        let nk = kb + STAGES - 1;
        if nk < kbs {
            load_stage(nk % STAGES, nk);
        }
        cp_async_commit();

        // acc holds the sum in units of the previous K block's scale per row (s_prev): rescale it to this block's
        // scale, then let the tensor cores add this block's raw products straight into it (no second tile).
        let s_w = *sw.add(kb);
        if s_w != 0.0 {
            unroll!(i in [0, 1, 2, 3] {
                unroll!(h in [0, 1] {
                    let row = (m0 + wm * 64 + 16 * i + g + 8 * h).min(m - 1);
                    let s = *sa.add(row * kbs + kb) * s_w;
                    let r = s_prev[i][h] / s;
                    s_prev[i][h] = s;
                    unroll!(j in [0, 1, 2, 3] {
                        acc[i][j][2 * h] *= r;
                        acc[i][j][2 * h + 1] *= r;
                    });
                });
            });
            let base = smem + ((kb % STAGES) * STAGE_BYTES) as u32;
            // A real loop over the 4 k steps (an opaque trip count keeps LLVM from unrolling it): unrolled, ptxas
            // hoisted the operand conversions of all 4 steps on sm_90 and spilled.
            let mut ks = 0usize;
            while ks < opaque_usize(BK / 32) {
                let mut af = [[0u32; 4]; 4];
                unroll!(i in [0, 1, 2, 3] {
                    af[i] = ldmatrix_x4(base + swz(a_row + 16 * i, 2 * ks + a_ch));
                });
                unroll!(jp in [0, 1] {
                    let r = ldmatrix_x4(base + (BM * BK) as u32 + swz(b_row + 16 * jp, 2 * ks + b_ch));
                    unroll!(i in [0, 1, 2, 3] {
                        acc[i][2 * jp] = mma_e4m3_m16n8k32(af[i], [r[0], r[1]], acc[i][2 * jp]);
                        acc[i][2 * jp + 1] = mma_e4m3_m16n8k32(af[i], [r[2], r[3]], acc[i][2 * jp + 1]);
                    });
                });
                ks += 1;
            }
        }
    }
    cp_async_wait::<0>();

    let out = p.out as *mut u16;
    unroll!(i in [0, 1, 2, 3] {
        unroll!(h in [0, 1] {
            let row = m0 + wm * 64 + 16 * i + g + 8 * h;
            if row < m {
                unroll!(j in [0, 1, 2, 3] {
                    let col = n0 + wn * 32 + 8 * j + 2 * t;
                    let s = s_prev[i][h];
                    let v = f32x2_to_bf16x2(acc[i][j][2 * h] * s, acc[i][j][2 * h + 1] * s);
                    *(out.add(row * n + col) as *mut u32) = v;
                });
            }
        });
    });
}
