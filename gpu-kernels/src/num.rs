//! Pure number formats shared by the kernels and the host: bf16 and FP8 e4m3fn encode / decode, and the
//! per-token-group activation quantization rule. The host uses these as the CPU reference; the kernels use the
//! hardware conversions in [`crate::arch`] (sm_89+), which the GPU tests check bit-for-bit against these.

/// Largest finite e4m3fn value. e4m3fn has no infinities; `S.1111.111` is NaN.
pub const E4M3_MAX: f32 = 448.0;
/// Width of one activation-quantization group along K (and of one weight scale block).
pub const FP8_GROUP: usize = 128;
/// The absmax of an activation group is clamped below by this before the scale is taken, so that an all-zero group
/// gets a finite scale (and zeros) instead of 0/0.
pub const FP8_ACT_EPS: f32 = 1e-10;

/// bf16 bits -> f32 (exact).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 -> bf16 bits, round to nearest even (as `cvt.rn.bf16.f32`); NaN stays NaN.
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    ((bits.wrapping_add(0x7FFF + lsb)) >> 16) as u16
}

/// e4m3fn bits -> f32 (exact).
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = ((b >> 3) & 0xF) as i32;
    let m = (b & 7) as f32;
    if e == 0 {
        sign * m * (1.0 / 512.0)
    } else if e == 15 && (b & 7) == 7 {
        f32::NAN
    } else {
        sign * (1.0 + m / 8.0) * exp2i(e - 7)
    }
}

/// f32 -> e4m3fn bits, round to nearest even, saturating to +-448 (as `cvt.rn.satfinite.e4m3x2.f32`).
/// NaN maps to NaN (0x7F, sign kept).
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if x.is_nan() {
        return sign | 0x7F;
    }
    let a = f32::from_bits(bits & 0x7FFF_FFFF);
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Subnormal range of e4m3 (and its rounding up into the smallest normal, which has the bits 0x08).
        return sign | round_half_even(a * 512.0) as u8;
    }
    let ab = a.to_bits();
    let lsb = (ab >> 20) & 1;
    let r = ab + 0x7FFFF + lsb;
    let e = ((r >> 23) as i32) - 127;
    let m = (r >> 20) & 7;
    if e > 8 || (e == 8 && m == 7) {
        return sign | 0x7E;
    }
    sign | ((((e + 7) as u32) << 3) | m) as u8
}

/// The scale of one activation group: `max(absmax, FP8_ACT_EPS) / 448`. Values are then stored as
/// `f32_to_e4m3(x / scale)`; dequantization is `e4m3_to_f32(q) * scale`.
#[inline]
pub fn fp8_group_scale(absmax: f32) -> f32 {
    let a = if absmax > FP8_ACT_EPS { absmax } else { FP8_ACT_EPS };
    a / E4M3_MAX
}

/// The ALU e4m3 -> f16 conversion of the f16 prefill kernel (`arch::convert::e4m3x4_to_f16x2x2_scaled`: `prmt`
/// with sign replication, `shl 7`, `and 0xBF80BF80`), bit for bit, for the CPU tests: four e4m3 in a u32 (byte i =
/// element i) -> f16x2 [e0, e1] and [e2, e3] (low half first), each f16 = e4m3 value * 2^-8 exactly.
pub fn e4m3x4_to_f16x2x2_scaled_bits(v: u32) -> [u32; 2] {
    let byte = |i: u32| (v >> (8 * i)) & 0xFF;
    // prmt sign-replicate mode: the high byte of each half is the byte's sign bit repeated.
    let sext = |b: u32| if b & 0x80 != 0 { 0xFF00 | b } else { b };
    let spread = |b0: u32, b1: u32| ((sext(b0) | (sext(b1) << 16)) << 7) & 0xBF80_BF80;
    [spread(byte(0), byte(1)), spread(byte(2), byte(3))]
}

#[inline]
fn round_half_even(x: f32) -> f32 {
    // x is small and non-negative here (< 9).
    let f = x as u32 as f32; // floor
    let d = x - f;
    if d > 0.5 || (d == 0.5 && (f as u32) & 1 == 1) {
        f + 1.0
    } else {
        f
    }
}

#[inline]
fn exp2i(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bits_to_f32(h: u32) -> f32 {
        let s = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
        let (e, m) = (((h >> 10) & 0x1F) as i32, (h & 0x3FF) as f32);
        s * if e == 0 { m * exp2i(-24) } else { (1.0 + m / 1024.0) * exp2i(e - 15) }
    }

    #[test]
    fn e4m3_to_f16_scaled_every_pair_of_codes() {
        for b0 in 0u32..=255 {
            for b1 in 0u32..=255 {
                if b0 & 0x7F == 0x7F || b1 & 0x7F == 0x7F {
                    continue;
                }
                let codes = [b0, b1, b1, b0];
                let v = codes.iter().enumerate().fold(0u32, |v, (i, b)| v | (b << (8 * i)));
                let [lo, hi] = e4m3x4_to_f16x2x2_scaled_bits(v);
                let got = [lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16];
                for (c, h) in codes.iter().zip(got) {
                    let want = e4m3_to_f32(*c as u8) * exp2i(-8);
                    let g = f16_bits_to_f32(h);
                    assert!(g == want && g.is_sign_negative() == want.is_sign_negative(), "{c:#x}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn e4m3_roundtrip_every_code() {
        for b in 0u8..=255 {
            let x = e4m3_to_f32(b);
            if b & 0x7F == 0x7F {
                assert!(x.is_nan());
                continue;
            }
            let back = f32_to_e4m3(x);
            // +0 and -0 keep their sign bit.
            assert_eq!(back, b, "code {b:#x} value {x}");
        }
    }

    #[test]
    fn e4m3_known_values_and_saturation() {
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(-1e9), 0xFE);
        assert_eq!(f32_to_e4m3(460.0), 0x7E);
        assert_eq!(f32_to_e4m3(1.0), 0x38);
        // 1.0625 is halfway between 1.0 (m=0) and 1.125 (m=1): ties to even -> 1.0.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        // Halfway between the two smallest subnormals (1/512 and 2/512): even -> 2/512.
        assert_eq!(f32_to_e4m3(1.5 / 512.0), 0x02);
        assert_eq!(f32_to_e4m3(0.5 / 512.0), 0x00);
    }

    #[test]
    fn e4m3_rounds_to_nearest() {
        // Exhaustive over a grid: the chosen code is the nearest representable value.
        let mut x = -500.0f32;
        while x < 500.0 {
            let q = e4m3_to_f32(f32_to_e4m3(x));
            let best = (0u8..=255)
                .map(e4m3_to_f32)
                .filter(|v| !v.is_nan())
                .map(|v| (v - x.clamp(-448.0, 448.0)).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((q - x.clamp(-448.0, 448.0)).abs() <= best, "x={x} q={q}");
            x += 0.37;
        }
    }

    #[test]
    fn bf16_round_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even -> 1.
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
    }
}
