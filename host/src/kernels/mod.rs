//! Safe launchers: one per kernel, named as the kernel. Each checks shapes and lengths, then performs the one
//! unsafe launch. Device buffers are cudarc slices or views (`bf16` for bf16, `u8` for e4m3, `f32`).
pub mod attention;
pub mod gemm;
pub mod head;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod selftest;

pub use attention::{
    hga_attention_decode, hga_attention_decode_kernel, hga_attention_decode_upto_quant, hga_attention_prefill,
    hga_attention_prefill_lazy, AttentionShape, DecodeKernel, DecodeWorkspace,
};
pub use norm::hga_rmsnorm;
pub use quant::{hga_fp8_dequant, hga_fp8_quant};
pub use rope::{hga_qk_norm_rope, QkNormRopeShape};
pub use selftest::{hga_selftest, SelfTest};

use crate::runtime::{Gpu, Param, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Launches `name` with the parameter struct `p` (its single by-value parameter).
///
/// # Safety
/// `p` must describe buffers that are valid for the kernel's whole access pattern under `cfg`, and they must stay
/// alive until the work completes (the callers hold the cudarc guards across the launch; cudarc orders later uses).
pub(crate) unsafe fn launch<T: bytemuck::Pod>(
    gpu: &Gpu,
    name: &'static str,
    cfg: LaunchConfig,
    p: T,
) -> Result<(), RuntimeError> {
    let f = gpu.function(name)?;
    if cfg.shared_mem_bytes > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            cfg.shared_mem_bytes as i32,
        )?;
    }
    let p = Param(p);
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&p);
    b.launch(cfg).map_err(|e| RuntimeError::Launch { kernel: name, msg: e.to_string() })?;
    Ok(())
}

/// Checks that a buffer holds exactly `want` elements.
pub(crate) fn check_len(what: &str, have: usize, want: usize) -> Result<(), RuntimeError> {
    if have != want {
        return Err(RuntimeError::Shape(format!("{what}: {have} elements, expected {want}")));
    }
    Ok(())
}

/// Checks that a dimension fits the kernels' 32-bit indices.
pub(crate) fn dim_u32(what: &str, v: usize) -> Result<u32, RuntimeError> {
    u32::try_from(v).map_err(|_| RuntimeError::Shape(format!("{what} = {v} does not fit in 32 bits")))
}

/// Device address of a buffer for reading, with its cudarc guard.
pub(crate) fn dptr<'a, T>(gpu: &'a Gpu, b: &'a impl DevicePtr<T>) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    let (p, g) = b.device_ptr(gpu.stream());
    (p, g)
}

/// Device address of a buffer for writing, with its cudarc guard.
pub(crate) fn dptr_mut<'a, T>(gpu: &'a Gpu, b: &'a mut impl DevicePtrMut<T>) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
    let (p, g) = b.device_ptr_mut(gpu.stream());
    (p, g)
}
