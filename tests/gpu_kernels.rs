//! GPU property tests: every kernel against its CPU reference over random shapes (1, primes, tile sizes +-1),
//! fresh random inputs per case, outputs poisoned before the launch (see `hga::check`).
//!
//! Without a CUDA device each test prints one `SKIP` line (to stderr, not captured) and returns. On a GPU machine
//! the image is the best embedded one for the device; `HGA_KERNEL_IMAGE=sm_89.ptx` (etc.) forces another.
mod common;
use common::{cases, gpu};

use hga::check::{self, Outcome};
use hga::kernels::selftest::ALL_SELFTESTS;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn assert_ok(o: Outcome) -> Result<(), TestCaseError> {
    prop_assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
    Ok(())
}

/// Sizes around the kernels' tile widths: 1, primes, 32/128/256/2048 +-1, and anything in between.
fn dim_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        prop::sample::select(vec![
            2, 3, 7, 31, 32, 33, 127, 128, 129, 255, 256, 257, 2047, 2048, 2049, 4096, 8192, 8208
        ]),
        1usize..3000,
    ]
}

#[test]
fn gpu_selftest_building_blocks() {
    let Some(gpu) = gpu("gpu_selftest_building_blocks") else { return };
    proptest!(cases(), |(seed in any::<u64>(), which in 0..ALL_SELFTESTS.len())| {
        let t = ALL_SELFTESTS[which];
        let mut rng = StdRng::seed_from_u64(seed);
        let n = hga::reference::selftest::random_n(t, &mut rng);
        assert_ok(check::selftest(gpu, t, n, &mut rng).unwrap())?;
    });
    // And each one at least once, whatever proptest drew.
    let mut rng = StdRng::seed_from_u64(7);
    for t in ALL_SELFTESTS {
        let n = hga::reference::selftest::random_n(t, &mut rng);
        let o = check::selftest(gpu, t, n, &mut rng).unwrap();
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
    }
}

#[test]
fn gpu_rmsnorm_matches_reference() {
    let Some(gpu) = gpu("gpu_rmsnorm_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), rows in prop_oneof![Just(1usize), 1usize..70], dim in dim_strategy(), fused in any::<bool>())| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::rmsnorm(gpu, rows, dim, fused, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_fp8_quant_matches_reference() {
    let Some(gpu) = gpu("gpu_fp8_quant_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), rows in prop_oneof![Just(1usize), 1usize..70], k in dim_strategy())| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::fp8_quant(gpu, rows, k, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_launchers_reject_bad_shapes() {
    let Some(gpu) = gpu("gpu_launchers_reject_bad_shapes") else { return };
    let s = gpu.stream();
    let x = s.alloc_zeros::<half::bf16>(10).unwrap();
    let w = s.alloc_zeros::<half::bf16>(5).unwrap();
    let mut out = s.alloc_zeros::<half::bf16>(9).unwrap();
    let e = hga::kernels::hga_rmsnorm(gpu, &x, None, &w, &mut out, 2, 5, 1e-6).unwrap_err().to_string();
    assert!(e.contains("rmsnorm out: 9 elements, expected 10"), "{e}");
    let mut q = s.alloc_zeros::<u8>(10).unwrap();
    let mut sc = s.alloc_zeros::<f32>(1).unwrap();
    let e = hga::kernels::hga_fp8_quant(gpu, &x, &mut q, &mut sc, 2, 5).unwrap_err().to_string();
    assert!(e.contains("fp8_quant scale: 1 elements, expected 2"), "{e}");
    let e = hga::kernels::hga_selftest(gpu, hga::kernels::SelfTest::Warp, &[0; 4 * 33], 33).unwrap_err().to_string();
    assert!(e.contains("multiple of 32"), "{e}");
}
