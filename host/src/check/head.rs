//! Checks of the head family against `crate::reference::head`.
use super::{bf16_vec, rel_l2, Outcome};
use crate::kernels;
use crate::reference;
use crate::runtime::{Gpu, RuntimeError};
use half::bf16;
use rand::Rng;

/// Embedding gather of `rows` random ids from a random [vocab, hidden] table: bit-exact.
pub fn embed_gather(
    gpu: &Gpu,
    rows: usize,
    vocab: usize,
    hidden: usize,
    rng: &mut impl Rng,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let table = bf16_vec(vocab * hidden, -2.0, 2.0, rng);
    let ids: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    let dt = s.clone_htod(&table)?;
    let mut di = s.alloc_zeros::<u32>(rows.max(1))?;
    let mut di = di.slice_mut(0..rows);
    let mut dout = s.clone_htod(&vec![bf16::from_bits(0xFFFF); rows * hidden])?;
    kernels::head::hga_embed_gather(gpu, &dt, &ids, &mut di, &mut dout, vocab, hidden)?;
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    let want = reference::head::hga_embed_gather(&table, &ids, hidden);
    let bad = out.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()).map(|i| {
        format!("out[{i}] (row {}, id {}): got {}, expected {}", i / hidden, ids[i / hidden], out[i], want[i])
    });
    Ok(Outcome::new("hga_embed_gather", format!("rows={rows} vocab={vocab} hidden={hidden}"), 0.0, bad))
}

/// lm_head GEMV on m x vocab x hidden: relative L2 to the f64 reference <= 1e-5 (f32 accumulation of bf16
/// products), every element within 1e-4 of the reference's RMS.
pub fn lm_head(gpu: &Gpu, m: usize, vocab: usize, hidden: usize, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let x = bf16_vec(m * hidden, -2.0, 2.0, rng);
    let w = bf16_vec(vocab * hidden, -0.1, 0.1, rng);
    let (dx, dw) = (s.clone_htod(&x)?, s.clone_htod(&w)?);
    let mut dout = s.clone_htod(&vec![f32::NAN; m * vocab])?;
    kernels::head::hga_lm_head(gpu, &dx, &dw, &mut dout, m, vocab, hidden)?;
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    let want = reference::head::hga_lm_head(&x, &w, m, vocab, hidden);
    let rms = (want.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let mut bad =
        out.iter().zip(&want).position(|(g, e)| g.is_nan() || ((g - e).abs() as f64) > 1e-4 * rms).map(|i| {
            format!("out[{}, {}]: got {}, expected {} (rms {rms:.3e})", i / vocab, i % vocab, out[i], want[i])
        });
    let rel = rel_l2(&out, &want);
    if bad.is_none() && rel > 1e-5 {
        bad = Some(format!("relative L2 error {rel:.3e} > 1e-5"));
    }
    Ok(Outcome::new("hga_lm_head", format!("m={m} vocab={vocab} hidden={hidden}"), rel, bad))
}

/// Random logits with planted exact ties at the maximum and (sometimes) NaNs.
fn logits_with_ties(rows: usize, vocab: usize, rng: &mut impl Rng) -> Vec<f32> {
    let mut l: Vec<f32> = (0..rows * vocab).map(|_| rng.gen_range(-8.0f32..8.0)).collect();
    for r in 0..rows {
        let row = &mut l[r * vocab..(r + 1) * vocab];
        if rng.gen_bool(0.5) {
            let top = 9.0 + rng.gen_range(0..4) as f32 * 0.25;
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..vocab);
                row[i] = top;
            }
        }
        if rng.gen_bool(0.2) {
            let i = rng.gen_range(0..vocab);
            row[i] = f32::NAN;
        }
    }
    l
}

/// Argmax on rows x vocab (planted ties and NaNs): exact.
pub fn argmax(gpu: &Gpu, rows: usize, vocab: usize, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let l = logits_with_ties(rows, vocab, rng);
    let dl = s.clone_htod(&l)?;
    let mut dout = s.clone_htod(&vec![0xDEAD_BEEFu32; rows])?;
    kernels::head::hga_argmax(gpu, &dl, &mut dout, rows, vocab)?;
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    let want = reference::head::hga_argmax(&l, rows, vocab);
    let bad = out
        .iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .map(|i| format!("row {i}: got {}, expected {}", out[i], want[i]));
    Ok(Outcome::new("hga_argmax", format!("rows={rows} vocab={vocab}"), 0.0, bad))
}

