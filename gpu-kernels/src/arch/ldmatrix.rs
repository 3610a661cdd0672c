//! `ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16`: loads 1, 2 or 4 8x8 matrices of 16-bit elements from
//! shared memory into the mma fragment layout. Lane i supplies the 32-bit shared address of row (i % 8) of matrix
//! (i / 8) (lanes beyond the matrix count are ignored but must hold a valid address for x1/x2 only in lanes 0-7 /
//! 0-15). Each lane receives, per matrix, the two elements (row lane/4, cols 2*(lane%4), +1) packed in a u32;
//! with `.trans` the matrix is transposed on the way.
//!
//! # Safety (all functions)
//! The addresses must be 16-byte aligned rows inside the launch's shared memory, and all 32 lanes must call.

macro_rules! ldmatrix_fn {
    ($name:ident, $n:literal, $op:literal, [$($o:ident),+]) => {
        /// See the module docs.
        ///
        /// # Safety
        /// See the module docs.
        #[inline(always)]
        pub unsafe fn $name(addr: u32) -> [u32; $n] {
            let mut r = [0u32; $n];
            let [$($o),+] = &mut r;
            core::arch::asm!($op, $(out(reg32) *$o,)+ in(reg32) addr, options(nostack, readonly));
            r
        }
    };
}
ldmatrix_fn!(ldmatrix_x1, 1, "ldmatrix.sync.aligned.m8n8.x1.shared.b16 {{{0}}}, [{1}];", [r0]);
ldmatrix_fn!(ldmatrix_x2, 2, "ldmatrix.sync.aligned.m8n8.x2.shared.b16 {{{0}, {1}}}, [{2}];", [r0, r1]);
ldmatrix_fn!(
    ldmatrix_x4,
    4,
    "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{0}, {1}, {2}, {3}}}, [{4}];",
    [r0, r1, r2, r3]
);
ldmatrix_fn!(ldmatrix_x1_trans, 1, "ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {{{0}}}, [{1}];", [r0]);
ldmatrix_fn!(ldmatrix_x2_trans, 2, "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {{{0}, {1}}}, [{2}];", [r0, r1]);
ldmatrix_fn!(
    ldmatrix_x4_trans,
    4,
    "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{{0}, {1}, {2}, {3}}}, [{4}];",
    [r0, r1, r2, r3]
);
