//! Programmatic dependent launch (PDL, sm_90+): the host launches kernel N+1 with the attribute
//! `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, so the GPU may start it while kernel N is still running;
//! N+1 must then execute [`grid_dependency_wait`] before it touches any memory that N (or anything before N) reads
//! or writes. The wait returns once every block of N has completed and N's memory operations are visible. Ordering
//! is transitive only when every kernel of the stream waits, so every entry point starts with [`entry_prologue`].
//!
//! The instructions exist from PTX ISA 7.8 on sm_90. build.rs passes `--cfg hga_pdl` to the sm_90 and sm_120 kernel
//! builds only; without it (the sm_89 image) these functions are empty and the image has no `griddepcontrol`, so
//! the host launches it without the attribute. (`cfg(target_feature = "sm_90")` is also set by rustc for
//! `-C target-cpu=sm_90`/`sm_120`, but only on a nightly or bootstrapped compiler, and it is an unstable feature
//! name; an explicit cfg that build.rs controls is the one the host's per-image record can rely on.)

/// `griddepcontrol.wait`: blocks until the grids this one depends on (the previous kernel of the stream, when it
/// was launched with PDL) have completed and their memory is visible. A no-op when the launch had no programmatic
/// dependency. A memory clobber: no load or store is moved above it.
#[inline(always)]
pub fn grid_dependency_wait() {
    #[cfg(hga_pdl)]
    unsafe {
        core::arch::asm!("griddepcontrol.wait;", options(nostack))
    };
}

/// `griddepcontrol.launch_dependents`: once every block of this grid has executed it (or exited), the next kernel
/// of the stream may be scheduled. That kernel still waits for this grid's full completion in its own
/// [`grid_dependency_wait`], so calling it early is always safe; it only lets the dependent's launch and block
/// ramp-up overlap our tail.
#[inline(always)]
pub fn grid_dependency_launch_dependents() {
    #[cfg(hga_pdl)]
    unsafe {
        core::arch::asm!("griddepcontrol.launch_dependents;", options(nostack))
    };
}

/// What every kernel entry point runs first, before its first global-memory access (reading its by-value
/// parameter is fine): wait for the predecessor, then allow the successor to launch.
#[inline(always)]
pub fn entry_prologue() {
    grid_dependency_wait();
    grid_dependency_launch_dependents();
}

/// Before [`entry_prologue`]: asks L2 for the `bytes` from `base` (`prefetch.global.L2`, one per 128-byte line,
/// `nthreads` threads sharing them from `tid`; no register result, nothing waits), so that a kernel's weight
/// stream starts while the previous kernel finishes. Only for model weights: data that no kernel writes (uploaded
/// by copies). A prefetch is only a hint into L2, the GPU's point of coherence, so even a racing write could not
/// make the kernel's later loads stale; the rule keeps it useful (bytes the kernel will read as they are) and the
/// PTX check simple. Each PTX line carries the marker
/// `pdl-early-constant`, the only access the host's `ptx_pdl_check` accepts before the wait. Without `hga_pdl`
/// (the sm_89 build) it is empty: the kernel's own loads follow at once, there is nothing to overlap.
///
/// # Safety
/// `base .. base + bytes` lies in one global allocation.
#[inline(always)]
pub unsafe fn prefetch_l2_early(base: *const u8, bytes: usize, tid: usize, nthreads: usize) {
    prefetch_lines!(base, bytes, tid, nthreads, "prefetch.global.L2 [{0}]; // pdl-early-constant");
}

/// As [`prefetch_l2_early`], for K/V cache rows a decode attention kernel is about to stream, marked
/// `pdl-early-kv`. The predecessors of that kernel write at most the rows of the positions being decoded (the
/// RoPE kernel's cache write); every other row is as the kernel will read it. Even a row being written is safe to
/// prefetch: the prefetch is only a hint into L2, the point of coherence, and the kernel's own loads after the wait
/// (`cp.async.cg`, which also reads L2) see the write. Rows past the context are harmless (inside the cache).
///
/// # Safety
/// `base .. base + bytes` lies in one global allocation.
#[inline(always)]
pub unsafe fn prefetch_l2_early_kv(base: *const u8, bytes: usize, tid: usize, nthreads: usize) {
    prefetch_lines!(base, bytes, tid, nthreads, "prefetch.global.L2 [{0}]; // pdl-early-kv");
}

/// One `prefetch.global.L2` per 128-byte line of `base .. base + bytes`, lines shared by `nthreads` threads from
/// `tid`, with the given instruction text (its marker comment); nothing without `hga_pdl`.
macro_rules! prefetch_lines {
    ($base:expr, $bytes:expr, $tid:expr, $nthreads:expr, $insn:literal) => {{
        #[cfg(hga_pdl)]
        {
            let mut off = $tid * 128;
            while off < $bytes {
                core::arch::asm!($insn, in(reg64) $base.add(off), options(nostack, readonly));
                off += $nthreads * 128;
            }
        }
        #[cfg(not(hga_pdl))]
        let _ = ($base, $bytes, $tid, $nthreads);
    }};
}
use prefetch_lines;
