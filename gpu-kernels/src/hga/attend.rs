//! Routed attention kernels: exact softmax of every query head of a KV head over the entries of the attention entry
//! list (`params::hga`: the sink, the local window and the selected groups, each a 16-token group block in the
//! layer's slot pool), split-K over the entries, partial outputs with their LSE merged by the dense decode's merge
//! kernels (`attention::merge`, FlashInfer-style state merge). One kernel per file:
//! - [`decode`]: a few query tokens (decode), warp w takes entry w of each tile of 4 entries for the CTA's 16 rows;
//! - [`prefill`]: a block of up to 64 consecutive query tokens routed jointly (one entry list per KV head), 4 warps
//!   of 16 rows each over every entry of the split.
//!
//! Both read a group block with `cp.async` into the swizzled K / V tiles of `attention::tile` (entry i of a tile at
//! tile rows 16i..16i+15), so the per-warp FlashAttention-2 step of the dense kernels is reused as is with the
//! entry's first position as the key base (the causal mask `entry_pos + r <= p` is the dense mask `key < p + 1`).
//! Rows that no query of the CTA can see (`entry_pos + r` past the CTA's last position: the unfilled rows of the
//! open group) are zero-filled by `cp.async` instead of read, so whatever the pool holds there (stale or NaN) never
//! reaches the output. Launch shapes depend only on `max_entries` and the split: the entry count and the position
//! are read on the device, so one recorded launch serves every step.
pub mod decode;
pub mod prefill;

use crate::arch::*;
use crate::attention::tile::{swz, ROW_BYTES};
use crate::params::HgaAttendParams;

/// Threads per CTA of both kernels (4 warps).
pub(crate) const NTHREADS: u32 = 128;
/// Entries per tile.
pub(crate) const EPT: u32 = 4;
/// Bytes of the K (or V) tile of 4 entries (64 rows of 256 bytes).
pub(crate) const TILE: u32 = 64 * ROW_BYTES;
/// Bytes of one ring stage: K tile then V tile.
pub(crate) const STAGE: u32 = 2 * TILE;
/// Bytes of one group block (K then V, 16 rows of 256 bytes each).
const GROUP_BYTES: usize = 8192;

#[inline(always)]
pub(crate) fn min_u32(a: u32, b: u32) -> u32 {
    if a < b {
        a
    } else {
        b
    }
}

/// `cp.async.cg` of 16 bytes that copies the first `src_size` bytes (16 or 0) and zero-fills the rest.
///
/// # Safety
/// As `cp_async_16`; `src` stays a valid address even when nothing is read.
#[inline(always)]
unsafe fn cp_async_16_zfill(dst: u32, src: *const u8, src_size: u32) {
    core::arch::asm!("cp.async.cg.shared.global [{0}], [{1}], 16, {2};", in(reg32) dst, in(reg64) src,
        in(reg32) src_size, options(nostack));
}

/// The position of query token 0 (from `pos_dev` when set) and the entry count of KV head `kvh` (clamped to
/// `max_entries`).
///
/// # Safety
/// After the PDL wait; `p` describes valid buffers.
#[inline(always)]
pub(crate) unsafe fn position_and_count(p: &HgaAttendParams, kvh: u32) -> (u32, u32) {
    let pos = if p.pos_dev != 0 { *(p.pos_dev as *const u32) } else { p.pos };
    let ne = min_u32(*(p.n_entries as *const u32).add(kvh as usize), p.max_entries);
    (pos, ne)
}

/// The entries of split `sp` of a KV head with `ne` entries: (first, end (exclusive), tiles of 4).
#[inline(always)]
pub(crate) fn split_entries(p: &HgaAttendParams, sp: u32, ne: u32) -> (u32, u32, u32) {
    let per = EPT * p.tiles_per_split;
    let e0 = sp * per;
    let e1 = if e0 < ne { min_u32(ne, e0 + per) } else { e0 };
    (e0, e1, (e1 - e0).div_ceil(EPT))
}

/// The first position of entry `e` of KV head `kvh`.
///
/// # Safety
/// `e < max_entries`.
#[inline(always)]
pub(crate) unsafe fn entry_pos(p: &HgaAttendParams, kvh: u32, e: u32) -> u32 {
    *(p.entry_pos as *const u32).add(kvh as usize * p.max_entries as usize + e as usize)
}

/// Issues the `cp.async` copies of the entries `e_first .. min(e_first + 4, e_end)` of KV head `kvh` into the
/// stage at shared address `dst` (K tile, then V tile; entry i at tile rows 16i..16i+15, swizzled). Rows at
/// positions past `pmax` are zero-filled. Entries past `e_end` leave their rows as they were (the callers skip
/// them). All 128 threads call: thread `tid` copies chunk `tid % 16` of rows `tid / 16` and `tid / 16 + 8` of the
/// K and the V of each entry (a warp reads 512 contiguous bytes per copy).
///
/// # Safety
/// `e_end <= max_entries`; `dst` a stage of [`STAGE`] bytes of the launch's shared memory.
#[inline(always)]
pub(crate) unsafe fn load_tile(dst: u32, p: &HgaAttendParams, kvh: u32, e_first: u32, e_end: u32, pmax: u32, tid: u32) {
    let base = kvh as usize * p.max_entries as usize;
    let sl = (p.entry_slot as *const u32).add(base);
    let ps = (p.entry_pos as *const u32).add(base);
    let r = tid / 16;
    let c = tid % 16;
    // The list first (independent loads, one round trip), then the copies.
    let mut slot = [0u32; EPT as usize];
    let mut pos = [0u32; EPT as usize];
    let mut i = 0;
    while i < EPT as usize {
        let e = min_u32(e_first + i as u32, e_end - 1);
        slot[i] = min_u32(*sl.add(e as usize), p.n_slots - 1);
        pos[i] = *ps.add(e as usize);
        i += 1;
    }
    let mut i = 0;
    while i < EPT {
        if e_first + i < e_end {
            let blk = (p.pool as *const u8).add(slot[i as usize] as usize * GROUP_BYTES);
            let mut h = 0;
            while h < 2 {
                let rr = r + 8 * h;
                let n = if pos[i as usize] + rr <= pmax { 16 } else { 0 };
                let src = blk.add(rr as usize * 256 + c as usize * 16);
                let d = dst + swz(i * 16 + rr, c);
                cp_async_16_zfill(d, src, n);
                cp_async_16_zfill(d + TILE, src.add(GROUP_BYTES / 2), n);
                h += 1;
            }
        }
        i += 1;
    }
}
