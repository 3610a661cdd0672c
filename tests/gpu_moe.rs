//! GPU property tests of the MoE kernels (router in both forms, grouping, the decode and the grouped expert
//! paths) against the CPU reference, over random shapes (see `hga::check::moe` for what is compared), plus the
//! Qwen3-30B-A3B shape (hidden 2048, 128 experts, top-8, intermediate 768) at T = 1 and T = 4, and the norm inside
//! the router bit for bit against the separate launches.
//!
//! Without a CUDA device each test prints one `SKIP` line and returns.
mod common;
use common::{cases, gpu};
use std::io::Write;

use hga::check::moe::{self as cm, MoePath};
use hga::check::Outcome;
use hga::kernels::moe::RouterForm;
use hga::reference::moe::MoeDims;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn assert_ok(o: Outcome) -> Result<(), TestCaseError> {
    let _ = writeln!(
        std::io::stderr(),
        "  {} {}: rel {:.2e} {}",
        o.kernel,
        o.shape,
        o.rel_err,
        if o.ok { "ok" } else { "FAIL" }
    );
    prop_assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
    Ok(())
}

/// Token counts: 1, primes, 16 +- 1 and 32/64 +- 1 (tile sizes), up to a few hundred.
fn tokens() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        prop::sample::select(vec![2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 257, 311]),
        1usize..400,
    ]
}

/// A random layer of `t` tokens and the given small shape (router rows with exact ties when `dups`), and the
/// generator that made it.
fn random_case(
    seed: u64,
    t: usize,
    dims: (usize, usize, usize, usize, bool),
    dups: bool,
) -> (MoeDims, cm::MoeInputs, StdRng) {
    let (h, i, e, k, n) = dims;
    let mut rng = StdRng::seed_from_u64(seed);
    let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: n };
    let mut inp = cm::random_inputs(&d, &mut rng);
    inp.router_w = cm::random_router(&d, dups, &mut rng);
    (d, inp, rng)
}

/// Small layer shapes (multiples of 128 for hidden and inter), experts 1..=256 with top-k <= experts.
fn small_dims() -> impl Strategy<Value = (usize, usize, usize, usize, bool)> {
    (
        prop::sample::select(vec![128usize, 256, 384]),
        prop::sample::select(vec![128usize, 256, 384]),
        prop::sample::select(vec![1usize, 2, 5, 8, 16, 33]),
        1usize..=8,
        any::<bool>(),
    )
        .prop_map(|(h, i, e, k, n)| (h, i, e, k.min(e), n))
}

#[test]
fn gpu_moe_router_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_router_matches_reference") else { return };
    let experts = prop::sample::select(vec![1usize, 2, 3, 8, 13, 64, 127, 128, 129, 200, 256]);
    let hidden = prop::sample::select(vec![128usize, 256, 640, 2048]);
    proptest!(cases(), |(seed in any::<u64>(), t in tokens(), h in hidden, e in experts, k in 1usize..=16,
                         norm in any::<bool>(), f in 0usize..2)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: 128, experts: e, top_k: k.min(e), norm_topk: norm };
        let form = [RouterForm::Batch, RouterForm::Rows][f];
        assert_ok(cm::router(gpu, &d, form, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_moe_router_qwen3_shape() {
    let Some(gpu) = gpu("gpu_moe_router_qwen3_shape") else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for t in [1usize, 4, 17, 1000] {
        for form in [RouterForm::Batch, RouterForm::Rows, RouterForm::Auto] {
            let o = cm::router(gpu, &MoeDims::qwen3_30b_a3b(t), form, &mut rng).unwrap();
            assert_ok(o).unwrap();
        }
    }
}

#[test]
fn gpu_moe_group_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_group_matches_reference") else { return };
    let experts = prop::sample::select(vec![1usize, 2, 7, 8, 64, 128, 256]);
    proptest!(cases(), |(seed in any::<u64>(), t in prop_oneof![tokens(), 1000usize..5000], e in experts, k in 1usize..=8)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: 128, inter: 128, experts: e, top_k: k.min(e), norm_topk: true };
        assert_ok(cm::group(gpu, &d, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_moe_decode_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_decode_matches_reference") else { return };
    let t = prop_oneof![Just(1usize), prop::sample::select(vec![2usize, 3, 4, 5, 7, 8, 13, 17])];
    proptest!(cases(), |(seed in any::<u64>(), t in t, (h, i, e, k, n) in small_dims())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: n };
        assert_ok(cm::moe(gpu, &d, MoePath::Decode, &mut rng).unwrap())?;
    });
}

/// The decode path at top-k 9..=32 (the launchers allow up to `MOE_MAX_TOPK`; the down kernel then gives some warps
/// a unit fewer than others) and at larger hidden / inter.
#[test]
fn gpu_moe_decode_wide_topk() {
    let Some(gpu) = gpu("gpu_moe_decode_wide_topk") else { return };
    let dims = (
        prop::sample::select(vec![128usize, 640, 2048]),
        prop::sample::select(vec![128usize, 384, 768, 1152]),
        prop::sample::select(vec![32usize, 33]),
        9usize..=32,
    );
    proptest!(cases(), |(seed in any::<u64>(), t in 1usize..=5, (h, i, e, k) in dims)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: true };
        assert_ok(cm::moe(gpu, &d, MoePath::Decode, &mut rng).unwrap())?;
    });
}

