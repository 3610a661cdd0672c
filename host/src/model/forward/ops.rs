//! The numeric building blocks of the CPU reference forward, on plain row-major slices.
//!
//! Every dot product accumulates in f64 (eight independent lanes, so that LLVM vectorises it without reassociating a
//! single sum); results are rounded to f32 once, at the end. Each output element is computed by the same sequence of
//! operations whatever the batch it belongs to, so a token gives bit-identical values in a prefill and in a decode.

use gpu_kernels::num::{e4m3_to_f32, f32_to_e4m3, fp8_group_scale, FP8_GROUP};
use rayon::prelude::*;

/// `sum a[i] * b[i]` accumulated in f64 (8 lanes, then the lanes added in a fixed order).
#[inline]
pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] as f64 * y[j] as f64;
        }
    }
    for (j, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[j] += *x as f64 * *y as f64;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// `y[t, o] = sum_i x[t, i] * w[o, i]` for `x: [tokens, k]`, `w: [n, k]` (the PyTorch `Linear` layout), returns
/// `[tokens, n]`. Parallel over blocks of weight rows; each weight row is read once for all tokens.
pub fn linear(x: &[f32], tokens: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    linear_rounded(x, tokens, k, w, n, |v| v as f32)
}

/// [`linear`] with each f64 dot product rounded by `round` (e.g. straight to bf16, without passing through f32).
pub fn linear_rounded(
    x: &[f32],
    tokens: usize,
    k: usize,
    w: &[f32],
    n: usize,
    round: impl Fn(f64) -> f32 + Sync,
) -> Vec<f32> {
    assert_eq!(x.len(), tokens * k, "linear: x is not [{tokens}, {k}]");
    assert_eq!(w.len(), n * k, "linear: w is not [{n}, {k}]");
    const ROWS: usize = 16;
    // Transposed result [n, tokens], filled in parallel by row blocks, then transposed back.
    let mut yt = vec![0f32; n * tokens];
    yt.par_chunks_mut(ROWS * tokens.max(1)).enumerate().for_each(|(blk, out)| {
        let o0 = blk * ROWS;
        for (r, out_row) in out.chunks_mut(tokens.max(1)).enumerate() {
            let wr = &w[(o0 + r) * k..(o0 + r + 1) * k];
            for (t, y) in out_row.iter_mut().enumerate().take(tokens) {
                *y = round(dot_f64(&x[t * k..(t + 1) * k], wr));
            }
        }
    });
    let mut y = vec![0f32; tokens * n];
    for o in 0..n {
        for t in 0..tokens {
            y[t * n + o] = yt[o * tokens + t];
        }
    }
    y
}

/// Dynamic FP8 activation quantization, as the FP8 GEMM kernels do it, returned dequantized: for each row of
/// `x: [rows, k]` and each `FP8_GROUP`-wide group along k (the last one may be shorter),
/// `s = fp8_group_scale(max |x|)`, `x' = e4m3(x / s) * s`.
pub fn fp8_quant_dequant_rows(x: &[f32], k: usize) -> Vec<f32> {
    assert!(
        k > 0 && x.chunks_exact(k.max(1)).remainder().is_empty(),
        "fp8_quant_dequant_rows: length {} is not a multiple of {k}",
        x.len()
    );
    let mut out = vec![0f32; x.len()];
    for (row, orow) in x.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
        for (g, og) in row.chunks(FP8_GROUP).zip(orow.chunks_mut(FP8_GROUP)) {
            let absmax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = fp8_group_scale(absmax);
            for (v, o) in g.iter().zip(og.iter_mut()) {
                *o = e4m3_to_f32(f32_to_e4m3(*v / s)) * s;
            }
        }
    }
    out
}

/// RMSNorm of each `w.len()`-wide row of `x` in place: `x * rsqrt(mean(x^2) + eps) * w` (mean in f64, as the
/// f32 reference of `Qwen3MoeRMSNorm`: normalise in f32, cast, then times the weight).
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f64) {
    let d = w.len();
    assert!(
        d > 0 && x.chunks_exact(d.max(1)).remainder().is_empty(),
        "rms_norm_rows: length {} is not a multiple of {d}",
        x.len()
    );
    for row in x.chunks_exact_mut(d) {
        let ms = row.iter().map(|v| *v as f64 * *v as f64).sum::<f64>() / d as f64;
        let r = (1.0 / (ms + eps).sqrt()) as f32;
        for (v, g) in row.iter_mut().zip(w) {
            *v = g * (*v * r);
        }
    }
}

