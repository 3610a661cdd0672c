//! `hga_route_summary`: the summaries of closed chunks, from their 64 post-RoPE bf16 keys per KV head: the
//! elementwise min and max (`chunk_min` / `chunk_max`, bf16 [n_kv][max_chunks][128]) and each token's int4 sketch
//! (`sketch` u8 [n_kv][max_tokens][64] + `sketch_scale` f16 [n_kv][max_tokens]), formats of `crate::params::hga`.
//!
//! Sketch of a key k (as host/src/hga's `sketch4`): `s = max_d |k_d| / 7` in f32 (IEEE division),
//! `n_d = clamp(round(k_d / s), -8, 7)` with the division in f32 by that f32 `s` and round half away from zero;
//! the stored scale is `f16(s)` (round to nearest even); the estimate of k_d is `n_d * f16(s)`. `s = 0` (an
//! all-zero key) gives nibbles 0. A NaN in the key stores a NaN scale (so every estimate of that token is NaN, as
//! host/src/hga's sketch of such a key gives a NaN score); NaN quotients (an infinite key: s = inf) store nibble 0.
//! Min/max ignore NaN (f32::min / f32::max from +inf / -inf, as host/src/hga's `Summaries::build`).
//!
//! Keys through the key source of [`RouteParams`] (dense pointer + strides, or a table of group-block addresses).
//! Which chunks: with `pos` = 0, chunks `chunk0 .. chunk0 + grid.x` (prefill: many chunks in one launch); with
//! `pos` set (decode, graph-friendly), `*pos + chunk0` is the number of keys written so far (`chunk0` 0: `*pos` is
//! that count; 1: `*pos` is the position of the key just written) and the launch (grid.x = 1) summarizes chunk
//! `(*pos + chunk0) / 64 - 1` when that count is a positive multiple of 64, else does nothing.
//!
//! Grid (chunks, n_kv), block 256 = 8 warps; warp w takes tokens 8w .. 8w + 7 of the chunk, lane l dims 4l .. 4l + 3
//! (one 8-byte load per token and lane, the warp's 8 loads issued together, a warp max for the scale, a 2-byte nibble store per lane); the min/max of
//! the warps meet in shared memory (8 x 128 x 2 f32 = 8 KB) and thread d < 128 writes dim d. Bytes: 16 KB of keys
//! read, 1 KB of summary + 4.2 KB of sketches written per (chunk, KV head).
use crate::arch::*;
use crate::hga::route::{fmin, key_row};
use crate::moe::unroll;
use crate::params::{RouteParams, HGA_CHUNK};

/// Shared memory of the summary kernel (bytes).
pub const SUMMARY_SMEM: usize = 8 * 128 * 2 * 4;

#[inline(always)]
fn f32_to_f16(x: f32) -> u16 {
    let r: u16;
    unsafe { core::arch::asm!("cvt.rn.f16.f32 {0}, {1};", out(reg16) r, in(reg32) x, options(pure, nomem, nostack)) };
    r
}

/// Round half away from zero (f32::round), exact: `x - trunc(x)` is exact in f32.
#[inline(always)]
fn round_away(x: f32) -> f32 {
    let t: f32;
    unsafe { core::arch::asm!("cvt.rzi.f32.f32 {0}, {1};", out(reg32) t, in(reg32) x, options(pure, nomem, nostack)) };
    if fabs(x - t) >= 0.5 {
        if x > 0.0 {
            t + 1.0
        } else {
            t - 1.0
        }
    } else {
        t
    }
}

/// The two's complement nibble of `k / s` (see the module docs).
#[inline(always)]
fn nibble(k: f32, s: f32) -> u32 {
    if s == 0.0 {
        return 0;
    }
    let v = k / s;
    if v != v {
        return 0;
    }
    let r = round_away(v);
    let r = if r < -8.0 {
        -8.0
    } else if r > 7.0 {
        7.0
    } else {
        r
    };
    (r as i32 as u32) & 0xF
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_route_summary(p: RouteParams) {
    entry_prologue();
    let h = block_y() as usize;
    let tid = thread_x() as usize;
    let (warp, lane) = (tid / 32, tid % 32);
    let chunk = if p.pos != 0 {
        // `chunk0` is 0 with a device count of keys, 1 with the device position of the key just written.
        let t = *(p.pos as *const u32) as usize + p.chunk0 as usize;
        if t == 0 || t % HGA_CHUNK != 0 || block_x() != 0 {
            return;
        }
        t / HGA_CHUNK - 1
    } else {
        p.chunk0 as usize + block_x() as usize
    };
    if chunk >= p.max_chunks as usize || (chunk + 1) * HGA_CHUNK > p.max_tokens as usize {
        return;
    }
    let mut mn = [f32::INFINITY; 4];
    let mut mx = [f32::NEG_INFINITY; 4];
    // The warp's 8 tokens loaded first (unrolled), then processed.
    let mut kw = [[0u32; 2]; 8];
    unroll!(t in [0, 1, 2, 3, 4, 5, 6, 7] {
        let j = chunk * HGA_CHUNK + warp * 8 + t;
        kw[t] = *(key_row(&p, h, j).add(4 * lane) as *const [u32; 2]);
    });
    unroll!(t in [0, 1, 2, 3, 4, 5, 6, 7] {
        let j = chunk * HGA_CHUNK + warp * 8 + t;
        let w = kw[t];
        let (k0, k1) = bf16x2_to_f32(w[0]);
        let (k2, k3) = bf16x2_to_f32(w[1]);
        let k = [k0, k1, k2, k3];
        let mut amax = 0f32;
        let mut nan = 0f32;
        unroll!(d in [0, 1, 2, 3] {
            mn[d] = fmin(mn[d], k[d]);
            mx[d] = fmax(mx[d], k[d]);
            amax = fmax(amax, fabs(k[d]));
            if k[d] != k[d] {
                nan = 1.0;
            }
        });
        let amax = warp_max(amax);
        let nan = warp_max(nan);
        let s = amax / 7.0;
        let nib = nibble(k0, s) | nibble(k1, s) << 4 | nibble(k2, s) << 8 | nibble(k3, s) << 12;
        let tok = h * p.max_tokens as usize + j;
        *((p.sketch as *mut u8).add(tok * 64 + 2 * lane) as *mut u16) = nib as u16;
        if lane == 0 {
            *(p.sketch_scale as *mut u16).add(tok) = if nan != 0.0 { 0x7E00 } else { f32_to_f16(s) };
        }
    });
    let sm = dyn_smem_ptr::<f32>();
    let mut d = 0;
    while d < 4 {
        *sm.add(warp * 128 + 4 * lane + d) = mn[d];
        *sm.add(1024 + warp * 128 + 4 * lane + d) = mx[d];
        d += 1;
    }
    sync_threads();
    if tid < 128 {
        let mut a = f32::INFINITY;
        let mut b = f32::NEG_INFINITY;
        let mut w = 0;
        while w < 8 {
            a = fmin(a, *sm.add(w * 128 + tid));
            b = fmax(b, *sm.add(1024 + w * 128 + tid));
            w += 1;
        }
        let o = (h * p.max_chunks as usize + chunk) * 128 + tid;
        *(p.chunk_min as *mut u16).add(o) = f32_to_bf16(a);
        *(p.chunk_max as *mut u16).add(o) = f32_to_bf16(b);
    }
}
