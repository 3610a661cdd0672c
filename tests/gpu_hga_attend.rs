//! GPU property tests of the routed-attention kernels (`hga_attend_decode_s{2,3}`, `hga_attend_prefill`, merged by
//! `hga_attention_merge_v2`) against the f64 reference over the gathered tokens (`check::hga_attend`): random
//! GQA shapes, lists of 1 entry, prime entry counts, lists shorter than `max_entries` (the spare entries point at
//! NaN slots), the open group partially filled (its rows past the last position NaN), positions at group
//! boundaries (15, 16, 17, 63, 64, ...), prefill blocks of 1, 17 and 64 tokens; exactness (every group in order)
//! against the dense GPU decode on the same K/V; NaN / Inf in q and NaN in K of a seen or an unseen row.
//! Without a CUDA device: one SKIP line per test.
mod common;
use common::gpu;
use std::io::Write;

use hga::check::hga_attend::{routed, Poison, RoutedCase, RoutedPath};
use hga::check::Outcome;
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn cases(default: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn assert_ok(o: Outcome) -> Result<(), TestCaseError> {
    prop_assert!(o.ok, "{} {}: {} (rel {:.2e})", o.kernel, o.shape, o.detail, o.rel_err);
    let _ = writeln!(std::io::stderr(), "ok {} {} rel {:.2e}", o.kernel, o.shape, o.rel_err);
    Ok(())
}

fn heads() -> impl Strategy<Value = (usize, usize)> {
    prop::sample::select(vec![(1usize, 1usize), (2, 1), (8, 1), (16, 2), (32, 4), (6, 3), (12, 4), (40, 2)])
}

/// Positions: 0, group and chunk boundaries +-1, and anything up to a few thousand.
fn position() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        prop::sample::select(vec![1, 15, 16, 17, 31, 32, 63, 64, 65, 255, 256, 1023, 1024, 2047]),
        0usize..4100,
    ]
}

/// Entries per list: 1, primes, and random (clamped by the case to what the context has).
fn entries() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), prop::sample::select(vec![2, 3, 5, 7, 13, 31, 37, 61, 127, 131]), 1usize..300]
}

fn poison() -> impl Strategy<Value = Poison> {
    prop_oneof![
        6 => Just(Poison::None),
        1 => Just(Poison::QNan),
        1 => Just(Poison::QInf),
        1 => Just(Poison::KSeen),
        1 => Just(Poison::KUnseen),
    ]
}

#[test]
fn gpu_hga_attend_decode_matches_reference() {
    let Some(gpu) = gpu("gpu_hga_attend_decode_matches_reference") else { return };
    let tokens = prop_oneof![4 => Just(1usize), 1 => 2usize..=4];
    let spare = prop_oneof![Just(0usize), 1usize..40];
    proptest!(cases(40), |(seed in any::<u64>(), tokens in tokens, h in heads(), pos in position(), n in entries(),
                           spare in spare, poison in poison())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let c = RoutedCase { path: RoutedPath::Decode, tokens, n_heads: h.0, n_kv_heads: h.1, pos, entries: Some(n),
                             spare, poison };
        assert_ok(routed(gpu, c, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_hga_attend_prefill_matches_reference() {
    let Some(gpu) = gpu("gpu_hga_attend_prefill_matches_reference") else { return };
    let tokens = prop_oneof![Just(1usize), Just(17), Just(64), 1usize..=64];
    let spare = prop_oneof![Just(0usize), 1usize..40];
    proptest!(cases(32), |(seed in any::<u64>(), tokens in tokens, h in heads(), pos in position(), n in entries(),
                           spare in spare, poison in poison())| {
        let mut rng = StdRng::seed_from_u64(seed);
        let c = RoutedCase { path: RoutedPath::Prefill, tokens, n_heads: h.0, n_kv_heads: h.1, pos, entries: Some(n),
                             spare, poison };
        assert_ok(routed(gpu, c, &mut rng).unwrap())?;
    });
}

/// Every group in position order: the routed decode equals the dense decode on the same K/V (rel-L2 <= 1e-3),
/// NaN in the same places.
#[test]
fn gpu_hga_attend_decode_exact_against_dense() {
    let Some(gpu) = gpu("gpu_hga_attend_decode_exact_against_dense") else { return };
    let tokens = prop_oneof![4 => Just(1usize), 1 => 2usize..=4];
    let pos = prop_oneof![Just(0usize), prop::sample::select(vec![15, 16, 63, 64, 4095, 8191]), 0usize..9000];
    let poison = prop_oneof![4 => Just(Poison::None), 1 => Just(Poison::QNan), 1 => Just(Poison::KSeen)];
    proptest!(cases(24), |(seed in any::<u64>(), tokens in tokens, h in heads(), pos in pos, spare in 0usize..9,
                           poison in poison)| {
        let mut rng = StdRng::seed_from_u64(seed);
        let c = RoutedCase { path: RoutedPath::Decode, tokens, n_heads: h.0, n_kv_heads: h.1, pos, entries: None,
                             spare, poison };
        assert_ok(routed(gpu, c, &mut rng).unwrap())?;
    });
}

/// The fixed cases of `hga selfcheck`.
#[test]
fn gpu_hga_attend_selfcheck_rows() {
    let Some(gpu) = gpu("gpu_hga_attend_selfcheck_rows") else { return };
    let mut rng = StdRng::seed_from_u64(12);
    for o in hga::check::hga_attend::selfcheck_rows(gpu, &mut rng).unwrap() {
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
        eprintln!("ok {} {} rel {:.2e}", o.kernel, o.shape, o.rel_err);
    }
}
