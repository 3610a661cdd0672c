//! GPU property tests of the head family (embedding gather, lm_head GEMV, argmax, sampling) against the CPU
//! references, plus a CPU-only check of the sampling rule's distribution. Without a CUDA device each GPU test
//! prints one SKIP line and returns.
mod common;
use common::{cases, gpu};

use hga::check::{self, Outcome};
use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

fn assert_ok(o: Outcome) -> Result<(), TestCaseError> {
    prop_assert!(o.ok, "{} {}: {} (rel {:.3e})", o.kernel, o.shape, o.detail, o.rel_err);
    Ok(())
}

fn vocab_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        prop::sample::select(vec![2, 3, 7, 8, 9, 1023, 1024, 1025, 4096, 4097, 32000]),
        1usize..20000,
    ]
}

#[test]
fn gpu_embed_gather_matches_reference() {
    let Some(gpu) = gpu("gpu_embed_gather_matches_reference") else { return };
    let hidden_s = prop_oneof![Just(1usize), prop::sample::select(vec![7, 8, 9, 64, 2047, 2048]), 1usize..600];
    proptest!(cases(), |(seed in any::<u64>(), rows in 1usize..40, vocab in 1usize..3000, hidden in hidden_s)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::head::embed_gather(gpu, rows, vocab, hidden, &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_lm_head_matches_reference() {
    let Some(gpu) = gpu("gpu_lm_head_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), m in 1usize..=16, vocab in vocab_strategy(), hb in 1usize..=64)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::head::lm_head(gpu, m, vocab.min(6000), 32 * hb, &mut rng).unwrap())?;
    });
    let mut rng = StdRng::seed_from_u64(5);
    for (m, v, h) in [(1, 151936, 512), (4, 20011, 2048), (16, 1000, 2048)] {
        let o = check::head::lm_head(gpu, m, v, h, &mut rng).unwrap();
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
        eprintln!("{} {} rel {:.2e}", o.kernel, o.shape, o.rel_err);
    }
}

#[test]
fn gpu_argmax_matches_reference() {
    let Some(gpu) = gpu("gpu_argmax_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), rows in 1usize..20, vocab in vocab_strategy())| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::head::argmax(gpu, rows, vocab, &mut rng).unwrap())?;
    });
    let mut rng = StdRng::seed_from_u64(6);
    assert_ok(check::head::argmax(gpu, 4, 151936, &mut rng).unwrap()).unwrap();
}

#[test]
fn gpu_sample_matches_reference() {
    let Some(gpu) = gpu("gpu_sample_matches_reference") else { return };
    proptest!(cases(), |(seed in any::<u64>(), rows in 1usize..20, vocab in vocab_strategy())| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(check::head::sample(gpu, rows, vocab, &mut rng).unwrap())?;
    });
    let mut rng = StdRng::seed_from_u64(8);
    for _ in 0..4 {
        assert_ok(check::head::sample(gpu, 3, 151936, &mut rng).unwrap()).unwrap();
    }
}

/// Logits whose top-p boundaries are far from 0.7 (cumulative mass 0.604 | 0.742 at T = 1).
const DIST_LOGITS: [f32; 8] = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.7, 1.5];

#[test]
fn gpu_sample_distribution() {
    let Some(gpu) = gpu("gpu_sample_distribution") else { return };
    for (t, p) in [(1.0, 1.0), (1.0, 0.7), (0.5, 1.0), (2.0, 1.0)] {
        let o = check::head::sample_distribution(gpu, &DIST_LOGITS, t, p, 20000).unwrap();
        assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
        eprintln!("{} {}: worst |freq - p| {:.4}", o.kernel, o.shape, o.rel_err);
    }
}

/// The reference rule alone (no GPU): frequencies of 40000 draws match softmax(l / T) restricted to the top-p set.
#[test]
fn reference_sample_distribution() {
    use gpu_kernels::sample::uniform_u32;
    use hga::reference::head::sample_row;
    for (t, top_p, expect) in [
        (1.0f32, 1.0f32, vec![0.3757, 0.1382, 0.0838, 0.0508, 0.0187, 0.0025, 0.1024, 0.2279]),
        (1.0, 0.7, vec![0.5065, 0.1863, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3072]),
    ] {
        let n = 40000;
        let mut count = [0usize; 8];
        for s in 0..n {
            count[sample_row(&DIST_LOGITS, t, top_p, uniform_u32(99, s)) as usize] += 1;
        }
        for i in 0..8 {
            let f = count[i] as f64 / n as f64;
            assert!((f - expect[i]).abs() < 0.012, "T={t} top_p={top_p} token {i}: {f} vs {}", expect[i]);
        }
    }
    // Ties at the maximum and greedy-like temperatures never pick a lower logit.
    let l = [1.0f32, 5.0, 5.0, 2.0];
    for s in 0..1000 {
        let tok = sample_row(&l, 0.01, 1.0, uniform_u32(3, s));
        assert!(tok == 1 || tok == 2, "{tok}");
    }
}
