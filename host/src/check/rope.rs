//! GPU check of `hga_qk_norm_rope` against `reference::rope`.
use super::{poison_bf16, rel_l2, to_f32, Outcome};
use crate::kernels::rope::{hga_qk_norm_rope, QkNormRopeShape};
use crate::reference::rope::norm_head;
use crate::runtime::{Gpu, RuntimeError};
use half::bf16;
use rand::seq::SliceRandom;
use rand::Rng;

/// One bf16 ulp at |w| (for |w| >= the smallest normal).
pub fn bf16_ulp(w: f32) -> f32 {
    let a = w.abs().max(f32::MIN_POSITIVE);
    f32::from_bits(a.to_bits() & 0x7F80_0000) * 2f32.powi(-7)
}

/// Compares bf16 heads of 128 elementwise against the reference `want`, given the normed (pre-rotation) heads `y`:
/// |got - want| <= 2 ulp(want) + 2^-7 (|y_i| + |y_partner|). The second term is one bf16 ulp of the rotation's
/// inputs: the GPU's f32 norm may round `x * rsqrt(..)` to the other bf16 neighbour near a tie (a legitimate 1-ulp
/// difference in y), which the rotation carries into outputs that cancel to small values. A wrong angle, pairing or
/// weight gives errors of the order of |y| itself. Returns the first mismatch.
pub fn compare_heads(what: &str, got: &[bf16], want: &[bf16], y: &[bf16]) -> Option<String> {
    for (hi, ((g, w), y)) in got.chunks(128).zip(want.chunks(128)).zip(y.chunks(128)).enumerate() {
        for i in 0..128 {
            let (gv, wv) = (g[i].to_f32(), w[i].to_f32());
            let tol = 2.0 * bf16_ulp(wv) + 2f32.powi(-7) * (y[i].to_f32().abs() + y[(i + 64) % 128].to_f32().abs());
            if gv.is_nan() || wv.is_nan() || (gv - wv).abs() > tol {
                return Some(format!("{what}[head row {hi}, dim {i}]: got {gv}, expected {wv} (tolerance {tol:.2e})"));
            }
        }
    }
    None
}

