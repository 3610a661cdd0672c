//! `hga_sample`: temperature / top-p sampling per row with the integer-exact rule of [`crate::sample`] (the CPU
//! reference applies the same rule and gets the same token for the same uniform). See [`SampleParams`].
//!
//! Grid: one block per row, 1024 threads. Passes over the row (strided, coalesced): (1) the max logit key;
//! (2-5) a radix select of the top-p threshold key K*, 8 bits per pass from the top: each pass adds the integer
//! weights of the tokens still matching the prefix into a 256-bin u64 histogram in shared memory (shared-memory
//! atomics; integer sums, so the order does not matter), and thread 0 walks the bins from the top to the bin where
//! the mass reaches `need` (pass 2 also yields the total mass, hence `need`); (6) each thread sums the kept weights
//! of its contiguous chunk of the row, thread 0 scans the 1024 chunk sums, and the thread whose chunk holds the
//! target walks it to the token. Weights are recomputed from the logits in every pass (no scratch memory).
//! Shared memory: hist 256 u64 + chunk sums 1024 u64 + 8 u64 = 10 KiB + 64 B.
//! Cost: ~6 reads of the row (from L2 after the first) and ~40 integer ops per element per pass; about tens of
//! microseconds per 151936-token row. Rows are independent (M rows = M blocks).
use super::argmax::block_max_u64;
use crate::arch::*;
use crate::params::SampleParams;
use crate::sample::{key_logit, logit_key, sample_target, top_p_need, uniform_u32, weight};

const HIST: usize = 0;
const SUMS: usize = 256;
const MISC: usize = 256 + 1024;
/// Bytes of dynamic shared memory the kernel needs.
pub const SMEM_BYTES: usize = (MISC + 8) * 8;

#[inline(always)]
unsafe fn red_add_u64(smem_addr: u32, v: u64) {
    core::arch::asm!("red.shared.add.u64 [{0}], {1};", in(reg32) smem_addr, in(reg64) v, options(nostack));
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_sample(p: SampleParams) {
    entry_prologue();
    let row = block_x() as usize;
    if row >= p.rows as usize {
        return;
    }
    let v = p.vocab as usize;
    let x = (p.logits as *const f32).add(row * v);
    let tid = thread_x() as usize;
    let nt = block_dim_x() as usize;
    let sm = dyn_smem_ptr::<u64>();
    let sm_addr = dyn_smem_addr();
    let out = (p.out as *mut u32).add(row);

    // (1) max key.
    let mut mk = 0u32;
    let mut i = tid;
    while i < v {
        let k = logit_key(*x.add(i));
        mk = if k > mk { k } else { mk };
        i += nt;
    }
    let mk = block_max_u64(mk as u64, sm.add(SUMS)) as u32;
    if mk == 0 {
        if tid == 0 {
            *out = u32::MAX;
        }
        return;
    }
    let mx = key_logit(mk);
    let coef = p.coef;

    // (2-5) radix select of K*.
    let mut i = tid;
    while i < 256 {
        *sm.add(HIST + i) = 0;
        i += nt;
    }
    sync_threads();
    let mut prefix = 0u32;
    let mut need = 0u64;
    let mut above = 0u64;
    let mut kept = 0u64;
    for pass in 0..4u32 {
        let shift = 24 - 8 * pass;
        let mut i = tid;
        while i < v {
            let l = *x.add(i);
            let k = logit_key(l);
            if pass == 0 || (k >> (shift + 8)) == (prefix >> (shift + 8)) {
                let w = weight(l, mx, coef);
                if w != 0 {
                    red_add_u64(sm_addr + (8 * (HIST + ((k >> shift) & 255) as usize)) as u32, w);
                }
            }
            i += nt;
        }
        sync_threads();
        if tid == 0 {
            if pass == 0 {
                let mut total = 0u64;
                for b in 0..256 {
                    total += *sm.add(HIST + b);
                }
                need = top_p_need(total, p.top_p);
            }
            let mut cum = above;
            let mut b = 255usize;
            loop {
                let h = *sm.add(HIST + b);
                if cum + h >= need || b == 0 {
                    kept = cum + h;
                    break;
                }
                cum += h;
                b -= 1;
            }
            above = cum;
            prefix |= (b as u32) << shift;
            *sm.add(MISC + 1) = prefix as u64;
        }
        sync_threads();
        prefix = *sm.add(MISC + 1) as u32;
        let mut i = tid;
        while i < 256 {
            *sm.add(HIST + i) = 0;
            i += nt;
        }
        sync_threads();
    }
    if tid == 0 {
        *sm.add(MISC + 2) = kept;
    }
    sync_threads();
    let kept = *sm.add(MISC + 2);
    let kstar = prefix;

    // (6) the token: chunk sums, scan, walk.
    let u = uniform_u32(p.seed, p.step.wrapping_add(row as u64));
    let target = sample_target(kept, u);
    let cs = v.div_ceil(nt);
    let lo = (tid * cs).min(v);
    let hi = (lo + cs).min(v);
    let mut s = 0u64;
    for i in lo..hi {
        let l = *x.add(i);
        if logit_key(l) >= kstar {
            s += weight(l, mx, coef);
        }
    }
    *sm.add(SUMS + tid) = s;
    sync_threads();
    if tid == 0 {
        let mut c = 0u64;
        for t in 0..nt {
            let v = *sm.add(SUMS + t);
            *sm.add(SUMS + t) = c;
            c += v;
        }
    }
    sync_threads();
    let excl = *sm.add(SUMS + tid);
    if excl <= target && target < excl + s {
        let mut c = excl;
        for i in lo..hi {
            let l = *x.add(i);
            if logit_key(l) >= kstar {
                c += weight(l, mx, coef);
                if c > target {
                    *out = i as u32;
                    break;
                }
            }
        }
    }
}
