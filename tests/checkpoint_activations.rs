//! The generator's weights make a forward pass meaningful: through the CPU reference forward, activations neither
//! vanish nor explode with depth, the router differentiates experts, and the logits are spread and token-dependent.
use std::collections::{BTreeMap, BTreeSet};

use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::forward::{ActivationMode, CpuModel, Tap};
use hga::model::generate::{write_checkpoint, WriteOptions};

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

struct Stats {
    hidden: Vec<f64>,
    attn_out: Vec<f64>,
    mlp_out: Vec<f64>,
    router_std: Vec<f64>,
    topk_sets: BTreeMap<usize, BTreeSet<Vec<usize>>>,
    logits_std: f64,
    argmax: BTreeSet<usize>,
}

fn run(cfg: &Qwen3MoeConfig, tag: &str, tokens: &[u32]) -> Stats {
    let dir = std::env::temp_dir().join(format!("hga-ckact-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_checkpoint(&dir, cfg, 42, &WriteOptions::default()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let model = CpuModel::load(&ck, ActivationMode::F32).unwrap();
    let mut cache = model.new_cache();
    let (k, e) = (cfg.num_experts_per_tok, cfg.num_experts);
    let mut s = Stats {
        hidden: vec![],
        attn_out: vec![],
        mlp_out: vec![],
        router_std: vec![],
        topk_sets: BTreeMap::new(),
        logits_std: 0.0,
        argmax: BTreeSet::new(),
    };
    let logits = model
        .prefill_traced(tokens, &mut cache, &mut |tap, layer, v| match tap {
            Tap::Hidden => s.hidden.push(rms(v)),
            Tap::AttnOut => s.attn_out.push(rms(v)),
            Tap::MlpOut => s.mlp_out.push(rms(v)),
            Tap::RouterLogits => {
                let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
                s.router_std.push((v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt());
                for row in v.chunks_exact(e) {
                    let mut idx: Vec<usize> = (0..e).collect();
                    idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
                    let mut top = idx[..k].to_vec();
                    top.sort();
                    s.topk_sets.entry(layer.unwrap()).or_default().insert(top);
                }
            }
            _ => {}
        })
        .unwrap();
    let v = logits.vocab;
    for t in 0..logits.tokens {
        let row = logits.row(t);
        let mean = row.iter().map(|x| *x as f64).sum::<f64>() / v as f64;
        s.logits_std +=
            (row.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v as f64).sqrt() / logits.tokens as f64;
        s.argmax.insert((0..v).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap());
    }
    std::fs::remove_dir_all(&dir).unwrap();
    println!(
        "{tag}: hidden rms per layer {:?}\n  attn_out {:?}\n  mlp_out {:?}\n  router logit std {:?}\n  logits std {:.2}, {} distinct argmax over {} tokens, distinct top-k sets per MoE layer {:?}",
        s.hidden.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
        s.attn_out.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
        s.mlp_out.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
        s.router_std.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(),
        s.logits_std,
        s.argmax.len(),
        tokens.len(),
        s.topk_sets.values().map(BTreeSet::len).collect::<Vec<_>>()
    );
    s
}

fn check(s: &Stats, tokens: usize) {
    for (l, h) in s.hidden.iter().enumerate() {
        assert!((0.5..8.0).contains(h), "hidden rms {h} at layer {l}");
    }
    for x in s.attn_out.iter().chain(&s.mlp_out) {
        assert!(*x > 0.02 && *x < 4.0, "sublayer output rms {x}");
    }
    for r in &s.router_std {
        assert!((1.0..4.0).contains(r), "router logit std {r}");
    }
    for (l, sets) in &s.topk_sets {
        assert!(sets.len() > 1, "layer {l}: every token picks the same experts");
    }
    assert!((1.0..4.0).contains(&s.logits_std), "logits std {}", s.logits_std);
    assert!(s.argmax.len() * 2 >= tokens, "argmax too uniform: {} distinct of {tokens}", s.argmax.len());
}

#[test]
fn tiny_forward_is_meaningful() {
    let cfg = Qwen3MoeConfig::preset("tiny").unwrap();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % 320).collect();
    check(&run(&cfg, "tiny", &tokens), tokens.len());
}

/// The real model's depth (48 layers) and expert count (128, top 8) at a small width: the residual stays bounded.
#[test]
fn deep_forward_stays_bounded() {
    let mut cfg = Qwen3MoeConfig::preset("qwen3-30b-a3b").unwrap();
    cfg.vocab_size = 512;
    cfg.hidden_size = 256;
    cfg.num_attention_heads = 4;
    cfg.num_key_value_heads = 2;
    cfg.head_dim = 64;
    cfg.moe_intermediate_size = 64;
    cfg.num_experts = 32;
    cfg.num_experts_per_tok = 8;
    cfg.quantization.as_mut().unwrap().modules_to_not_convert = cfg.default_modules_to_not_convert();
    let tokens: Vec<u32> = (0..12).map(|i| (i * 97 + 3) % 512).collect();
    check(&run(&cfg, "deep48", &tokens), tokens.len());
}
