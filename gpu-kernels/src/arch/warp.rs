//! Warp shuffles (`shfl.sync`, full mask) and butterfly reductions. All 32 lanes must take part.

/// `shfl.sync.bfly`: the value of lane `lane ^ mask`.
#[inline(always)]
pub fn shfl_xor_f32(v: f32, mask: u32) -> f32 {
    let r: f32;
    unsafe {
        core::arch::asm!("shfl.sync.bfly.b32 {0}, {1}, {2}, 0x1f, 0xffffffff;",
            out(reg32) r, in(reg32) v, in(reg32) mask, options(nomem, nostack))
    };
    r
}

/// `shfl.sync.down`: the value of lane `lane + delta` (own value past lane 31).
#[inline(always)]
pub fn shfl_down_f32(v: f32, delta: u32) -> f32 {
    let r: f32;
    unsafe {
        core::arch::asm!("shfl.sync.down.b32 {0}, {1}, {2}, 0x1f, 0xffffffff;",
            out(reg32) r, in(reg32) v, in(reg32) delta, options(nomem, nostack))
    };
    r
}

/// `shfl.sync.idx`: the value of lane `src`.
#[inline(always)]
pub fn shfl_idx_u32(v: u32, src: u32) -> u32 {
    let r: u32;
    unsafe {
        core::arch::asm!("shfl.sync.idx.b32 {0}, {1}, {2}, 0x1f, 0xffffffff;",
            out(reg32) r, in(reg32) v, in(reg32) src, options(nomem, nostack))
    };
    r
}

/// Sum over the warp; every lane gets the result (butterfly: 5 shuffles).
#[inline(always)]
pub fn warp_sum(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v += shfl_xor_f32(v, m);
        m >>= 1;
    }
    v
}

/// Max over the warp; every lane gets the result.
#[inline(always)]
pub fn warp_max(mut v: f32) -> f32 {
    let mut m = 16;
    while m > 0 {
        v = crate::arch::math::fmax(v, shfl_xor_f32(v, m));
        m >>= 1;
    }
    v
}

/// Sum over the block (up to 32 warps) through the first 32 f32 of the dynamic shared memory; every thread gets
/// the result. All threads of the block must call it; the caller must not use that shared memory concurrently.
#[inline(always)]
pub unsafe fn block_sum(v: f32) -> f32 {
    let s = crate::arch::smem::dyn_smem_ptr::<f32>();
    let warp = (crate::arch::thread_x() / 32) as usize;
    let nwarps = (crate::arch::block_dim_x() as usize).div_ceil(32);
    let v = warp_sum(v);
    if crate::arch::lane_id() == 0 {
        *s.add(warp) = v;
    }
    crate::arch::sync::sync_threads();
    let mut t = 0f32;
    for k in 0..nwarps {
        t += *s.add(k);
    }
    t
}
