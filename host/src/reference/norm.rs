//! Reference RMSNorm (transformers' Qwen3RMSNorm on bf16 tensors).
use half::bf16;

/// Returns `(out, residual_out)`; see `hga_host::kernels::hga_rmsnorm`. Mean of squares in f64.
pub fn hga_rmsnorm(
    x: &[bf16],
    residual: Option<&[bf16]>,
    weight: &[bf16],
    rows: usize,
    dim: usize,
    eps: f32,
) -> (Vec<bf16>, Option<Vec<bf16>>) {
    assert_eq!(x.len(), rows * dim);
    assert_eq!(weight.len(), dim);
    let summed: Option<Vec<bf16>> =
        residual.map(|r| x.iter().zip(r).map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32())).collect());
    let src = summed.as_deref().unwrap_or(x);
    let mut out = Vec::with_capacity(rows * dim);
    for row in src.chunks(dim) {
        let ms = row.iter().map(|v| (v.to_f32() as f64).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / ((ms as f32 + eps) as f64).sqrt();
        for (v, w) in row.iter().zip(weight) {
            let h = super::bf16_rn(v.to_f32() as f64 * inv);
            out.push(bf16::from_f32(w.to_f32() * h.to_f32()));
        }
    }
    (out, summed)
}
