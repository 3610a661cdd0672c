//! Launchers of the gemm family (gpu-kernels/src/gemm/): `hga_fp8_linear` (the kernel by [`Fp8LinearKernel::pick`],
//! every kernel by name with [`hga_fp8_linear_with`]), `hga_rmsnorm_fp8_quant`, and the bf16 mma.sync peak
//! microbenchmark (the ceiling anchor of `bench_gemm`). Which FP8 linear runs:
//!
//! | rows m | sm_89, sm_120 (and any card but sm_90) | sm_90 |
//! |---|---|---|
//! | m <= [`DECODE_MAX_M`] (16) | `hga_fp8_linear_decode` | `hga_fp8_linear_decode` |
//! | m > 16 | `hga_fp8_linear_prefill` (native e4m3 mma.sync) | `hga_fp8_linear_prefill_f16_v3` (own e4m3 -> f16 conversion; Hopper has no FP8 mma.sync) |
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::num::FP8_GROUP;
use gpu_kernels::params::{Fp8LinearParams, MmaPeakParams, RmsNormQuantParams, FP8_PREFILL_F16_SMEM_BYTES};
use half::bf16;

/// Largest m the decode kernel takes.
pub const DECODE_MAX_M: usize = 16;

/// Which FP8 linear kernel to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8LinearKernel {
    /// `hga_fp8_linear_decode` (m <= 16, k % 128 == 0).
    Decode,
    /// `hga_fp8_linear_prefill` (native e4m3 mma.sync, 3 stages; n % 128 == 0, k % 128 == 0): m > 16 on every
    /// card but sm_90.
    Prefill,
    /// `hga_fp8_linear_prefill_f16_v3`: own e4m3 -> f16 conversion (all of A on the conversion pipe, W on the ALU)
    /// and f16 mma.sync, software-pipelined inside the warp (the next 16-wide k chunk's fragments loaded and
    /// converted into a second register set while the current chunk's HMMA issue); n % 128 == 0, k % 128 == 0.
    /// m > 16 on sm_90; runs on every arch.
    PrefillF16V3,
}

impl Fp8LinearKernel {
    pub fn name(self) -> &'static str {
        match self {
            Fp8LinearKernel::Decode => "hga_fp8_linear_decode",
            Fp8LinearKernel::Prefill => "hga_fp8_linear_prefill",
            Fp8LinearKernel::PrefillF16V3 => "hga_fp8_linear_prefill_f16_v3",
        }
    }
    /// The kernel `hga_fp8_linear` picks for `m` rows on a device of compute capability `cc` (major, minor):
    /// decode for m <= 16; above, the software-pipelined f16-conversion kernel on sm_90 (Hopper has no FP8
    /// mma.sync: ptxas's emulation is conversion-bound, docs/perf-gemm.md), else the native e4m3 kernel (sm_89,
    /// sm_120).
    pub fn pick(m: usize, cc: (u32, u32)) -> Self {
        if m <= DECODE_MAX_M {
            Fp8LinearKernel::Decode
        } else if cc == (9, 0) {
            // The fastest on an H200 (docs/perf-gemm.md, commit 3b466b4: 0.592x of the bf16 mma.sync ceiling at
            // 4096x4096x2048, against 0.566x for the unpipelined form in the same run).
            Fp8LinearKernel::PrefillF16V3
        } else {
            Fp8LinearKernel::Prefill
        }
    }
    /// Whether this is one of the m > 16 kernels (n % 128 == 0 required).
    pub fn is_prefill(self) -> bool {
        self != Fp8LinearKernel::Decode
    }
}

/// Block-scaled FP8 linear `out[m, n] = sum_kb (qa[m, kb] . qw[n, kb]) * a_scale[m, kb] * w_scale[n/128, kb]`
/// (bf16 out, f32 accumulation): a e4m3 [m, k], a_scale f32 [m, k/128] (from `hga_fp8_quant` or
/// `hga_rmsnorm_fp8_quant`), w e4m3 [n, k], w_scale f32 [ceil(n/128), k/128] (the checkpoint's `weight_scale_inv`),
/// out bf16 [m, n]. Picks the kernel with [`Fp8LinearKernel::pick`] (decode for m <= 16, prefill above: the f16
/// one on sm_90, the native e4m3 one elsewhere); [`hga_fp8_linear_with`] runs a given kernel.
#[allow(clippy::too_many_arguments)]
pub fn hga_fp8_linear(
    gpu: &Gpu,
    a: &impl DevicePtr<u8>,
    a_scale: &impl DevicePtr<f32>,
    w: &impl DevicePtr<u8>,
    w_scale: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), RuntimeError> {
    let kernel = Fp8LinearKernel::pick(m, gpu.compute_capability());
    hga_fp8_linear_with(gpu, kernel, a, a_scale, w, w_scale, out, m, n, k)
}

