//! `hga_bench_mma_bf16_peak`: the bf16 `mma.sync m16n8k16` ceiling of this card (the portable path's peak), for the
//! benchmarks. See [`MmaPeakParams`].
//!
//! Grid and block: any (the bench uses 256 threads and several blocks per SM). Each warp runs `iters` iterations
//! of 8 independent products (8 accumulator chains keep the tensor pipe full). The A operand changes every
//! iteration (its low mantissa bits are XORed with the iteration counter, staying finite), so ptxas cannot hoist
//! the products out of the loop (TOOLCHAIN.md: with loop-invariant operands it did). Every thread writes the sum
//! of its accumulators, so nothing is dead. Flops: 2 * 16 * 8 * 16 * 8 * iters per warp. No shared memory.
use crate::arch::*;
use crate::params::MmaPeakParams;

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_bench_mma_bf16_peak(p: MmaPeakParams) {
    entry_prologue();
    let tid = thread_x() + block_x() * block_dim_x();
    // bf16 values near 1 (0x3F80) with per-thread mantissa bits.
    let base = 0x3F80_3F80u32 | ((tid ^ p.seed) & 0x003F_003F);
    let b = [base ^ 0x0001_0002, base ^ 0x0004_0008];
    let mut c = [[0f32; 4]; 8];
    let mut i = 0u32;
    while i < p.iters {
        let x = (i & 0x3F) * 0x0001_0001;
        let a = [base ^ x, base ^ (x << 1) & 0x007F_007F, base, base ^ 0x0010_0010];
        for (j, cj) in c.iter_mut().enumerate() {
            let bj = [b[0] ^ (j as u32), b[1]];
            *cj = mma_bf16_m16n8k16(a, bj, *cj);
        }
        i += 1;
    }
    let mut s = 0f32;
    for cj in &c {
        s += cj[0] + cj[1] + cj[2] + cj[3];
    }
    *(p.out as *mut f32).add(tid as usize) = s;
}
