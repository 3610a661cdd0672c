//! `hga_kv_advance`: `p += 1` (the device-resident position), the last node of a recorded decode step, so that the
//! replayed graph serves the next position.
//!
//! Shapes: `pos: u32 [1]`. Grid 1, block 1 (more threads are harmless: only thread 0 of block 0 writes). No shared
//! memory.
use crate::arch::*;
use crate::params::KvCacheParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_kv_advance(p: KvCacheParams) {
    entry_prologue();
    if thread_x() == 0 && block_x() == 0 {
        let pos = p.pos as *mut u32;
        *pos += 1;
    }
}
