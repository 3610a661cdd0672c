//! Self-tests of shared memory, the barrier, warp shuffles, fast math and conversions.
use crate::arch::*;
use crate::params::SelfTestParams;

/// Shared memory + barrier. One block of `n` threads (n <= 1024), input f32 [n], output f32 [2n]:
/// out[i] = in[n-1-i] (written through the generic pointer, read through the 32-bit address after a barrier),
/// out[n+i] = 3 * in[(i+1) % n] (written through the 32-bit address, read through the generic pointer).
/// Dynamic shared memory: 8n bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_smem(p: SelfTestParams) {
    entry_prologue();
    let n = p.n as usize;
    let i = thread_x() as usize;
    let inp = p.input as *const f32;
    let out = p.output as *mut f32;
    let s = dyn_smem_ptr::<f32>();
    let base = dyn_smem_addr();
    if i < n {
        *s.add(i) = *inp.add(i);
        st_shared_f32(base + 4 * (n + i) as u32, 3.0 * *inp.add((i + 1) % n));
    }
    sync_threads();
    if i < n {
        *out.add(i) = ld_shared_f32(base + 4 * (n - 1 - i) as u32);
        *out.add(n + i) = *s.add(n + i);
    }
}

/// Warp shuffles and reductions. n threads (a multiple of 32), input f32 [n], output f32 [5n]: per thread i,
/// out[5i..5i+5] = warp_sum, warp_max, shfl_xor(v, 5), shfl_down(v, 3), bits of shfl_idx(bits(v), 7).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_warp(p: SelfTestParams) {
    entry_prologue();
    let i = (block_x() * block_dim_x() + thread_x()) as usize;
    if i >= p.n as usize {
        return;
    }
    let v = *(p.input as *const f32).add(i);
    let o = (p.output as *mut f32).add(5 * i);
    *o = warp_sum(v);
    *o.add(1) = warp_max(v);
    *o.add(2) = shfl_xor_f32(v, 5);
    *o.add(3) = shfl_down_f32(v, 3);
    *o.add(4) = f32::from_bits(shfl_idx_u32(v.to_bits(), 7));
}

/// Fast math. input f32 [n], output f32 [4n]: ex2(x), lg2(|x|), rcp(x), rsqrt(|x|).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_math(p: SelfTestParams) {
    entry_prologue();
    let i = (block_x() * block_dim_x() + thread_x()) as usize;
    if i >= p.n as usize {
        return;
    }
    let x = *(p.input as *const f32).add(i);
    let o = (p.output as *mut f32).add(4 * i);
    *o = ex2(x);
    *o.add(1) = lg2(fabs(x));
    *o.add(2) = rcp(x);
    *o.add(3) = rsqrt(fabs(x));
}

/// Conversions. input f32 [n], output u32 [4n]: per x,
/// [bf16(x), e4m3x2(lo = x, hi = -x/3), bits(f32(e4m3 code (i & 0xff) as lo, code (i*7+3)&0xff as hi) lo), bf16x2(lo = x, hi = 2x)],
/// and word 2's partner: the hi decode goes to the f32 bits in the upper... see host: word 2 = lo decode bits,
/// and the hi decode is checked by a second launch with swapped codes (the host does that).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_convert(p: SelfTestParams) {
    entry_prologue();
    let i = (block_x() * block_dim_x() + thread_x()) as usize;
    if i >= p.n as usize {
        return;
    }
    let x = *(p.input as *const f32).add(i);
    let o = (p.output as *mut u32).add(5 * i);
    *o = f32_to_bf16(x) as u32;
    *o.add(1) = f32x2_to_e4m3x2(x, -x / 3.0) as u32;
    let codes = ((i & 0xff) | ((((i * 7 + 3) & 0xff) as usize) << 8)) as u16;
    let (lo, hi) = e4m3x2_to_f32x2(codes);
    *o.add(2) = lo.to_bits();
    *o.add(3) = hi.to_bits();
    *o.add(4) = f32x2_to_bf16x2(x, 2.0 * x);
}
