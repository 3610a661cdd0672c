//! Reference MoE (Qwen3-MoE sparse block with block-scaled FP8 experts), naive and independent of the kernels:
//! router logits and softmax in f64, top-k by a stable sort (ties: lower expert index), the experts on e4m3 values
//! (exact in f64) with f64 accumulation, activations quantized as the GPU does (`hga_fp8_quant`'s rule per token
//! per 128-wide group, for x and for the bf16-rounded intermediate silu(gate) * up).
use gpu_kernels::num::{e4m3_to_f32, FP8_GROUP};
use gpu_kernels::params::MOE_GROUP_TILE_M;
use half::bf16;
use rayon::prelude::*;

/// Sizes of one MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeDims {
    pub tokens: usize,
    pub hidden: usize,
    /// expert intermediate size (`moe_intermediate_size`)
    pub inter: usize,
    pub experts: usize,
    pub top_k: usize,
    pub norm_topk: bool,
}

impl MoeDims {
    /// Qwen3-30B-A3B: hidden 2048, 128 experts, top-8, intermediate 768, norm_topk_prob.
    pub fn qwen3_30b_a3b(tokens: usize) -> Self {
        MoeDims { tokens, hidden: 2048, inter: 768, experts: 128, top_k: 8, norm_topk: true }
    }
    /// FP8 bytes of one expert's gate + up + down weights.
    pub fn expert_bytes(&self) -> usize {
        3 * self.hidden * self.inter
    }
}

/// Stacked expert weights on the host: gate/up e4m3 [experts, inter, hidden] with f32 scales
/// [experts, inter/128, hidden/128]; down e4m3 [experts, hidden, inter] with scales [experts, hidden/128, inter/128].
#[derive(Clone, Debug)]
pub struct MoeHostWeights {
    pub w_gate: Vec<u8>,
    pub s_gate: Vec<f32>,
    pub w_up: Vec<u8>,
    pub s_up: Vec<f32>,
    pub w_down: Vec<u8>,
    pub s_down: Vec<f32>,
}

