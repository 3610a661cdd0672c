//! `hga_moe_combine`: the routing-weighted sum of the per-(token, slot) expert outputs of the grouped path:
//! `out[t, n] = bf16(sum over slots s = 0, 1, .. in order of weights[t, s] * ys[t * top_k + s, n])`, in f32.
//!
//! Grid: ceil(tokens * hidden / 256) blocks of 256 threads, one output element per thread (coalesced along n).
//! No shared memory. Deterministic: a fixed order, no atomics.
use crate::arch::*;
use crate::params::MoeExpertParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_moe_combine(p: MoeExpertParams) {
    entry_prologue();
    let (h, k) = (p.hidden as usize, p.top_k as usize);
    let i = (block_x() * block_dim_x() + thread_x()) as usize;
    if i >= p.tokens as usize * h {
        return;
    }
    let (t, n) = (i / h, i % h);
    let w = (p.weights as *const f32).add(t * k);
    let ys = (p.ys as *const f32).add(t * k * h + n);
    let mut acc = 0f32;
    for s in 0..k {
        acc += *w.add(s) * *ys.add(s * h);
    }
    *(p.out as *mut u16).add(i) = f32_to_bf16(acc);
}
