//! Reference of `hga_qk_norm_rope`: Qwen3's per-head q/k RMSNorm then NeoX RoPE, and the K/V cache write.
use half::bf16;

/// One head of 128: RMSNorm (mean of squares in f64; `bf16(x * rsqrt(ms + eps))`, then `bf16(w * h)`), then NeoX RoPE
/// at `pos`: `inv_freq[i] = f32(1 / theta^(2i/128))`, angle `f32(pos) * inv_freq` rounded to f32 (as transformers),
/// cos/sin in f64, rotation in f64, one rounding to bf16.
pub fn norm_rope_head(x: &[bf16], w: &[bf16], eps: f32, pos: u32, theta: f64) -> Vec<bf16> {
    let d = x.len();
    let half = d / 2;
    let y: Vec<f64> = norm_head(x, w, eps).iter().map(|v| v.to_f32() as f64).collect();
    let mut out = vec![bf16::ZERO; d];
    for i in 0..half {
        let inv_freq = (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32;
        let ang = (pos as f32 * inv_freq) as f64;
        let (s, c) = ang.sin_cos();
        out[i] = super::bf16_rn(y[i] * c - y[i + half] * s);
        out[i + half] = super::bf16_rn(y[i + half] * c + y[i] * s);
    }
    out
}

/// The RMSNorm part of [`norm_rope_head`]: `bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))`, mean in f64.
pub fn norm_head(x: &[bf16], w: &[bf16], eps: f32) -> Vec<bf16> {
    let ms = x.iter().map(|v| (v.to_f32() as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / ((ms as f32 + eps) as f64).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, w)| {
            let h = super::bf16_rn(v.to_f32() as f64 * inv);
            bf16::from_f32(w.to_f32() * h.to_f32())
        })
        .collect()
}

/// Returns q_out [tokens, n_heads, 128] and updates `k_cache` / `v_cache` [n_kv_heads, capacity, 128] in place
/// (slots `positions[t]`, or slot t with `cache_by_token`; slots >= capacity are skipped). Inputs use row strides as the launcher's shape says.
#[allow(clippy::too_many_arguments)]
pub fn hga_qk_norm_rope(
    q_in: &[bf16],
    k_in: &[bf16],
    v_in: &[bf16],
    positions: &[u32],
    q_norm_w: &[bf16],
    k_norm_w: &[bf16],
    k_cache: &mut [bf16],
    v_cache: &mut [bf16],
    s: &crate::kernels::rope::QkNormRopeShape,
) -> Vec<bf16> {
    const D: usize = 128;
    let mut q_out = Vec::with_capacity(s.tokens * s.n_heads * D);
    for (t, &pos) in positions.iter().enumerate().take(s.tokens) {
        for h in 0..s.n_heads {
            let x = &q_in[t * s.q_stride + h * D..][..D];
            q_out.extend(norm_rope_head(x, q_norm_w, s.eps, pos, s.theta));
        }
        let slot = if s.cache_by_token { t } else { pos as usize };
        if slot >= s.capacity {
            continue;
        }
        for h in 0..s.n_kv_heads {
            let row = (h * s.capacity + slot) * D;
            let k = norm_rope_head(&k_in[t * s.k_stride + h * D..][..D], k_norm_w, s.eps, pos, s.theta);
            k_cache[row..row + D].copy_from_slice(&k);
            v_cache[row..row + D].copy_from_slice(&v_in[t * s.v_stride + h * D..][..D]);
        }
    }
    q_out
}
