//! Warp-level tensor-core products (`mma.sync.aligned`), f32 accumulators. All 32 lanes take part; fragment
//! layouts are the PTX ISA's (section "Matrix Fragments for mma.m16n8k16 / m16n8k32"), with g = lane / 4,
//! t = lane % 4:
//! - A (16 x K, row-major): a[0] = (row g, k 0..), a[1] = (row g+8, k 0..), a[2] = (row g, k K/2..),
//!   a[3] = (row g+8, k K/2..); each register holds consecutive k at column offset t * (elements per register).
//! - B (K x 8, "col": stored n-major): b[0] = (k t*epr.., col g), b[1] = (k K/2 + t*epr.., col g).
//! - C/D (16 x 8): c[0], c[1] = row g, cols 2t, 2t+1; c[2], c[3] = row g+8, cols 2t, 2t+1.
//!
//! On sm_89 / sm_120 the e4m3 form is native (QMMA); on sm_90 ptxas lowers it to f16 HMMA (see TOOLCHAIN.md).

/// D = A * B + C, m16n8k16, bf16 inputs (2 per register).
#[inline(always)]
pub fn mma_bf16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let mut d = [0f32; 4];
    unsafe {
        core::arch::asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{10}, {11}, {12}, {13}}};",
            out(reg32) d[0], out(reg32) d[1], out(reg32) d[2], out(reg32) d[3],
            in(reg32) a[0], in(reg32) a[1], in(reg32) a[2], in(reg32) a[3],
            in(reg32) b[0], in(reg32) b[1],
            in(reg32) c[0], in(reg32) c[1], in(reg32) c[2], in(reg32) c[3],
            options(pure, nomem, nostack));
    }
    d
}

/// D = A * B + C, m16n8k16, f16 inputs (2 per register).
#[inline(always)]
pub fn mma_f16_m16n8k16(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let mut d = [0f32; 4];
    unsafe {
        core::arch::asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{10}, {11}, {12}, {13}}};",
            out(reg32) d[0], out(reg32) d[1], out(reg32) d[2], out(reg32) d[3],
            in(reg32) a[0], in(reg32) a[1], in(reg32) a[2], in(reg32) a[3],
            in(reg32) b[0], in(reg32) b[1],
            in(reg32) c[0], in(reg32) c[1], in(reg32) c[2], in(reg32) c[3],
            options(pure, nomem, nostack));
    }
    d
}

/// D = A * B + C, m16n8k32, e4m3 inputs (4 per register).
#[inline(always)]
pub fn mma_e4m3_m16n8k32(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let mut d = [0f32; 4];
    unsafe {
        core::arch::asm!(
            "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {{{0}, {1}, {2}, {3}}}, {{{4}, {5}, {6}, {7}}}, {{{8}, {9}}}, {{{10}, {11}, {12}, {13}}};",
            out(reg32) d[0], out(reg32) d[1], out(reg32) d[2], out(reg32) d[3],
            in(reg32) a[0], in(reg32) a[1], in(reg32) a[2], in(reg32) a[3],
            in(reg32) b[0], in(reg32) b[1],
            in(reg32) c[0], in(reg32) c[1], in(reg32) c[2], in(reg32) c[3],
            options(pure, nomem, nostack));
    }
    d
}
