//! GPU-versus-reference checks, shared by the GPU tests (`tests/gpu_*.rs`, random shapes from proptest) and by
//! `hga selfcheck` (a fixed list of shapes). Every check draws fresh random inputs, poisons the outputs (NaN
//! bytes) before the launch, and compares with the CPU reference of `crate::reference`; NaN never passes.
pub mod attention;
pub mod gemm;
pub mod head;
pub mod hga_attend;
pub mod hga_route;
pub mod kv;
pub mod moe;
pub mod rope;

use crate::kernels::{self, SelfTest};
use crate::reference;
use crate::runtime::{Gpu, RuntimeError};
use half::bf16;
use rand::Rng;

/// The result of one check.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Kernel name.
    pub kernel: &'static str,
    /// Shape in words (`rows=3 dim=128 fused`).
    pub shape: String,
    /// ||out - ref|| / ||ref|| over all compared values (0 for exact checks that passed).
    pub rel_err: f64,
    pub ok: bool,
    /// The first mismatch, when not ok.
    pub detail: String,
}

impl Outcome {
    /// An outcome; `first_bad` is the first mismatch, if any.
    pub fn new(kernel: &'static str, shape: String, rel_err: f64, first_bad: Option<String>) -> Self {
        Outcome { kernel, shape, rel_err, ok: first_bad.is_none(), detail: first_bad.unwrap_or_default() }
    }
}

/// ||a - b|| / ||b||; NaN anywhere gives infinity.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if g.is_nan() || w.is_nan() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// Runs self-test kernel `t` with size `n` on fresh random input.
pub fn selftest(gpu: &Gpu, t: SelfTest, n: usize, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let input = reference::selftest::input(t, n, rng);
    let out = kernels::hga_selftest(gpu, t, &input, n)?;
    let bad = reference::selftest::check(t, n, &input, &out).err();
    Ok(Outcome::new(t.name(), format!("n={n}"), 0.0, bad))
}

pub(crate) fn bf16_vec(n: usize, lo: f32, hi: f32, rng: &mut impl Rng) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.gen_range(lo..hi))).collect()
}
pub(crate) fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
pub(crate) fn poison_bf16(n: usize) -> Vec<bf16> {
    vec![bf16::from_bits(0xFFFF); n]
}

/// RMSNorm (optionally with the fused residual add) on `rows` x `dim`.
pub fn rmsnorm(gpu: &Gpu, rows: usize, dim: usize, fused: bool, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let scale = 10f32.powf(rng.gen_range(-2.0..2.0));
    let x = bf16_vec(rows * dim, -scale, scale, rng);
    let r = bf16_vec(rows * dim, -scale, scale, rng);
    let w = bf16_vec(dim, 0.5, 1.5, rng);
    let eps = 1e-6;
    let dx = s.clone_htod(&x)?;
    let dw = s.clone_htod(&w)?;
    let mut dout = s.clone_htod(&poison_bf16(rows * dim))?;
    let dr = s.clone_htod(&r)?;
    let mut dro = s.clone_htod(&poison_bf16(rows * dim))?;
    let res = if fused {
        Some((&dr as &dyn cudarc::driver::DevicePtr<bf16>, &mut dro as &mut dyn cudarc::driver::DevicePtrMut<bf16>))
    } else {
        None
    };
    kernels::hga_rmsnorm(gpu, &dx, res, &dw, &mut dout, rows, dim, eps)?;
    let out = s.clone_dtoh(&dout)?;
    let ro = s.clone_dtoh(&dro)?;
    gpu.synchronize()?;
    let (want, want_r) = reference::hga_rmsnorm(&x, fused.then_some(&r[..]), &w, rows, dim, eps);
    let mut bad = None;
    // Each output is a product of two roundings: allow 2 bf16 ulps (2^-6 relative) per element.
    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
        let (g, w) = (g.to_f32(), w.to_f32());
        if g.is_nan() || (g - w).abs() > w.abs() * 2f32.powi(-6) + 1e-30 {
            bad = Some(format!("out[{i}] (row {}, col {}): got {g}, expected {w}", i / dim, i % dim));
            break;
        }
    }
    if let (Some(wr), None) = (&want_r, &bad) {
        if let Some(i) = ro.iter().zip(wr).position(|(a, b)| a.to_bits() != b.to_bits()) {
            bad = Some(format!("residual_out[{i}]: got {}, expected {}", ro[i], wr[i]));
        }
    }
    let rel = rel_l2(&to_f32(&out), &to_f32(&want));
    if bad.is_none() && rel > 4e-3 {
        bad = Some(format!("relative L2 error {rel:.3e} > 4e-3"));
    }
    Ok(Outcome::new("hga_rmsnorm", format!("rows={rows} dim={dim}{}", if fused { " +residual" } else { "" }), rel, bad))
}

/// FP8 quantization and dequantization of `rows` x `k`: bit-exact against the reference.
pub fn fp8_quant(gpu: &Gpu, rows: usize, k: usize, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let groups = k.div_ceil(gpu_kernels::num::FP8_GROUP);
    // Varied magnitudes per row, and an all-zero row now and then (the eps clamp).
    let mut x = Vec::with_capacity(rows * k);
    for _ in 0..rows {
        let scale = if rng.gen_ratio(1, 10) { 0.0 } else { 10f32.powf(rng.gen_range(-3.0..3.0)) };
        x.extend((0..k).map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0) * scale)));
    }
    let dx = s.clone_htod(&x)?;
    let mut dq = s.clone_htod(&vec![0xFFu8; rows * k])?;
    let mut ds = s.clone_htod(&vec![f32::NAN; rows * groups])?;
    kernels::hga_fp8_quant(gpu, &dx, &mut dq, &mut ds, rows, k)?;
    let mut dy = s.clone_htod(&poison_bf16(rows * k))?;
    kernels::hga_fp8_dequant(gpu, &dq, &ds, &mut dy, rows, k)?;
    let (q, sc, y) = (s.clone_dtoh(&dq)?, s.clone_dtoh(&ds)?, s.clone_dtoh(&dy)?);
    gpu.synchronize()?;
    let (wq, ws) = reference::hga_fp8_quant(&x, rows, k);
    let wy = reference::hga_fp8_dequant(&wq, &ws, rows, k);
    let mut bad = None;
    if let Some(i) = sc.iter().zip(&ws).position(|(a, b)| a.to_bits() != b.to_bits()) {
        bad = Some(format!("scale[{i}]: got {}, expected {}", sc[i], ws[i]));
    } else if let Some(i) = q.iter().zip(&wq).position(|(a, b)| a != b) {
        bad = Some(format!("q[{i}] (x = {}): got {:#04x}, expected {:#04x}", x[i], q[i], wq[i]));
    } else if let Some(i) = y.iter().zip(&wy).position(|(a, b)| a.to_bits() != b.to_bits()) {
        bad = Some(format!("dequant[{i}]: got {}, expected {}", y[i], wy[i]));
    }
    // Quantization error of the round trip, for the record.
    let rel = rel_l2(&to_f32(&y), &to_f32(&x));
    Ok(Outcome::new("hga_fp8_quant+dequant", format!("rows={rows} k={k}"), rel, bad))
}
