//! `hga_embed_gather`: `out[i, :] = table[ids[i], :]` (bf16 rows). See [`EmbedParams`].
//!
//! Shapes: table bf16 [vocab, hidden], ids u32 [rows], out bf16 [rows, hidden]. Grid: one block per row, 256
//! threads. With hidden % 8 == 0 (and 16-byte aligned buffers, the launcher checks) each thread copies 16 bytes per
//! step, else 2. An id >= vocab (the launcher rejects these on the host) writes a zero row instead of reading out
//! of bounds. Memory-bound: reads and writes rows * hidden * 2 bytes. No shared memory.
use crate::arch::*;
use crate::gemm::ld_stream_v4;
use crate::params::EmbedParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_embed_gather(p: EmbedParams) {
    entry_prologue();
    let row = block_x() as usize;
    if row >= p.rows as usize {
        return;
    }
    let h = p.hidden as usize;
    let id = *(p.ids as *const u32).add(row);
    let valid = id < p.vocab;
    let src = (p.table as *const u16).add(if valid { id as usize * h } else { 0 });
    let dst = (p.out as *mut u16).add(row * h);
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;
    if h % 8 == 0 {
        let (s, d) = (src as *const u8, dst as *mut u8);
        let mut i = tid;
        while i < h / 8 {
            let v = if valid { ld_stream_v4(s.add(16 * i)) } else { [0; 4] };
            core::arch::asm!("st.global.v4.u32 [{0}], {{{1}, {2}, {3}, {4}}};", in(reg64) d.add(16 * i),
                in(reg32) v[0], in(reg32) v[1], in(reg32) v[2], in(reg32) v[3], options(nostack));
            i += nt;
        }
    } else {
        let mut i = tid;
        while i < h {
            *dst.add(i) = if valid { *src.add(i) } else { 0 };
            i += nt;
        }
    }
}
