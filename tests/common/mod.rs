//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::sync::OnceLock;

use hga::runtime::Gpu;
use proptest::prelude::ProptestConfig;

/// A byte-level BPE tokenizer.json over the printable ASCII bytes (ids 0..95, well inside tiny's vocab of 320).
pub fn ascii_tokenizer_json() -> String {
    // GPT-2 byte-level alphabet: printable ASCII maps to itself, ' ' to 'Ġ'.
    let vocab: Vec<String> = (b' '..=b'~')
        .enumerate()
        .map(|(i, b)| {
            let ch = if b == b' ' { "\u{120}".to_string() } else { (b as char).to_string() };
            format!("{}: {i}", serde_json::to_string(&ch).unwrap())
        })
        .collect();
    format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}},
        "post_processor": null,
        "decoder": {{"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}},
        "model": {{"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": {{{}}}, "merges": []}}}}"#,
        vocab.join(", ")
    )
}

/// The shared GPU of a test binary (opened once, its device and image printed), or None after printing a `SKIP`
/// line for `test` (to stderr, which the test harness does not capture) when there is no CUDA device.
pub fn gpu(test: &str) -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    let g = GPU.get_or_init(|| {
        if hga::runtime::device_count() == 0 {
            return None;
        }
        let g = hga::open_gpu(0).expect("a CUDA device is present but the kernels could not be loaded");
        let _ = writeln!(std::io::stderr(), "GPU tests on {} with image {}", g.device_name(), g.image_name());
        Some(g)
    });
    if g.is_none() {
        let _ = writeln!(std::io::stderr(), "SKIP {test}: no CUDA device (GPU test not run)");
    }
    g.as_ref()
}

/// Serializes the tests of one binary that use the shared GPU's stream while one of them records a CUDA graph on
/// it: a capture in progress is invalidated (or worse, with mapped memory in flight) by another thread's launches
/// on the same stream. Hold the guard for the whole test.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Proptest cases per property: `PROPTEST_CASES`, default 24; no failure files.
pub fn cases() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Relative L2 error `|a - b| / |b|` (f64 sums); the slices have the same length.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_l2 of slices of different lengths");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// A fresh, empty directory under the temp dir, named by `prefix`, `tag` and this process.
pub fn tmpdir(prefix: &str, tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tmpfs of `size` mounted on `dir/mnt` (lazily unmounted on drop); `None`, with a SKIP line, when this process
/// cannot mount one (CI runs as root and can).
pub fn tmpfs(dir: &std::path::Path, tag: &str, size: &str) -> Option<Mount> {
    let dir = dir.join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&dir)
        .output();
    match out {
        Ok(o) if o.status.success() => Some(Mount(dir)),
        Ok(o) => {
            eprintln!("SKIP {tag}: cannot mount a tmpfs (needs root): {}", String::from_utf8_lossy(&o.stderr).trim());
            None
        }
        Err(e) => {
            eprintln!("SKIP {tag}: cannot run mount: {e}");
            None
        }
    }
}

/// A mounted tmpfs; unmounted (lazily) on drop.
pub struct Mount(pub std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
