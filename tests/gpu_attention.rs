//! GPU property tests of the dense attention kernels against the f64 CPU reference: prefill (FlashAttention-2 style)
//! and split-K decode + LSE merge. Random shapes: query tokens 1, primes, the tile size 64 +-1 and 128 +-1;
//! contexts from 1 to a few thousand (chunked prefill: a random number of earlier tokens already in the cache);
//! GQA ratios 1, 2, 8 (and others); random split limits for decode. Outputs, LSE, decode partials and the cache
//! past the context are poisoned. Pass: rel-L2 <= 1e-2, |LSE error| <= 1e-3. Decode runs the decode kernel (the
//! 3-stage ring) and the merge; the device-start cases also check the merge's fused FP8 quantization bit for bit
//! against `hga_fp8_quant` of the bf16 output.
//! Without a CUDA device: one SKIP line per test.
mod common;
use common::gpu;
use std::io::Write;

use hga::check::attention::{attention, Path};
use hga::check::Outcome;
use hga::kernels::AttentionShape;
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

/// (n_heads, n_kv_heads): GQA ratios 1, 2, 8 and a few others.
fn heads() -> impl Strategy<Value = (usize, usize)> {
    prop::sample::select(vec![(1usize, 1usize), (2, 2), (4, 2), (2, 1), (8, 1), (16, 2), (32, 4), (6, 3), (12, 4)])
}

fn shape(tokens: usize, (n_heads, n_kv_heads): (usize, usize), start: usize) -> AttentionShape {
    AttentionShape { tokens, n_heads, n_kv_heads, capacity: start + tokens, start }
}

#[test]
fn gpu_attention_prefill_matches_reference() {
    let Some(gpu) = gpu("gpu_attention_prefill_matches_reference") else { return };
    let tokens = prop_oneof![
        Just(1usize),
        prop::sample::select(vec![2, 3, 13, 31, 63, 64, 65, 127, 128, 129, 191, 257]),
        1usize..700,
    ];
    let start = prop_oneof![Just(0usize), prop::sample::select(vec![1, 63, 64, 65, 1000]), 0usize..2500];
    proptest!(cases(24), |(seed in any::<u64>(), tokens in tokens, h in heads(), start in start)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(attention(gpu, Path::Prefill, shape(tokens, h, start), &mut rng).unwrap())?;
    });
}

#[test]
fn gpu_attention_decode_matches_reference() {
    let Some(gpu) = gpu("gpu_attention_decode_matches_reference") else { return };
    let tokens = prop_oneof![Just(1usize), 1usize..=8];
    let start = prop_oneof![Just(0usize), prop::sample::select(vec![1, 2, 62, 63, 64, 127, 128, 4095]), 0usize..4100,];
    proptest!(cases(32), |(seed in any::<u64>(), tokens in tokens, h in heads(), start in start)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(attention(gpu, Path::Decode, shape(tokens, h, start), &mut rng).unwrap())?;
    });
}

/// The decode launch of a recorded step: start read from the device, splits sized for a larger context bound
/// (the trailing ones empty); the cache past the real context is NaN, so a read beyond it fails the case. The
/// merge's fused FP8 quantization must equal `hga_fp8_quant` of the output bit for bit.
#[test]
fn gpu_attention_decode_device_start_matches_reference() {
    let Some(gpu) = gpu("gpu_attention_decode_device_start_matches_reference") else { return };
    let tokens = prop_oneof![Just(1usize), 1usize..=8];
    let start = prop_oneof![Just(0usize), prop::sample::select(vec![1, 63, 64, 1023, 1024]), 0usize..4100];
    proptest!(cases(24), |(seed in any::<u64>(), tokens in tokens, h in heads(), start in start)| {
        let mut rng = StdRng::seed_from_u64(seed);
        assert_ok(attention(gpu, Path::DecodeUpTo, shape(tokens, h, start), &mut rng).unwrap())?;
    });
}

/// The model's decode step shape (Qwen3: 32 query heads, 4 KV heads, one token) at fixed contexts, including the
/// tile and ring boundaries (63..65 keys; 127..129: 2 tiles = the 3-stage ring's prologue; 191..193) and a context
/// long enough to wrap the ring many times per split: reference and fused FP8 quantization.
#[test]
fn gpu_attention_decode_qwen3_step_fused_fp8() {
    let Some(gpu) = gpu("gpu_attention_decode_qwen3_step_fused_fp8") else { return };
    let mut rng = StdRng::seed_from_u64(0x5eed_a77e);
    for start in [0usize, 62, 63, 64, 126, 127, 128, 190, 191, 192, 319, 320, 1500, 6000] {
        let o = attention(gpu, Path::DecodeUpTo, shape(1, (32, 4), start), &mut rng).unwrap();
        assert_ok(o).unwrap();
    }
}

#[test]
fn gpu_attention_rejects_bad_shapes() {
    let Some(gpu) = gpu("gpu_attention_rejects_bad_shapes") else { return };
    let s = gpu.stream();
    let q = s.alloc_zeros::<half::bf16>(3 * 128).unwrap();
    let kv = s.alloc_zeros::<half::bf16>(2 * 10 * 128).unwrap();
    let mut out = s.alloc_zeros::<half::bf16>(3 * 128).unwrap();
    let mut lse = s.alloc_zeros::<f32>(3).unwrap();
    let bad = AttentionShape { tokens: 1, n_heads: 3, n_kv_heads: 2, capacity: 10, start: 0 };
    let e = hga::kernels::hga_attention_prefill(gpu, &q, &kv, &kv, &mut out, &mut lse, &bad).unwrap_err().to_string();
    assert!(e.contains("multiple of n_kv_heads"), "{e}");
    let over = AttentionShape { tokens: 3, n_heads: 1, n_kv_heads: 1, capacity: 10, start: 8 };
    let e = hga::kernels::hga_attention_prefill(gpu, &q, &kv, &kv, &mut out, &mut lse, &over).unwrap_err().to_string();
    assert!(e.contains("exceeds the cache capacity"), "{e}");
}
