//! Launcher of `hga_qk_norm_rope` (gpu-kernels/src/rope/qk_norm_rope.rs).
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::{QkNormRopeParams, ROPE_HEAD_DIM};
use half::bf16;

/// Shapes of one `hga_qk_norm_rope` call. Row strides are in elements per token (>= the row width:
/// `n_heads * 128` for q, `n_kv_heads * 128` for k and v; larger for a fused qkv buffer).
#[derive(Clone, Copy, Debug)]
pub struct QkNormRopeShape {
    pub tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Slots per KV head in the cache.
    pub capacity: usize,
    pub q_stride: usize,
    pub k_stride: usize,
    pub v_stride: usize,
    /// Token t goes to cache slot t (a staging buffer of `capacity >= tokens` rows) instead of slot `positions[t]`.
    pub cache_by_token: bool,
    pub eps: f32,
    pub theta: f64,
}

/// NeoX inverse frequencies as transformers computes them: `f32(1 / theta^(2i / 128))`.
pub fn rope_inv_freq(theta: f64) -> [f32; ROPE_HEAD_DIM / 2] {
    std::array::from_fn(|i| (1.0 / theta.powf((2 * i) as f64 / ROPE_HEAD_DIM as f64)) as f32)
}

/// Per-head RMSNorm (q_norm_w / k_norm_w, bf16 [128]) and NeoX RoPE at `positions` (u32 [tokens]) of q_in and k_in;
/// writes q_out [tokens, n_heads, 128] and, for every token t and KV head h, k (normed, rotated) and v (copied) into
/// slot `positions[t]` of `k_cache` / `v_cache` [n_kv_heads, capacity, 128]. Positions >= capacity are not written
/// to the cache (the kernel cannot report them; callers keep positions < capacity).
#[allow(clippy::too_many_arguments)]
pub fn hga_qk_norm_rope(
    gpu: &Gpu,
    q_in: &impl DevicePtr<bf16>,
    k_in: &impl DevicePtr<bf16>,
    v_in: &impl DevicePtr<bf16>,
    positions: &impl DevicePtr<u32>,
    q_norm_w: &impl DevicePtr<bf16>,
    k_norm_w: &impl DevicePtr<bf16>,
    q_out: &mut impl DevicePtrMut<bf16>,
    k_cache: &mut impl DevicePtrMut<bf16>,
    v_cache: &mut impl DevicePtrMut<bf16>,
    s: &QkNormRopeShape,
) -> Result<(), RuntimeError> {
    const D: usize = ROPE_HEAD_DIM;
    let bad = |m: String| Err(RuntimeError::Shape(format!("qk_norm_rope: {m}")));
    if s.n_heads == 0 || s.n_kv_heads == 0 {
        return bad("n_heads and n_kv_heads must be > 0".into());
    }
    if !(s.eps.is_finite() && s.eps >= 0.0 && s.theta.is_finite() && s.theta > 0.0) {
        return bad(format!("eps {} / theta {} out of range", s.eps, s.theta));
    }
    let (qw, kw) = (s.n_heads * D, s.n_kv_heads * D);
    if s.q_stride < qw || s.k_stride < kw || s.v_stride < kw {
        return bad(format!("strides {}/{}/{} below the row widths {qw}/{kw}", s.q_stride, s.k_stride, s.v_stride));
    }
    if !(s.q_stride.is_multiple_of(2) && s.k_stride.is_multiple_of(2) && s.v_stride.is_multiple_of(2)) {
        return bad("strides must be even (4-byte accesses)".into());
    }
    let need = |stride: usize, w: usize| if s.tokens == 0 { 0 } else { (s.tokens - 1) * stride + w };
    if q_in.len() < need(s.q_stride, qw) || k_in.len() < need(s.k_stride, kw) || v_in.len() < need(s.v_stride, kw) {
        return bad(format!(
            "inputs too short: q {} k {} v {} elements for {} tokens",
            q_in.len(),
            k_in.len(),
            v_in.len(),
            s.tokens
        ));
    }
    check_len("qk_norm_rope positions", positions.len(), s.tokens)?;
    check_len("qk_norm_rope q_norm_w", q_norm_w.len(), D)?;
    check_len("qk_norm_rope k_norm_w", k_norm_w.len(), D)?;
    check_len("qk_norm_rope q_out", q_out.len(), s.tokens * qw)?;
    let cache = s.n_kv_heads.checked_mul(s.capacity).and_then(|v| v.checked_mul(D));
    let cache = cache.ok_or_else(|| RuntimeError::Shape("qk_norm_rope: cache size overflows".into()))?;
    check_len("qk_norm_rope k_cache", k_cache.len(), cache)?;
    check_len("qk_norm_rope v_cache", v_cache.len(), cache)?;
    let items = s.tokens * (s.n_heads + s.n_kv_heads);
    dim_u32("qk_norm_rope tokens * (n_heads + n_kv_heads)", items)?;
    dim_u32("qk_norm_rope capacity", s.capacity)?;
    dim_u32("qk_norm_rope strides", s.q_stride.max(s.k_stride).max(s.v_stride))?;
    if s.tokens == 0 {
        return Ok(());
    }
    let (pq, _g1) = dptr(gpu, q_in);
    let (pk, _g2) = dptr(gpu, k_in);
    let (pv, _g3) = dptr(gpu, v_in);
    let (ppos, _g4) = dptr(gpu, positions);
    let (pqw, _g5) = dptr(gpu, q_norm_w);
    let (pkw, _g6) = dptr(gpu, k_norm_w);
    let (pqo, _g7) = dptr_mut(gpu, q_out);
    let (pkc, _g8) = dptr_mut(gpu, k_cache);
    let (pvc, _g9) = dptr_mut(gpu, v_cache);
    let p = QkNormRopeParams {
        q_in: pq,
        k_in: pk,
        v_in: pv,
        q_norm_w: pqw,
        k_norm_w: pkw,
        positions: ppos,
        q_out: pqo,
        k_cache: pkc,
        v_cache: pvc,
        tokens: s.tokens as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        capacity: s.capacity as u32,
        q_stride: s.q_stride as u32,
        k_stride: s.k_stride as u32,
        v_stride: s.v_stride as u32,
        cache_by_token: s.cache_by_token as u32,
        eps: s.eps,
        inv_freq: rope_inv_freq(s.theta),
        _pad: 0,
    };
    let cfg = LaunchConfig { grid_dim: (items.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: lengths and strides checked above; the guards keep the buffers alive across the launch.
    unsafe { launch(gpu, "hga_qk_norm_rope", cfg, p) }
}
