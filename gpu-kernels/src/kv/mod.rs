//! The GPU working-set cache of K/V group slots (formats: `params/kv.rs`, `params/hga.rs`): one launch per layer
//! covering all its KV heads, fixed shapes for a given maximal selection, the position `p` read from device memory
//! (one recorded CUDA graph serves every decode step, no host round trip).
//! - [`append`]: the new token's K/V into its window-ring slot (and its sink slot while `p < 64`) and into the
//!   mapped host arena;
//! - [`lookup`]: page-table lookup of the selected groups, CLOCK replacement for the misses, the attention entry
//!   list, the counters;
//! - [`gather`]: the misses from the mapped host arena (zero copy) into their slots;
//! - [`advance`]: `p += 1` at the end of a recorded step.
pub mod advance;
pub mod append;
pub mod gather;
pub mod lookup;

use crate::arch::*;

/// `fence.acq_rel.cta` then `bar.warp.sync`: the warp's earlier global writes are visible to all its lanes.
#[inline(always)]
pub(crate) fn warp_sync_memory() {
    unsafe { core::arch::asm!("fence.acq_rel.cta;", "bar.warp.sync 0xffffffff;", options(nostack)) };
}

/// `vote.sync.ballot.b32` over the full warp.
#[inline(always)]
pub(crate) fn ballot(pred: bool) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("{{ .reg .pred p; setp.ne.u32 p, {1}, 0; vote.sync.ballot.b32 {0}, p, 0xffffffff; }}",
            out(reg32) r, in(reg32) pred as u32, options(nomem, nostack))
    };
    r
}

/// Lanes with the same value (`match.any.sync.b32`).
#[inline(always)]
pub(crate) fn match_any(v: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("match.any.sync.b32 {0}, {1}, 0xffffffff;", out(reg32) r, in(reg32) v, options(nomem, nostack))
    };
    r
}

/// `%lanemask_lt`: the bits of the lanes below this one.
#[inline(always)]
pub(crate) fn lanemask_lt() -> u32 {
    let r: u32;
    unsafe { core::arch::asm!("mov.u32 {0}, %lanemask_lt;", out(reg32) r, options(pure, nomem, nostack)) };
    r
}

/// Byte address of group `g` of (`p.layer`, `h`) in the mapped arena, or 0 when the group lies past the table or
/// its extent is not allocated yet (a 0 entry: the table has a fixed length so that a recorded graph stays valid
/// while the arena grows). With `p.group_addr` the address is that table's entry instead (0: not in RAM).
///
/// # Safety
/// `p.extents` holds `p.n_extents` device addresses; `p.group_addr`, when set, `(p.layer + 1) * p.n_kv *
/// p.table_groups` of them.
#[inline(always)]
pub(crate) unsafe fn arena_block(p: &crate::params::KvCacheParams, h: u32, g: u32) -> u64 {
    if p.group_addr != 0 {
        if g >= p.table_groups {
            return 0;
        }
        let i = (p.layer as u64 * p.n_kv as u64 + h as u64) * p.table_groups as u64 + g as u64;
        return *(p.group_addr as *const u64).add(i as usize);
    }
    let e = g / p.groups_per_extent;
    if e >= p.n_extents {
        return 0;
    }
    let base = *(p.extents as *const u64).add(e as usize);
    if base == 0 {
        return 0;
    }
    let blk =
        (p.layer as u64 * p.n_kv as u64 + h as u64) * p.groups_per_extent as u64 + (g % p.groups_per_extent) as u64;
    base + blk * crate::params::KV_GROUP_BYTES as u64
}
