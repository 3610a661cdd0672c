//! `hga_qk_norm_rope`: Qwen3's per-head q/k RMSNorm + NeoX RoPE on the q/k/v projection outputs, writing the
//! rotated q and writing the rotated k and the plain v into the K/V cache. See [`QkNormRopeParams`].
//!
//! Shapes: q_in [tokens, n_heads, 128] (row stride q_stride), k_in / v_in [tokens, n_kv_heads, 128] (strides
//! k_stride / v_stride), positions u32 [tokens]; q_out [tokens, n_heads, 128]; k_cache / v_cache
//! [n_kv_heads, capacity, 128] (one KV head's tokens contiguous; token t lands in slot positions[t], or in slot t
//! with `cache_by_token`).
//! Grid / block: one warp per (token, head slot), slot in [0, n_heads + n_kv_heads): q heads first, then KV heads
//! (whose warp also copies v). Block = 128 threads (4 warps), grid.x = ceil(tokens * (n_heads + n_kv_heads) / 4).
//! Lane l owns the elements (2l, 2l+1) and their NeoX partners (64+2l, 65+2l), so each rotation pair stays in one
//! lane; loads and stores are 4-byte, coalesced per half row.
//! Shared memory: none.
//! Math (transformers' Qwen3 order): h = bf16(x * rsqrt(mean(x^2) + eps)) (sum of squares in f32),
//! y = bf16(w * h); angle = f32(pos * inv_freq[i]) (f32 product, as transformers), cos/sin of that angle with a
//! f64 range reduction to [-pi, pi] then `cos.approx` / `sin.approx` (abs. error ~1e-6);
//! out_i = bf16(y_i cos - y_{i+64} sin), out_{i+64} = bf16(y_{i+64} cos + y_i sin) in f32 (one rounding; transformers
//! rounds cos/sin and each product to bf16 too: within a couple of bf16 ulps of this).
//! Assumes: head_dim 128; positions >= capacity are skipped for the cache write (q is still written).
use crate::arch::*;
use crate::params::QkNormRopeParams;

const D: usize = 128;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_qk_norm_rope(p: QkNormRopeParams) {
    // The q/k norm weights (constant, 256 bytes each) towards L2 while the previous kernel finishes.
    prefetch_l2_early(p.q_norm_w as *const u8, 2 * D, thread_x() as usize, 128);
    prefetch_l2_early(p.k_norm_w as *const u8, 2 * D, thread_x() as usize, 128);
    entry_prologue();
    let slots = p.n_heads + p.n_kv_heads;
    let item = block_x() * 4 + thread_x() / 32;
    if item >= p.tokens * slots {
        return;
    }
    let t = item / slots;
    let slot = item % slots;
    let lane = lane_id() as usize;
    let pos = *(p.positions as *const u32).add(t as usize);
    let is_q = slot < p.n_heads;
    let (src, w) = if is_q {
        ((p.q_in as *const u16).add(t as usize * p.q_stride as usize + slot as usize * D), p.q_norm_w as *const u16)
    } else {
        let kh = (slot - p.n_heads) as usize;
        ((p.k_in as *const u16).add(t as usize * p.k_stride as usize + kh * D), p.k_norm_w as *const u16)
    };
    let lo = *(src.add(2 * lane) as *const u32);
    let hi = *(src.add(64 + 2 * lane) as *const u32);
    let (x0, x1) = bf16x2_to_f32(lo);
    let (x2, x3) = bf16x2_to_f32(hi);
    let ss = warp_sum(x0 * x0 + x1 * x1 + x2 * x2 + x3 * x3);
    let inv = 1.0 / sqrt_rn(ss / D as f32 + p.eps);
    let (w0, w1) = bf16x2_to_f32(*(w.add(2 * lane) as *const u32));
    let (w2, w3) = bf16x2_to_f32(*(w.add(64 + 2 * lane) as *const u32));
    let y = |x: f32, w: f32| bf16_to_f32(f32_to_bf16(w * bf16_to_f32(f32_to_bf16(x * inv))));
    let (y0, y1, y2, y3) = (y(x0, w0), y(x1, w1), y(x2, w2), y(x3, w3));
    // inv_freq[2 lane], inv_freq[2 lane + 1] by selects over constant indices: a run-time index into the by-value
    // parameter would copy the whole struct to local memory.
    let (mut f0, mut f1) = (0f32, 0f32);
    let mut i = 0;
    while i < 32 {
        if lane == i {
            f0 = p.inv_freq[2 * i];
            f1 = p.inv_freq[2 * i + 1];
        }
        i += 1;
    }
    let (c0, s0) = cos_sin(pos as f32 * f0);
    let (c1, s1) = cos_sin(pos as f32 * f1);
    let out_lo = f32x2_to_bf16x2(y0 * c0 - y2 * s0, y1 * c1 - y3 * s1);
    let out_hi = f32x2_to_bf16x2(y2 * c0 + y0 * s0, y3 * c1 + y1 * s1);
    let dst = if is_q {
        (p.q_out as *mut u16).add((t as usize * p.n_heads as usize + slot as usize) * D)
    } else {
        let cache_slot = if p.cache_by_token != 0 { t } else { pos };
        if cache_slot >= p.capacity {
            return;
        }
        let kh = (slot - p.n_heads) as usize;
        let row = (kh * p.capacity as usize + cache_slot as usize) * D;
        // v is copied unchanged by the warp of its KV head.
        let vs = (p.v_in as *const u16).add(t as usize * p.v_stride as usize + kh * D);
        let vd = (p.v_cache as *mut u16).add(row);
        *(vd.add(2 * lane) as *mut u32) = *(vs.add(2 * lane) as *const u32);
        *(vd.add(64 + 2 * lane) as *mut u32) = *(vs.add(64 + 2 * lane) as *const u32);
        (p.k_cache as *mut u16).add(row)
    };
    *(dst.add(2 * lane) as *mut u32) = out_lo;
    *(dst.add(64 + 2 * lane) as *mut u32) = out_hi;
}

/// (cos a, sin a) for any finite f32 `a`: reduction by 2*pi in f64, then the approximate f32 instructions on
/// [-pi, pi] (abs. error about 2^-20).
#[inline(always)]
fn cos_sin(a: f32) -> (f32, f32) {
    const TWO_PI: f64 = core::f64::consts::TAU;
    let a64 = a as f64;
    let k = rint_f64(a64 * (1.0 / TWO_PI));
    let r = (a64 - k * TWO_PI) as f32;
    let (c, s): (f32, f32);
    unsafe {
        core::arch::asm!("cos.approx.f32 {0}, {2}; sin.approx.f32 {1}, {2};",
            out(reg32) c, out(reg32) s, in(reg32) r, options(pure, nomem, nostack))
    };
    (c, s)
}

#[inline(always)]
fn rint_f64(x: f64) -> f64 {
    let r: f64;
    unsafe { core::arch::asm!("cvt.rni.f64.f64 {0}, {1};", out(reg64) r, in(reg64) x, options(pure, nomem, nostack)) };
    r
}
