//! Unit tests of the CPU forward on in-memory random weights (the checkpoint round trip is tested in
//! tests/forward_*.rs of the root package).
use super::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Deterministic uniform values in [-1, 1) (SplitMix64).
fn uniform(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn random_weights(c: &Qwen3MoeConfig, seed: u64) -> HashMap<String, Vec<f32>> {
    tensor_shapes(c)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let u = uniform(seed * 1000 + i as u64, n);
            let v = if name.ends_with("norm.weight") {
                u.iter().map(|x| 1.0 + 0.2 * x).collect()
            } else if name.contains("embed_tokens") {
                u
            } else {
                // ~ fan-in scaled so that activations stay O(1).
                let k = *shape.last().unwrap() as f32;
                u.iter().map(|x| x * 1.7 / k.sqrt()).collect()
            };
            (name, v)
        })
        .collect()
}

fn model(c: &Qwen3MoeConfig, mode: ActivationMode, seed: u64) -> CpuModel {
    let w = random_weights(c, seed);
    CpuModel::from_tensors(c.clone(), mode, |n| {
        w.get(n).cloned().ok_or_else(|| ForwardError::Load { name: n.into(), msg: "absent".into() })
    })
    .unwrap()
}

/// head_dim 128, GQA 8:2, layers dense / MoE / dense / MoE (mlp_only_layers), 8 experts top-2.
fn mixed() -> Qwen3MoeConfig {
    let mut c = Qwen3MoeConfig::preset("tiny").unwrap();
    c.vocab_size = 96;
    c.hidden_size = 256;
    c.intermediate_size = 320;
    c.moe_intermediate_size = 128;
    c.num_hidden_layers = 4;
    c.num_attention_heads = 8;
    c.num_key_value_heads = 2;
    c.head_dim = 128;
    c.num_experts = 8;
    c.num_experts_per_tok = 2;
    c.mlp_only_layers = vec![0, 2];
    c.rope_theta = 1e6;
    c
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

const TOKENS: [u32; 7] = [1, 17, 5, 42, 42, 9, 63];

fn check_prefill_equals_decode(c: &Qwen3MoeConfig, mode: ActivationMode) {
    let m = model(c, mode, 7);
    let mut cache = m.new_cache();
    let full = m.prefill(&TOKENS, &mut cache).unwrap();
    assert_eq!(cache.len(), TOKENS.len());
    assert_eq!((full.tokens, full.vocab), (TOKENS.len(), c.vocab_size));
    let mut cache2 = m.new_cache();
    for (i, &t) in TOKENS.iter().enumerate() {
        let row = m.decode(t, &mut cache2).unwrap();
        assert_eq!(row.as_slice(), full.row(i), "{mode} token {i}: decode differs from prefill");
    }
    // Chunked prefill (3 + 4) too.
    let mut cache3 = m.new_cache();
    let a = m.prefill(&TOKENS[..3], &mut cache3).unwrap();
    let b = m.prefill(&TOKENS[3..], &mut cache3).unwrap();
    assert_eq!([a.data, b.data].concat(), full.data);
    // The logits are not degenerate.
    assert!(full.data.iter().all(|v| v.is_finite()));
    let spread = full.row(0).iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.1, "logits are all ~0: {spread}");
}

#[test]
fn tiny_prefill_equals_decode_f32_and_fp8() {
    let c = Qwen3MoeConfig::preset("tiny").unwrap();
    check_prefill_equals_decode(&c, ActivationMode::F32);
    check_prefill_equals_decode(&c, ActivationMode::Fp8);
}

#[test]
fn mixed_dense_moe_gqa_hd128_prefill_equals_decode() {
    let c = mixed();
    assert_eq!((0..4).map(|l| c.is_moe_layer(l)).collect::<Vec<_>>(), [false, true, false, true]);
    check_prefill_equals_decode(&c, ActivationMode::F32);
    check_prefill_equals_decode(&c, ActivationMode::Fp8);
}

#[test]
fn tied_embeddings_need_no_lm_head() {
    let mut c = Qwen3MoeConfig::preset("tiny").unwrap();
    c.tie_word_embeddings = true;
    assert!(tensor_shapes(&c).iter().all(|(n, _)| n != "lm_head.weight"));
    check_prefill_equals_decode(&c, ActivationMode::F32);
}

