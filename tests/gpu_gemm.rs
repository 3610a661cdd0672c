//! GPU property tests of the gemm family (FP8 linear decode / prefill, fused RMSNorm -> FP8 quant) against the CPU
//! references fed the same FP8 inputs: random shapes (1, primes, tile sizes +-1), fresh inputs per case, outputs
//! poisoned before the launch. Without a CUDA device each test prints one SKIP line and returns.
mod common;
use common::{cases, gpu};

use hga::check::{self, Outcome};
use hga::kernels::gemm::Fp8LinearKernel;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn assert_ok(o: Outcome) -> Result<(), TestCaseError> {
    prop_assert!(o.ok, "{} {}: {} (rel {:.3e})", o.kernel, o.shape, o.detail, o.rel_err);
    Ok(())
}

#[test]
fn gpu_fp8_linear_decode_matches_reference() {
    let Some(gpu) = gpu("gpu_fp8_linear_decode_matches_reference") else { return };
    let n_s = prop_oneof![prop::sample::select(vec![1usize, 7, 8, 9, 127, 128, 129, 255, 256, 257]), 1usize..700,];
    proptest!(cases(), |(seed in any::<u64>(), m in 1usize..=16, n in n_s, kb in 1usize..=17)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::gemm::fp8_linear(gpu, Fp8LinearKernel::Decode, m, n, 128 * kb, &mut rng).unwrap())?;
    });
    // Qwen3-30B-A3B shapes: q_proj, expert gate/up and down, at m = 1 and 4 (and 16).
    let mut rng = StdRng::seed_from_u64(11);
    for (m, n, k) in [(1, 4096, 2048), (4, 4096, 2048), (1, 768, 2048), (4, 2048, 768), (16, 512, 2048)] {
        let o = check::gemm::fp8_linear(gpu, Fp8LinearKernel::Decode, m, n, k, &mut rng).unwrap();
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
        eprintln!("{} {} rel {:.2e}", o.kernel, o.shape, o.rel_err);
    }
}

#[test]
fn gpu_fp8_linear_prefill_matches_reference() {
    let Some(gpu) = gpu("gpu_fp8_linear_prefill_matches_reference") else { return };
    let m_s = prop_oneof![prop::sample::select(vec![1usize, 2, 17, 127, 128, 129, 255, 256, 257]), 1usize..400,];
    proptest!(cases(), |(seed in any::<u64>(), m in m_s, nb in 1usize..=4, kb in 1usize..=9)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::gemm::fp8_linear(gpu, Fp8LinearKernel::Prefill, m, 128 * nb, 128 * kb, &mut rng).unwrap())?;
    });
    let mut rng = StdRng::seed_from_u64(12);
    for (m, n, k) in [(200, 512, 2048), (129, 256, 768), (300, 768, 2048)] {
        let o = check::gemm::fp8_linear(gpu, Fp8LinearKernel::Prefill, m, n, k, &mut rng).unwrap();
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
        eprintln!("{} {} rel {:.2e}", o.kernel, o.shape, o.rel_err);
    }
}

/// The f16-conversion prefill kernel (picked on sm_90), forced so it runs on any arch: the same properties and
/// tolerances as the native one (m of 1, tile sizes +-1 and ragged, several N and K blocks), plus the Qwen3-30B-A3B
/// prefill shapes (q_proj, expert gate/up and down, o_proj) at m not a multiple of 128.
#[test]
fn gpu_fp8_linear_prefill_f16_matches_reference() {
    let Some(gpu) = gpu("gpu_fp8_linear_prefill_f16_matches_reference") else { return };
    let m_s =
        prop_oneof![prop::sample::select(vec![1usize, 2, 17, 63, 64, 65, 127, 128, 129, 255, 256, 257]), 1usize..400,];
    let kernel = Fp8LinearKernel::PrefillF16V3;
    proptest!(cases(), |(seed in any::<u64>(), m in m_s, nb in 1usize..=4, kb in 1usize..=9)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::gemm::fp8_linear(gpu, kernel, m, 128 * nb, 128 * kb, &mut rng).unwrap())?;
    });
    let mut rng = StdRng::seed_from_u64(13);
    // k/v_proj, small, expert gate/up, expert down, q_proj, o_proj.
    for (m, n, k) in
        [(200, 512, 2048), (129, 256, 768), (300, 768, 2048), (257, 2048, 768), (160, 4096, 2048), (130, 2048, 4096)]
    {
        let o = check::gemm::fp8_linear(gpu, kernel, m, n, k, &mut rng).unwrap();
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
        eprintln!("{} {} rel {:.2e}", o.kernel, o.shape, o.rel_err);
    }
}

