//! The CPU reference forward on checkpoints made by our writer (tiny, and tools/parity/mixed.json: dense + MoE
//! layers, GQA 8:2, head_dim 128), and `hga logits` end to end. Fast in debug builds; the `small` preset runs in
//! release only (`cargo test --release --test forward_cpu`).
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::ascii_tokenizer_json;
use common::rel_l2;
use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::forward::{ActivationMode, CpuModel};
use hga::model::generate::{write_checkpoint, WriteOptions};

const TOKENS: [u32; 9] = [1, 17, 5, 42, 42, 9, 63, 100, 2];

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hga-fwd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn mixed_config() -> Qwen3MoeConfig {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/parity/mixed.json")).unwrap();
    Qwen3MoeConfig::from_json_str(&text).unwrap()
}

fn written(tag: &str, cfg: &Qwen3MoeConfig, seed: u64) -> PathBuf {
    let dir = tmpdir(tag);
    write_checkpoint(&dir, cfg, seed, &WriteOptions::default()).unwrap();
    dir
}

/// Prefill == token-by-token decode (bit for bit), in both activation modes; fp8 is near f32 but not equal.
fn check_model(dir: &Path) {
    let ckpt = Checkpoint::open(dir).unwrap();
    let mut model = CpuModel::load(&ckpt, ActivationMode::F32).unwrap();
    let mut f32_logits = None;
    for mode in [ActivationMode::F32, ActivationMode::Fp8] {
        model.set_activation_mode(mode);
        let full = model.prefill(&TOKENS, &mut model.new_cache()).unwrap();
        assert_eq!(full.data.len(), TOKENS.len() * ckpt.config.vocab_size);
        assert!(full.data.iter().all(|v| v.is_finite()));
        let mut cache = model.new_cache();
        for (i, &t) in TOKENS.iter().enumerate() {
            let row = model.decode(t, &mut cache).unwrap();
            assert_eq!(row.as_slice(), full.row(i), "{mode}: decode of token {i} differs from prefill");
        }
        assert_eq!(cache.len(), TOKENS.len());
        match &f32_logits {
            None => f32_logits = Some(full.data),
            Some(f) => {
                let e = rel_l2(&full.data, f);
                assert!(e > 1e-6 && e < 0.1, "fp8 vs f32 rel L2 {e}");
            }
        }
    }
}