/// [`hga_fp8_linear`] with the kernel chosen by the caller (tests and benchmarks): same checks, any kernel on any
/// arch (the prefill kernels' 96 KiB / 99888 B of shared memory fit sm_89 / sm_90 / sm_120).
#[allow(clippy::too_many_arguments)]
pub fn hga_fp8_linear_with(
    gpu: &Gpu,
    kernel: Fp8LinearKernel,
    a: &impl DevicePtr<u8>,
    a_scale: &impl DevicePtr<f32>,
    w: &impl DevicePtr<u8>,
    w_scale: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<bf16>,
    m: usize,
    n: usize,
    k: usize,
) -> Result<(), RuntimeError> {
    let name = kernel.name();
    if n == 0 || k == 0 {
        return Err(RuntimeError::Shape(format!("{name}: n and k must be > 0 (n={n}, k={k})")));
    }
    if !k.is_multiple_of(FP8_GROUP) {
        return Err(RuntimeError::Shape(format!("{name}: k = {k} must be a multiple of 128")));
    }
    match kernel {
        Fp8LinearKernel::Decode if m > DECODE_MAX_M => {
            return Err(RuntimeError::Shape(format!("{name}: m = {m} > {DECODE_MAX_M}")));
        }
        _ if kernel.is_prefill() && !n.is_multiple_of(128) => {
            return Err(RuntimeError::Shape(format!("{name}: n = {n} must be a multiple of 128")));
        }
        _ => {}
    }
    let kb = k / FP8_GROUP;
    let mk = m.checked_mul(k).ok_or_else(|| RuntimeError::Shape(format!("{name}: m * k overflows")))?;
    let nk = n.checked_mul(k).ok_or_else(|| RuntimeError::Shape(format!("{name}: n * k overflows")))?;
    let mn = m.checked_mul(n).ok_or_else(|| RuntimeError::Shape(format!("{name}: m * n overflows")))?;
    check_len("fp8_linear a", a.len(), mk)?;
    check_len("fp8_linear a_scale", a_scale.len(), m * kb)?;
    check_len("fp8_linear w", w.len(), nk)?;
    check_len("fp8_linear w_scale", w_scale.len(), n.div_ceil(128) * kb)?;
    check_len("fp8_linear out", out.len(), mn)?;
    let (m32, n32, k32) = (dim_u32("m", m)?, dim_u32("n", n)?, dim_u32("k", k)?);
    // The kernels index with 32-bit products in places and 64-bit pointers elsewhere; keep every matrix < 2^31.
    for (what, v) in [("m * k", mk), ("n * k", nk), ("m * n", mn)] {
        if v >= 1 << 31 {
            return Err(RuntimeError::Shape(format!("{name}: {what} = {v} >= 2^31")));
        }
    }
    if m == 0 {
        return Ok(());
    }
    let (pa, _ga) = dptr(gpu, a);
    let (psa, _gsa) = dptr(gpu, a_scale);
    let (pw, _gw) = dptr(gpu, w);
    let (psw, _gsw) = dptr(gpu, w_scale);
    let (po, _go) = dptr_mut(gpu, out);
    if pa % 16 != 0 || pw % 16 != 0 || psa % 4 != 0 || psw % 4 != 0 || po % 4 != 0 {
        return Err(RuntimeError::Shape(format!("{name}: a and w must be 16-byte aligned, scales and out 4-byte")));
    }
    let p = Fp8LinearParams { a: pa, a_scale: psa, w: pw, w_scale: psw, out: po, m: m32, n: n32, k: k32, _pad: 0 };
    let cfg = match kernel {
        Fp8LinearKernel::Decode => LaunchConfig {
            grid_dim: (dim_u32("blocks", n.div_ceil(8))?, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 4 * 32 * 4 * 4,
        },
        Fp8LinearKernel::Prefill => LaunchConfig {
            grid_dim: ((n / 128) as u32, dim_u32("blocks", m.div_ceil(128))?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 3 * 32 * 1024,
        },
        Fp8LinearKernel::PrefillF16V3 => LaunchConfig {
            grid_dim: ((n / 128) as u32, dim_u32("blocks", m.div_ceil(128))?, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: FP8_PREFILL_F16_SMEM_BYTES as u32,
        },
    };
    // SAFETY: lengths, divisibility and alignment checked above; the guards live across the launch.
    unsafe { launch(gpu, name, cfg, p) }
}

/// Fused RMSNorm (+ residual) -> FP8 quantization: the output equals `hga_fp8_quant(hga_rmsnorm(x))` bit for bit.
/// x bf16 [rows, dim], residual `Some((r, r_out))` (both bf16 [rows, dim]), weight bf16 [dim], q e4m3 [rows, dim],
/// scale f32 [rows, ceil(dim/128)].
#[allow(clippy::too_many_arguments)]
pub fn hga_rmsnorm_fp8_quant(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    residual: Option<(&dyn DevicePtr<bf16>, &mut dyn DevicePtrMut<bf16>)>,
    weight: &impl DevicePtr<bf16>,
    q: &mut impl DevicePtrMut<u8>,
    scale: &mut impl DevicePtrMut<f32>,
    rows: usize,
    dim: usize,
    eps: f32,
) -> Result<(), RuntimeError> {
    if dim == 0 {
        return Err(RuntimeError::Shape("rmsnorm_fp8_quant: dim must be > 0".into()));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(RuntimeError::Shape(format!("rmsnorm_fp8_quant: eps must be finite and >= 0, got {eps}")));
    }
    let n = rows.checked_mul(dim).ok_or_else(|| RuntimeError::Shape("rmsnorm_fp8_quant: overflow".into()))?;
    check_len("rmsnorm_fp8_quant x", x.len(), n)?;
    check_len("rmsnorm_fp8_quant weight", weight.len(), dim)?;
    check_len("rmsnorm_fp8_quant q", q.len(), n)?;
    check_len("rmsnorm_fp8_quant scale", scale.len(), rows * dim.div_ceil(FP8_GROUP))?;
    let rows32 = dim_u32("rows", rows)?;
    let dim32 = dim_u32("dim", dim)?;
    if rows == 0 {
        return Ok(());
    }
    let (px, _gx) = dptr(gpu, x);
    let (pw, _gw) = dptr(gpu, weight);
    let (pq, _gq) = dptr_mut(gpu, q);
    let (ps, _gs) = dptr_mut(gpu, scale);
    let (pr, pro, _gr, _gro) = match residual {
        Some((r, ro)) => {
            check_len("rmsnorm_fp8_quant residual", r.len(), n)?;
            check_len("rmsnorm_fp8_quant residual_out", ro.len(), n)?;
            let (a, ga) = r.device_ptr(gpu.stream());
            let (b, gb) = ro.device_ptr_mut(gpu.stream());
            (a, b, Some(ga), Some(gb))
        }
        None => (0, 0, None, None),
    };
    let p = RmsNormQuantParams {
        x: px,
        residual: pr,
        residual_out: pro,
        weight: pw,
        q: pq,
        scale: ps,
        rows: rows32,
        dim: dim32,
        eps,
        _pad: 0,
    };
    let cfg = LaunchConfig { grid_dim: (rows32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 128 };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_rmsnorm_fp8_quant", cfg, p) }
}

/// The bf16 mma.sync peak kernel: `blocks` x 256 threads, `iters` iterations of 8 products per warp; `out` gets
/// blocks * 256 f32. Returns the flops it performs.
pub fn hga_bench_mma_bf16_peak(
    gpu: &Gpu,
    out: &mut impl DevicePtrMut<f32>,
    blocks: usize,
    iters: u32,
) -> Result<f64, RuntimeError> {
    check_len("mma_peak out", out.len(), blocks * 256)?;
    let (po, _g) = dptr_mut(gpu, out);
    let p = MmaPeakParams { out: po, iters, seed: 0x1234 };
    let cfg =
        LaunchConfig { grid_dim: (dim_u32("blocks", blocks)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: out holds one f32 per thread.
    unsafe { launch(gpu, "hga_bench_mma_bf16_peak", cfg, p)? };
    Ok(blocks as f64 * 8.0 * iters as f64 * 8.0 * 2.0 * 16.0 * 8.0 * 16.0)
}
