//! The whole GPU forward against the CPU reference forward in `fp8-bf16` activation mode (the FP8 kernels' arithmetic
//! with activations rounded to bf16 where the GPU stores them):
//! prefill and token-by-token decode, relative L2 error of the logits <= 1e-2 and top-1 agreement >= 99%, on the
//! `small` preset and a mixed dense/MoE config with GQA and head_dim 128. Without a CUDA device: a SKIP line.
use std::io::Write;
use std::path::PathBuf;

use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::forward::{ActivationMode, CpuModel};
use hga::model::generate::{write_checkpoint, WriteOptions};
use hga::model::gpu::GpuModel;

fn mixed() -> Qwen3MoeConfig {
    let mut c = Qwen3MoeConfig::preset("small").unwrap();
    c.vocab_size = 384;
    c.hidden_size = 256;
    c.intermediate_size = 384;
    c.moe_intermediate_size = 256;
    c.num_hidden_layers = 4;
    c.mlp_only_layers = vec![0, 2];
    c.num_attention_heads = 8;
    c.num_key_value_heads = 1;
    c.num_experts = 8;
    c.num_experts_per_tok = 2;
    let keep = c.default_modules_to_not_convert();
    if let Some(q) = c.quantization.as_mut() {
        q.modules_to_not_convert = keep;
    }
    c
}

fn written(tag: &str, c: &Qwen3MoeConfig) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hga-gpu-model-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_checkpoint(&dir, c, 11, &WriteOptions::default()).unwrap();
    dir
}

fn compare(what: &str, got: &[f32], want: &[f32], vocab: usize) -> (f64, f64) {
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b });
    let rows = want.len() / vocab;
    let agree = (0..rows)
        .filter(|&t| argmax(&got[t * vocab..(t + 1) * vocab]) == argmax(&want[t * vocab..(t + 1) * vocab]))
        .count();
    let rel = (num / den).sqrt();
    let top1 = agree as f64 / rows as f64;
    // Error by position (to tell a wrong kernel from rounding that grows along the sequence through the K/V).
    let by_pos: Vec<String> = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256]
        .iter()
        .filter(|&&t| t < rows)
        .map(|&t| {
            let (g, w) = (&got[t * vocab..(t + 1) * vocab], &want[t * vocab..(t + 1) * vocab]);
            let n: f64 = g.iter().zip(w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let d: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
            format!("{t}:{:.1e}", (n / d).sqrt())
        })
        .collect();
    let _ =
        writeln!(std::io::stderr(), "{what}: rel L2 {rel:.3e}, top-1 {agree}/{rows}; by position {}", by_pos.join(" "));
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
    (rel, top1)
}

fn check(tag: &str, c: &Qwen3MoeConfig, n: usize, decode: usize) {
    if hga::runtime::device_count() == 0 {
        let _ = writeln!(std::io::stderr(), "SKIP gpu_model {tag}: no CUDA device (GPU test not run)");
        return;
    }
    let dir = written(tag, c);
    let ck = Checkpoint::open(&dir).unwrap();
    let cpu = CpuModel::load(&ck, ActivationMode::Fp8Bf16).unwrap();
    let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % c.vocab_size as u32).collect();
    let want = cpu.prefill(&tokens, &mut cpu.new_cache()).unwrap().data;
    let gpu = hga::open_gpu(0).unwrap();
    let v = c.vocab_size;
    // Prefill in chunks of 64 (chunked prefill against the cache), all logits.
    let mut m = GpuModel::load(&gpu, &ck, n + 8, 64, |_, _| {}).unwrap();
    let got = m.forward(&tokens, true).unwrap();
    let (rel, top1) = compare(&format!("{tag} prefill"), &got, &want, v);
    assert!(rel <= 1e-2 && top1 >= 0.99, "{tag} prefill: rel L2 {rel:.3e}, top-1 {top1}");
    // Prefill all but the last `decode` tokens, then decode them one by one.
    m.reset();
    let split = n - decode;
    m.forward(&tokens[..split], false).unwrap();
    let mut got = Vec::new();
    for &t in &tokens[split..] {
        got.extend(m.forward(&[t], false).unwrap());
    }
    let (rel, top1) = compare(&format!("{tag} decode"), &got, &want[split * v..], v);
    assert!(rel <= 1e-2 && top1 >= 0.99, "{tag} decode: rel L2 {rel:.3e}, top-1 {top1}");
    // Errors are clear.
    let e = m.forward(&vec![1; n + 100], false).unwrap_err().to_string();
    assert!(e.contains("exceed the K/V cache capacity"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpu_model_mixed_dense_moe_matches_cpu_fp8() {
    check("mixed", &mixed(), 300, 40);
}

#[test]
fn gpu_model_small_matches_cpu_fp8() {
    check("small", &Qwen3MoeConfig::preset("small").unwrap(), 200, 24);
}

#[test]
fn gpu_model_refuses_unsupported_shapes() {
    if hga::runtime::device_count() == 0 {
        let _ = writeln!(std::io::stderr(), "SKIP gpu_model_refuses_unsupported_shapes: no CUDA device");
        return;
    }
    let dir = written("tiny", &Qwen3MoeConfig::preset("tiny").unwrap());
    let ck = Checkpoint::open(&dir).unwrap();
    let gpu = hga::open_gpu(0).unwrap();
    let e = GpuModel::load(&gpu, &ck, 16, 16, |_, _| {}).err().unwrap().to_string();
    assert!(e.contains("cannot run this model"), "{e}");
}
