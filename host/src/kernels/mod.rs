//! Safe launchers: one per kernel, named as the kernel. Each checks shapes and lengths, then performs the one
//! unsafe launch. Device buffers are cudarc slices or views, or `DeviceBuf`s (a slice booked in the memory
//! accountant: `crate::memory`); `bf16` for bf16, `u8` for e4m3, `f32`.
pub mod attention;
pub mod gemm;
pub mod head;
pub mod hga_attend;
pub mod hga_route;
pub mod kv;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod selftest;

pub use attention::{
    hga_attention_decode, hga_attention_decode_kernel, hga_attention_decode_upto_quant, hga_attention_prefill,
    AttentionShape, DecodeKernel, DecodeWorkspace, MergeKernel,
};
pub use norm::hga_rmsnorm;
pub use quant::{hga_fp8_dequant, hga_fp8_quant};
pub use rope::{hga_qk_norm_rope, QkNormRopeShape};
pub use selftest::{hga_selftest, SelfTest};

use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};

/// Launches `name` with the parameter struct `p` (its single by-value parameter) on the `Gpu`'s stream, with
/// programmatic dependent launch when [`Gpu::pdl_enabled`] (the attribute
/// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`; without it `cuLaunchKernelEx` is the plain launch).
///
/// # Safety
/// `p` must describe buffers that are valid for the kernel's whole access pattern under `cfg`, and they must stay
/// alive until the work completes (the callers hold the cudarc guards across the launch; cudarc orders later uses).
/// The one place that calls `cuLaunchKernelEx`.
pub(crate) unsafe fn launch<T: bytemuck::Pod>(
    gpu: &Gpu,
    name: &'static str,
    cfg: LaunchConfig,
    p: T,
) -> Result<(), RuntimeError> {
    use cudarc::driver::sys;
    let f = gpu.function_for_smem(name, cfg.shared_mem_bytes)?;
    // Every kernel takes one by-value `Pod` struct: the parameter array holds one pointer to it.
    let mut p = p;
    let mut params = [(&mut p as *mut T).cast::<std::ffi::c_void>()];
    // SAFETY: plain C structs and unions, for which all-zero bytes are valid.
    let mut attr: sys::CUlaunchAttribute = std::mem::zeroed();
    let n_attrs = if gpu.pdl_enabled() {
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        1
    } else {
        0
    };
    let lc = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: gpu.stream().cu_stream(),
        attrs: &mut attr,
        numAttrs: n_attrs,
    };
    let launch_err = |e: cudarc::driver::DriverError| RuntimeError::Launch { kernel: name, msg: e.to_string() };
    gpu.context().bind_to_thread().map_err(launch_err)?;
    // SAFETY: `f` belongs to the `Gpu`'s loaded module, `params` points at the kernel's one parameter, which the
    // driver copies before returning; the buffers are the caller's contract.
    sys::cuLaunchKernelEx(&lc, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result().map_err(launch_err)
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
