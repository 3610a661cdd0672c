//! `hga_fp8_linear_prefill_f16_v3`: the block-scaled FP8 linear of `hga_fp8_linear_prefill` (same
//! [`Fp8LinearParams`], same semantics) for sm_90 (H100 / H200), which has no FP8 `mma.sync`: there ptxas emulates
//! each e4m3 m16n8k32 with 2 HMMA plus its own conversions (measured 0.31x of the bf16 mma.sync ceiling,
//! docs/perf-gemm.md). This kernel converts each ldmatrix'd e4m3 fragment to f16 itself, once per warp and
//! 16-wide k chunk, reuses it over a 64 x 64 warp tile (4 m-tiles x 8 n-tiles: 32 f16x2 conversions feed 32 plain
//! `mma.sync m16n8k16 f32.f16.f16.f32`), and software-pipelines the conversions against the HMMA inside the warp
//! with a register double buffer. It assembles and runs on sm_89 / sm_120 too (the launcher picks it on sm_90
//! only; the `_f16_v3` name is that of the measured history, docs/perf-gemm.md).
//!
//! Shapes: a e4m3 [m, k], a_scale f32 [m, k/128], w e4m3 [n, k], w_scale f32 [n/128, k/128], out bf16 [m, n].
//! Assumes (the launcher checks): n % 128 == 0, k % 128 == 0 (k < 2^31), m >= 1 arbitrary; a and w 16-byte
//! aligned. Grid: (n/128, ceil(m/128)); block = 4 warps (128 threads) in a 2 (m) x 2 (n) layout, each warp a
//! 64 x 64 tile. Block tile 128 x 128 x 128: one K step is one scale block. Scales and rows past m: as
//! `fp8_linear_prefill.rs`: the accumulator is kept in units of the current block's scale s (rescaled by
//! s_prev / s per row before each K block; here with `rcp.approx`, 2^-22 relative), scales are otherwise positive
//! normal floats, rows of A past m are clamped to row m-1, not stored.
//!
//! Conversion (arch::convert), exact both ways: on the ALU pipe, `prmt` (sign-replicating byte spread) + `shl` +
//! `and` per f16x2 gives each e4m3 value times 2^-8; on the conversion pipe, one `cvt.rn.f16x2.e4m3x2` (F2FP) per
//! f16x2 gives the value itself. W is converted on the ALU, all of A on the conversion pipe (16 F2FP + 16 ALU
//! conversions per chunk). The powers of two (2^8 or 2^16 per m-tile) are constant per row: they cancel in the
//! rescaling ratio and the epilogue applies them (f32, exact).
//! K order inside an mma: the e4m3 fragment register (row g, k bytes 4t..4t+3 of a 16-byte chunk, from
//! `ldmatrix` b16 over e4m3 rows) gives f16x2 [4t, 4t+1] and [4t+2, 4t+3]; they go to the f16 m16n8k16 slots of
//! logical k [2t, 2t+1] and [8+2t, 8+2t+1] for A and for B alike, so each mma sums the same 16 k of the chunk.
//!
//! Shared memory: STAGES x (A 128 x 128 B + W 128 x 128 B + 128 f32 row scales of A + 1 f32 weight scale, padded
//! to 16 B) = 33296 B per stage, 3 stages = 99888 B (fits the 99 KiB of sm_89 / sm_120; 2 blocks / SM on sm_90).
//! The tile rows are 128 bytes whose 16-byte chunks are XOR-swizzled by (row % 8) (conflict-free cp.async stores and
//! ldmatrix reads); the scales come with their tile through 4-byte `cp.async` (no global load in the loop).
//! cp.async pipeline: STAGES - 1 K blocks in flight. Epilogue: bf16 pairs (4-byte stores) from the accumulators.
//!
//! Why the software pipeline: ncu of the unpipelined form on an H200 (4096x4096x2048) showed 2 warps per
//! scheduler, 0.54 eligible, 0.39 issued per cycle, top stall "fixed latency execution dependency" (34.5%), 47% SM
//! throughput: each warp ran ldmatrix -> convert -> HMMA of one 16-wide k chunk as a serial chain, so the 32 HMMA
//! of a chunk waited for its own conversions and the conversions for its own ldmatrix; one other warp per
//! scheduler was not enough to fill the gaps.
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
//!   chunk keeps the one-chunk look-ahead, and STAGES - 1 K blocks stay in flight.
//! - Rescale: once per K block, one `mul.f32` per accumulator (128 per thread: the minimum for a rescaled
//!   accumulator; sm_90 has no packed f32 multiply) plus 8 `ld.shared` + 8 `mul` + 8 `rcp.approx` + 8 `mul` for
//!   the per-row ratios, issued between chunk 7's HMMA of kb and chunk 0's of kb + 1 (they depend on the first and
//!   feed the second). A K block whose weight scale is 0 (all of its products must be dropped) instead zeroes its
//!   W tile in shared memory (one more barrier; never taken with real checkpoints) and leaves the accumulator's
//!   scale as is.
//! Registers: 128 f32 accumulators + 32 f16x2 in x + 32 in y (+ 16 raw e4m3 while they are converted) +
//! addressing; see docs/perf-gemm.md for the ptxas counts (0 spills on sm_89 / sm_90 / sm_120).
//! Cycle count and prediction: docs/perf-gemm.md, "FP8 linear, prefill v3 (sm_90)".
use crate::arch::*;
use crate::params::Fp8LinearParams;

