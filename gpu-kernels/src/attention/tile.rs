//! Building blocks shared by the attention kernels: swizzled K/V/Q tiles in shared memory filled with `cp.async`,
//! and the per-warp pieces of FlashAttention-2 (16 query rows per warp) on `mma.sync.m16n8k16` bf16.
//!
//! Shared-memory tile: rows of 128 bf16 (256 bytes, 16 chunks of 16 bytes); chunk c of row r is stored at chunk
//! `c ^ (r & 7)` (XOR swizzle), so the 8 row addresses of one `ldmatrix` matrix hit 8 different bank groups and the
//! 16-byte `cp.async` writes stay whole.
//!
//! Fragment conventions (see `arch::mma`, g = lane / 4, t = lane % 4):
//! - Q (A operand, 16 rows x 128): `[[u32; 4]; 8]`, one entry per 16-wide slice of the head dimension.
//! - S = Q K^T (C layout): `[[f32; 4]; NT]`, n-tile j covers keys 8j..8j+7: [0], [1] = row g, keys 8j+2t, +1;
//!   [2], [3] = row g+8.
//! - O (C layout): `[[f32; 4]; 16]`, n-tile j covers head dims 8j..8j+7.
//! - Softmax state per lane: running max `m` (log2 domain, scaled scores) and this lane's partial row sum `l` for
//!   rows g and g+8; the sum is reduced over the 4 lanes of a row only at the end.
use crate::arch::*;

/// Head dimension.
pub const D: usize = 128;
/// Bytes of one tile row (128 bf16).
pub const ROW_BYTES: u32 = 256;

/// Byte offset of chunk `c` (16 bytes) of row `r` inside a swizzled tile.
#[inline(always)]
pub fn swz(r: u32, c: u32) -> u32 {
    r * ROW_BYTES + ((c ^ (r & 7)) << 4)
}

/// Issues the `cp.async` copies of `ROWS` rows into the swizzled tile at shared address `dst`: tile row r takes the
/// global row `min(r0 + r, end - 1)` of `src` (row stride `stride` elements), so rows past the end repeat the last
/// valid one (finite data; the caller masks them). `end > 0`. All `NTHREADS` threads call.
///
/// # Safety
/// `src` rows `[.., end)` readable; `dst` a tile of `ROWS * 256` bytes in the launch's shared memory.
#[inline(always)]
pub unsafe fn load_rows<const ROWS: u32, const NTHREADS: u32>(
    dst: u32,
    src: *const u16,
    r0: u32,
    end: u32,
    stride: usize,
    tid: u32,
) {
    let mut id = tid;
    while id < ROWS * 16 {
        let r = id / 16;
        let c = id % 16;
        let mut gr = r0 + r;
        if gr >= end {
            gr = end - 1;
        }
        cp_async_16(dst + swz(r, c), src.add(gr as usize * stride + c as usize * 8) as *const u8);
        id += NTHREADS;
    }
}

/// Loads the A fragments of 16 query rows (tile rows `row0..row0+16`) from a swizzled tile at `base`.
///
/// # Safety
/// All 32 lanes call; the tile holds those rows.
#[inline(always)]
pub unsafe fn q_frags(base: u32, row0: u32) -> [[u32; 4]; 8] {
    let lane = lane_id();
    let m = lane / 8;
    let r = row0 + (m & 1) * 8 + lane % 8;
    let mut q = [[0u32; 4]; 8];
    let mut kk = 0;
    while kk < 8 {
        q[kk] = ldmatrix_x4(base + swz(r, 2 * kk as u32 + (m >> 1)));
        kk += 1;
    }
    q
}

/// S = Q K^T for the keys in tile rows `key0 .. key0 + 8 * NT` of the swizzled K tile at `kbase` (raw scores).
///
/// # Safety
/// All 32 lanes call; NT even.
#[inline(always)]
pub unsafe fn qk<const NT: usize>(q: &[[u32; 4]; 8], kbase: u32, key0: u32) -> [[f32; 4]; NT] {
    let lane = lane_id();
    let m = lane / 8;
    let mut s = [[0f32; 4]; NT];
    let mut kk = 0;
    while kk < 8 {
        let mut np = 0;
        while np < NT / 2 {
            let key = key0 + np as u32 * 16 + (m >> 1) * 8 + lane % 8;
            let b = ldmatrix_x4(kbase + swz(key, 2 * kk as u32 + (m & 1)));
            s[2 * np] = mma_bf16_m16n8k16(q[kk], [b[0], b[1]], s[2 * np]);
            s[2 * np + 1] = mma_bf16_m16n8k16(q[kk], [b[2], b[3]], s[2 * np + 1]);
            np += 1;
        }
        kk += 1;
    }
    s
}