/// Sampling on rows x vocab with random temperature / top_p / seed / step: the same token as the reference for
/// every row (same rule, same uniforms).
pub fn sample(gpu: &Gpu, rows: usize, vocab: usize, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let mut l = logits_with_ties(rows, vocab, rng);
    let spread = 10f32.powf(rng.gen_range(-1.0..1.0));
    l.iter_mut().for_each(|v| *v *= spread);
    let temperature = rng.gen_range(0.2f32..2.0);
    let top_p = *[1.0f32, 0.95, 0.8, 0.5, 0.1, rng.gen_range(0.01..1.0)].get(rng.gen_range(0..6)).unwrap();
    let (seed, step) = (rng.gen::<u64>(), rng.gen::<u32>() as u64);
    let dl = s.clone_htod(&l)?;
    let mut dout = s.clone_htod(&vec![0xDEAD_BEEFu32; rows])?;
    kernels::head::hga_sample(gpu, &dl, &mut dout, rows, vocab, temperature, top_p, seed, step)?;
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    let want = reference::head::hga_sample(&l, rows, vocab, temperature, top_p, seed, step);
    let bad = out
        .iter()
        .zip(&want)
        .position(|(a, b)| a != b)
        .map(|i| format!("row {i}: got {}, expected {}", out[i], want[i]));
    Ok(Outcome::new("hga_sample", format!("rows={rows} vocab={vocab} T={temperature:.3} top_p={top_p:.3}"), 0.0, bad))
}

/// Coarse distribution check: `rows` draws (one per row, steps step..step+rows) from fixed logits over a small
/// vocabulary; each token's frequency must be within 5 standard errors (+ 0.002) of its probability under the
/// temperature-scaled softmax restricted to the top-p set (the set computed in f64 here). Also checks that the
/// GPU's tokens equal the reference's.
pub fn sample_distribution(
    gpu: &Gpu,
    logits: &[f32],
    temperature: f32,
    top_p: f32,
    rows: usize,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let vocab = logits.len();
    let l: Vec<f32> = (0..rows).flat_map(|_| logits.iter().copied()).collect();
    let dl = s.clone_htod(&l)?;
    let mut dout = s.clone_htod(&vec![0xDEAD_BEEFu32; rows])?;
    let (seed, step) = (0x5EED, 1000);
    kernels::head::hga_sample(gpu, &dl, &mut dout, rows, vocab, temperature, top_p, seed, step)?;
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    // Expected probabilities in f64: softmax(l / T), nucleus = the smallest top set with mass >= top_p.
    let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let p: Vec<f64> = logits.iter().map(|&x| ((x as f64 - mx) / temperature as f64).exp()).collect();
    let z: f64 = p.iter().sum();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap());
    let mut keep = vec![false; vocab];
    let mut cum = 0.0;
    for &i in &order {
        keep[i] = true;
        cum += p[i] / z;
        if cum >= top_p as f64 - 1e-9 {
            break;
        }
    }
    let zk: f64 = (0..vocab).filter(|&i| keep[i]).map(|i| p[i]).sum();
    let mut count = vec![0usize; vocab];
    let mut bad = None;
    for &t in &out {
        if (t as usize) < vocab {
            count[t as usize] += 1;
        } else {
            bad = Some(format!("token {t} out of range"));
        }
    }
    let mut worst = 0f64;
    for i in 0..vocab {
        let q = if keep[i] { p[i] / zk } else { 0.0 };
        let f = count[i] as f64 / rows as f64;
        let se = (q * (1.0 - q) / rows as f64).sqrt();
        worst = worst.max((f - q).abs());
        if bad.is_none() && (f - q).abs() > 5.0 * se + 0.002 {
            bad = Some(format!("token {i}: frequency {f:.4}, probability {q:.4} (5 se = {:.4})", 5.0 * se));
        }
    }
    let want = reference::head::hga_sample(&l, rows, vocab, temperature, top_p, seed, step);
    if bad.is_none() {
        if let Some(i) = out.iter().zip(&want).position(|(a, b)| a != b) {
            bad = Some(format!("row {i}: got {}, reference {}", out[i], want[i]));
        }
    }
    Ok(Outcome::new("hga_sample (distribution)", format!("vocab={vocab} T={temperature} top_p={top_p}"), worst, bad))
}
