//! Reference block-scaled FP8 linear and fused RMSNorm -> FP8 quantization.
use gpu_kernels::num::{e4m3_to_f32, FP8_GROUP};
use half::bf16;

/// `out[m, n] = bf16(sum_kb (sum_{k in kb} qa[m, k] qw[n, k]) * sa[m, kb] * sw[n / 128, kb])`, dequantized
/// products accumulated in f64. Shapes as `hga_host::kernels::gemm::hga_fp8_linear` (k % 128 == 0). Also returns
/// the unrounded f64 result (for error measurements).
pub fn hga_fp8_linear(
    a: &[u8],
    a_scale: &[f32],
    w: &[u8],
    w_scale: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> (Vec<bf16>, Vec<f64>) {
    assert_eq!(k % FP8_GROUP, 0);
    let kbs = k / FP8_GROUP;
    assert_eq!(a.len(), m * k);
    assert_eq!(a_scale.len(), m * kbs);
    assert_eq!(w.len(), n * k);
    assert_eq!(w_scale.len(), n.div_ceil(128) * kbs);
    let lut: Vec<f64> = (0..=255u8).map(|b| e4m3_to_f32(b) as f64).collect();
    let mut exact = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut total = 0f64;
            for kb in 0..kbs {
                let mut s = 0f64;
                for c in kb * FP8_GROUP..(kb + 1) * FP8_GROUP {
                    s += lut[a[i * k + c] as usize] * lut[w[j * k + c] as usize];
                }
                total += s * a_scale[i * kbs + kb] as f64 * w_scale[(j / 128) * kbs + kb] as f64;
            }
            exact[i * n + j] = total;
        }
    }
    (exact.iter().map(|&v| super::bf16_rn(v)).collect(), exact)
}

/// `hga_fp8_quant(hga_rmsnorm(x, residual))`: returns `(q, scale, residual_out)`.
pub fn hga_rmsnorm_fp8_quant(
    x: &[bf16],
    residual: Option<&[bf16]>,
    weight: &[bf16],
    rows: usize,
    dim: usize,
    eps: f32,
) -> (Vec<u8>, Vec<f32>, Option<Vec<bf16>>) {
    let (h, r) = super::hga_rmsnorm(x, residual, weight, rows, dim, eps);
    let (q, s) = super::hga_fp8_quant(&h, rows, dim);
    (q, s, r)
}