/// A K block whose weight scale is 0 adds nothing (the native kernel skips it, the f16 one zeroes its W tile), also as the first and
/// the last K block and where every block of a column tile is 0: each prefill kernel against the reference.
#[test]
fn gpu_fp8_linear_prefill_zero_weight_scale() {
    let Some(gpu) = gpu("gpu_fp8_linear_prefill_zero_weight_scale") else { return };
    let (m, n, k) = (130usize, 384usize, 768usize);
    let kbs = k / 128;
    let mut rng = StdRng::seed_from_u64(15);
    let a = check::gemm::random_e4m3(m * k, &mut rng);
    let w = check::gemm::random_e4m3(n * k, &mut rng);
    let sa = check::gemm::random_scales(m * kbs, &mut rng);
    let mut sw = check::gemm::random_scales(n / 128 * kbs, &mut rng);
    // Column tile 0: K blocks 0, 2 and 5 (first, inner, last) zero; tile 1: all zero; tile 2: none.
    for kb in [0, 2, 5] {
        sw[kb] = 0.0;
    }
    for kb in 0..kbs {
        sw[kbs + kb] = 0.0;
    }
    let (want, _) = hga::reference::gemm::hga_fp8_linear(&a, &sa, &w, &sw, m, n, k);
    let s = gpu.stream();
    let (da, dsa, dw, dsw) =
        (s.clone_htod(&a).unwrap(), s.clone_htod(&sa).unwrap(), s.clone_htod(&w).unwrap(), s.clone_htod(&sw).unwrap());
    for kernel in [Fp8LinearKernel::Prefill, Fp8LinearKernel::PrefillF16V3] {
        let mut out = s.clone_htod(&vec![half::bf16::NAN; m * n]).unwrap();
        hga::kernels::gemm::hga_fp8_linear_with(gpu, kernel, &da, &dsa, &dw, &dsw, &mut out, m, n, k).unwrap();
        let got = s.clone_dtoh(&out).unwrap();
        gpu.synchronize().unwrap();
        let got: Vec<f32> = got.iter().map(|v| v.to_f32()).collect();
        let want: Vec<f32> = want.iter().map(|v| v.to_f32()).collect();
        assert!(got.iter().all(|v| v.is_finite()), "{}: non-finite output", kernel.name());
        assert!(got[..].chunks(n).all(|row| row[128..256].iter().all(|&v| v == 0.0)), "{}: tile 1", kernel.name());
        let rel = check::rel_l2(&got, &want);
        assert!(rel <= 1e-3, "{}: relative L2 error {rel:.3e}", kernel.name());
        eprintln!("{} zero weight scales: rel {rel:.2e}", kernel.name());
    }
}

/// `hga_fp8_linear` picks the f16 kernel on sm_90 only, and its result matches the reference on this device.
#[test]
fn gpu_fp8_linear_dispatch() {
    assert_eq!(Fp8LinearKernel::pick(16, (9, 0)), Fp8LinearKernel::Decode);
    assert_eq!(Fp8LinearKernel::pick(17, (9, 0)), Fp8LinearKernel::PrefillF16V3);
    assert_eq!(Fp8LinearKernel::pick(17, (8, 9)), Fp8LinearKernel::Prefill);
    assert_eq!(Fp8LinearKernel::pick(4096, (12, 0)), Fp8LinearKernel::Prefill);
    let Some(gpu) = gpu("gpu_fp8_linear_dispatch") else { return };
    let kernel = Fp8LinearKernel::pick(300, gpu.compute_capability());
    let o = check::gemm::fp8_linear(gpu, kernel, 300, 512, 1024, &mut StdRng::seed_from_u64(14)).unwrap();
    assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
    eprintln!("{:?} picks {}: rel {:.2e}", gpu.compute_capability(), o.kernel, o.rel_err);
}

#[test]
fn gpu_rmsnorm_fp8_quant_matches_reference() {
    let Some(gpu) = gpu("gpu_rmsnorm_fp8_quant_matches_reference") else { return };
    let dim_s = prop_oneof![
        Just(1usize),
        prop::sample::select(vec![2, 7, 127, 128, 129, 255, 256, 257, 2047, 2048, 2049, 4096]),
        1usize..3000,
    ];
    proptest!(cases(), |(seed in any::<u64>(), rows in 1usize..40, dim in dim_s, fused in any::<bool>())| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::gemm::rmsnorm_fp8_quant(gpu, rows, dim, fused, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_fp8_linear_rejects_bad_shapes() {
    let Some(gpu) = gpu("gpu_fp8_linear_rejects_bad_shapes") else { return };
    let s = gpu.stream();
    let a = s.alloc_zeros::<u8>(17 * 256).unwrap();
    let sa = s.alloc_zeros::<f32>(17 * 2).unwrap();
    let w = s.alloc_zeros::<u8>(200 * 256).unwrap();
    let sw = s.alloc_zeros::<f32>(2 * 2).unwrap();
    let mut out = s.alloc_zeros::<half::bf16>(17 * 200).unwrap();
    use hga::kernels::gemm::hga_fp8_linear_with as lin;
    let e = lin(gpu, Fp8LinearKernel::Decode, &a, &sa, &w, &sw, &mut out, 17, 200, 256).unwrap_err().to_string();
    assert!(e.contains("m = 17 > 16"), "{e}");
    let e = lin(gpu, Fp8LinearKernel::Prefill, &a, &sa, &w, &sw, &mut out, 17, 200, 256).unwrap_err().to_string();
    assert!(e.contains("multiple of 128"), "{e}");
    let e = lin(gpu, Fp8LinearKernel::Prefill, &a, &sa, &w, &sw, &mut out, 17, 200, 200).unwrap_err().to_string();
    assert!(e.contains("k = 200 must be a multiple of 128"), "{e}");
    let e = lin(gpu, Fp8LinearKernel::PrefillF16V3, &a, &sa, &w, &sw, &mut out, 17, 200, 256).unwrap_err().to_string();
    assert!(e.contains("multiple of 128"), "{e}");
    let e = lin(gpu, Fp8LinearKernel::Decode, &a, &sa, &w, &sw, &mut out, 16, 200, 256).unwrap_err().to_string();
    assert!(e.contains("fp8_linear a:"), "{e}");
}
