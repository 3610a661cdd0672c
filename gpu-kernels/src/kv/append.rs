//! `hga_kv_append`: the new token's K and V (position `p`, read from `pos`) into the layer's slot pool and the
//! mapped host arena.
//!
//! Shapes: `k_new`, `v_new: bf16 [n_kv][128]` (the model's qk-norm + RoPE output and V projection); the slot pool
//! and the arena as in `params/kv.rs`. Row `p % 16` of group `g = p / 16` is written to the window-ring slot
//! `h * slots_per_head + 4 + g % 20`, to the sink slot `h * slots_per_head + g` while `p < 64`, and (with
//! `write_arena`) to the arena's group block of (`layer`, `h`, `g`) through its mapped device address (posted PCIe
//! writes; no copy engine, no host work).
//! Grid: `n_kv` blocks, one warp each: lanes 0..15 move the K row (16 bytes each), lanes 16..31 the V row.
//! No shared memory.
use super::arena_block;
use crate::arch::*;
use crate::params::{KvCacheParams, HGA_HEAD_DIM, KV_GROUP_BYTES, KV_GROUP_K_BYTES, KV_SINK_SLOTS};

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_kv_append(p: KvCacheParams) {
    entry_prologue();
    let h = block_x();
    let lane = thread_x();
    if h >= p.n_kv || lane >= 32 {
        return;
    }
    let pos = *(p.pos as *const u32);
    let g = pos / 16;
    let row = (pos % 16) as usize;
    let half = (lane / 16) as usize; // 0: K, 1: V
    let col = (lane % 16) as usize * 16;
    let src = if half == 0 { p.k_new } else { p.v_new } as *const u8;
    let v = ld_global_v4(src.add(h as usize * HGA_HEAD_DIM * 2 + col));
    // Byte offset of this lane's 16 bytes inside a group block.
    let inner = half * KV_GROUP_K_BYTES + row * HGA_HEAD_DIM * 2 + col;
    let head0 = h as usize * p.slots_per_head as usize;
    let ring = head0 + KV_SINK_SLOTS + (g as usize % crate::params::KV_WINDOW_SLOTS);
    let slots = p.slots as *mut u8;
    st_global_v4(slots.add(ring * KV_GROUP_BYTES + inner), v);
    if (g as usize) < KV_SINK_SLOTS {
        st_global_v4(slots.add((head0 + g as usize) * KV_GROUP_BYTES + inner), v);
    }
    if p.write_arena != 0 {
        let blk = arena_block(&p, h, g);
        if blk != 0 {
            st_global_v4((blk as *mut u8).add(inner), v);
        }
    }
}
