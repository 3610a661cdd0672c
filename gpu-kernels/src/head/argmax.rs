//! `hga_argmax`: index of the largest f32 logit per row; ties go to the lowest index; NaN never wins (an all-NaN
//! row gives u32::MAX). See [`ArgmaxParams`].
//!
//! Grid: one block per row, 1024 threads. Each thread packs (order-preserving key of the logit, !index) into a u64
//! whose maximum is the answer, scans its strided elements (16-byte loads when vocab % 4 == 0), then a warp
//! butterfly and a shared-memory pass over the 32 warps. Shared memory: 32 u64 (256 bytes). Memory-bound: one
//! read of the row (608 KB at vocab 151936), latency-bound for a single row.
use crate::arch::*;
use crate::params::ArgmaxParams;
use crate::sample::logit_key;

#[inline(always)]
fn pack(x: f32, i: usize) -> u64 {
    let k = logit_key(x);
    if k == 0 {
        0
    } else {
        ((k as u64) << 32) | (!(i as u32)) as u64
    }
}

#[inline(always)]
pub(crate) fn shfl_xor_u64(v: u64, m: u32) -> u64 {
    let lo = shfl_xor_f32(f32::from_bits(v as u32), m).to_bits() as u64;
    let hi = shfl_xor_f32(f32::from_bits((v >> 32) as u32), m).to_bits() as u64;
    (hi << 32) | lo
}

/// Max of a u64 over the block (all threads get it). Uses `smem[0..32]` (u64) of the dynamic shared memory.
#[inline(always)]
pub(crate) unsafe fn block_max_u64(mut v: u64, smem: *mut u64) -> u64 {
    let mut m = 16;
    while m > 0 {
        let o = shfl_xor_u64(v, m);
        v = if o > v { o } else { v };
        m >>= 1;
    }
    let warp = (thread_x() / 32) as usize;
    if lane_id() == 0 {
        *smem.add(warp) = v;
    }
    sync_threads();
    let nw = (block_dim_x() as usize).div_ceil(32);
    let mut r = 0u64;
    for i in 0..nw {
        let o = *smem.add(i);
        r = if o > r { o } else { r };
    }
    sync_threads();
    r
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_argmax(p: ArgmaxParams) {
    entry_prologue();
    let row = block_x() as usize;
    if row >= p.rows as usize {
        return;
    }
    let v = p.vocab as usize;
    let x = (p.logits as *const f32).add(row * v);
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;
    let mut best = 0u64;
    if v % 4 == 0 {
        let x4 = x as *const [f32; 4];
        let mut i = tid;
        while i < v / 4 {
            let q = *x4.add(i);
            for (e, val) in q.iter().enumerate() {
                let c = pack(*val, 4 * i + e);
                best = if c > best { c } else { best };
            }
            i += nt;
        }
    } else {
        let mut i = tid;
        while i < v {
            let c = pack(*x.add(i), i);
            best = if c > best { c } else { best };
            i += nt;
        }
    }
    let r = block_max_u64(best, dyn_smem_ptr::<u64>());
    if tid == 0 {
        *(p.out as *mut u32).add(row) = if r == 0 { u32::MAX } else { !(r as u32) };
    }
}
