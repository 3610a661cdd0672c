//! Reference dynamic FP8 activation quantization per token per 128-wide group (the rule of QWEN3.md, with the
//! number formats of `gpu_kernels::num`).
use gpu_kernels::num::{e4m3_to_f32, f32_to_e4m3, fp8_group_scale, FP8_GROUP};
use half::bf16;

/// Returns `(q [rows, k] e4m3, scale [rows, ceil(k/128)])`.
pub fn hga_fp8_quant(x: &[bf16], rows: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(x.len(), rows * k);
    let groups = k.div_ceil(FP8_GROUP);
    let mut q = vec![0u8; rows * k];
    let mut s = vec![0f32; rows * groups];
    for r in 0..rows {
        for g in 0..groups {
            let cols = g * FP8_GROUP..((g + 1) * FP8_GROUP).min(k);
            let amax = cols.clone().map(|c| x[r * k + c].to_f32().abs()).fold(0f32, f32::max);
            let scale = fp8_group_scale(amax);
            s[r * groups + g] = scale;
            for c in cols {
                q[r * k + c] = f32_to_e4m3(x[r * k + c].to_f32() / scale);
            }
        }
    }
    (q, s)
}

/// `x = bf16(e4m3 * scale)`.
pub fn hga_fp8_dequant(q: &[u8], scale: &[f32], rows: usize, k: usize) -> Vec<bf16> {
    let groups = k.div_ceil(FP8_GROUP);
    assert_eq!(q.len(), rows * k);
    assert_eq!(scale.len(), rows * groups);
    (0..rows * k).map(|i| bf16::from_f32(e4m3_to_f32(q[i]) * scale[(i / k) * groups + (i % k) / FP8_GROUP])).collect()
}
