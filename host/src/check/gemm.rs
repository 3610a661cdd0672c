//! Checks of the gemm family against `crate::reference::gemm`, fed the same FP8 inputs.
use super::{poison_bf16, rel_l2, to_f32, Outcome};
use crate::kernels::{self, gemm::Fp8LinearKernel};
use crate::reference;
use crate::runtime::{Gpu, RuntimeError};
use half::bf16;
use rand::Rng;

/// Random e4m3 codes over the whole finite range (never the NaN codes 0x7F / 0xFF).
pub fn random_e4m3(n: usize, rng: &mut impl Rng) -> Vec<u8> {
    (0..n)
        .map(|_| loop {
            let b: u8 = rng.gen();
            if b & 0x7F != 0x7F {
                break b;
            }
        })
        .collect()
}

/// Random positive scales 2^[-12, 0).
pub fn random_scales(n: usize, rng: &mut impl Rng) -> Vec<f32> {
    (0..n).map(|_| 2f32.powf(rng.gen_range(-12.0..0.0))).collect()
}

/// FP8 linear on m x n x k with `kernel`: against the f64 reference on the same FP8 inputs. Passes when the
/// relative L2 error to the reference's bf16 output is <= 1e-3 (only f32 accumulation order and bf16 rounding
/// differ) and every element is within 2^-7 relative + 1e-3 of the reference's RMS.
pub fn fp8_linear(
    gpu: &Gpu,
    kernel: Fp8LinearKernel,
    m: usize,
    n: usize,
    k: usize,
    rng: &mut impl Rng,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let kbs = k / 128;
    let a = random_e4m3(m * k, rng);
    let w = random_e4m3(n * k, rng);
    let sa = random_scales(m * kbs, rng);
    let sw = random_scales(n.div_ceil(128) * kbs, rng);
    let (da, dsa, dw, dsw) = (s.clone_htod(&a)?, s.clone_htod(&sa)?, s.clone_htod(&w)?, s.clone_htod(&sw)?);
    let mut dout = s.clone_htod(&poison_bf16(m * n))?;
    kernels::gemm::hga_fp8_linear_with(gpu, kernel, &da, &dsa, &dw, &dsw, &mut dout, m, n, k)?;
    let out = s.clone_dtoh(&dout)?;
    gpu.synchronize()?;
    let (want, exact) = reference::gemm::hga_fp8_linear(&a, &sa, &w, &sw, m, n, k);
    let rms = (exact.iter().map(|v| v * v).sum::<f64>() / exact.len().max(1) as f64).sqrt();
    let mut bad = None;
    for (i, (g, e)) in out.iter().zip(&exact).enumerate() {
        let g = g.to_f32() as f64;
        if g.is_nan() || (g - e).abs() > e.abs() / 128.0 + 1e-3 * rms {
            bad = Some(format!("out[{}, {}]: got {g}, expected {e} (rms {rms:.3e})", i / n, i % n));
            break;
        }
    }
    let rel = rel_l2(&to_f32(&out), &to_f32(&want));
    if bad.is_none() && rel > 1e-3 {
        bad = Some(format!("relative L2 error {rel:.3e} > 1e-3"));
    }
    Ok(Outcome::new(kernel.name(), format!("m={m} n={n} k={k}"), rel, bad))
}

