//! Reference of the routed-attention kernels: gathers, per (KV head, query token), the tokens the attention entry
//! list makes visible (row r of entry e, e < min(n_entries, max_entries), iff entry_pos[e] + r <= position) from the
//! slot pool, then a naive softmax in f64 over exactly those tokens. Independent of the kernels' tiling, split and
//! masking: no tiles, no running max, the visible set built first.
use crate::kernels::hga_attend::RoutedShape;
use half::bf16;
use rayon::prelude::*;

/// Routed attention of the query tokens at positions `pos .. pos + tokens` (q bf16 [tokens, n_heads, 128]) over
/// the entry lists (`entry_slot` / `entry_pos` u32 [n_kv_heads][max_entries], `n_entries` u32 [n_kv_heads]) into
/// the slot pool (bf16 [n_slots][2][16][128]; a slot index past the pool reads the last slot, as the kernels do).
/// Scale 1/sqrt(128). Returns (out [tokens, n_heads, 128], lse [tokens, n_heads], natural log), f64. A row with
/// no visible token gives NaN; NaN or Inf in q or in a visible K row propagate as IEEE arithmetic makes them.
pub fn hga_attend(
    q: &[bf16],
    pool: &[bf16],
    entry_slot: &[u32],
    entry_pos: &[u32],
    n_entries: &[u32],
    pos: u32,
    s: &RoutedShape,
) -> (Vec<f64>, Vec<f64>) {
    const D: usize = 128;
    const GROUP: usize = 16;
    let g = s.n_heads / s.n_kv_heads;
    let scale = 1.0 / (D as f64).sqrt();
    let rows: Vec<(Vec<f64>, f64)> = (0..s.tokens * s.n_heads)
        .into_par_iter()
        .map(|r| {
            let (t, h) = (r / s.n_heads, r % s.n_heads);
            let kvh = h / g;
            let p = pos as u64 + t as u64;
            // The visible tokens: (K row, V row) offsets into the pool.
            let ne = (n_entries[kvh] as usize).min(s.max_entries);
            let mut toks = Vec::new();
            for e in 0..ne {
                let slot = (entry_slot[kvh * s.max_entries + e] as usize).min(s.n_slots - 1);
                let first = entry_pos[kvh * s.max_entries + e] as u64;
                for row in 0..GROUP {
                    if first + row as u64 <= p {
                        let k = (slot * 2 * GROUP + row) * D;
                        toks.push((k, k + GROUP * D));
                    }
                }
            }
            let qv: Vec<f64> = q[r * D..(r + 1) * D].iter().map(|x| x.to_f32() as f64).collect();
            let scores: Vec<f64> = toks
                .iter()
                .map(|&(k, _)| qv.iter().zip(&pool[k..k + D]).map(|(a, b)| a * b.to_f32() as f64).sum::<f64>() * scale)
                .collect();
            if toks.is_empty() || scores.iter().any(|x| x.is_nan()) {
                return (vec![f64::NAN; D], f64::NAN);
            }
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let mut o = vec![0f64; D];
            for (wj, &(_, v)) in w.iter().zip(&toks) {
                for (od, vd) in o.iter_mut().zip(&pool[v..v + D]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// One KV head, one query head, two entries given out of order; the result equals a softmax over the visible
    /// tokens written out by hand.
    #[test]
    fn gathers_visible_rows_only() {
        const D: usize = 128;
        let s = RoutedShape { tokens: 1, n_heads: 1, n_kv_heads: 1, n_slots: 3, max_entries: 3 };
        let mut pool = vec![bf16::from_f32(f32::NAN); 3 * 2 * 16 * D];
        // Slot 2 holds group 0 (positions 0..15), slot 0 holds group 1 (positions 16..31); K row r = r / 16 in dim
        // 0, V row r = r in dim 1.
        for (slot, grp) in [(2usize, 0usize), (0, 1)] {
            for r in 0..16 {
                let k = (slot * 32 + r) * D;
                let v = (slot * 32 + 16 + r) * D;
                pool[k..k + D].fill(bf16::ZERO);
                pool[v..v + D].fill(bf16::ZERO);
                pool[k] = bf16::from_f32((grp * 16 + r) as f32 / 16.0);
                pool[v + 1] = bf16::from_f32((grp * 16 + r) as f32);
            }
        }
        let mut q = vec![bf16::ZERO; D];
        q[0] = bf16::from_f32(2.0);
        // Entry 2 (slot 1, NaN) is past n_entries: never read. Position 20: tokens 0..=20 visible.
        let (out, lse) = hga_attend(&q, &pool, &[0, 2, 1], &[16, 0, 32], &[2], 20, &s);
        let sc: Vec<f64> = (0..=20).map(|j| 2.0 * (j as f64 / 16.0) / (D as f64).sqrt()).collect();
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
        let o1: f64 = sc.iter().enumerate().map(|(j, x)| (x - m).exp() * j as f64).sum::<f64>() / z;
        assert!((out[1] - o1).abs() < 1e-12, "{} vs {o1}", out[1]);
        assert_eq!(out[0], 0.0);
        assert!((lse[0] - (m + z.ln())).abs() < 1e-12);
        assert!(out.iter().all(|x| x.is_finite()));
    }
}