#[test]
fn fp8_mode_is_close_to_f32_but_not_equal() {
    let c = mixed();
    let mut m = model(&c, ActivationMode::F32, 3);
    let f = m.prefill(&TOKENS, &mut m.new_cache()).unwrap();
    m.set_activation_mode(ActivationMode::Fp8);
    let q = m.prefill(&TOKENS, &mut m.new_cache()).unwrap();
    let e = rel_l2(&q.data, &f.data);
    assert!(e > 1e-5 && e < 0.1, "rel L2 fp8 vs f32 = {e}");
}

#[test]
fn bf16_checkpoint_has_no_fp8_linears() {
    // Without quantization_config no linear is FP8, so Fp8 mode equals F32 mode.
    let mut c = Qwen3MoeConfig::preset("tiny").unwrap();
    c.quantization = None;
    let mut m = model(&c, ActivationMode::F32, 5);
    let f = m.prefill(&TOKENS, &mut m.new_cache()).unwrap();
    m.set_activation_mode(ActivationMode::Fp8);
    assert_eq!(m.prefill(&TOKENS, &mut m.new_cache()).unwrap(), f);
}

#[test]
fn attention_policy_hook_is_called_per_layer() {
    struct Counting(AtomicUsize);
    impl AttentionPolicy for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn attend(&self, layer: usize, s: &AttentionShape, start: usize, q: &[f32], kv: &LayerKv) -> Vec<f32> {
            self.0.fetch_add(1, Ordering::Relaxed);
            assert_eq!(kv.k.len(), (start + q.len() / (s.num_heads * s.head_dim)) * s.num_kv_heads * s.head_dim);
            DenseAttention.attend(layer, s, start, q, kv)
        }
    }
    let c = Qwen3MoeConfig::preset("tiny").unwrap();
    let dense = model(&c, ActivationMode::F32, 1);
    let want = dense.prefill(&TOKENS, &mut dense.new_cache()).unwrap();
    let counting = Box::leak(Box::new(Counting(AtomicUsize::new(0))));
    struct Ref(&'static Counting);
    impl AttentionPolicy for Ref {
        fn name(&self) -> &str {
            self.0.name()
        }
        fn attend(&self, l: usize, s: &AttentionShape, st: usize, q: &[f32], kv: &LayerKv) -> Vec<f32> {
            self.0.attend(l, s, st, q, kv)
        }
    }
    let m = model(&c, ActivationMode::F32, 1).with_attention_policy(Box::new(Ref(counting)));
    assert!(format!("{m:?}").contains("counting"));
    assert_eq!(m.prefill(&TOKENS, &mut m.new_cache()).unwrap(), want);
    assert_eq!(counting.0.load(Ordering::Relaxed), c.num_hidden_layers);
}

#[test]
fn trace_reports_every_stage_with_its_width() {
    let c = mixed();
    let m = model(&c, ActivationMode::F32, 2);
    let mut seen: Vec<(Tap, Option<usize>, usize)> = Vec::new();
    let mut last_hidden = Vec::new();
    let logits = m
        .prefill_traced(&TOKENS, &mut m.new_cache(), &mut |p, l, v| {
            seen.push((p, l, v.len() / TOKENS.len()));
            if p == Tap::FinalNorm {
                last_hidden = v.to_vec();
            }
        })
        .unwrap();
    assert_eq!(logits, m.prefill(&TOKENS, &mut m.new_cache()).unwrap());
    assert_eq!(seen[0], (Tap::Embed, None, 256));
    assert_eq!(*seen.last().unwrap(), (Tap::FinalNorm, None, 256));
    let layer1: Vec<(Tap, usize)> = seen.iter().filter(|s| s.1 == Some(1)).map(|s| (s.0, s.2)).collect();
    use Tap::*;
    assert_eq!(
        layer1,
        [
            (AttnNorm, 256),
            (Q, 1024),
            (K, 256),
            (V, 256),
            (Attn, 1024),
            (AttnOut, 256),
            (MlpNorm, 256),
            (RouterLogits, 8),
            (MlpOut, 256),
            (Hidden, 256)
        ]
    );
    // Layer 0 is dense: no router.
    assert!(!seen.iter().any(|s| s.0 == RouterLogits && s.1 == Some(0)));
    assert_eq!(last_hidden.len(), TOKENS.len() * 256);
}

