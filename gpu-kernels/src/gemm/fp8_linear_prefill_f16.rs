//! `hga_fp8_linear_prefill_f16` (and the variants `_f16_alu`, `_f16_cvt`): the block-scaled FP8 linear of
//! `hga_fp8_linear_prefill` (same [`Fp8LinearParams`], same semantics) for GPUs without FP8 `mma.sync` (sm_90:
//! H100 / H200), where ptxas emulates each e4m3 m16n8k32 with 2 HMMA plus its own conversions (SASS of v1's loop:
//! 48 F2FP + 64 FADD per 32 HMMA, measured 0.31x of the bf16 mma.sync ceiling, docs/perf-gemm.md). Here the
//! kernel converts each ldmatrix'd e4m3 fragment to f16 itself, once per warp and 16-wide k chunk, and reuses it
//! over a 64 x 64 warp tile (4 m-tiles x 8 n-tiles): 32 f16x2 conversions feed 32 plain
//! `mma.sync m16n8k16 f32.f16.f16.f32`. It assembles and runs on sm_89 / sm_120 too (where v1's native QMMA is
//! the better choice; the launcher picks this kernel on sm_90 only).
//!
//! Shapes: a e4m3 [m, k], a_scale f32 [m, k/128], w e4m3 [n, k], w_scale f32 [n/128, k/128], out bf16 [m, n].
//! Assumes (the launcher checks): n % 128 == 0, k % 128 == 0 (k < 2^31), m >= 1 arbitrary; a and w 16-byte
//! aligned. Grid: (n/128, ceil(m/128)); block = 4 warps (128 threads) in a 2 (m) x 2 (n) layout, each warp a
//! 64 x 64 tile. Block tile 128 x 128 x 128: one K step is one scale block. Scales and rows past m: as v1
//! (`fp8_linear_prefill.rs`): the accumulator is kept in units of the current block's scale s (rescaled by
//! s_prev / s per row before each K block; here with `rcp.approx`, 2^-22 relative), a K block whose weight scale is
//! 0 is skipped, scales are otherwise positive normal floats, rows of A past m are clamped to row m-1, not stored.
//!
//! Conversion (arch::convert), exact both ways: on the ALU pipe, `prmt` (sign-replicating byte spread) + `shl` +
//! `and` per f16x2 gives each e4m3 value times 2^-8 (ptxas issues about a third of the shifts as IMAD.SHL on the
//! FMA pipe); on the conversion pipe, one `cvt.rn.f16x2.e4m3x2` (F2FP) per f16x2 gives the value itself. W is always
//! converted on the ALU; A's m-tiles 0 .. CVT_MT on the conversion pipe, the others on the ALU:
//! `_f16` CVT_MT = 2 (8 F2FP + 24 ALU conversions per chunk), `_f16_alu` 0, `_f16_cvt` 4 (16 + 16). The powers of
//! two (2^8 or 2^16 per m-tile) are constant per row: they cancel in the rescaling ratio and the epilogue applies
//! them (f32, exact).
//! K order inside an mma: the e4m3 fragment register (row g, k bytes 4t..4t+3 of a 16-byte chunk, from
//! `ldmatrix` b16 over e4m3 rows) gives f16x2 [4t, 4t+1] and [4t+2, 4t+3]; they go to the f16 m16n8k16 slots of
//! logical k [2t, 2t+1] and [8+2t, 8+2t+1] for A and for B alike, so each mma sums the same 16 k of the chunk.
//!
//! Cycle count (SASS, ptxas 13.0, sm_90; per warp and 16-wide k chunk, the inner loop):
//! `_f16`: 32 HMMA.16816, 4 LDSM.x4, 8 F2FP, 24 PRMT + 25 LOP3 + 8 SHF + 4 other ALU = 61 ALU, 19 IMAD: 125.
//! `_f16_alu`: 32 HMMA, 4 LDSM, 0 F2FP, 77 ALU, 24 IMAD: 141. `_f16_cvt`: 32 HMMA, 4 LDSM, 16 F2FP, ~43 ALU, 12 IMAD:
//! 109. Per K block and warp outside that loop: ~300 (144 FMUL of the rescale, cp.async issue and addressing,
//! 15 LDS of scales, 8 MUFU.RCP, barrier). Per SM and 128-wide K block (2 blocks x 4 warps resident on sm_90 =
//! 8 warps x 8 chunks = 64 chunk iterations):
//! - tensor: 2048 HMMA = 8.4 MFLOP; at the measured 548 TFLOP/s (4.15 TFLOP/s per SM) 2.0 us = ~3600-4000 clk
//!   (1.75-1.98 GHz). The floor.
//! - issue (1 / clk / SMSP, 2 warps per SMSP): `_f16` 2 x (8 x 125 + 300) = 2600 clk (65-72%), `_f16_alu` 2860
//!   (72-80%), `_f16_cvt` 2340 (59-65%). The tightest resource of the ALU variant.
//! - ALU (16 lanes / clk / SMSP = 0.5 warp instruction / clk): `_f16` 2 x 8 x 61 / 0.5 = 1950 clk (49-54%),
//!   `_f16_alu` 2460 (62-68%), `_f16_cvt` 1380.
//! - conversion pipe (16 lanes / clk / SM by the CUDA throughput table = 2 clk per warp F2FP per SM): `_f16` 512
//!   F2FP = 1024 clk (26-28%), `_f16_cvt` 2048 (51-57%). v1's 0.31x with 48 F2FP per 32 HMMA is also consistent
//!   with only ~8 lanes / clk / SM for F2FP.F16.E4M3.UNPACK_B: then `_f16` 2048 clk (51-57%) and `_f16_cvt` 4096
//!   (conversion-bound, ~0.9x at best). `_f16` is the split with headroom under both rates, hence the default.
//! - FMA pipe (IMAD.SHL, FMUL; 0.5 warp instruction / clk / SMSP): < 25%.
//! - shared memory: cp.async 32 KB in + ldmatrix 64 x 4 x 512 B = 128 KB out = 160 KB at 128 B/clk = 1280 clk
//!   (32-36%).
//! - L2 -> SM: 32 KB per block and K block (v1's tile): (M/128)(N/128)(K/128) x 32 KB = 256 MB at 4096x2048x2048,
//!   3.5 TB/s at the predicted 74 us (512 MB, 3.5 TB/s at 4096x4096x2048). Not measured here: if L2 cannot deliver
//!   that, a 256 x 128 block tile (8 warps, 144 KiB shared memory, sm_90 only) cuts it by a quarter.
//! Predicted: ~0.85x of the bf16 mma.sync ceiling for `_f16` (every pipe <= 72% of the tensor time; losses: one
//! barrier per K block, tail waves (1.94 and 3.88 waves of 264 resident blocks at the bench shapes), the epilogue).
//! The conversions of a chunk run before its 32 HMMA (no software pipelining inside a warp): the two warps per SMSP
//! (one of each resident block) overlap one's conversions with the other's HMMA.
//! Registers: 128 f32 accumulators + 16 e4m3 + 32 f16x2 fragment registers + addressing: ~245-252, 0 spills (<= 256
//! keeps 2 blocks of 128 threads per SM on sm_90).
//! Shared memory: STAGES x (A 128 x 128 B + W 128 x 128 B + 128 f32 row scales of A + 1 f32 weight scale, padded
//! to 16 B) = 33296 B per stage, 3 stages = 99888 B (fits the 99 KiB of sm_89 / sm_120; 2 blocks / SM on sm_90).
//! The tile rows are 128 bytes whose 16-byte chunks are XOR-swizzled by (row % 8) (conflict-free cp.async stores and
//! ldmatrix reads, as v1); the scales come with their tile through 4-byte `cp.async` (no global load in the loop).
//! Pipeline: as v1, STAGES - 1 K blocks in flight. Epilogue: bf16 pairs (4-byte stores) from the accumulators.
//! The pieces (`Blk`: tile copies, pipeline steps, fragment loads, rescale, epilogue; `a_frag`, `b_frags`,
//! `mma_row`) are shared with v3 (`fp8_linear_prefill_f16_v3.rs`), which reorders them into a software pipeline.
use crate::arch::*;
use crate::params::Fp8LinearParams;