/// Fused RMSNorm (+ residual) -> FP8 quant on rows x dim: bit-exact against the GPU's own `hga_rmsnorm` followed by
/// `hga_fp8_quant` (same math by construction), and within 1e-2 relative L2 of the CPU reference after
/// dequantization (the CPU norm's f64 sum can flip a bf16 rounding, hence a code).
pub fn rmsnorm_fp8_quant(
    gpu: &Gpu,
    rows: usize,
    dim: usize,
    fused: bool,
    rng: &mut impl Rng,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let groups = dim.div_ceil(128);
    let scale = 10f32.powf(rng.gen_range(-2.0..2.0));
    let gen = |n: usize, lo: f32, hi: f32, rng: &mut dyn rand::RngCore| -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(rng.gen_range(lo..hi))).collect()
    };
    let x = gen(rows * dim, -scale, scale, rng);
    let r = gen(rows * dim, -scale, scale, rng);
    let wt = gen(dim, 0.5, 1.5, rng);
    let eps = 1e-6;
    let (dx, dr, dw) = (s.clone_htod(&x)?, s.clone_htod(&r)?, s.clone_htod(&wt)?);
    let mut dq = s.clone_htod(&vec![0xFFu8; rows * dim])?;
    let mut ds = s.clone_htod(&vec![f32::NAN; rows * groups])?;
    let mut dro = s.clone_htod(&poison_bf16(rows * dim))?;
    {
        let res = fused.then_some((
            &dr as &dyn cudarc::driver::DevicePtr<bf16>,
            &mut dro as &mut dyn cudarc::driver::DevicePtrMut<bf16>,
        ));
        kernels::gemm::hga_rmsnorm_fp8_quant(gpu, &dx, res, &dw, &mut dq, &mut ds, rows, dim, eps)?;
    }
    // The two-kernel path on the GPU.
    let mut dh = s.clone_htod(&poison_bf16(rows * dim))?;
    let mut dro2 = s.clone_htod(&poison_bf16(rows * dim))?;
    {
        let res = fused.then_some((
            &dr as &dyn cudarc::driver::DevicePtr<bf16>,
            &mut dro2 as &mut dyn cudarc::driver::DevicePtrMut<bf16>,
        ));
        kernels::hga_rmsnorm(gpu, &dx, res, &dw, &mut dh, rows, dim, eps)?;
    }
    let mut dq2 = s.clone_htod(&vec![0xFFu8; rows * dim])?;
    let mut ds2 = s.clone_htod(&vec![f32::NAN; rows * groups])?;
    kernels::hga_fp8_quant(gpu, &dh, &mut dq2, &mut ds2, rows, dim)?;
    let (q, sc, ro) = (s.clone_dtoh(&dq)?, s.clone_dtoh(&ds)?, s.clone_dtoh(&dro)?);
    let (q2, sc2, ro2) = (s.clone_dtoh(&dq2)?, s.clone_dtoh(&ds2)?, s.clone_dtoh(&dro2)?);
    gpu.synchronize()?;
    let mut bad = None;
    if let Some(i) = sc.iter().zip(&sc2).position(|(a, b)| a.to_bits() != b.to_bits()) {
        bad = Some(format!("scale[{i}]: fused {} vs rmsnorm+quant {}", sc[i], sc2[i]));
    } else if let Some(i) = q.iter().zip(&q2).position(|(a, b)| a != b) {
        bad = Some(format!("q[{i}]: fused {:#04x} vs rmsnorm+quant {:#04x}", q[i], q2[i]));
    } else if fused {
        if let Some(i) = ro.iter().zip(&ro2).position(|(a, b)| a.to_bits() != b.to_bits()) {
            bad = Some(format!("residual_out[{i}]: fused {} vs rmsnorm {}", ro[i], ro2[i]));
        }
    }
    let (wq, ws, _) = reference::gemm::hga_rmsnorm_fp8_quant(&x, fused.then_some(&r[..]), &wt, rows, dim, eps);
    let got = reference::hga_fp8_dequant(&q, &sc, rows, dim);
    let want = reference::hga_fp8_dequant(&wq, &ws, rows, dim);
    let rel = rel_l2(&to_f32(&got), &to_f32(&want));
    if bad.is_none() && rel > 1e-2 {
        bad = Some(format!("dequantized relative L2 error vs the CPU reference {rel:.3e} > 1e-2"));
    }
    Ok(Outcome::new(
        "hga_rmsnorm_fp8_quant",
        format!("rows={rows} dim={dim}{}", if fused { " +residual" } else { "" }),
        rel,
        bad,
    ))
}
