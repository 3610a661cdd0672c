//! Fast math (`core` has no f32 transcendental functions on nvptx). Approximate forms, flush-to-zero:
//! `ex2.approx.ftz` (2^x, max rel. error 2^-22), `lg2.approx.ftz` (log2 x, abs. error 2^-22 near 1),
//! `rcp.approx.ftz` (1/x, 1 ulp), `rsqrt.approx.ftz` (1/sqrt x, 2 ulp). The host tests check these bounds.

macro_rules! unary_f32 {
    ($(#[$m:meta])* $name:ident, $op:literal) => {
        $(#[$m])*
        #[inline(always)]
        pub fn $name(x: f32) -> f32 {
            let r: f32;
            unsafe { core::arch::asm!(concat!($op, " {0}, {1};"), out(reg32) r, in(reg32) x, options(pure, nomem, nostack)) };
            r
        }
    };
}
unary_f32!(/// 2^x.
    ex2, "ex2.approx.ftz.f32");
unary_f32!(/// log2(x).
    lg2, "lg2.approx.ftz.f32");
unary_f32!(/// 1/x.
    rcp, "rcp.approx.ftz.f32");
unary_f32!(/// 1/sqrt(x).
    rsqrt, "rsqrt.approx.ftz.f32");
unary_f32!(/// |x|.
    fabs, "abs.f32");

/// max(a, b) (`max.f32`; NaN-ignoring as in IEEE maxNum).
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    let r: f32;
    unsafe {
        core::arch::asm!("max.f32 {0}, {1}, {2};", out(reg32) r, in(reg32) a, in(reg32) b, options(pure, nomem, nostack))
    };
    r
}

/// e^x through ex2.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    ex2(x * core::f32::consts::LOG2_E)
}

/// Correctly rounded square root (`sqrt.rn.f32`).
#[inline(always)]
pub fn sqrt_rn(x: f32) -> f32 {
    let r: f32;
    unsafe { core::arch::asm!("sqrt.rn.f32 {0}, {1};", out(reg32) r, in(reg32) x, options(pure, nomem, nostack)) };
    r
}
