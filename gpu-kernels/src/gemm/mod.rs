//! FP8 block-scaled linear layers, the fused RMSNorm -> FP8 quantizer that feeds them, and the bf16 mma.sync peak
//! microbenchmark (the portable ceiling that `bench_gemm` measures the prefill kernels against). One kernel per job
//! and card; `Fp8LinearKernel::pick` (host/src/kernels/gemm.rs) chooses:
//!
//! | rows m | sm_89, sm_120 | sm_90 |
//! |---|---|---|
//! | m <= 16 | [`fp8_linear_decode`] `hga_fp8_linear_decode` | `hga_fp8_linear_decode` |
//! | m > 16 | [`fp8_linear_prefill`] `hga_fp8_linear_prefill` (native e4m3 `mma.sync`) | [`fp8_linear_prefill_f16_v3`] `hga_fp8_linear_prefill_f16_v3` (own e4m3 -> f16 conversion, f16 `mma.sync`; sm_90 has no FP8 `mma.sync`) |
//!
//! Earlier prefill variants (4 stages, unpipelined f16 conversion splits) are in docs/perf-gemm.md and git history.
/// Repeats `$body` with `$i` bound to each literal: a loop LLVM must not keep (register arrays indexed by it would
/// go to local memory otherwise; seen: 544-byte stack frame with plain `for` loops in v1 of the prefill kernel).
macro_rules! unroll {
    ($i:ident in [$($v:literal),*] $body:block) => { $( { let $i: usize = $v; $body } )* };
}

pub mod fp8_linear_decode;
pub mod fp8_linear_prefill;
pub mod fp8_linear_prefill_f16_v3;
pub mod mma_peak;
pub mod rmsnorm_fp8_quant;

/// 16-byte streaming load from global memory (`ld.global.nc.L1::no_allocate.v4.u32`): read-only data read once
/// (weights), kept out of L1.
///
/// # Safety
/// `p` is a 16-byte aligned pointer into global memory, readable for 16 bytes and not written during the kernel.
#[inline(always)]
pub(crate) unsafe fn ld_stream_v4(p: *const u8) -> [u32; 4] {
    let mut r = [0u32; 4];
    let [a, b, c, d] = &mut r;
    core::arch::asm!("ld.global.nc.L1::no_allocate.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) *a, out(reg32) *b, out(reg32) *c, out(reg32) *d, in(reg64) p, options(nostack, readonly));
    r
}

/// 16-byte read-only load from global memory through L1 (`ld.global.nc.v4.u32`): small data many warps re-read
/// (activations).
///
/// # Safety
/// As [`ld_stream_v4`].
#[inline(always)]
pub(crate) unsafe fn ld_ro_v4(p: *const u8) -> [u32; 4] {
    let mut r = [0u32; 4];
    let [a, b, c, d] = &mut r;
    core::arch::asm!("ld.global.nc.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) *a, out(reg32) *b, out(reg32) *c, out(reg32) *d, in(reg64) p, options(nostack, readonly));
    r
}
