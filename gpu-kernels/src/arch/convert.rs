//! Conversions: f32 <-> bf16 (round to nearest even) and f32 <-> e4m3fn (saturating: max 448, no infinities;
//! `cvt.rn.satfinite.e4m3x2.f32`, sm_89+). The host's `crate::num` functions are the bit-exact references.

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
