//! Dynamic shared memory. One module-scope `.extern .shared` array (a `.shared` declaration inside a function is a
//! ptxas syntax error); its size is given at launch. Kernels take either a generic pointer (ordinary loads and
//! stores) or a 32-bit shared-window address (what `ldmatrix`, `cp.async` and `ld.shared` want).
//! More than 48 KB per block needs the function attribute raised at load time (host side).

core::arch::global_asm!(".extern .shared .align 16 .b8 hga_dyn_smem[];");

/// Generic pointer to the start of the dynamic shared memory, as `*mut T` (16-byte aligned).
#[inline(always)]
pub fn dyn_smem_ptr<T>() -> *mut T {
    let p: u64;
    unsafe { core::arch::asm!("cvta.shared.u64 {0}, hga_dyn_smem;", out(reg64) p, options(pure, nomem, nostack)) };
    p as *mut T
}

/// 32-bit shared-window address of the start of the dynamic shared memory.
#[inline(always)]
pub fn dyn_smem_addr() -> u32 {
    let a: u32;
    unsafe { core::arch::asm!("mov.u32 {0}, hga_dyn_smem;", out(reg32) a, options(pure, nomem, nostack)) };
    a
}

/// `ld.shared.f32` at a 32-bit shared address.
///
/// # Safety
/// `addr` must lie inside the launch's dynamic shared memory, 4-byte aligned.
#[inline(always)]
pub unsafe fn ld_shared_f32(addr: u32) -> f32 {
    let v: f32;
    core::arch::asm!("ld.shared.f32 {0}, [{1}];", out(reg32) v, in(reg32) addr, options(nostack, readonly));
    v
}

/// `st.shared.f32` at a 32-bit shared address.
///
/// # Safety
/// `addr` must lie inside the launch's dynamic shared memory, 4-byte aligned.
#[inline(always)]
pub unsafe fn st_shared_f32(addr: u32, v: f32) {
    core::arch::asm!("st.shared.f32 [{0}], {1};", in(reg32) addr, in(reg32) v, options(nostack));
}