/// `silu(x) = x / (1 + exp(-x))`, in f64, rounded to f32.
#[inline]
pub fn silu(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// NeoX-style rotary tables for one position: `cos[i], sin[i]` for `i < head_dim / 2` with
/// `inv_freq[i] = theta^(-2i / head_dim)` (computed like transformers: in f32, `freq = pos * inv_freq` in f32, then
/// cos/sin of that f32 value).
pub fn rope_cos_sin(pos: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(half);
    let mut sin = Vec::with_capacity(half);
    for i in 0..half {
        let inv_freq = (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32;
        let f = (pos as f32 * inv_freq) as f64;
        cos.push(f.cos() as f32);
        sin.push(f.sin() as f32);
    }
    (cos, sin)
}

/// Applies NeoX rotary embedding (`x * cos + rotate_half(x) * sin`, pairs `(i, i + head_dim/2)`) to every
/// `head_dim`-wide head of `x` in place.
pub fn apply_rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    debug_assert_eq!(cos.len(), half);
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos[i] - b * sin[i];
            head[i + half] = b * cos[i] + a * sin[i];
        }
    }
}

/// [`apply_rope`] with the rotation in f64 and one rounding, by `round`: the angle `f32(pos) * inv_freq` in f32 as
/// [`rope_cos_sin`], cos/sin and the products in f64 (as `hga_qk_norm_rope`'s reference; the kernel rotates in f32 and
/// rounds once, to bf16).
pub fn apply_rope_f64(x: &mut [f32], head_dim: usize, pos: usize, theta: f64, round: impl Fn(f64) -> f32) {
    let half = head_dim / 2;
    let cs: Vec<(f64, f64)> = (0..half)
        .map(|i| {
            let inv_freq = (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32;
            let (s, c) = ((pos as f32 * inv_freq) as f64).sin_cos();
            (c, s)
        })
        .collect();
    for head in x.chunks_exact_mut(head_dim) {
        for (i, &(c, s)) in cs.iter().enumerate() {
            let (a, b) = (head[i] as f64, head[i + half] as f64);
            head[i] = round(a * c - b * s);
            head[i + half] = round(b * c + a * s);
        }
    }
}

/// Softmax of `x` in f64 (max subtracted), rounded to f32.
pub fn softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let e: Vec<f64> = x.iter().map(|v| (*v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}

/// Indices of the `k` largest values, largest first (ties: lower index first, as a stable sort).
pub fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Causal attention of one query head over the first `n` cached positions: `q: [head_dim]`, `k, v`: rows of
/// `row_stride` floats, this head's slice at `offset`. Scores and softmax in f64; returns `[head_dim]`.
pub fn attend_one(q: &[f32], k: &[f32], v: &[f32], n: usize, row_stride: usize, offset: usize, scale: f64) -> Vec<f32> {
    let d = q.len();
    let scores: Vec<f64> =
        (0..n).map(|j| dot_f64(q, &k[j * row_stride + offset..j * row_stride + offset + d]) * scale).collect();
    let m = scores.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v));
    let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = p.iter().sum();
    let mut acc = vec![0f64; d];
    for (j, pj) in p.iter().enumerate() {
        let vr = &v[j * row_stride + offset..j * row_stride + offset + d];
        for (a, vv) in acc.iter_mut().zip(vr) {
            *a += pj * *vv as f64;
        }
    }
    acc.iter().map(|a| (a / z) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_f64(&a, &b) - naive).abs() < 1e-12);
    }

    #[test]
    fn linear_small() {
        // x [2,3], w [2,3]
        let x = [1.0, 2.0, 3.0, -1.0, 0.5, 0.0];
        let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        assert_eq!(linear(&x, 2, 3, &w, 2), vec![1.0, 6.0, -1.0, -0.5]);
        // More rows than one block, one token.
        let w2: Vec<f32> = (0..40 * 3).map(|i| i as f32).collect();
        let y = linear(&x[..3], 1, 3, &w2, 40);
        for (o, v) in y.iter().enumerate() {
            let r = &w2[o * 3..o * 3 + 3];
            assert_eq!(*v, r[0] + 2.0 * r[1] + 3.0 * r[2]);
        }
    }

    #[test]
    fn rms_norm_unit() {
        let mut x = vec![3.0, 4.0];
        rms_norm_rows(&mut x, &[1.0, 2.0], 0.0);
        let r = (12.5f64).sqrt() as f32;
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
    }

    #[test]
    fn rope_is_a_rotation_and_identity_at_zero() {
        let mut x: Vec<f32> = (0..8).map(|i| i as f32 - 3.0).collect();
        let orig = x.clone();
        let (c, s) = rope_cos_sin(0, 8, 10000.0);
        apply_rope(&mut x, 8, &c, &s);
        assert_eq!(x, orig);
        let (c, s) = rope_cos_sin(7, 8, 10000.0);
        apply_rope(&mut x, 8, &c, &s);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        // Pair (0, 4) at position 7 rotates by angle 7 * theta^0 = 7 rad.
        let (a, b) = (orig[0], orig[4]);
        assert!((x[0] - (a * 7f32.cos() - b * 7f32.sin())).abs() < 1e-5);
    }

    #[test]
    fn fp8_quant_keeps_group_max_exact_and_error_small() {
        let x: Vec<f32> = (0..300).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0).collect();
        let q = fp8_quant_dequant_rows(&x, 300);
        for (g, qg) in x.chunks(FP8_GROUP).zip(q.chunks(FP8_GROUP)) {
            let am = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (v, w) in g.iter().zip(qg) {
                assert!((v - w).abs() <= am / 16.0 + 1e-6, "{v} -> {w}");
            }
        }
        assert_eq!(fp8_quant_dequant_rows(&[0.0; 4], 4), vec![0.0; 4]);
    }

    /// The `Fp8` mode computes `linear(quant_dequant(x), dequant(w))`; the FP8 GEMM kernels compute, per 128-wide
    /// K block, `dot(q_a, q_w) * s_a * s_w` (QWEN3.md). Same value up to f32 rounding of the scale products.
    #[test]
    fn fp8_mode_equals_block_scaled_gemm_formulation() {
        let (t, k, n) = (3usize, 300usize, 130usize);
        let x: Vec<f32> = (0..t * k).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i % 13) as f32)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.011).cos() * 0.05).collect();
        // Weight: e4m3 with one scale per 128x128 block.
        let (bn, bk) = (n.div_ceil(128), k.div_ceil(128));
        let mut sw = vec![0f32; bn * bk];
        for (bi, s) in sw.iter_mut().enumerate() {
            let (r0, c0) = ((bi / bk) * 128, (bi % bk) * 128);
            let mut am = 0f32;
            for r in r0..(r0 + 128).min(n) {
                for c in c0..(c0 + 128).min(k) {
                    am = am.max(w[r * k + c].abs());
                }
            }
            *s = am / 448.0;
        }
        let qw: Vec<u8> = (0..n * k).map(|i| f32_to_e4m3(w[i] / sw[(i / k / 128) * bk + (i % k) / 128])).collect();
        let w_deq: Vec<f32> = (0..n * k).map(|i| e4m3_to_f32(qw[i]) * sw[(i / k / 128) * bk + (i % k) / 128]).collect();
        let ours = linear(&fp8_quant_dequant_rows(&x, k), t, k, &w_deq, n);
        for ti in 0..t {
            let row = &x[ti * k..(ti + 1) * k];
            for o in 0..n {
                let mut acc = 0f64;
                for (b, g) in row.chunks(FP8_GROUP).enumerate() {
                    let sa = fp8_group_scale(g.iter().fold(0f32, |m, v| m.max(v.abs())));
                    let dot: f64 = g
                        .iter()
                        .enumerate()
                        .map(|(j, v)| {
                            let qa = e4m3_to_f32(f32_to_e4m3(*v / sa)) as f64;
                            qa * e4m3_to_f32(qw[o * k + b * 128 + j]) as f64
                        })
                        .sum();
                    acc += dot * sa as f64 * sw[(o / 128) * bk + b] as f64;
                }
                let got = ours[ti * n + o] as f64;
                assert!((got - acc).abs() <= 1e-5 * acc.abs().max(1.0), "t {ti} o {o}: {got} vs {acc}");
            }
        }
    }

    #[test]
    fn softmax_topk_silu() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6 && p[2] > p[1]);
        assert_eq!(top_k(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }

    #[test]
    fn attend_one_uniform_when_keys_equal() {
        // Two positions with the same key: the output is the mean of the values.
        let q = [1.0, 0.0];
        let k = [0.5, 0.5, 0.5, 0.5];
        let v = [1.0, 2.0, 3.0, 4.0];
        let o = attend_one(&q, &k, &v, 2, 2, 0, 1.0);
        assert_eq!(o, vec![2.0, 3.0]);
    }
}
