//! The generator streams: writing a checkpoint many shards large raises the peak resident memory (VmHWM) by about one
//! shard at most, not by the model size. (Alone in its own test binary, so no other test disturbs the peak.)
use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::generate::{planned_bytes, write_checkpoint, ScaleDtype, WriteOptions};

fn vm_hwm_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn peak_memory_stays_near_one_shard() {
    let Some(_) = vm_hwm_kb() else {
        eprintln!("no /proc/self/status: skipped");
        return;
    };
    let mut cfg = Qwen3MoeConfig::preset("small").unwrap();
    cfg.num_hidden_layers = 3;
    cfg.vocab_size = 8000;
    cfg.quantization.as_mut().unwrap().modules_to_not_convert = cfg.default_modules_to_not_convert();
    let total = planned_bytes(&cfg, ScaleDtype::F32);
    let shard = 4_000_000u64;
    let dir = std::env::temp_dir().join(format!("hga-ckrss-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // Warm up (thread pool, allocator) on a tiny model first.
    let warm = dir.with_extension("warm");
    let _ = std::fs::remove_dir_all(&warm);
    write_checkpoint(&warm, &Qwen3MoeConfig::preset("tiny").unwrap(), 1, &WriteOptions::default()).unwrap();
    std::fs::remove_dir_all(&warm).unwrap();
    let before = vm_hwm_kb().unwrap() * 1024;
    write_checkpoint(&dir, &cfg, 1, &WriteOptions { shard_size: shard, ..Default::default() }).unwrap();
    let after = vm_hwm_kb().unwrap() * 1024;
    let grew = after.saturating_sub(before);
    let files = std::fs::read_dir(&dir).unwrap().count();
    println!(
        "wrote {:.1} MB in {} files with {:.1} MB shards: peak RSS {:.1} MB -> {:.1} MB (+{:.1} MB)",
        total as f64 / 1e6,
        files,
        shard as f64 / 1e6,
        before as f64 / 1e6,
        after as f64 / 1e6,
        grew as f64 / 1e6
    );
    assert!(total > 20 * shard, "the model must be many shards large ({total} bytes)");
    assert!(grew < 2 * shard, "peak RSS grew by {grew} bytes writing {total} bytes in {shard}-byte shards");
    Checkpoint::open(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