/// `a * b + c` with one rounding (`fma.rn.f32`; rustc does not contract `a * b + c` on its own).
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    let r: f32;
    unsafe {
        core::arch::asm!("fma.rn.f32 {0}, {1}, {2}, {3};", out(reg32) r, in(reg32) a, in(reg32) b, in(reg32) c,
            options(pure, nomem, nostack))
    };
    r
}

/// Slack of the lazy rescaling (log2 units): the running base trails the true row max by at most this, so
/// P <= 2^8 (exact in bf16's range; the final O / l and LSE are unchanged mathematically).
pub const LAZY_SLACK: f32 = 8.0;

/// True when `p` holds in any lane of the warp (`vote.sync.any`); all 32 lanes call.
#[inline(always)]
pub fn warp_any(p: bool) -> bool {
    let r: u32;
    unsafe {
        core::arch::asm!(
            "{{ .reg .pred a, b; setp.ne.u32 a, {1}, 0; vote.sync.any.pred b, a, 0xffffffff; selp.u32 {0}, 1, 0, b; }}",
            out(reg32) r, in(reg32) p as u32, options(nomem, nostack))
    };
    r != 0
}

/// Online-softmax step on raw scores `s`: with `MASKED`, sets the scores of keys `key >= lim[0]` (row g) /
/// `lim[1]` (row g+8) to -inf, where `key = kpos0 + column`; updates the running max (in the scaled log2 domain:
/// score * `scale_log2`, scale_log2 = log2(e) / sqrt(d) > 0, so the max of raw scores scales) and the partial
/// sums, rescales `o`, and returns P = ex2(score * scale_log2 - max) (one FFMA + ex2 per score) as bf16 A fragments
/// for [`pv`] (one per 16 keys). `MASKED` is a compile-time choice so that the common unmasked tiles carry no
/// per-element compare / select. `LAZY`: rescale O and l only when the row max grew by more than [`LAZY_SLACK`]
/// (as FlashAttention-4's conditional rescaling, here exact: base and sums stay consistent), which skips the
/// 64 multiplies per lane of almost every tile; otherwise the base is the running max (FlashAttention-2).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn softmax_step<const NT: usize, const KS: usize, const MASKED: bool, const LAZY: bool>(
    s: &mut [[f32; 4]; NT],
    kpos0: u32,
    lim: [u32; 2],
    scale_log2: f32,
    mrow: &mut [f32; 2],
    lrow: &mut [f32; 2],
    o: &mut [[f32; 4]; 16],
) -> [[u32; 4]; KS] {
    let t = lane_id() % 4;
    let mut mx = [f32::NEG_INFINITY; 2];
    let mut j = 0;
    while j < NT {
        let mut e = 0;
        while e < 4 {
            if MASKED {
                let key = kpos0 + j as u32 * 8 + 2 * t + (e as u32 & 1);
                if key >= lim[e / 2] {
                    s[j][e] = f32::NEG_INFINITY;
                }
            }
            mx[e / 2] = fmax(mx[e / 2], s[j][e]);
            e += 1;
        }
        j += 1;
    }
    let mut base = [0f32; 2];
    let mut alpha = [1f32; 2];
    let mut moved = false;
    let mut r = 0;
    while r < 2 {
        let mut v = mx[r];
        v = fmax(v, shfl_xor_f32(v, 1));
        v = fmax(v, shfl_xor_f32(v, 2));
        let v = v * scale_log2;
        if LAZY {
            // Move the base only when the tile's max exceeds it by more than LAZY_SLACK (the first valid key
            // always moves it from -inf); otherwise P = ex2(score - base) <= 2^LAZY_SLACK and O, l keep their scale.
            if v > mrow[r] + LAZY_SLACK {
                alpha[r] = ex2(mrow[r] - v);
                mrow[r] = v;
                moved = true;
            }
        } else {
            let m_new = fmax(mrow[r], v);
            // A row with no valid key yet keeps m = -inf: the base below is then 0, so ex2 sees -inf, not NaN.
            alpha[r] = ex2(mrow[r] - if m_new == f32::NEG_INFINITY { 0.0 } else { m_new });
            mrow[r] = m_new;
        }
        base[r] = if mrow[r] == f32::NEG_INFINITY { 0.0 } else { mrow[r] };
        r += 1;
    }
    let mut sum = [0f32; 2];
    let mut j = 0;
    while j < NT {
        let mut e = 0;
        while e < 4 {
            let pv = ex2(fma(s[j][e], scale_log2, -base[e / 2]));
            s[j][e] = pv;
            sum[e / 2] += pv;
            e += 1;
        }
        j += 1;
    }
    // Eager: rescale every tile. Lazy: only when some row of the warp moved its base (a warp-uniform branch).
    if !LAZY || warp_any(moved) {
        lrow[0] *= alpha[0];
        lrow[1] *= alpha[1];
        let mut j = 0;
        while j < 16 {
            o[j][0] *= alpha[0];
            o[j][1] *= alpha[0];
            o[j][2] *= alpha[1];
            o[j][3] *= alpha[1];
            j += 1;
        }
    }
    lrow[0] += sum[0];
    lrow[1] += sum[1];
    let mut pf = [[0u32; 4]; KS];
    let mut k = 0;
    while k < KS {
        pf[k] = [
            f32x2_to_bf16x2(s[2 * k][0], s[2 * k][1]),
            f32x2_to_bf16x2(s[2 * k][2], s[2 * k][3]),
            f32x2_to_bf16x2(s[2 * k + 1][0], s[2 * k + 1][1]),
            f32x2_to_bf16x2(s[2 * k + 1][2], s[2 * k + 1][3]),
        ];
        k += 1;
    }
    pf
}

