//! Self-tests of the tensor-core path: ldmatrix, mma.sync (bf16 and e4m3) and cp.async. One warp (or block) each.
use crate::arch::*;
use crate::params::SelfTestParams;

/// ldmatrix, all six forms. One warp. input: bf16 [32, 8] (four 8x8 matrices, rows of 16 bytes); output: u32
/// [32 lanes][14]: x1, x2 (2), x4 (4), x1.trans, x2.trans (2), x4.trans (4) as each lane received them.
/// Dynamic shared memory: 512 bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_ldmatrix(p: SelfTestParams) {
    entry_prologue();
    let lane = lane_id() as usize;
    let s = dyn_smem_ptr::<u32>();
    let inp = p.input as *const u32;
    for k in 0..4 {
        *s.add(lane * 4 + k) = *inp.add(lane * 4 + k);
    }
    sync_threads();
    // Lane l supplies row (l % 8) of matrix (l / 8): row l of the [32, 8] array.
    let addr = dyn_smem_addr() + 16 * lane as u32;
    let o = (p.output as *mut u32).add(14 * lane);
    let mut w = [0u32; 14];
    w[0] = ldmatrix_x1(addr)[0];
    w[1..3].copy_from_slice(&ldmatrix_x2(addr));
    w[3..7].copy_from_slice(&ldmatrix_x4(addr));
    w[7] = ldmatrix_x1_trans(addr)[0];
    w[8..10].copy_from_slice(&ldmatrix_x2_trans(addr));
    w[10..14].copy_from_slice(&ldmatrix_x4_trans(addr));
    for (k, v) in w.iter().enumerate() {
        *o.add(k) = *v;
    }
}

/// mma.sync m16n8k16 bf16. One warp, `n` = number of products (one per block, grid.x = n). Per product, input:
/// A bf16 [16, 16] row-major, B^T bf16 [8, 16] (n-major), C f32 [16, 8] (1280 bytes, packed in that order);
/// output f32 [16, 8] = A B + C. Fragments loaded straight from global in the PTX ISA layout.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_mma_bf16(p: SelfTestParams) {
    entry_prologue();
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let base = (p.input as *const u8).add(block_x() as usize * 1280);
    let a = base as *const u32; // [16 rows][8 words]
    let bt = base.add(512) as *const u32; // [8 cols][8 words]
    let c = base.add(768) as *const f32;
    let af = [*a.add(g * 8 + t), *a.add((g + 8) * 8 + t), *a.add(g * 8 + 4 + t), *a.add((g + 8) * 8 + 4 + t)];
    let bf = [*bt.add(g * 8 + t), *bt.add(g * 8 + 4 + t)];
    let cf = [
        *c.add(g * 8 + 2 * t),
        *c.add(g * 8 + 2 * t + 1),
        *c.add((g + 8) * 8 + 2 * t),
        *c.add((g + 8) * 8 + 2 * t + 1),
    ];
    let d = mma_bf16_m16n8k16(af, bf, cf);
    let o = (p.output as *mut f32).add(block_x() as usize * 128);
    *o.add(g * 8 + 2 * t) = d[0];
    *o.add(g * 8 + 2 * t + 1) = d[1];
    *o.add((g + 8) * 8 + 2 * t) = d[2];
    *o.add((g + 8) * 8 + 2 * t + 1) = d[3];
}

/// mma.sync m16n8k32 e4m3. One warp per product (grid.x = n). Per product, input: A e4m3 [16, 32] row-major,
/// B^T e4m3 [8, 32] (n-major), C f32 [16, 8] (1280 bytes); output f32 [16, 8] = A B + C.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_mma_e4m3(p: SelfTestParams) {
    entry_prologue();
    let lane = lane_id() as usize;
    let (g, t) = (lane / 4, lane % 4);
    let base = (p.input as *const u8).add(block_x() as usize * 1280);
    let a = base as *const u32; // [16 rows][8 words of 4 bytes]
    let bt = base.add(512) as *const u32; // [8 cols][8 words]
    let c = base.add(768) as *const f32;
    let af = [*a.add(g * 8 + t), *a.add((g + 8) * 8 + t), *a.add(g * 8 + 4 + t), *a.add((g + 8) * 8 + 4 + t)];
    let bf = [*bt.add(g * 8 + t), *bt.add(g * 8 + 4 + t)];
    let cf = [
        *c.add(g * 8 + 2 * t),
        *c.add(g * 8 + 2 * t + 1),
        *c.add((g + 8) * 8 + 2 * t),
        *c.add((g + 8) * 8 + 2 * t + 1),
    ];
    let d = mma_e4m3_m16n8k32(af, bf, cf);
    let o = (p.output as *mut f32).add(block_x() as usize * 128);
    *o.add(g * 8 + 2 * t) = d[0];
    *o.add(g * 8 + 2 * t + 1) = d[1];
    *o.add((g + 8) * 8 + 2 * t) = d[2];
    *o.add((g + 8) * 8 + 2 * t + 1) = d[3];
}

/// cp.async. One block of 64 threads; `n` = number of 16-byte chunks (n <= 128). Input: bytes [16n]; output:
/// bytes [16n] = the input, copied global -> shared in two commit groups (chunks < n/2, then the rest) and back.
/// The first half is read after `wait_group 1` (only the second group may still be in flight), the second after
/// `wait_group 0`. Dynamic shared memory: 16n bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn hga_selftest_cp_async(p: SelfTestParams) {
    entry_prologue();
    let n = p.n as usize;
    let half = n / 2;
    let tid = thread_x() as usize;
    let inp = p.input as *const u8;
    let out = p.output as *mut u32;
    let sa = dyn_smem_addr();
    let s = dyn_smem_ptr::<u32>();
    let mut c = tid;
    while c < half {
        cp_async_16(sa + 16 * c as u32, inp.add(16 * c));
        c += 64;
    }
    cp_async_commit();
    let mut c = half + tid;
    while c < n {
        cp_async_16(sa + 16 * c as u32, inp.add(16 * c));
        c += 64;
    }
    cp_async_commit();
    cp_async_wait::<1>();
    sync_threads();
    let mut w = tid;
    while w < 4 * half {
        *out.add(w) = *s.add(w);
        w += 64;
    }
    cp_async_wait::<0>();
    sync_threads();
    let mut w = 4 * half + tid;
    while w < 4 * n {
        *out.add(w) = *s.add(w);
        w += 64;
    }
}
