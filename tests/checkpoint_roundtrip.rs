//! Writer -> reader round trips: every preset shape class, sharding, scale dtypes, determinism.
use hga::model::checkpoint::{Checkpoint, Dtype};
use hga::model::config::Qwen3MoeConfig;
use hga::model::generate::{reference_values, write_checkpoint, WriteOptions};

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hga-ckpt-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn tiny_roundtrip_matches_reference_values() {
    let cfg = Qwen3MoeConfig::preset("tiny").unwrap();
    let dir = tmpdir("tiny");
    write_checkpoint(&dir, &cfg, 7, &WriteOptions::default()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config, cfg);
    assert!(ck.warnings().is_empty());
    assert_eq!(ck.files(), vec!["model.safetensors"]);
    let mut fp8 = 0;
    for name in ck.tensor_names().map(str::to_string).collect::<Vec<_>>() {
        if name.ends_with("_scale_inv") {
            continue;
        }
        let got = ck.tensor_f32(&name).unwrap();
        let want = reference_values(&cfg, 7, &name).unwrap();
        assert_eq!(got.len(), want.len(), "{name}");
        let e = rel_err(&got, &want);
        if ck.is_fp8(&name) {
            fp8 += 1;
            assert!(e < 0.04, "{name}: fp8 rel err {e}");
        } else {
            assert_eq!(ck.dtype(&name).unwrap(), Dtype::BF16);
            assert!(e < 0.005, "{name}: bf16 rel err {e}");
        }
    }
    assert!(fp8 > 0);
    // The safetensors crate reads our files too.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), ck.len());
    std::fs::remove_dir_all(&dir).unwrap();
}
