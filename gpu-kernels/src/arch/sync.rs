//! Block barrier. Written in `asm!` (a memory clobber by default) rather than `core::arch::nvptx::_syncthreads`,
//! which MIR jump threading can miscompile (rust#137086).

/// `bar.sync 0`: every thread of the block waits here; shared-memory writes before it are visible after it.
#[inline(always)]
pub fn sync_threads() {
    unsafe { core::arch::asm!("bar.sync 0;", options(nostack)) };
}
