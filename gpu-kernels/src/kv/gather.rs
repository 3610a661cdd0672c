//! `hga_kv_gather`: this step's misses (the work list of `hga_kv_lookup`) from the mapped host arena into their
//! slots: zero-copy reads over PCIe, one 8 KB group block per warp.
//!
//! Shapes: `miss_group`, `miss_slot: u32 [n_kv][max_groups]`, `n_miss: u32 [n_kv]`; arena and slot pool as in
//! `params/kv.rs`. Grid: (`ceil(max_groups / 8)`, `n_kv`), block 256 threads = [`KV_GATHER_WARPS`] warps; warp `w`
//! of block `b` copies miss `8 b + w` of KV head `blockIdx.y` when it exists (fixed grid: the count is read on the
//! device). Each lane issues its 16 loads of 16 bytes (the warp's 8 KB, 512 contiguous bytes per instruction)
//! before any store, so every warp keeps a whole group in flight: a layer's misses are all requested at once,
//! which is what hides the PCIe latency (measured: docs/perf-kv.md). No shared memory.
use super::arena_block;
use crate::arch::*;
use crate::params::{KvCacheParams, KV_GATHER_WARPS, KV_GROUP_BYTES};

/// 16-byte loads per lane: 8192 / (32 * 16).
const LOADS: usize = KV_GROUP_BYTES / 512;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_kv_gather(p: KvCacheParams) {
    entry_prologue();
    let h = block_y();
    let warp = thread_x() / 32;
    let lane = (thread_x() % 32) as usize;
    let i = block_x() * KV_GATHER_WARPS as u32 + warp;
    if h >= p.n_kv || i >= p.max_groups {
        return;
    }
    let nm = *(p.n_miss as *const u32).add(h as usize);
    if i >= nm {
        return;
    }
    let at = h as usize * p.max_groups as usize + i as usize;
    let g = *(p.miss_group as *const u32).add(at);
    let slot = *(p.miss_slot as *const u32).add(at);
    let src = arena_block(&p, h, g) as *const u8;
    if src.is_null() {
        return;
    }
    let dst = (p.slots as *mut u8).add(slot as usize * KV_GROUP_BYTES);
    let mut v = [[0u32; 4]; LOADS];
    let mut j = 0;
    while j < LOADS {
        v[j] = ld_global_v4(src.add(j * 512 + lane * 16));
        j += 1;
    }
    j = 0;
    while j < LOADS {
        st_global_v4(dst.add(j * 512 + lane * 16), v[j]);
        j += 1;
    }
}