/// The router's result: logits (f64) [tokens, experts], ids [tokens, top_k] (best first), weights [tokens, top_k].
#[derive(Clone, Debug)]
pub struct RouterRef {
    pub logits: Vec<f64>,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Softmax probabilities (f64) of one token's logits.
pub fn softmax_f64(l: &[f64]) -> Vec<f64> {
    let m = l.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = l.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Routing weights of a chosen set `ids` from one token's logits: softmax probabilities, renormalised over the set
/// when `norm`.
pub fn weights_of(l: &[f64], ids: &[u32], norm: bool) -> Vec<f64> {
    let p = softmax_f64(l);
    let sum: f64 = ids.iter().map(|&e| p[e as usize]).sum();
    ids.iter().map(|&e| if norm { p[e as usize] / sum } else { p[e as usize] }).collect()
}

/// Router: x bf16 [tokens, hidden], w bf16 [experts, hidden].
pub fn hga_moe_router(x: &[bf16], w: &[bf16], d: &MoeDims) -> RouterRef {
    let (t, h, ne, k) = (d.tokens, d.hidden, d.experts, d.top_k);
    assert_eq!(x.len(), t * h);
    assert_eq!(w.len(), ne * h);
    let mut logits = vec![0f64; t * ne];
    for tok in 0..t {
        for e in 0..ne {
            logits[tok * ne + e] =
                (0..h).map(|i| x[tok * h + i].to_f32() as f64 * w[e * h + i].to_f32() as f64).sum::<f64>();
        }
    }
    let mut ids = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    for tok in 0..t {
        let l = &logits[tok * ne..(tok + 1) * ne];
        let mut idx: Vec<u32> = (0..ne as u32).collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
        idx.truncate(k);
        weights.extend(weights_of(l, &idx, d.norm_topk).iter().map(|&v| v as f32));
        ids.extend(idx);
    }
    RouterRef { logits, ids, weights }
}

/// Grouping: (counts [experts], offsets [experts + 1], tile_start [experts + 1], perm [tokens * top_k]); perm lists
/// the entries `token * top_k + slot` by expert, then by entry.
pub fn hga_moe_group(ids: &[u32], experts: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>, Vec<u32>) {
    let mut counts = vec![0u32; experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    let mut offsets = vec![0u32; experts + 1];
    let mut tiles = vec![0u32; experts + 1];
    for e in 0..experts {
        offsets[e + 1] = offsets[e] + counts[e];
        tiles[e + 1] = tiles[e] + counts[e].div_ceil(MOE_GROUP_TILE_M as u32);
    }
    let mut perm: Vec<u32> = (0..ids.len() as u32).collect();
    perm.sort_by_key(|&i| (ids[i as usize], i));
    (counts, offsets, tiles, perm)
}

/// Per-token-group quantization of one f32 row (values must already be what the GPU quantizes, e.g. bf16-rounded),
/// returned as (e4m3 values as f64, scale per group).
fn quant_row(x: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let row: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let (q, s) = super::quant::hga_fp8_quant(&row, 1, x.len());
    (q.iter().map(|&b| e4m3_to_f32(b) as f64).collect(), s.iter().map(|&v| v as f64).collect())
}

/// One FP8 linear row: sum over 128-blocks of (sum e4m3 a * e4m3 w) * s_a[kb] * s_w[kb].
fn fp8_dot(a: &[f64], sa: &[f64], w: &[u8], sw: &[f32], lut: &[f64; 256]) -> f64 {
    let mut tot = 0f64;
    for (kb, (ab, wb)) in a.chunks(FP8_GROUP).zip(w.chunks(FP8_GROUP)).enumerate() {
        let s: f64 = ab.iter().zip(wb).map(|(x, &q)| x * lut[q as usize]).sum();
        tot += s * sa[kb] * sw[kb] as f64;
    }
    tot
}

/// silu in f64.
fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// The experts for given routing (ids, weights [tokens, top_k]): returns the MoE output [tokens, hidden] in f32
/// (the GPU rounds its output to bf16). Per (token, slot): x quantized, gate/up in f64, `h = bf16(silu(g) * u)`,
/// h quantized, down in f64, then the weighted sum over slots in f64.
pub fn hga_moe_experts(x: &[bf16], ids: &[u32], weights: &[f32], w: &MoeHostWeights, d: &MoeDims) -> Vec<f32> {
    let (t, h, inter, k) = (d.tokens, d.hidden, d.inter, d.top_k);
    assert_eq!(x.len(), t * h);
    assert_eq!(ids.len(), t * k);
    assert_eq!(weights.len(), t * k);
    assert_eq!(w.w_gate.len(), d.experts * inter * h);
    assert_eq!(w.w_down.len(), d.experts * h * inter);
    let lut: [f64; 256] = std::array::from_fn(|b| e4m3_to_f32(b as u8) as f64);
    let (hb, ib) = (h / FP8_GROUP, inter / FP8_GROUP);
    let rows: Vec<Vec<f32>> = (0..t)
        .into_par_iter()
        .map(|tok| {
            let xr: Vec<f32> = x[tok * h..(tok + 1) * h].iter().map(|v| v.to_f32()).collect();
            let (xq, xs) = quant_row(&xr);
            let mut acc = vec![0f64; h];
            for s in 0..k {
                let e = ids[tok * k + s] as usize;
                let hv: Vec<f32> = (0..inter)
                    .map(|i| {
                        let r = e * inter + i;
                        let sc = (e * ib + i / FP8_GROUP) * hb;
                        let g = fp8_dot(&xq, &xs, &w.w_gate[r * h..(r + 1) * h], &w.s_gate[sc..sc + hb], &lut);
                        let u = fp8_dot(&xq, &xs, &w.w_up[r * h..(r + 1) * h], &w.s_up[sc..sc + hb], &lut);
                        super::bf16_rn(silu(g) * u).to_f32()
                    })
                    .collect();
                let (hq, hs) = quant_row(&hv);
                let rw = weights[tok * k + s] as f64;
                for (n, a) in acc.iter_mut().enumerate() {
                    let r = e * h + n;
                    let sc = (e * hb + n / FP8_GROUP) * ib;
                    *a += rw * fp8_dot(&hq, &hs, &w.w_down[r * inter..(r + 1) * inter], &w.s_down[sc..sc + ib], &lut);
                }
            }
            acc.iter().map(|&v| v as f32).collect()
        })
        .collect();
    rows.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_ties_go_to_the_lower_index_and_weights_renormalise() {
        // Experts 1 and 2 have the same row: equal logits; top-2 must be [1, 2] then.
        let d = MoeDims { tokens: 1, hidden: 2, inter: 128, experts: 4, top_k: 2, norm_topk: true };
        let x = [bf16::from_f32(1.0), bf16::from_f32(0.5)];
        let w: Vec<bf16> = [0.1f32, 0.0, 0.5, 0.5, 0.5, 0.5, -1.0, 0.0].iter().map(|&v| bf16::from_f32(v)).collect();
        let r = hga_moe_router(&x, &w, &d);
        assert_eq!(r.ids, vec![1, 2]);
        assert!((r.weights[0] - 0.5).abs() < 1e-7 && (r.weights[1] - 0.5).abs() < 1e-7);
        let d = MoeDims { norm_topk: false, ..d };
        let r = hga_moe_router(&x, &w, &d);
        let p = softmax_f64(&r.logits);
        assert!((r.weights[0] as f64 - p[1]).abs() < 1e-7);
    }

    #[test]
    fn grouping_is_a_stable_counting_sort() {
        let ids = [3u32, 0, 1, 3, 0, 2, 1, 3]; // 4 tokens, top-2
        let (c, o, t, p) = hga_moe_group(&ids, 5);
        assert_eq!(c, vec![2, 2, 1, 3, 0]);
        assert_eq!(o, vec![0, 2, 4, 5, 8, 8]);
        assert_eq!(t, vec![0, 1, 2, 3, 4, 4]);
        assert_eq!(p, vec![1, 4, 2, 6, 5, 0, 3, 7]);
    }

    #[test]
    fn experts_of_a_zero_input_are_zero() {
        let d = MoeDims { tokens: 2, hidden: 128, inter: 128, experts: 2, top_k: 1, norm_topk: true };
        let w = MoeHostWeights {
            w_gate: vec![0x38; 2 * 128 * 128],
            s_gate: vec![1.0; 2],
            w_up: vec![0x38; 2 * 128 * 128],
            s_up: vec![1.0; 2],
            w_down: vec![0x38; 2 * 128 * 128],
            s_down: vec![1.0; 2],
        };
        let x = vec![bf16::ZERO; 256];
        let out = hga_moe_experts(&x, &[0, 1], &[1.0, 1.0], &w, &d);
        assert!(out.iter().all(|&v| v == 0.0));
        // x = 1/128 everywhere, all weights 1: gate = up = 1 (x quantizes exactly), h = silu(1) * 1,
        // down = 128 * bf16(h) (after an exact requantization of a constant row), weight 0.5.
        let x = vec![bf16::from_f32(1.0 / 128.0); 256];
        let out = hga_moe_experts(&x, &[0, 1], &[0.5, 0.5], &w, &d);
        let h = bf16::from_f64(1.0 / (1.0 + (-1.0f64).exp())).to_f32() as f64;
        assert!(out.iter().all(|&v| (v as f64 - 0.5 * 128.0 * h).abs() < 1e-4), "{}", out[0]);
    }
}
