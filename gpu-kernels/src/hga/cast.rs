//! `hga_cast_bf16_f32`: `dst[i] = f32(src[i])` (exact), the f32 copy of a bf16 query that the routing kernels
//! read, made on the device so that an embedded layer's step needs no host round trip (`host/src/hga/gpu_layer.rs`).
//!
//! Shapes: `src: bf16 [n]`, `dst: f32 [n]`. Grid `ceil(n / 256)` blocks of 256 threads, one element per thread.
//! No shared memory.
use crate::arch::*;
use crate::params::HgaCastParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_cast_bf16_f32(p: HgaCastParams) {
    entry_prologue();
    let i = (block_x() * block_dim_x() + thread_x()) as usize;
    if i >= p.n as usize {
        return;
    }
    let b = *(p.src as *const u16).add(i);
    *(p.dst as *mut f32).add(i) = bf16_to_f32(b);
}
