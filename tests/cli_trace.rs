//! `hga trace record` / `hga trace info` through the binary: the argument errors, the summary of the committed
//! trace (fixtures/traces/torch-8k-64.hgakv), and (ignored: minutes in a debug build) a short recording on the
//! fixture that round-trips through `info`.
use std::process::{Command, Output};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes");
const TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes/eval/torch.txt");
const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/traces/torch-8k-64.hgakv");

fn hga(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hga")).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

fn fails(args: &[&str], want: &[&str]) {
    let o = hga(args);
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
    for w in want {
        assert!(e.contains(w), "{args:?}: `{w}` not in: {e}");
    }
}

#[test]
fn trace_info_of_the_committed_trace() {
    let o = hga(&["trace", "info", TRACE]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("6 layers x 2 KV heads (12 streams), 64 steps from position 8192"), "{out}");
    let o = hga(&["trace", "info", TRACE, "--max-groups", "123", "--factor", "8"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("scaled to 123 groups per step x8 (blocks of 8)") && out.contains("246 slots"), "{out}");
    fails(&["trace", "info", TEXT], &["eval/torch.txt: not a selection trace"]);
    fails(&["trace", "info", TRACE, "--max-groups", "10", "--cache-slots", "5"], &["--cache-slots 5 is below"]);
}

#[test]
fn trace_record_errors() {
    let rec = |extra: &[&'static str]| {
        let mut a = vec!["trace", "record", "--model", FIXTURE, "--text", TEXT, "--out", "/dev/null"];
        a.extend_from_slice(extra);
        a
    };
    fails(&rec(&["--context", "100000000", "--steps", "2", "--groups", "4"]), &["the text has", "100000000 wanted"]);
    fails(&rec(&["--context", "512", "--steps", "0", "--groups", "4"]), &["must be positive"]);
    let short = |model: &'static str, text: &'static str| {
        let mut a = vec!["trace", "record", "--model", model, "--text", text, "--out", "/dev/null"];
        a.extend_from_slice(&["--context", "8", "--steps", "1", "--groups", "1"]);
        a
    };
    fails(&short("/nonexistent", TEXT), &["/nonexistent is not a model directory"]);
    fails(&short(FIXTURE, "/nonexistent.txt"), &["reading /nonexistent.txt"]);
}

/// A short recording (CPU reference, a minute or more in a debug build): `cargo test --test cli_trace -- --ignored`.
#[test]
#[ignore]
fn trace_record_round_trips_through_info() {
    let out = std::env::temp_dir().join(format!("hga-trace-{}.hgakv", std::process::id()));
    let o = hga(&[
        "trace",
        "record",
        "--model",
        FIXTURE,
        "--text",
        TEXT,
        "--context",
        "1024",
        "--steps",
        "3",
        "--groups",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("prefill done") && e.contains("decode step 3/3"), "{e}");
    let o = hga(&["trace", "info", out.to_str().unwrap()]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(s.contains("6 layers x 2 KV heads (12 streams), 3 steps from position 1024"), "{s}");
    let t = hga::reference::kv::SelectionTrace::from_bytes(&std::fs::read(&out).unwrap()).unwrap();
    // 1024 tokens: the closed chunks between the sink and the window are candidates; 8 groups routed at most.
    assert!(t.max_selected() <= 8 && t.max_selected() > 0, "widest {}", t.max_selected());
    let _ = std::fs::remove_file(&out);
}
