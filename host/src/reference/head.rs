//! Reference head: embedding gather, lm_head (f64 accumulation), argmax, and the sampling rule of
//! `gpu_kernels::sample` implemented independently of the kernel (sort for the threshold, a sequential walk).
use gpu_kernels::sample::{logit_key, sample_target, top_p_fixed, top_p_need, uniform_u32, weight, weight_coef};
use half::bf16;

/// Rows of `table` [vocab, hidden] for `ids`.
pub fn hga_embed_gather(table: &[bf16], ids: &[u32], hidden: usize) -> Vec<bf16> {
    ids.iter().flat_map(|&i| table[i as usize * hidden..(i as usize + 1) * hidden].iter().copied()).collect()
}

/// `out[m, v] = sum_h x[m, h] w[v, h]` in f64, as f32.
pub fn hga_lm_head(x: &[bf16], w: &[bf16], m: usize, vocab: usize, hidden: usize) -> Vec<f32> {
    let wf: Vec<f64> = w.iter().map(|v| v.to_f64()).collect();
    let mut out = vec![0f32; m * vocab];
    for i in 0..m {
        let xr: Vec<f64> = x[i * hidden..(i + 1) * hidden].iter().map(|v| v.to_f64()).collect();
        for v in 0..vocab {
            let wr = &wf[v * hidden..(v + 1) * hidden];
            out[i * vocab + v] = xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f64>() as f32;
        }
    }
    out
}

/// Argmax of each row (ties: lowest index; NaN skipped; all-NaN: u32::MAX).
pub fn hga_argmax(logits: &[f32], rows: usize, vocab: usize) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let mut best: Option<(f32, usize)> = None;
            for (i, &v) in row.iter().enumerate() {
                if v.is_nan() {
                    continue;
                }
                if best.is_none_or(|(b, _)| v > b) {
                    best = Some((v, i));
                }
            }
            best.map_or(u32::MAX, |(_, i)| i as u32)
        })
        .collect()
}

/// The token chosen for one row by the rule of `gpu_kernels::sample` with the uniform `u`.
pub fn sample_row(row: &[f32], temperature: f32, top_p: f32, u: u32) -> u32 {
    let Some(mx) = row.iter().copied().filter(|v| !v.is_nan()).reduce(f32::max) else { return u32::MAX };
    let coef = weight_coef(temperature);
    let w: Vec<u64> = row.iter().map(|&l| weight(l, mx, coef)).collect();
    let total: u64 = w.iter().sum();
    let need = top_p_need(total, top_p_fixed(top_p));
    // Threshold: walk the distinct keys of positive-weight tokens from the top.
    let mut by_key: Vec<(u32, u64)> =
        row.iter().zip(&w).filter(|(_, &wi)| wi > 0).map(|(&l, &wi)| (logit_key(l), wi)).collect();
    by_key.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
    let (mut cum, mut kstar, mut i) = (0u64, 0u32, 0usize);
    while i < by_key.len() {
        let k = by_key[i].0;
        while i < by_key.len() && by_key[i].0 == k {
            cum += by_key[i].1;
            i += 1;
        }
        kstar = k;
        if cum >= need {
            break;
        }
    }
    let kept = cum;
    let target = sample_target(kept, u);
    let mut c = 0u64;
    for (i, &l) in row.iter().enumerate() {
        if logit_key(l) >= kstar {
            c += w[i];
            if c > target {
                return i as u32;
            }
        }
    }
    unreachable!("target {target} < kept {kept}")
}

/// Sampling of every row: row r uses the uniform of (seed, step + r).
pub fn hga_sample(
    logits: &[f32],
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_p: f32,
    seed: u64,
    step: u64,
) -> Vec<u32> {
    (0..rows)
        .map(|r| {
            let u = uniform_u32(seed, step.wrapping_add(r as u64));
            sample_row(&logits[r * vocab..(r + 1) * vocab], temperature, top_p, u)
        })
        .collect()
}