/// The post-attention norm inside the router (`moe_decode_residual`, one token) gives `hga_rmsnorm` +
/// `moe_decode`'s residual, normalized row, routing and output bit for bit, over repeated runs and graph replays;
/// more tokens take the fallback (the same two launches). The Qwen3 shape and random small shapes.
#[test]
fn gpu_moe_norm_in_router_bit_identical() {
    let Some(gpu) = gpu("gpu_moe_norm_in_router_bit_identical") else { return };
    let mut rng = StdRng::seed_from_u64(43);
    for t in [1usize, 2] {
        let d = MoeDims::qwen3_30b_a3b(t);
        let inp = cm::random_inputs(&d, &mut rng);
        assert_ok(cm::norm_in_router_matches_separate(gpu, &d, &inp, &mut rng, 4).unwrap()).unwrap();
    }
    proptest!(cases(), |(seed in any::<u64>(), t in 1usize..=2, dims in small_dims(), dups in any::<bool>())| {
        let (d, inp, mut rng) = random_case(seed, t, dims, dups);
        assert_ok(cm::norm_in_router_matches_separate(gpu, &d, &inp, &mut rng, 3).unwrap())?;
    });
}

#[test]
fn gpu_moe_grouped_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_grouped_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), t in tokens(), (h, i, e, k, n) in small_dims())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: n };
        assert_ok(cm::moe(gpu, &d, MoePath::Grouped, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_moe_qwen3_shape_both_paths() {
    let Some(gpu) = gpu("gpu_moe_qwen3_shape_both_paths") else { return };
    let mut rng = StdRng::seed_from_u64(5);
    for t in [1usize, 4] {
        let d = MoeDims::qwen3_30b_a3b(t);
        let inp = cm::random_inputs(&d, &mut rng);
        for path in [MoePath::Decode, MoePath::Grouped] {
            assert_ok(cm::moe_with(gpu, &d, path, &inp).unwrap()).unwrap();
        }
    }
}

#[test]
fn gpu_moe_launchers_reject_bad_shapes() {
    let Some(gpu) = gpu("gpu_moe_launchers_reject_bad_shapes") else { return };
    let s = gpu.stream();
    let d = MoeDims { tokens: 2, hidden: 100, inter: 128, experts: 4, top_k: 2, norm_topk: true };
    let x = s.alloc_zeros::<half::bf16>(200).unwrap();
    let w = s.alloc_zeros::<half::bf16>(400).unwrap();
    let mut l = s.alloc_zeros::<f32>(8).unwrap();
    let mut c = s.alloc_zeros::<u32>(1).unwrap();
    let mut ids = s.alloc_zeros::<u32>(4).unwrap();
    let mut wt = s.alloc_zeros::<f32>(4).unwrap();
    let e = hga::kernels::moe::hga_moe_router(gpu, &x, &w, &mut l, &mut c, &mut ids, &mut wt, &d, RouterForm::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiples of 128"), "{e}");
    let d = MoeDims { hidden: 128, top_k: 5, ..d };
    let e = hga::kernels::moe::hga_moe_router(gpu, &x, &w, &mut l, &mut c, &mut ids, &mut wt, &d, RouterForm::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("top_k = 5"), "{e}");
    let d = MoeDims { top_k: 2, ..d };
    let e = hga::kernels::moe::hga_moe_router(gpu, &x, &w, &mut l, &mut c, &mut ids, &mut wt, &d, RouterForm::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("moe router x: 200 elements, expected 256"), "{e}");
    // The decode path refuses more tokens than its workspace holds.
    let w = hga::kernels::moe::MoeExpertWeights::upload(gpu, &cm::random_experts(&d, &mut StdRng::seed_from_u64(1)))
        .unwrap();
    let mut ws = hga::kernels::moe::MoeWorkspace::new(gpu, &d, 1, false).unwrap();
    let x = s.alloc_zeros::<half::bf16>(256).unwrap();
    let w_r = s.alloc_zeros::<half::bf16>(512).unwrap();
    let mut out = s.alloc_zeros::<half::bf16>(256).unwrap();
    let e = hga::kernels::moe::moe_decode(gpu, &x, &w_r, &w, &mut ws, &mut out, &d, RouterForm::Auto)
        .unwrap_err()
        .to_string();
    assert!(e.contains("moe workspace holds 1 tokens, 2 asked"), "{e}");
}