pub(super) const BM: usize = 128;
pub(super) const BN: usize = 128;
pub(super) const BK: usize = 128;
pub(super) const THREADS: usize = 128;
pub(super) const STAGES: usize = 3;
pub(super) const TILE: usize = BM * BK;
/// Offset of the 128 f32 A row scales in a stage.
pub(super) const SA_OFF: usize = 2 * TILE;
/// Offset of the f32 weight scale in a stage.
pub(super) const SW_OFF: usize = SA_OFF + 4 * BM;
/// Bytes of one stage (A tile, W tile, A scales, W scale padded to 16).
pub const STAGE_BYTES: usize = SW_OFF + 16;
/// Dynamic shared memory of a launch (the launcher's constant).
pub const SMEM_BYTES: usize = STAGES * STAGE_BYTES;
const _: () = assert!(SMEM_BYTES == crate::params::FP8_PREFILL_F16_SMEM_BYTES);

/// A m-tiles 0 and 1 (of 4) converted on the conversion pipe, m-tiles 2, 3 and W on the ALU.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_linear_prefill_f16(p: Fp8LinearParams) {
    entry_prologue();
    body::<2>(&p);
}

/// All conversions on the ALU.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_linear_prefill_f16_alu(p: Fp8LinearParams) {
    entry_prologue();
    body::<0>(&p);
}

