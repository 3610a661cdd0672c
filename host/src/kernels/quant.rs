//! Launchers of `hga_fp8_quant` / `hga_fp8_dequant` (gpu-kernels/src/quant/fp8_quant.rs).
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::num::FP8_GROUP;
use gpu_kernels::params::Fp8QuantParams;
use half::bf16;

fn shapes(rows: usize, k: usize) -> Result<(usize, usize, LaunchConfig, u32, u32), RuntimeError> {
    if k == 0 {
        return Err(RuntimeError::Shape("fp8 quant: k must be > 0".into()));
    }
    let groups = k.div_ceil(FP8_GROUP);
    let n = rows.checked_mul(k).ok_or_else(|| RuntimeError::Shape("fp8 quant: rows * k overflows".into()))?;
    let warps = rows * groups;
    let blocks = dim_u32("fp8 quant blocks", warps.div_ceil(8))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    Ok((n, rows * groups, cfg, dim_u32("fp8 quant rows", rows)?, dim_u32("fp8 quant k", k)?))
}

/// Quantizes bf16 `x` [rows, k] to e4m3 `q` [rows, k] with one f32 scale per token per 128-wide group,
/// `scale` [rows, ceil(k/128)].
pub fn hga_fp8_quant(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    q: &mut impl DevicePtrMut<u8>,
    scale: &mut impl DevicePtrMut<f32>,
    rows: usize,
    k: usize,
) -> Result<(), RuntimeError> {
    let (n, ns, cfg, rows32, k32) = shapes(rows, k)?;
    check_len("fp8_quant x", x.len(), n)?;
    check_len("fp8_quant q", q.len(), n)?;
    check_len("fp8_quant scale", scale.len(), ns)?;
    if rows == 0 {
        return Ok(());
    }
    let (px, _a) = dptr(gpu, x);
    let (pq, _b) = dptr_mut(gpu, q);
    let (ps, _c) = dptr_mut(gpu, scale);
    let p = Fp8QuantParams { x: px, q: pq, scale: ps, rows: rows32, k: k32 };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_fp8_quant", cfg, p) }
}

/// Dequantizes e4m3 `q` [rows, k] with `scale` [rows, ceil(k/128)] to bf16 `x` [rows, k].
pub fn hga_fp8_dequant(
    gpu: &Gpu,
    q: &impl DevicePtr<u8>,
    scale: &impl DevicePtr<f32>,
    x: &mut impl DevicePtrMut<bf16>,
    rows: usize,
    k: usize,
) -> Result<(), RuntimeError> {
    let (n, ns, cfg, rows32, k32) = shapes(rows, k)?;
    check_len("fp8_dequant q", q.len(), n)?;
    check_len("fp8_dequant scale", scale.len(), ns)?;
    check_len("fp8_dequant x", x.len(), n)?;
    if rows == 0 {
        return Ok(());
    }
    let (pq, _a) = dptr(gpu, q);
    let (ps, _b) = dptr(gpu, scale);
    let (px, _c) = dptr_mut(gpu, x);
    let p = Fp8QuantParams { x: px, q: pq, scale: ps, rows: rows32, k: k32 };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_fp8_dequant", cfg, p) }
}
