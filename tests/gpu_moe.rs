//! GPU property tests of the MoE kernels (router in both forms, grouping, the decode and the grouped expert
//! paths) against the CPU reference, over random shapes (see `hga::check::moe` for what is compared), plus the
//! Qwen3-30B-A3B shape (hidden 2048, 128 experts, top-8, intermediate 768) at T = 1 and T = 4. The decode path
//! runs version 3 (`moe_decode`); versions 1 and 2 keep their own tests. Version 4 (`hga_moe_decode_v4`, one
//! persistent launch, T <= 4) is checked against the reference and, bit for bit, against version 3, over repeated
//! launches and graph replays (its flags must reset themselves).
//!
//! Without a CUDA device each test prints one `SKIP` line and returns.
mod common;
use common::{cases, gpu};
use std::io::Write;

use hga::check::moe::{self as cm, MoePath};
use hga::check::Outcome;
use hga::kernels::moe::{RouterForm, V4Launch};
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
                         norm in any::<bool>(), f in 0usize..3)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: 128, experts: e, top_k: k.min(e), norm_topk: norm };
        let form = [RouterForm::SplitK, RouterForm::Batch, RouterForm::Rows][f];
        assert_ok(cm::router(gpu, &d, form, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_moe_router_qwen3_shape() {
    let Some(gpu) = gpu("gpu_moe_router_qwen3_shape") else { return };
    let mut rng = StdRng::seed_from_u64(11);
    for t in [1usize, 4, 17, 1000] {
        for form in [RouterForm::Batch, RouterForm::SplitK, RouterForm::Rows, RouterForm::Auto] {
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

/// Version 2 of the decode expert kernels (with the split-K router; kept for comparison in bench_moe) stays
/// correct too.
#[test]
fn gpu_moe_decode_v2_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_decode_v2_matches_reference") else { return };
    let t = prop_oneof![Just(1usize), prop::sample::select(vec![2usize, 3, 4, 5, 7, 8, 13, 17])];
    proptest!(cases(), |(seed in any::<u64>(), t in t, (h, i, e, k, n) in small_dims())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: n };
        assert_ok(cm::moe(gpu, &d, MoePath::DecodeV2, &mut rng).unwrap())?;
    });
}

/// Version 1 of the decode expert kernels (kept for comparison in bench_moe) stays correct too.
#[test]
fn gpu_moe_decode_v1_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_decode_v1_matches_reference") else { return };
    let t = prop_oneof![Just(1usize), prop::sample::select(vec![2usize, 3, 4, 5, 7, 8, 13, 17])];
    proptest!(cases(), |(seed in any::<u64>(), t in t, (h, i, e, k, n) in small_dims())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: n };
        assert_ok(cm::moe(gpu, &d, MoePath::DecodeV1, &mut rng).unwrap())?;
    });
}

/// The decode path at top-k 9..=32 (the launchers allow up to `MOE_MAX_TOPK`; an odd number of (slot, k block)
/// units pairs the last one with zeros in version 2's down kernel; version 3's down kernel gives a warp fewer
/// units) and at larger hidden / inter, on all three versions.
#[test]
fn gpu_moe_decode_wide_topk() {
    let Some(gpu) = gpu("gpu_moe_decode_wide_topk") else { return };
    let dims = (
        prop::sample::select(vec![128usize, 640, 2048]),
        prop::sample::select(vec![128usize, 384, 768, 1152]),
        prop::sample::select(vec![32usize, 33]),
        9usize..=32,
    );
    proptest!(cases(), |(seed in any::<u64>(), t in 1usize..=5, (h, i, e, k) in dims, v in 0usize..3)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: true };
        let path = [MoePath::Decode, MoePath::DecodeV2, MoePath::DecodeV1][v];
        assert_ok(cm::moe(gpu, &d, path, &mut rng).unwrap())?;
    });
}

/// Version 4 (one persistent launch) against the reference: T = 1..=4, small random shapes, and top-k up to 32 at
/// larger hidden / inter.
#[test]
fn gpu_moe_decode_v4_matches_reference() {
    let Some(gpu) = gpu("gpu_moe_decode_v4_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), t in 1usize..=4, (h, i, e, k, n) in small_dims())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: n };
        assert_ok(cm::moe(gpu, &d, MoePath::DecodeV4, &mut rng).unwrap())?;
    });
    let dims = (
        prop::sample::select(vec![128usize, 640, 2048]),
        prop::sample::select(vec![128usize, 384, 768, 1152]),
        prop::sample::select(vec![32usize, 33, 256]),
        9usize..=32,
    );
    proptest!(cases(), |(seed in any::<u64>(), t in 1usize..=4, (h, i, e, k) in dims)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = MoeDims { tokens: t, hidden: h, inter: i, experts: e, top_k: k, norm_topk: true };
        assert_ok(cm::moe(gpu, &d, MoePath::DecodeV4, &mut rng).unwrap())?;
    });
}

/// Version 4 gives version 3's output, ids and weights bit for bit, over 3 back-to-back launches and 3 graph
/// replays with the scratch poisoned in between (the flag reset), cooperative and plain launches; random shapes
/// (exact-tie router rows included) and the Qwen3 shape at T = 1 and 4.
#[test]
fn gpu_moe_decode_v4_bit_identical_to_v3() {
    let Some(gpu) = gpu("gpu_moe_decode_v4_bit_identical_to_v3") else { return };
    let mut rng = StdRng::seed_from_u64(41);
    for t in [1usize, 4] {
        let d = MoeDims::qwen3_30b_a3b(t);
        let inp = cm::random_inputs(&d, &mut rng);
        for how in [V4Launch::Cooperative, V4Launch::Plain] {
            assert_ok(cm::v4_matches_v3(gpu, &d, &inp, how, 3).unwrap()).unwrap();
        }
    }
    proptest!(cases(), |(seed in any::<u64>(), t in 1usize..=4, dims in small_dims(), dups in any::<bool>())| {
        let (d, inp, _) = random_case(seed, t, dims, dups);
        assert_ok(cm::v4_matches_v3(gpu, &d, &inp, V4Launch::Cooperative, 2).unwrap())?;
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
        for path in [MoePath::Decode, MoePath::DecodeV4, MoePath::DecodeV2, MoePath::DecodeV1, MoePath::Grouped] {
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
    // Version 4 takes 1..=4 tokens.
    let d = hga::reference::moe::MoeDims::qwen3_30b_a3b(5);
    let w = hga::kernels::moe::MoeExpertWeights::upload(
        gpu,
        &cm::random_experts(&MoeDims { experts: 2, ..d }, &mut StdRng::seed_from_u64(1)),
    )
    .unwrap();
    let d = MoeDims { experts: 2, top_k: 2, ..d };
    let mut ws = hga::kernels::moe::MoeWorkspace::new(gpu, &d, 5, false).unwrap();
    let x = s.alloc_zeros::<half::bf16>(5 * 2048).unwrap();
    let rw = s.alloc_zeros::<half::bf16>(2 * 2048).unwrap();
    let mut out = s.alloc_zeros::<half::bf16>(5 * 2048).unwrap();
    let e = hga::kernels::moe::moe_decode_v4(gpu, &x, &rw, &w, &mut ws, &mut out, &d).unwrap_err().to_string();
    assert!(e.contains("tokens = 5 must be in 1..=4"), "{e}");
}
