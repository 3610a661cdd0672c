//! Building blocks over `asm!` and `core::arch::nvptx`: each a small documented wrapper, each exercised by a
//! self-test kernel (`kernels::selftest`) that the host checks against a CPU expectation.
//!
//! Everything here targets PTX ISA >= 8.5 on sm_89 / sm_90 (8.7 on sm_120) and uses only instructions that exist on
//! all three (no wgmma, no TMA): the portable path. The one exception is `pdl` (`griddepcontrol`, sm_90+), which
//! compiles to nothing in the sm_89 build.
pub mod convert;
pub mod cp_async;
pub mod ldmatrix;
pub mod math;
pub mod mem;
pub mod mma;
pub mod pdl;
pub mod smem;
pub mod sync;
pub mod warp;

pub use convert::*;
pub use cp_async::*;
pub use ldmatrix::*;
pub use math::*;
pub use mem::*;
pub use mma::*;
pub use pdl::*;
pub use smem::*;
pub use sync::*;
pub use warp::*;

use core::arch::nvptx;

/// `threadIdx.x`.
#[inline(always)]
pub fn thread_x() -> u32 {
    unsafe { nvptx::_thread_idx_x() as u32 }
}
/// `blockIdx.x`.
#[inline(always)]
pub fn block_x() -> u32 {
    unsafe { nvptx::_block_idx_x() as u32 }
}
/// `blockIdx.y`.
#[inline(always)]
pub fn block_y() -> u32 {
    unsafe { nvptx::_block_idx_y() as u32 }
}
/// `blockDim.x`.
#[inline(always)]
pub fn block_dim_x() -> u32 {
    unsafe { nvptx::_block_dim_x() as u32 }
}
/// `gridDim.x`.
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    unsafe { nvptx::_grid_dim_x() as u32 }
}
/// Lane index within the warp (`%laneid`).
#[inline(always)]
pub fn lane_id() -> u32 {
    thread_x() & 31
}
