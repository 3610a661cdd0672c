//! `hga_moe_group`: groups the (token, slot) entries of the router's ids by expert, deterministically.
//!
//! Input ids u32 [tokens, top_k] (entry i = token * top_k + slot). Outputs (see [`MoeGroupParams`]): counts
//! [experts], offsets [experts + 1] (exclusive prefix), tile_start [experts + 1] (exclusive prefix of
//! ceil(count / 64): the block tiles of the grouped expert kernels) and perm [tokens * top_k]: the entries sorted
//! by expert and, within an expert, by entry index (so by token; a token has each expert at most once).
//! Grid: one block of 256 threads (`THREADS`) (grouping is a small part of a prefill step; the decode path does not need it).
//! 1. Counts with shared-memory integer atomics (exact). 2. Thread 0 scans them (experts <= 256).
//! 3. Entries in chunks of 256, in order: within a warp, `match.any.sync` finds the lanes with the same expert and
//!    a lane's rank is the popcount of the lower ones; per-warp counts go to shared memory [8][experts], and an
//!    entry's place is cursor[e] + (counts of e in lower warps) + rank. Cursors advance by the chunk's totals.
//! Shared memory: (2 + 8) * experts u32 (<= 10 KB). Entries with an id >= experts are dropped (then the counts sum
//! to less than tokens * top_k; the host check looks for that).
use crate::arch::*;
use crate::params::{MoeGroupParams, MOE_GROUP_TILE_M};

/// Threads per block (one block).
pub const THREADS: usize = 256;
const WARPS: usize = THREADS / 32;

/// `barrier.sync 0` (the non-`.aligned` form): LLVM duplicated the plain `bar.sync` (= `.aligned`) of this kernel
/// into both arms of a divergent branch, which hangs; the non-aligned barrier may be reached from different
/// instructions by the threads of one warp.
#[inline(always)]
fn barrier_all() {
    unsafe { core::arch::asm!("barrier.sync 0;", options(nostack)) };
}

#[inline(always)]
fn match_any(v: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("match.any.sync.b32 {0}, {1}, 0xffffffff;", out(reg32) r, in(reg32) v, options(nomem, nostack))
    };
    r
}

#[inline(always)]
fn lanemask_lt() -> u32 {
    let r: u32;
    unsafe { core::arch::asm!("mov.u32 {0}, %lanemask_lt;", out(reg32) r, options(pure, nomem, nostack)) };
    r
}

#[inline(always)]
unsafe fn atomic_add_shared(p: *mut u32, v: u32) {
    core::arch::asm!("red.add.u32 [{0}], {1};", in(reg64) p, in(reg32) v, options(nostack));
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_group(p: MoeGroupParams) {
    entry_prologue();
    let ne = p.experts as usize;
    let n = p.tokens as usize * p.top_k as usize;
    let tid = thread_x() as usize;
    let warp = tid / 32;
    let ids = p.ids as *const u32;
    let sm = dyn_smem_ptr::<u32>();
    let counts = sm;
    let cursor = sm.add(ne);
    let wc = sm.add(2 * ne); // [8][experts]

    if tid < ne {
        *counts.add(tid) = 0;
    }
    barrier_all();
    let mut i = tid;
    while i < n {
        let e = *ids.add(i) as usize;
        if e < ne {
            atomic_add_shared(counts.add(e), 1);
        }
        i += THREADS;
    }
    barrier_all();
    if tid == 0 {
        let (mut off, mut tiles) = (0u32, 0u32);
        for e in 0..ne {
            let c = *counts.add(e);
            *(p.counts as *mut u32).add(e) = c;
            *(p.offsets as *mut u32).add(e) = off;
            *(p.tile_start as *mut u32).add(e) = tiles;
            *cursor.add(e) = off;
            off += c;
            tiles += c.div_ceil(MOE_GROUP_TILE_M as u32);
        }
        *(p.offsets as *mut u32).add(ne) = off;
        *(p.tile_start as *mut u32).add(ne) = tiles;
    }
    let mut base = 0;
    while base < n {
        // (the barrier of the previous step orders the cursor updates before this)
        let mut z = tid;
        while z < WARPS * ne {
            *wc.add(z) = 0;
            z += THREADS;
        }
        barrier_all();
        let i = base + tid;
        let e = if i < n { *ids.add(i) } else { u32::MAX };
        let valid = (e as usize) < ne;
        let same = match_any(e);
        let rank = (same & lanemask_lt()).count_ones();
        if valid && rank == 0 {
            *wc.add(warp * ne + e as usize) = same.count_ones();
        }
        barrier_all();
        if valid {
            let e = e as usize;
            let mut pos = *cursor.add(e) + rank;
            for w in 0..warp {
                pos += *wc.add(w * ne + e);
            }
            *(p.perm as *mut u32).add(pos as usize) = i as u32;
        }
        barrier_all();
        if tid < ne {
            let mut s = 0;
            for w in 0..WARPS {
                s += *wc.add(w * ne + tid);
            }
            *cursor.add(tid) += s;
        }
        barrier_all();
        base += THREADS;
    }
}
