//! Reference of the dense attention kernels: naive causal GQA attention in f64.
use half::bf16;
use rayon::prelude::*;

/// Causal GQA attention of the query tokens at positions `[start, start + tokens)` over cache positions
/// `0..=start + t`: q [tokens, n_heads, 128], K/V cache [n_kv_heads, capacity, 128] (bf16), scale 1/sqrt(128).
/// Returns (out [tokens, n_heads, 128] as f64, lse [tokens, n_heads], natural log of sum_j exp(scale q.k_j)).
pub fn hga_attention(
    q: &[bf16],
    k_cache: &[bf16],
    v_cache: &[bf16],
    s: &crate::kernels::AttentionShape,
) -> (Vec<f64>, Vec<f64>) {
    const D: usize = 128;
    let g = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (D as f64).sqrt();
    let f = |v: &[bf16]| -> Vec<f64> { v.iter().map(|x| x.to_f32() as f64).collect() };
    let rows: Vec<(Vec<f64>, f64)> = (0..s.tokens * s.n_heads)
        .into_par_iter()
        .map(|r| {
            let (t, h) = (r / s.n_heads, r % s.n_heads);
            let kvh = h / g;
            let qv = f(&q[r * D..(r + 1) * D]);
            let n = s.start + t + 1;
            let base = kvh * s.capacity * D;
            let scores: Vec<f64> = (0..n)
                .map(|j| {
                    let k = &k_cache[base + j * D..base + (j + 1) * D];
                    qv.iter().zip(k).map(|(a, b)| a * b.to_f32() as f64).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let mut o = vec![0f64; D];
            for (j, wj) in w.iter().enumerate() {
                let v = &v_cache[base + j * D..base + (j + 1) * D];
                for (od, vd) in o.iter_mut().zip(v) {
                    *od += wj * vd.to_f32() as f64;
                }
            }
            o.iter_mut().for_each(|x| *x /= sum);
            (o, m + sum.ln())
        })
        .collect();
    let mut out = Vec::with_capacity(s.tokens * s.n_heads * D);
    let mut lse = Vec::with_capacity(s.tokens * s.n_heads);
    for (o, l) in rows {
        out.extend(o);
        lse.push(l);
    }
    (out, lse)
}
