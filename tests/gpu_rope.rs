//! GPU property test of `hga_qk_norm_rope` (per-head q/k RMSNorm + NeoX RoPE + K/V cache write) against its CPU
//! reference: random token counts (1, primes, tile sizes +-1), head counts, positions (distinct, random, one past the
//! capacity now and then), theta, fused or separate q/k/v inputs; outputs and the whole cache poisoned.
//! Without a CUDA device: one SKIP line per test.
mod common;
use common::{cases, gpu};

use hga::check::{self, Outcome};
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn assert_ok(o: Outcome) -> Result<(), TestCaseError> {
    prop_assert!(o.ok, "{} {}: {} (rel {:.2e})", o.kernel, o.shape, o.detail, o.rel_err);
    Ok(())
}

#[test]
fn gpu_qk_norm_rope_matches_reference() {
    let Some(gpu) = gpu("gpu_qk_norm_rope_matches_reference") else { return };
    let tokens =
        prop_oneof![Just(1usize), prop::sample::select(vec![2, 3, 7, 31, 63, 64, 65, 127, 128, 129]), 1usize..300];
    let heads = prop::sample::select(vec![(1usize, 1usize), (2, 1), (8, 1), (4, 2), (16, 2), (32, 4), (5, 5), (24, 3)]);
    proptest!(cases(), |(seed in any::<u64>(), tokens in tokens, (nh, nkv) in heads, fused in any::<bool>())| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::rope::qk_norm_rope(gpu, tokens, nh, nkv, fused, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_qk_norm_rope_rejects_bad_shapes() {
    let Some(gpu) = gpu("gpu_qk_norm_rope_rejects_bad_shapes") else { return };
    let s = gpu.stream();
    let x = s.alloc_zeros::<half::bf16>(2 * 128).unwrap();
    let w = s.alloc_zeros::<half::bf16>(128).unwrap();
    let pos = s.alloc_zeros::<u32>(2).unwrap();
    let mut qo = s.alloc_zeros::<half::bf16>(2 * 128).unwrap();
    let mut kc = s.alloc_zeros::<half::bf16>(4 * 128).unwrap();
    let mut vc = s.alloc_zeros::<half::bf16>(3 * 128).unwrap();
    let shape = hga::kernels::QkNormRopeShape {
        tokens: 2,
        n_heads: 1,
        n_kv_heads: 1,
        capacity: 4,
        q_stride: 128,
        k_stride: 128,
        v_stride: 128,
        cache_by_token: false,
        eps: 1e-6,
        theta: 1e6,
    };
    let e = hga::kernels::hga_qk_norm_rope(gpu, &x, &x, &x, &pos, &w, &w, &mut qo, &mut kc, &mut vc, &shape)
        .unwrap_err()
        .to_string();
    assert!(e.contains("v_cache: 384 elements, expected 512"), "{e}");
}
