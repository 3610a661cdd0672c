//! Conversions: f32 <-> bf16 (round to nearest even) and f32 <-> e4m3fn (saturating: max 448, no infinities;
//! `cvt.rn.satfinite.e4m3x2.f32`, sm_89+), and e4m3 -> f16 for the f16 tensor-core path (exact, two ways: the
//! conversion pipe's `cvt.rn.f16x2.e4m3x2`, or integer bit moves on the ALU pipe that give the value times 2^-8).
//! The host's `crate::num` functions are the bit-exact references.

/// f32 -> bf16 bits (`cvt.rn.bf16.f32`).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let r: u16;
    unsafe { core::arch::asm!("cvt.rn.bf16.f32 {0}, {1};", out(reg16) r, in(reg32) x, options(pure, nomem, nostack)) };
    r
}

/// bf16 bits -> f32 (exact: a shift).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Two bf16 packed in a u32 (low half first) -> (lo, hi) as f32.
#[inline(always)]
pub fn bf16x2_to_f32(v: u32) -> (f32, f32) {
    (f32::from_bits(v << 16), f32::from_bits(v & 0xFFFF_0000))
}

/// (lo, hi) f32 -> two bf16 packed in a u32 (`cvt.rn.bf16x2.f32`; the first source goes to the upper half).
#[inline(always)]
pub fn f32x2_to_bf16x2(lo: f32, hi: f32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("cvt.rn.bf16x2.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

/// (lo, hi) f32 -> two e4m3 in a u16 (lo in the low byte), saturating.
#[inline(always)]
pub fn f32x2_to_e4m3x2(lo: f32, hi: f32) -> u16 {
    let r: u16;
    unsafe {
        core::arch::asm!("cvt.rn.satfinite.e4m3x2.f32 {0}, {1}, {2};", out(reg16) r, in(reg32) hi, in(reg32) lo, options(pure, nomem, nostack))
    };
    r
}

/// Two e4m3 in a u16 (lo in the low byte) -> (lo, hi) as f32 (through f16x2, exact).
#[inline(always)]
pub fn e4m3x2_to_f32x2(v: u16) -> (f32, f32) {
    let h: u32;
    unsafe {
        core::arch::asm!("cvt.rn.f16x2.e4m3x2 {0}, {1};", out(reg32) h, in(reg16) v, options(pure, nomem, nostack))
    };
    let lo: f32;
    let hi: f32;
    unsafe {
        core::arch::asm!(
            "{{ .reg .f16 l, h; mov.b32 {{l, h}}, {2}; cvt.f32.f16 {0}, l; cvt.f32.f16 {1}, h; }}",
            out(reg32) lo, out(reg32) hi, in(reg32) h, options(pure, nomem, nostack))
    };
    (lo, hi)
}

/// Four e4m3 in a u32 (byte i = element i) -> two f16x2: [e0, e1] and [e2, e3] (low half first), exact
/// (`cvt.rn.f16x2.e4m3x2` twice: the conversion pipe, F2FP on sm_89+).
#[inline(always)]
pub fn e4m3x4_to_f16x2x2(v: u32) -> [u32; 2] {
    let (lo, hi): (u32, u32);
    unsafe {
        core::arch::asm!(
            "{{ .reg .b16 l, h; mov.b32 {{l, h}}, {2}; cvt.rn.f16x2.e4m3x2 {0}, l; cvt.rn.f16x2.e4m3x2 {1}, h; }}",
            out(reg32) lo, out(reg32) hi, in(reg32) v, options(pure, nomem, nostack))
    };
    [lo, hi]
}

/// Four e4m3 in a u32 (byte i = element i) -> two f16x2 [e0, e1] and [e2, e3] holding each value times 2^-8,
/// exact, on the integer ALU pipe only (3 instructions per f16x2: `prmt`, `shl`, `and`). An e4m3 byte b (sign,
/// 4 exponent bits, 3 mantissa bits, bias 7) becomes the f16 with sign bit 15 and bits 13..7 = b & 0x7f, bit 14 = 0:
/// f16 exponent field = e4m3 exponent field, so the value is 2^(e-15) (1.m) = e4m3(b) * 2^-8, and e = 0 (e4m3
/// subnormal m * 2^-9) lands on the f16 subnormal m * 2^-3 * 2^-14 = m * 2^-17: the same 2^-8. The NaN codes
/// (0x7f, 0xff) become the finite 1.875 (* sign): callers feed finite e4m3. `prmt` with the sign-replicate mode puts
/// each byte b into a 16-bit half as (b's sign repeated) : b; shifted left by 7, bit 15 is the sign and bits 14..7
/// are b; the mask 0xBF80 clears bit 14 (b's sign) and bits 6..0 (the other half's sign copies).
/// CPU mirror, tested over every pair of codes: `crate::num::e4m3x4_to_f16x2x2_scaled_bits`.
#[inline(always)]
pub fn e4m3x4_to_f16x2x2_scaled(v: u32) -> [u32; 2] {
    let (lo, hi): (u32, u32);
    unsafe {
        core::arch::asm!(
            "{{ .reg .b32 x, y; prmt.b32 x, {2}, 0, 0x9180; prmt.b32 y, {2}, 0, 0xB3A2; shl.b32 x, x, 7; shl.b32 y, y, 7; and.b32 {0}, x, 0xBF80BF80; and.b32 {1}, y, 0xBF80BF80; }}",
            out(reg32) lo, out(reg32) hi, in(reg32) v, options(pure, nomem, nostack))
    };
    [lo, hi]
}
