//! Wide global memory accesses: 16-byte vector loads and stores (`ld.global.v4.u32` / `st.global.v4.u32`), the unit
//! of a coalesced memory-bound kernel (a warp moves 512 contiguous bytes per instruction).
//!
//! # Safety (all functions)
//! The pointer must be a valid, 16-byte aligned global address for 16 bytes.

/// 16-byte load.
///
/// # Safety
/// See the module docs.
#[inline(always)]
pub unsafe fn ld_global_v4(p: *const u8) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    core::arch::asm!("ld.global.v4.u32 {{{0}, {1}, {2}, {3}}}, [{4}];",
        out(reg32) a, out(reg32) b, out(reg32) c, out(reg32) d, in(reg64) p, options(nostack, readonly));
    [a, b, c, d]
}

/// 16-byte store.
///
/// # Safety
/// See the module docs.
#[inline(always)]
pub unsafe fn st_global_v4(p: *mut u8, v: [u32; 4]) {
    core::arch::asm!("st.global.v4.u32 [{0}], {{{1}, {2}, {3}, {4}}};",
        in(reg64) p, in(reg32) v[0], in(reg32) v[1], in(reg32) v[2], in(reg32) v[3], options(nostack));
}