#[test]
fn first_token_attends_to_itself_only() {
    // With one position, attention returns that position's V (query head h reads KV head h / 2).
    let s = AttentionShape { num_heads: 4, num_kv_heads: 2, head_dim: 48, scale: 0.1 };
    let q = uniform(1, 4 * 48);
    let kv = LayerKv { k: uniform(2, 2 * 48), v: uniform(3, 2 * 48) };
    let o = DenseAttention.attend(0, &s, 0, &q, &kv);
    assert_eq!(&o[..48], &kv.v[..48]);
    assert_eq!(&o[48..96], &kv.v[..48]);
    assert_eq!(&o[96..144], &kv.v[48..]);
    assert_eq!(&o[144..], &kv.v[48..]);
}

#[test]
fn errors_are_clear() {
    let c = Qwen3MoeConfig::preset("tiny").unwrap();
    let m = model(&c, ActivationMode::F32, 1);
    let e = m.prefill(&[1, 320], &mut m.new_cache()).unwrap_err();
    assert_eq!(e.to_string(), "token id 320 at index 1 is out of range (vocab_size 320)");
    assert!(matches!(m.prefill(&[], &mut m.new_cache()), Err(ForwardError::Empty)));
    let mut other = KvCache::new(&mixed());
    assert!(matches!(m.prefill(&[1], &mut other), Err(ForwardError::CacheMismatch(_))));
    // A wrongly sized tensor names itself.
    let mut w = random_weights(&c, 1);
    w.get_mut("model.layers.1.self_attn.k_proj.weight").unwrap().pop();
    let e = CpuModel::from_tensors(c, ActivationMode::F32, |n| Ok(w[n].clone())).unwrap_err();
    assert!(e.to_string().contains("model.layers.1.self_attn.k_proj.weight"), "{e}");
}

/// Writes unquantized (f32) checkpoints of random weights, `tiny` and the mixed config, plus our logits of
/// `TOKENS`, to `$HGA_PARITY_DUMP/{tiny,mixed}` and `{tiny,mixed}.logits.safetensors`, for tools/parity/parity.py
/// (a parity check that does not go through the FP8 generator):
/// `HGA_PARITY_DUMP=/tmp/d cargo test -p hga-host --lib dump_for_parity -- --ignored`.
#[test]
#[ignore = "writes files for tools/parity; run with HGA_PARITY_DUMP=DIR"]
fn dump_for_parity() {
    let dir = std::path::PathBuf::from(std::env::var("HGA_PARITY_DUMP").unwrap());
    for (name, c) in [("tiny", Qwen3MoeConfig::preset("tiny").unwrap()), ("mixed", mixed())] {
        let mut c = c;
        c.quantization = None;
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), c.to_json().to_string()).unwrap();
        let w = random_weights(&c, 11);
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensor_shapes(&c)
            .into_iter()
            .map(|(n, s)| (n.clone(), w[&n].iter().flat_map(|v| v.to_le_bytes()).collect(), s))
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(n, b, s)| {
                (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
            })
            .collect();
        safetensors::tensor::serialize_to_file(views, &None, &d.join("model.safetensors")).unwrap();
        let m = model(&c, ActivationMode::F32, 11);
        let l = m.prefill(&TOKENS, &mut m.new_cache()).unwrap();
        let lb: Vec<u8> = l.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tb: Vec<u8> = TOKENS.iter().flat_map(|t| (*t as i64).to_le_bytes()).collect();
        let views = vec![
            (
                "logits",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![l.tokens, l.vocab], &lb).unwrap(),
            ),
            ("tokens", safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![TOKENS.len()], &tb).unwrap()),
        ];
        safetensors::tensor::serialize_to_file(views, &None, &dir.join(format!("{name}.logits.safetensors"))).unwrap();
    }
}
