//! Launcher of `hga_rmsnorm` (gpu-kernels/src/norm/rmsnorm.rs).
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::RmsNormParams;
use half::bf16;

/// Threads per block of `hga_rmsnorm`.
const THREADS: u32 = 256;

/// `out = rmsnorm(x) * weight` over `rows` rows of `dim`; with `residual = Some((r, r_out))`, `x + r` (rounded to
/// bf16) is normalized and written to `r_out`. All bf16; x, r, r_out, out are [rows, dim], weight [dim].
#[allow(clippy::too_many_arguments)]
pub fn hga_rmsnorm(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    residual: Option<(&dyn DevicePtr<bf16>, &mut dyn DevicePtrMut<bf16>)>,
    weight: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtrMut<bf16>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), RuntimeError> {
    if dim == 0 {
        return Err(RuntimeError::Shape("rmsnorm: dim must be > 0".into()));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(RuntimeError::Shape(format!("rmsnorm: eps must be finite and >= 0, got {eps}")));
    }
    let n = rows.checked_mul(dim).ok_or_else(|| RuntimeError::Shape("rmsnorm: rows * dim overflows".into()))?;
    check_len("rmsnorm x", x.len(), n)?;
    check_len("rmsnorm weight", weight.len(), dim)?;
    check_len("rmsnorm out", out.len(), n)?;
    let rows32 = dim_u32("rmsnorm rows", rows)?;
    let dim32 = dim_u32("rmsnorm dim", dim)?;
    if rows == 0 {
        return Ok(());
    }
    let (px, _gx) = dptr(gpu, x);
    let (pw, _gw) = dptr(gpu, weight);
    let (po, _go) = dptr_mut(gpu, out);
    let (pr, pro, _gr, _gro) = match residual {
        Some((r, ro)) => {
            check_len("rmsnorm residual", r.len(), n)?;
            check_len("rmsnorm residual_out", ro.len(), n)?;
            let (a, ga) = r.device_ptr(gpu.stream());
            let (b, gb) = ro.device_ptr_mut(gpu.stream());
            (a, b, Some(ga), Some(gb))
        }
        None => (0, 0, None, None),
    };
    let p = RmsNormParams {
        x: px,
        residual: pr,
        residual_out: pro,
        weight: pw,
        out: po,
        rows: rows32,
        dim: dim32,
        eps,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid_dim: (rows32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 128 };
    // SAFETY: lengths checked above; the guards keep the buffers' events until after the launch.
    unsafe { launch(gpu, "hga_rmsnorm", cfg, p) }
}