/// All of A on the conversion pipe, W on the ALU.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_fp8_linear_prefill_f16_cvt(p: Fp8LinearParams) {
    entry_prologue();
    body::<4>(&p);
}

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
pub(super) type Acc = [[[f32; 4]; 8]; 4];
/// The scale each accumulator row of this lane is expressed in: [m-tile][half (row g | g + 8)].
pub(super) type RowScales = [[f32; 2]; 4];
/// The e4m3 fragments of one 16-wide k chunk as `ldmatrix.x4` returns them: A (2 x4 = 4 m-tiles x rows g | g + 8),
/// W (2 x4 = 8 n-tiles).
pub(super) type RawFrags = ([[u32; 4]; 2], [[u32; 4]; 2]);
/// The B (W) f16 fragments of the 8 n-tiles of one chunk.
pub(super) type BFrags = [[u32; 2]; 8];

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
pub(super) fn a_frag<const CVT_MT: usize>(ra: &[[u32; 4]; 2], i: usize) -> [u32; 4] {
    let lo = conv_a(ra[i / 2][2 * (i % 2)], i < CVT_MT); // row g
    let hi = conv_a(ra[i / 2][2 * (i % 2) + 1], i < CVT_MT); // row g + 8
    [lo[0], hi[0], lo[1], hi[1]]
}

/// B fragments of the 8 n-tiles: [k 4t..4t+1, k 4t+2..4t+3] of row (n) g, on the ALU (* 2^-8).
#[inline(always)]
pub(super) fn b_frags(rb: &[[u32; 4]; 2]) -> BFrags {
    let mut bf = [[0u32; 2]; 8];
    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        bf[j] = e4m3x4_to_f16x2x2_scaled(rb[j / 4][j % 4]);
    });
    bf
}

/// The 8 products of m-tile row `acc_i` (one A fragment against the 8 n-tiles).
#[inline(always)]
pub(super) fn mma_row(acc_i: &mut [[f32; 4]; 8], af: [u32; 4], bf: &BFrags) {
    unroll!(j in [0, 1, 2, 3, 4, 5, 6, 7] {
        acc_i[j] = mma_f16_m16n8k16(af, bf[j], acc_i[j]);
    });
}

