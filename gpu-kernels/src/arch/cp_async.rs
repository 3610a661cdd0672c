//! `cp.async` (sm_80+): asynchronous 16-byte global -> shared copies, grouped with `commit_group` and awaited with
//! `wait_group N` (wait until at most N groups are pending). A barrier is still needed before other threads read
//! what this thread copied.

/// Starts a 16-byte copy from global `src` to shared `dst` (`cp.async.cg.shared.global`, L2 only).
///
/// # Safety
/// `dst` is a 16-byte aligned shared address inside the launch's shared memory; `src` a 16-byte aligned readable
/// global pointer.
#[inline(always)]
pub unsafe fn cp_async_16(dst: u32, src: *const u8) {
    core::arch::asm!("cp.async.cg.shared.global [{0}], [{1}], 16;", in(reg32) dst, in(reg64) src, options(nostack));
}

/// Starts a 4-byte copy from global `src` to shared `dst` (`cp.async.ca.shared.global`, through L1; small
/// strided data such as per-row scales).
///
/// # Safety
/// `dst` is a 4-byte aligned shared address inside the launch's shared memory; `src` a 4-byte aligned readable
/// global pointer.
#[inline(always)]
pub unsafe fn cp_async_4(dst: u32, src: *const u8) {
    core::arch::asm!("cp.async.ca.shared.global [{0}], [{1}], 4;", in(reg32) dst, in(reg64) src, options(nostack));
}

/// Closes the current group of `cp.async` copies of this thread.
#[inline(always)]
pub fn cp_async_commit() {
    unsafe { core::arch::asm!("cp.async.commit_group;", options(nostack)) };
}

/// Waits until at most `N` of this thread's committed groups are still in flight.
#[inline(always)]
pub fn cp_async_wait<const N: u32>() {
    unsafe { core::arch::asm!("cp.async.wait_group {n};", n = const N, options(nostack)) };
}
