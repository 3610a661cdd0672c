//! `hga checkpoint new|inspect` end to end through the binary.
use std::process::Command;

fn hga(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hga")).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

#[test]
fn new_then_inspect_then_break_it() {
    let dir = std::env::temp_dir().join(format!("hga-ckcli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let o = hga(&[
        "checkpoint",
        "new",
        "--preset",
        "tiny",
        "--seed",
        "4",
        "--out",
        d,
        "--shard-size",
        "300K",
        "--scale-dtype",
        "bf16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.join("model.safetensors.index.json").exists());
    let o = hga(&["checkpoint", "inspect", d]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("valid Qwen3-MoE checkpoint") && out.contains("F8_E4M3") && out.contains("BF16"), "{out}");
    let o = hga(&["checkpoint", "inspect", d, "--json", "--deep"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["tensors"], 114);
    assert_eq!(v["dtypes"]["F8_E4M3"]["count"], 48);
    assert_eq!(v["config"]["hidden_size"], 192);
    // Refuses to overwrite.
    let o = hga(&["checkpoint", "new", "--preset", "tiny", "--out", d]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds"));
    // A deleted shard: nonzero exit, message names the shard.
    std::fs::remove_file(dir.join("model-00002-of-00005.safetensors")).unwrap();
    let o = hga(&["checkpoint", "inspect", d, "--json"]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["problems"][0].as_str().unwrap().contains("model-00002-of-00005.safetensors"), "{v}");
    // --config: a JSON file, here the tiny config made bf16.
    std::fs::remove_dir_all(&dir).unwrap();
    let cfg = dir.with_extension("json");
    let mut c = hga::model::config::Qwen3MoeConfig::preset("tiny").unwrap();
    c.quantization = None;
    std::fs::write(&cfg, c.to_json().to_string()).unwrap();
    let o = hga(&["checkpoint", "new", "--config", cfg.to_str().unwrap(), "--out", d]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = hga(&["checkpoint", "inspect", d]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("quantization: none"));
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_file(&cfg).unwrap();
}