const BM: usize = 128;
const BN: usize = 128;
const BK: usize = 128;
const THREADS: usize = 128;
const STAGES: usize = 3;
const TILE: usize = BM * BK;
/// Offset of the 128 f32 A row scales in a stage.
const SA_OFF: usize = 2 * TILE;
/// Offset of the f32 weight scale in a stage.
const SW_OFF: usize = SA_OFF + 4 * BM;
/// Bytes of one stage (A tile, W tile, A scales, W scale padded to 16).
pub const STAGE_BYTES: usize = SW_OFF + 16;
/// Dynamic shared memory of a launch (the launcher's constant).
pub const SMEM_BYTES: usize = STAGES * STAGE_BYTES;
const _: () = assert!(SMEM_BYTES == crate::params::FP8_PREFILL_F16_SMEM_BYTES);

/// `v` through an asm `mov` that LLVM may not move out of a loop (not `pure`): keeps loop-invariant address
/// arithmetic (the 16 cp.async source pointers per stage) from being hoisted and held in registers for the whole
/// kernel (seen: spills on sm_89).
#[inline(always)]
fn pinned_usize(v: usize) -> usize {
    let r: u64;
    unsafe { core::arch::asm!("mov.u64 {0}, {1};", out(reg64) r, in(reg64) v as u64, options(nomem, nostack)) };
    r as usize
}

/// Swizzled byte offset of (row, 16-byte chunk) in a tile of 128-byte rows.
#[inline(always)]
fn swz(row: usize, chunk: usize) -> u32 {
    (row * 128 + ((chunk ^ (row & 7)) << 4)) as u32
}

/// The f32 accumulators of a warp's 64 x 64 tile: [m-tile][n-tile][mma C fragment].
type Acc = [[[f32; 4]; 8]; 4];
/// The scale each accumulator row of this lane is expressed in: [m-tile][half (row g | g + 8)].
type RowScales = [[f32; 2]; 4];
/// The e4m3 fragments of one 16-wide k chunk as `ldmatrix.x4` returns them: A (2 x4 = 4 m-tiles x rows g | g + 8),
/// W (2 x4 = 8 n-tiles).
type RawFrags = ([[u32; 4]; 2], [[u32; 4]; 2]);
/// The B (W) f16 fragments of the 8 n-tiles of one chunk.
type BFrags = [[u32; 2]; 8];

/// A's e4m3 fragment register -> two f16x2: exact on the conversion pipe (`cvt`), else * 2^-8 on the ALU.
#[inline(always)]
fn conv_a(v: u32, cvt: bool) -> [u32; 2] {
    if cvt {
        e4m3x4_to_f16x2x2(v)
    } else {
        e4m3x4_to_f16x2x2_scaled(v)
    }
}

/// The f16 A fragment of m-tile `i` (rows g, g + 8) from the raw chunk; on the conversion pipe when i < CVT_MT.
#[inline(always)]
fn a_frag<const CVT_MT: usize>(ra: &[[u32; 4]; 2], i: usize) -> [u32; 4] {
    let lo = conv_a(ra[i / 2][2 * (i % 2)], i < CVT_MT); // row g
    let hi = conv_a(ra[i / 2][2 * (i % 2) + 1], i < CVT_MT); // row g + 8
    [lo[0], hi[0], lo[1], hi[1]]
}