/// One block's geometry and operands, and this warp's place in the tile.
pub(super) struct Blk {
    tid: usize,
    g: usize,
    t: usize,
    wm: usize,
    wn: usize,
    m: usize,
    n: usize,
    k: usize,
    pub(super) kbs: usize,
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
    pub(super) unsafe fn new(p: &Fp8LinearParams) -> Blk {
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
    pub(super) fn stage(&self, stage: usize) -> u32 {
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
    pub(super) unsafe fn prologue(&self) {
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
    pub(super) fn sync_k_block(&self, kb: usize) -> u32 {
        cp_async_wait::<{ STAGES as u32 - 2 }>();
        sync_threads();
        self.stage(kb % STAGES)
    }

    /// After [`Blk::sync_k_block`]`(kb)`: the copy of K block kb + STAGES - 1 (if any) into kb - 1's buffer, one
    /// commit group (empty past the last K block).
    #[inline(always)]
    pub(super) unsafe fn prefetch(&self, kb: usize) {
        let nk = kb + STAGES - 1;
        if nk < self.kbs {
            self.load_stage(nk % STAGES, nk);
        }
        cp_async_commit();
    }

    /// The raw e4m3 fragments of 16-wide k chunk `c` of the stage at `base` (4 ldmatrix.x4).
    #[inline(always)]
    pub(super) unsafe fn ld_frags(&self, base: u32, c: u32) -> RawFrags {
        let sw_c = ((c as usize ^ self.xr) << 4) as u32;
        (
            [ldmatrix_x4(base + self.a_off[0] as u32 + sw_c), ldmatrix_x4(base + self.a_off[1] as u32 + sw_c)],
            [ldmatrix_x4(base + self.b_off[0] as u32 + sw_c), ldmatrix_x4(base + self.b_off[1] as u32 + sw_c)],
        )
    }

    /// Moves `acc` from the scales `s_prev` to this K block's (row scale * weight scale `s_w`, stage `base`):
    /// acc *= s_prev / s per row (one multiply per accumulator), s_prev = s. With `keep` (the caller's
    /// `s_w == 0`, a K block that adds nothing), the scales stay and the ratio is 1: no branch around the
    /// multiplies (v3 keeps them in one basic block with the HMMA around them; v2 passes `false`).
    #[inline(always)]
    pub(super) unsafe fn rescale(&self, base: u32, s_w: f32, keep: bool, acc: &mut Acc, s_prev: &mut RowScales) {
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
    pub(super) unsafe fn store<const CVT_MT: usize>(&self, out: *mut u16, acc: &Acc, s_prev: &RowScales) {
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

/// `CVT_MT`: A m-tiles 0 .. CVT_MT of the warp's 4 go through the conversion pipe (0, 2, 4), the rest on the ALU.
#[inline(always)]
unsafe fn body<const CVT_MT: usize>(p: &Fp8LinearParams) {
    let b = Blk::new(p);
    b.prologue();
    let mut acc: Acc = [[[0f32; 4]; 8]; 4];
    // The scale acc is currently expressed in, per (m-tile, half) row of this lane; 0 at first (acc is 0).
    let mut s_prev: RowScales = [[0f32; 2]; 4];
    let chunks = (BK / 16) as u32 + (p.k >> 31);
    for kb in 0..b.kbs {
        let base = b.sync_k_block(kb);
        b.prefetch(kb);
        let s_w = ld_shared_f32(base + SW_OFF as u32);
        if s_w != 0.0 {
            b.rescale(base, s_w, false, &mut acc, &mut s_prev);
            // A real loop over the 8 k chunks: unrolled, the conversions of all chunks get hoisted and registers
            // run out (v1 saw it with ptxas's own conversions; here ptxas unrolled a loop of constant trip count on
            // sm_89 and spilled). The bound is 8 + (k >> 31) = 8 (k < 2^31, the launcher checks), which neither
            // LLVM nor ptxas can prove constant.
            let mut c = 0u32;
            while c < chunks {
                let (ra, rb) = b.ld_frags(base, c);
                let bf = b_frags(&rb);
                unroll!(i in [0, 1, 2, 3] {
                    mma_row(&mut acc[i], a_frag::<CVT_MT>(&ra, i), &bf);
                });
                c += 1;
            }
        }
    }
    cp_async_wait::<0>();
    b.store::<CVT_MT>(p.out as *mut u16, &acc, &s_prev);
}
