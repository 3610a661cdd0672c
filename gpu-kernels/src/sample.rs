//! The sampling rule shared bit for bit by the GPU kernel `hga_sample` and its CPU reference: a counter-based
//! generator (SplitMix64 of (seed, step)) and integer-exact token weights, so that, given the same uniform, both
//! sides choose the same token whatever their summation order.
//!
//! Rule, per row of logits l (vocabulary V), temperature T > 0, top_p in (0, 1]:
//! 1. `mx` = the largest logit (NaN ignored); `w_i = weight(l_i, mx, coef)` with `coef = log2(e) / T`: about
//!    2^31 * exp((l_i - mx) / T), computed in integers after one f32 subtraction and one f32 multiplication
//!    (IEEE, identical on both sides), 0 below 2^-40 relative. Total mass < V * 2^32 < 2^50.
//! 2. `need = max(1, ((total >> 10) * top_p_fixed) >> 10)` (top_p in 2^-20 units).
//! 3. Threshold key K* = the largest `key(l)` (an order-preserving u32 of the logit) such that the mass of tokens
//!    with key >= K* is >= need; kept = that mass. (Ties at the threshold are all kept, so the kept set can be
//!    larger than the smallest top-p set by tokens of exactly equal logit.)
//! 4. `u = uniform_u32(seed, step)`; `target = ((kept >> 20) * u) >> 12` (< kept).
//! 5. The token is the smallest index i with key_i >= K* whose inclusive prefix mass (over kept tokens, in index
//!    order) exceeds target.

/// SplitMix64's finalizer (a bijective 64-bit mix).
#[inline]
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The uniform 32-bit draw for `(seed, step)`.
#[inline]
pub fn uniform_u32(seed: u64, step: u64) -> u32 {
    (splitmix64(seed ^ splitmix64(step)) >> 32) as u32
}

/// Order-preserving map of an f32 to u32 (larger float, larger key; -0 < +0). NaN maps to 0 (below everything).
#[inline]
pub fn logit_key(x: f32) -> u32 {
    if x.is_nan() {
        return 0;
    }
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Inverse of [`logit_key`] (for keys of non-NaN values).
#[inline]
pub fn key_logit(k: u32) -> f32 {
    if k & 0x8000_0000 != 0 {
        f32::from_bits(k & 0x7FFF_FFFF)
    } else {
        f32::from_bits(!k)
    }
}

/// `log2(e) / temperature`, the coefficient the kernel takes (computed once on the host).
#[inline]
pub fn weight_coef(temperature: f32) -> f32 {
    core::f32::consts::LOG2_E / temperature
}

/// top_p in 2^-20 units, clamped to [1, 2^20].
#[inline]
pub fn top_p_fixed(top_p: f32) -> u32 {
    if top_p >= 1.0 || top_p.is_nan() {
        1 << 20
    } else {
        ((top_p * 1_048_576.0) as u32).max(1)
    }
}

/// 2^(f / 2^20) * 2^32 for f in [0, 2^20): Taylor series of exp(x ln 2) to degree 9 in Q32 (Horner, integers).
const EXP2_Q32: [u64; 10] =
    [4294967296, 2977044472, 1031764991, 238388332, 41309550, 5726720, 661577, 65510, 5676, 437];

/// The integer weight of logit `l` given the row's max `mx`: about 2^31 * 2^((l - mx) * coef); 0 when that
/// exponent is below -40 or NaN. At l == mx it is 2^31.
#[inline]
pub fn weight(l: f32, mx: f32, coef: f32) -> u64 {
    let t = (l - mx) * coef;
    if t.is_nan() || t <= -40.0 {
        return 0;
    }
    // t in (-40, 0]: fixed point with 20 fraction bits (exact scaling, truncation toward zero).
    let ti = (t * 1_048_576.0) as i32;
    let n = ti >> 20; // floor
    let f = (ti & 0xF_FFFF) as u64;
    let mut acc = EXP2_Q32[9];
    let mut i = 9;
    while i > 0 {
        i -= 1;
        acc = EXP2_Q32[i] + ((acc * f) >> 20);
    }
    // acc = 2^(f/2^20) in Q32, in [2^32, 2^33); halve to Q31 and shift by the integer part (n in [-40, 0]).
    (acc >> 1) >> ((-n) as u32)
}

/// `need` of step 2.
#[inline]
pub fn top_p_need(total: u64, top_p_fixed: u32) -> u64 {
    if top_p_fixed >= 1 << 20 {
        return total;
    }
    ((((total >> 10) * top_p_fixed as u64) >> 10).max(1)).min(total)
}

/// `target` of step 4.
#[inline]
pub fn sample_target(kept: u64, u: u32) -> u64 {
    ((kept >> 20) * u as u64) >> 12
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_tracks_exp() {
        let coef = weight_coef(0.7);
        for i in 0..2000 {
            let d = -(i as f32) * 0.013;
            let w = weight(d, 0.0, coef) as f64;
            let e = 2f64.powi(31) * ((d as f64) / 0.7).exp();
            if ((d * coef) as f64) > -39.0 {
                assert!((w - e).abs() <= e * 1e-6 + 1.0, "d={d} w={w} e={e}");
            }
        }
        assert_eq!(weight(3.0, 3.0, 1.0), 1 << 31);
        assert_eq!(weight(f32::NAN, 3.0, 1.0), 0);
        assert_eq!(weight(-1e30, 3.0, 1.0), 0);
    }

    #[test]
    fn keys_are_ordered() {
        let v = [f32::NEG_INFINITY, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 1e30, f32::INFINITY];
        for p in v.windows(2) {
            assert!(logit_key(p[0]) < logit_key(p[1]), "{} {}", p[0], p[1]);
        }
        for x in v {
            assert_eq!(key_logit(logit_key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn uniform_is_roughly_uniform() {
        let n = 1 << 16;
        let mean = (0..n).map(|s| uniform_u32(42, s) as f64 / 2f64.powi(32)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert_ne!(uniform_u32(1, 0), uniform_u32(2, 0));
    }
}
