//! Naive CPU references of every kernel, written independently of the kernels (f64 accumulation), named as the
//! kernels. The GPU tests and `hga selfcheck` compare against these.
pub mod attention;
pub mod gemm;
pub mod head;
pub mod hga_attend;
pub mod hga_route;
pub mod kv;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod selftest;

pub use norm::hga_rmsnorm;
pub use quant::{hga_fp8_dequant, hga_fp8_quant};

/// `x` rounded to the nearest bf16, ties to even, correctly. (`half`'s `bf16::from_f64` drops the low 32 bits of the
/// f64 mantissa before rounding, so a value within 2^-20 (relative) above a bf16 midpoint rounds as a tie: about one
/// output in 4000 one ulp off.) Via f32: rounding to f32 keeps the side of every bf16 midpoint (they are f32 values)
/// unless it lands on one; then it is moved one f32 ulp back towards `x`.
pub fn bf16_rn(x: f64) -> half::bf16 {
    let f = x as f32;
    let b = f.to_bits();
    if b & 0xFFFF == 0x8000 && f.is_finite() && f as f64 != x {
        let toward = if x.abs() > (f as f64).abs() { b + 1 } else { b - 1 };
        return half::bf16::from_f32(f32::from_bits(toward));
    }
    half::bf16::from_f32(f)
}

#[cfg(test)]
mod tests {
    use half::bf16;

    #[test]
    fn bf16_rn_rounds_near_ties_by_their_side() {
        // 1 + 2^-8 is the midpoint of 1 and 1 + 2^-7.
        let mid = 1.0 + 2f64.powi(-8);
        assert_eq!(super::bf16_rn(mid), bf16::from_f32(1.0));
        assert_eq!(super::bf16_rn(mid + 1e-9), bf16::from_f64(1.0 + 2f64.powi(-7)));
        assert_eq!(super::bf16_rn(-(mid + 1e-9)), bf16::from_f64(-(1.0 + 2f64.powi(-7))));
        assert_eq!(super::bf16_rn(mid - 1e-9), bf16::from_f32(1.0));
        assert_eq!(super::bf16_rn(-1.0039064239736737), bf16::from_f32(-1.0078125));
        for v in [0.0, -0.0, 1e-30, 3.5, -7.25e5, f64::INFINITY] {
            assert_eq!(super::bf16_rn(v).to_bits(), bf16::from_f64(v).to_bits(), "{v}");
        }
    }
}