/// B fragments of the 8 n-tiles: [k 4t..4t+1, k 4t+2..4t+3] of row (n) g, on the ALU (* 2^-8).
#[inline(always)]
fn b_frags(rb: &[[u32; 4]; 2]) -> BFrags {
    let mut bf = [[0u32; 2]; 8];
    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        bf[j] = e4m3x4_to_f16x2x2_scaled(rb[j / 4][j % 4]);
    });
    bf
}

/// The 8 products of m-tile row `acc_i` (one A fragment against the 8 n-tiles).
#[inline(always)]
fn mma_row(acc_i: &mut [[f32; 4]; 8], af: [u32; 4], bf: &BFrags) {
    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        acc_i[j] = mma_f16_m16n8k16(af, bf[j], acc_i[j]);
    });
}

/// One block's geometry and operands, and this warp's place in the tile.
struct Blk {
    tid: usize,
    g: usize,
    t: usize,
    wm: usize,
    wn: usize,
    m: usize,
    n: usize,
    k: usize,
    kbs: usize,
    n0: usize,
    m0: usize,
    a: *const u8,
    w: *const u8,
    sa: *const f32,
    sw: *const f32,
    smem: u32,
    /// Row % 8 of every ldmatrix row this lane addresses (the swizzle term).
    xr: usize,
    /// Byte offsets (in a stage) of this lane's ldmatrix rows: A rows wm * 64 + lane (+ 32), W rows wn * 64 + lane
    /// (+ 32).
    a_off: [usize; 2],
    b_off: [usize; 2],
}

impl Blk {
    #[inline(always)]
    unsafe fn new(p: &Fp8LinearParams) -> Blk {
        let tid = thread_x() as usize;
        let warp = tid / 32;
        let lane = tid % 32;
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let kbs = k / BK;
        let n0 = block_x() as usize * BN;
        let (wm, wn) = (warp / 2, warp % 2);
        // ldmatrix.x4 rows: lane l addresses row l of a 32-row group (matrix l / 8 = rows 8 (l / 8) ..), so one x4
        // covers 2 m-tiles of A (matrices: m-tile 2ip rows 0-7 | 8-15, m-tile 2ip+1 rows 0-7 | 8-15) or 4 n-tiles
        // of W. Row % 8 = lane % 8 in every group: the swizzle term is the same for all of this lane's rows.
        Blk {
            tid,
            g: lane / 4,
            t: lane % 4,
            wm,
            wn,
            m,
            n,
            k,
            kbs,
            n0,
            m0: block_y() as usize * BM,
            a: p.a as *const u8,
            w: p.w as *const u8,
            sa: p.a_scale as *const f32,
            sw: (p.w_scale as *const f32).add((n0 / BN) * kbs),
            smem: dyn_smem_addr(),
            xr: lane & 7,
            a_off: [(wm * 64 + lane) * 128, (wm * 64 + 32 + lane) * 128],
            b_off: [TILE + (wn * 64 + lane) * 128, TILE + (wn * 64 + 32 + lane) * 128],
        }
    }

    /// Shared address of stage `stage`.
    #[inline(always)]
    fn stage(&self, stage: usize) -> u32 {
        self.smem + (stage * STAGE_BYTES) as u32
    }

    /// This thread's copies of K block `kb` into `stage`: A and W chunks i = tid + 128 j (row i / 8, 16-byte
    /// column i % 8), the A row scale of row tid, and (thread 0) the weight scale.
    #[inline(always)]
    unsafe fn load_stage(&self, stage: usize, kb: usize) {
        let base = self.stage(stage);
        let k = pinned_usize(self.k);
        for j in 0..(TILE / 16 / THREADS) {
            let i = self.tid + THREADS * j;
            let (row, ch) = (i / 8, i % 8);
            let arow = (self.m0 + row).min(self.m - 1);
            cp_async_16(base + swz(row, ch), self.a.add(arow * k + kb * BK + ch * 16));
            cp_async_16(base + TILE as u32 + swz(row, ch), self.w.add((self.n0 + row) * k + kb * BK + ch * 16));
        }
        let arow = (self.m0 + self.tid).min(self.m - 1);
        cp_async_4(base + (SA_OFF + 4 * self.tid) as u32, self.sa.add(arow * self.kbs + kb) as *const u8);
        if self.tid == 0 {
            cp_async_4(base + SW_OFF as u32, self.sw.add(kb) as *const u8);
        }
    }