/// `tokens` tokens at random distinct positions of a cache of `capacity` slots (one position past it now and
/// then, which must not be written); `fused`: q, k, v are column slices of one [tokens, (nh + 2 nkv) * 128] buffer.
pub fn qk_norm_rope(
    gpu: &Gpu,
    tokens: usize,
    n_heads: usize,
    n_kv_heads: usize,
    fused: bool,
    rng: &mut impl Rng,
) -> Result<Outcome, RuntimeError> {
    const D: usize = 128;
    let st = gpu.stream();
    // A third of the cases stage the rows by token (slot t) into a buffer of exactly `tokens` slots or a few more.
    let by_token = rng.gen_ratio(1, 3);
    let capacity = tokens + if by_token { rng.gen_range(0..3) } else { rng.gen_range(0..300) };
    let mut slots: Vec<u32> = (0..capacity as u32).collect();
    slots.shuffle(rng);
    let mut positions: Vec<u32> = slots[..tokens].to_vec();
    if (tokens > 1 && rng.gen_ratio(1, 3)) || by_token {
        positions[0] = capacity as u32 + rng.gen_range(0..100_000);
    }
    let theta = if rng.gen_bool(0.5) { 1e7 } else { 1e6 };
    let (qw, kw) = (n_heads * D, n_kv_heads * D);
    let row = if fused { qw + 2 * kw } else { 0 };
    let s = QkNormRopeShape {
        tokens,
        n_heads,
        n_kv_heads,
        capacity,
        q_stride: if fused { row } else { qw },
        k_stride: if fused { row } else { kw },
        v_stride: if fused { row } else { kw },
        cache_by_token: by_token,
        eps: 1e-6,
        theta,
    };
    let scale = 10f32.powf(rng.gen_range(-2.0..1.5));
    let mut gen = |n: usize| super::bf16_vec(n, -scale, scale, rng);
    let (q_in, k_in, v_in) = if fused {
        // One [tokens, q | k | v] buffer; k and v start at their column offsets and use the fused row stride.
        let all = gen(tokens * row);
        (all.clone(), all[qw..].to_vec(), all[qw + kw..].to_vec())
    } else {
        (gen(tokens * qw), gen(tokens * kw), gen(tokens * kw))
    };
    let qn = super::bf16_vec(D, 0.5, 1.5, rng);
    let kn = super::bf16_vec(D, 0.5, 1.5, rng);
    let dq = st.clone_htod(&q_in)?;
    let dk = st.clone_htod(&k_in)?;
    let dv = st.clone_htod(&v_in)?;
    let dpos = st.clone_htod(&positions)?;
    let dqn = st.clone_htod(&qn)?;
    let dkn = st.clone_htod(&kn)?;
    let cache_len = n_kv_heads * capacity * D;
    let mut dqo = st.clone_htod(&poison_bf16(tokens * qw))?;
    let mut dkc = st.clone_htod(&poison_bf16(cache_len))?;
    let mut dvc = st.clone_htod(&poison_bf16(cache_len))?;
    hga_qk_norm_rope(gpu, &dq, &dk, &dv, &dpos, &dqn, &dkn, &mut dqo, &mut dkc, &mut dvc, &s)?;
    let (qo, kc, vc) = (st.clone_dtoh(&dqo)?, st.clone_dtoh(&dkc)?, st.clone_dtoh(&dvc)?);
    gpu.synchronize()?;
    let mut wk = poison_bf16(cache_len);
    let mut wv = poison_bf16(cache_len);
    let wq = crate::reference::rope::hga_qk_norm_rope(&q_in, &k_in, &v_in, &positions, &qn, &kn, &mut wk, &mut wv, &s);
    let yq: Vec<bf16> = (0..tokens)
        .flat_map(|t| (0..n_heads).map(move |h| (t, h)))
        .flat_map(|(t, h)| norm_head(&q_in[t * s.q_stride + h * D..][..D], &qn, s.eps))
        .collect();
    let mut bad = compare_heads("q_out", &qo, &wq, &yq);
    // Cache: written slots as the reference; every other slot still holds the poison bytes.
    if bad.is_none() {
        for (i, (g, w)) in kc.chunks(D).zip(wk.chunks(D)).enumerate() {
            let written = w[0].to_bits() != 0xFFFF; // the reference never writes NaN
            let b = if written {
                let (h, slot) = (i / capacity, (i % capacity) as u32);
                let t = if by_token {
                    slot as usize
                } else {
                    positions.iter().position(|&p| p == slot).expect("a written slot has a token")
                };
                let y = norm_head(&k_in[t * s.k_stride + h * D..][..D], &kn, s.eps);
                compare_heads("k_cache", g, w, &y)
            } else if g.iter().any(|v| v.to_bits() != 0xFFFF) {
                Some(format!("k_cache row {i} (head {}, slot {}) written but not a target", i / capacity, i % capacity))
            } else {
                None
            };
            if b.is_some() {
                bad = b;
                break;
            }
        }
    }
    if bad.is_none() {
        if let Some(i) = vc.iter().zip(&wv).position(|(a, b)| a.to_bits() != b.to_bits()) {
            bad = Some(format!(
                "v_cache[{i}] (head {}, slot {}): got {}, expected {}",
                i / D / capacity,
                i / D % capacity,
                vc[i],
                wv[i]
            ));
        }
    }
    let written: Vec<usize> = (0..n_kv_heads * capacity).filter(|&r| wk[r * D].to_bits() != 0xFFFF).collect();
    let gk: Vec<f32> = written.iter().flat_map(|&r| to_f32(&kc[r * D..r * D + D])).collect();
    let wkf: Vec<f32> = written.iter().flat_map(|&r| to_f32(&wk[r * D..r * D + D])).collect();
    let rel = rel_l2(&to_f32(&qo), &to_f32(&wq)).max(rel_l2(&gk, &wkf));
    if bad.is_none() && rel > 1e-2 {
        bad = Some(format!("relative L2 error {rel:.3e} > 1e-2"));
    }
    let shape = format!(
        "tokens={tokens} heads={n_heads}/{n_kv_heads} capacity={capacity} theta={theta:e}{}{}",
        if fused { " fused-qkv" } else { "" },
        if by_token { " by-token" } else { "" }
    );
    Ok(Outcome::new("hga_qk_norm_rope", shape, rel, bad))
}