#[test]
fn tiny_checkpoint_prefill_decode_and_fp8() {
    let dir = written("tiny", &Qwen3MoeConfig::preset("tiny").unwrap(), 3);
    check_model(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mixed_dense_moe_gqa_hd128_checkpoint() {
    let cfg = mixed_config();
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim), (8, 2, 128));
    let layers: Vec<bool> = (0..cfg.num_hidden_layers).map(|l| cfg.is_moe_layer(l)).collect();
    assert_eq!(layers, [false, true, false, true]);
    let dir = written("mixed", &cfg, 4);
    check_model(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn hga() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hga"))
}

fn read_logits(path: &Path) -> (Vec<usize>, Vec<f32>, Vec<i64>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let l = st.tensor("logits").unwrap();
    assert_eq!(l.dtype(), safetensors::Dtype::F32);
    let data = l.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let t = st.tensor("tokens").unwrap();
    let toks = t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    (l.shape().to_vec(), data, toks)
}

#[test]
fn cli_logits_matches_library_and_reports_errors() {
    let cfg = Qwen3MoeConfig::preset("tiny").unwrap();
    let dir = written("cli", &cfg, 5);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let ids = "1,17,5,42,42,9,63,100,2";
    for (mode, extra) in
        [(ActivationMode::F32, None), (ActivationMode::Fp8, None), (ActivationMode::F32, Some("--incremental"))]
    {
        let out = dir.join(format!("{mode}.safetensors"));
        let mut cmd = hga();
        cmd.args(["logits", "--model"]).arg(&dir).args(["--tokens", ids, "--activations", &mode.to_string(), "--out"]);
        cmd.arg(&out);
        if let Some(e) = extra {
            cmd.arg(e);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (shape, data, toks) = read_logits(&out);
        assert_eq!(shape, [TOKENS.len(), cfg.vocab_size]);
        assert_eq!(toks, TOKENS.iter().map(|&t| t as i64).collect::<Vec<_>>());
        let model = CpuModel::load(&ckpt, mode).unwrap();
        assert_eq!(data, model.prefill(&TOKENS, &mut model.new_cache()).unwrap().data, "{mode} {extra:?}");
    }

    let err = |args: &[&str]| {
        let o = hga().args(["logits", "--model"]).arg(&dir).args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let out = dir.join("x.safetensors");
    let out = out.to_str().unwrap();
    let e = err(&["--tokens", "1,2", "--backend", "cuda", "--out", out]);
    assert!(e.contains("--backend cuda computes FP8 activations"), "{e}");
    let e = err(&["--text", "hello", "--out", out]);
    assert!(e.contains("no tokenizer.json") && e.contains("--tokens"), "{e}");
    let e = err(&["--tokens", "1,320", "--out", out]);
    assert!(e.contains("token id 320 at index 1 is out of range (vocab_size 320)"), "{e}");
    let e = err(&["--out", out]);
    assert!(e.contains("--tokens") && e.contains("--text"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cli_text_input_uses_tokenizer_json() {
    let dir = written("text", &Qwen3MoeConfig::preset("tiny").unwrap(), 6);
    std::fs::write(dir.join("tokenizer.json"), ascii_tokenizer_json()).unwrap();
    let tok = hga::model::tokenizer::Tokenizer::from_model_dir(&dir).unwrap();
    let ids = tok.encode("Hi there!").unwrap();
    assert_eq!(ids, [40, 73, 0, 84, 72, 69, 82, 69, 1]);
    assert_eq!(tok.decode(&ids).unwrap(), "Hi there!");
    let out = dir.join("t.safetensors");
    let o =
        hga().args(["logits", "--model"]).arg(&dir).args(["--text", "Hi there!", "--out"]).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (shape, _, toks) = read_logits(&out);
    assert_eq!(shape[0], ids.len());
    assert_eq!(toks, ids.iter().map(|&t| t as i64).collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "small preset (~280 MB): run in release: cargo test --release --test forward_cpu"
)]
fn small_preset_prefill_equals_decode() {
    let cfg = Qwen3MoeConfig::preset("small").unwrap();
    let dir = written("small", &cfg, 1);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = CpuModel::load(&ckpt, ActivationMode::Fp8).unwrap();
    let tokens = &TOKENS[..5];
    let full = model.prefill(tokens, &mut model.new_cache()).unwrap();
    let mut cache = model.new_cache();
    for (i, &t) in tokens.iter().enumerate() {
        assert_eq!(model.decode(t, &mut cache).unwrap().as_slice(), full.row(i));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The `fp8-bf16` mode (the GPU forward's oracle): prefill == decode bit for bit, and close to `fp8`.
#[test]
fn fp8_bf16_mode_is_consistent() {
    let dir = written("fp8bf16", &mixed_config(), 4);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let m = CpuModel::load(&ckpt, ActivationMode::Fp8Bf16).unwrap();
    let pre = m.prefill(&TOKENS, &mut m.new_cache()).unwrap();
    let mut cache = m.new_cache();
    for (i, &t) in TOKENS.iter().enumerate() {
        assert_eq!(m.decode(t, &mut cache).unwrap(), pre.row(i), "position {i}");
    }
    let f = CpuModel::load(&ckpt, ActivationMode::Fp8).unwrap();
    let e = rel_l2(&pre.data, &f.prefill(&TOKENS, &mut f.new_cache()).unwrap().data);
    assert!(e > 0.0 && e < 0.1, "fp8-bf16 vs fp8: rel L2 {e}");
    assert_eq!("fp8-bf16".parse::<ActivationMode>().unwrap(), ActivationMode::Fp8Bf16);
    let _ = std::fs::remove_dir_all(&dir);
}