/// One K/V tile for one warp: S = Q K^T over the tile rows `row0 .. row0 + 8 * NT` (keys `kpos0 ..`), the
/// online-softmax step (masked or not) and O += P V.
///
/// # Safety
/// All 32 lanes call; the tiles at `kst` / `vst` hold those rows; NT = 2 * KS.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn attend_tile<const NT: usize, const KS: usize, const MASKED: bool, const LAZY: bool>(
    qf: &[[u32; 4]; 8],
    kst: u32,
    vst: u32,
    row0: u32,
    kpos0: u32,
    lim: [u32; 2],
    scale_log2: f32,
    m: &mut [f32; 2],
    l: &mut [f32; 2],
    o: &mut [[f32; 4]; 16],
) {
    let mut s = qk::<NT>(qf, kst, row0);
    let pf = softmax_step::<NT, KS, MASKED, LAZY>(&mut s, kpos0, lim, scale_log2, m, l, o);
    pv::<KS>(&pf, vst, row0, o);
}

/// O += P V for the keys in tile rows `key0 .. key0 + 16 * KS` of the swizzled V tile at `vbase`.
///
/// # Safety
/// All 32 lanes call.
#[inline(always)]
pub unsafe fn pv<const KS: usize>(p: &[[u32; 4]; KS], vbase: u32, key0: u32, o: &mut [[f32; 4]; 16]) {
    let lane = lane_id();
    let m = lane / 8;
    let mut k = 0;
    while k < KS {
        let key = key0 + k as u32 * 16 + (m & 1) * 8 + lane % 8;
        let mut c = 0;
        while c < 16 {
            let b = ldmatrix_x4_trans(vbase + swz(key, c as u32 + (m >> 1)));
            o[c] = mma_bf16_m16n8k16(p[k], [b[0], b[1]], o[c]);
            o[c + 1] = mma_bf16_m16n8k16(p[k], [b[2], b[3]], o[c + 1]);
            c += 2;
        }
        k += 1;
    }
}

/// The full row sums of rows g and g+8 (the 4 lanes of a row each hold a partial sum).
#[inline(always)]
pub fn row_sums(l: [f32; 2]) -> [f32; 2] {
    let mut r = l;
    let mut i = 0;
    while i < 2 {
        r[i] += shfl_xor_f32(r[i], 1);
        r[i] += shfl_xor_f32(r[i], 2);
        i += 1;
    }
    r
}