    /// The pipeline's start: K blocks 0 .. STAGES - 1 in flight (one commit group each, empty past kbs).
    #[inline(always)]
    unsafe fn prologue(&self) {
        for s in 0..STAGES - 1 {
            if s < self.kbs {
                self.load_stage(s, s);
            }
            cp_async_commit();
        }
    }

    /// Entry into K block `kb`: waits for its copies and a barrier (every warp is also done reading K block
    /// kb - 1). Returns kb's stage address. [`Blk::prefetch`] then reuses kb - 1's buffer.
    #[inline(always)]
    fn sync_k_block(&self, kb: usize) -> u32 {
        cp_async_wait::<{ STAGES as u32 - 2 }>();
        sync_threads();
        self.stage(kb % STAGES)
    }

    /// After [`Blk::sync_k_block`]`(kb)`: the copy of K block kb + STAGES - 1 (if any) into kb - 1's buffer, one
    /// commit group (empty past the last K block).
    #[inline(always)]
    unsafe fn prefetch(&self, kb: usize) {
        let nk = kb + STAGES - 1;
        if nk < self.kbs {
            self.load_stage(nk % STAGES, nk);
        }
        cp_async_commit();
    }

    /// The raw e4m3 fragments of 16-wide k chunk `c` of the stage at `base` (4 ldmatrix.x4).
    #[inline(always)]
    unsafe fn ld_frags(&self, base: u32, c: u32) -> RawFrags {
        let sw_c = ((c as usize ^ self.xr) << 4) as u32;
        (
            [ldmatrix_x4(base + self.a_off[0] as u32 + sw_c), ldmatrix_x4(base + self.a_off[1] as u32 + sw_c)],
            [ldmatrix_x4(base + self.b_off[0] as u32 + sw_c), ldmatrix_x4(base + self.b_off[1] as u32 + sw_c)],
        )
    }

    /// Moves `acc` from the scales `s_prev` to this K block's (row scale * weight scale `s_w`, stage `base`):
    /// acc *= s_prev / s per row (one multiply per accumulator), s_prev = s. With `keep` (the caller's
    /// `s_w == 0`, a K block that adds nothing), the scales stay and the ratio is 1: no branch around the
    /// multiplies (they stay in one basic block with the HMMA around them).
    #[inline(always)]
    unsafe fn rescale(&self, base: u32, s_w: f32, keep: bool, acc: &mut Acc, s_prev: &mut RowScales) {
        unroll!(i in [0, 1, 2, 3] {
            unroll!(h in [0, 1] {
                let row = self.wm * 64 + 16 * i + self.g + 8 * h;
                let s = ld_shared_f32(base + (SA_OFF + 4 * row) as u32) * s_w;
                // rcp.approx (1 ulp) instead of an IEEE division (~10 instructions and a slow path, 8 per K
                // block): r is off by <= 2^-22 relative, far below the bf16 output's 2^-9.
                let (r, s) = if keep { (1.0, s_prev[i][h]) } else { (s_prev[i][h] * rcp(s), s) };
                s_prev[i][h] = s;
                unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                    acc[i][j][2 * h] *= r;
                    acc[i][j][2 * h + 1] *= r;
                });
            });
        });
    }

    /// Epilogue: rows < m of the warp tile as bf16 pairs, acc * s_prev * 2^8 (A converted on the conversion pipe,
    /// m-tiles < CVT_MT) or 2^16 (A on the ALU): the powers of two the conversions left out.
    #[inline(always)]
    unsafe fn store<const CVT_MT: usize>(&self, out: *mut u16, acc: &Acc, s_prev: &RowScales) {
        let fold = |i: usize| if i < CVT_MT { 256.0f32 } else { 65536.0 };
        unroll!(i in [0, 1, 2, 3] {
            unroll!(h in [0, 1] {
                let row = self.m0 + self.wm * 64 + 16 * i + self.g + 8 * h;
                if row < self.m {
                    let s = s_prev[i][h] * fold(i);
                    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
                        let col = self.n0 + self.wn * 64 + 8 * j + 2 * self.t;
                        let v = f32x2_to_bf16x2(acc[i][j][2 * h] * s, acc[i][j][2 * h + 1] * s);
                        *(out.add(row * self.n + col) as *mut u32) = v;
                    });
                }
            });
        });
    }
}

/// A m-tiles converted on the conversion pipe (all four: the fastest split on the H200, docs/perf-gemm.md).
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
    // prove constant, so the chunk loop stays a loop (unrolled, conversions get hoisted and registers spill).
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
