//! `hga generate`, `hga eval --backend cuda`, `hga needle --backend cuda` and `hga demo` through the binary: the
//! argument errors (on their messages), the clear "no CUDA device" failure without a GPU, and, where a CUDA device
//! is present, short runs on the committed fixture model (their JSON figures). The GPU parts print a SKIP line on a
//! machine without one.
use std::process::{Command, Output};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes");
const FIXTURE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes/config.json");
const TEXT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes/eval/torch.txt");
/// The committed selection trace (fixtures/traces/README.md).
const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/traces/torch-8k-64.hgakv");

fn hga(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hga")).args(args).env("RUST_BACKTRACE", "0").output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `hga generate --model FIXTURE --tokens 1,2,3 <extra>` and expects failure with every one of `want` in stderr.
fn generate_fails(extra: &[&str], want: &[&str]) {
    let mut args = vec!["generate", "--model", FIXTURE, "--tokens", "1,2,3", "--max-tokens", "5"];
    args.extend_from_slice(extra);
    let o = hga(&args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded: {e}");
    assert!(!e.contains("panicked"), "{args:?} panicked: {e}");
    for w in want {
        assert!(e.contains(w), "{args:?}: `{w}` not in: {e}");
    }
}

fn gpu_present(test: &str) -> bool {
    let n = hga::runtime::device_count();
    if n == 0 {
        eprintln!("SKIP {test}: no CUDA device (GPU test not run)");
    }
    n > 0
}

#[test]
fn generate_argument_errors() {
    generate_fails(&["--attention", "sparse"], &["invalid value 'sparse' for '--attention", "dense, hga"]);
    generate_fails(&["--kv-tier", "gpu"], &["--attention hga --kv-tier gpu", "an HGA tier in GPU memory is not built"]);
    generate_fails(
        &["--attention", "dense", "--kv-tier", "disk", "--kv-dir", "/tmp"],
        &["--attention dense --kv-tier disk", "serves HGA's routed groups"],
    );
    generate_fails(&["--kv-tier", "disk"], &["--kv-tier disk needs --kv-dir DIR"]);
    generate_fails(&["--kv-dir", "/tmp"], &["--kv-dir is the disk tier's directory", "--kv-tier disk"]);
    generate_fails(&["--kv-tier", "disk", "--kv-dir", "/tmp", "--kv-io", "aio"], &["--kv-io"]);
    // The directory's faults come before any GPU is needed.
    generate_fails(
        &["--kv-tier", "disk", "--kv-dir", "/nonexistent/kv"],
        &["--kv-dir /nonexistent/kv", "does not exist"],
    );
    generate_fails(&["--kv-tier", "disk", "--kv-dir", FIXTURE_CONFIG], &["is not a directory"]);
    generate_fails(&["--attention", "dense", "--host-kv-limit", "1GiB"], &["--host-kv-limit caps the host tier"]);
    generate_fails(
        &["--attention", "dense", "--kv-tier", "gpu", "--host-kv-limit", "1GiB"],
        &["--kv-tier gpu keeps the K/V in GPU memory"],
    );
    generate_fails(&["--kv-tier", "floppy"], &["invalid value 'floppy' for '--kv-tier"]);
    generate_fails(&["--attention", "dense", "--sketch-tier", "host"], &["dense attention has neither"]);
    generate_fails(&["--attention", "dense", "--cache-slots", "64"], &["dense attention has neither"]);
    generate_fails(&["--attention", "dense", "--profile-prefill"], &["profiles the layer-major prefill"]);
    generate_fails(&["--sketch-tier", "disk"], &["invalid value 'disk' for '--sketch-tier"]);
}

#[test]
fn generate_size_and_budget_errors() {
    generate_fails(&["--gpu-memory-limit", "32G"], &["--gpu-memory-limit", "unit `G` is ambiguous"]);
    generate_fails(&["--gpu-memory-limit", "lots"], &["size `lots`: does not start with a number"]);
    generate_fails(&["--host-kv-limit", "12XB"], &["--host-kv-limit", "unknown unit `XB`"]);
    generate_fails(&["--budget", "1.5"], &["budget `1.5`: a share of the context must be in (0, 1]"]);
    generate_fails(&["--budget", "0"], &["budget `0`: at least one token"]);
    generate_fails(&["--budget", "three"], &["budget `three` is not a number"]);
    // 3 prompt tokens + 5 generated = 8 positions x 6 layers x 2 KV heads x 512 B = 49152 bytes (48 KiB).
    generate_fails(
        &["--host-kv-limit", "47KiB"],
        &[
            "--host-kv-limit 47.0 KiB (48128 bytes) is below",
            "8 positions x 6 layers x 2 KV heads x 512 B",
            "(49152 bytes)",
            "disk tier",
        ],
    );
}

#[test]
fn generate_without_a_gpu_says_so() {
    if hga::runtime::device_count() > 0 {
        eprintln!("SKIP generate_without_a_gpu_says_so: a CUDA device is present");
        return;
    }
    // 48 KiB is exactly the arena of 8 positions: accepted, then no device.
    for extra in [&[][..], &["--attention", "dense"], &["--host-kv-limit", "48KiB", "--gpu-memory-limit", "32GiB"]] {
        generate_fails(extra, &["no CUDA device"]);
    }
    // Exit status 1 (an error), not 101 (a panic).
    let o = hga(&["generate", "--model", FIXTURE, "--tokens", "1,2,3"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

/// `hga eval` / `hga needle` with `extra`; expects failure with each of `want` in stderr.
fn fails(cmd: &[&str], want: &[&str]) {
    let o = hga(cmd);
    let e = stderr(&o);
    assert!(!o.status.success(), "{cmd:?} succeeded: {e}");
    assert!(!e.contains("panicked"), "{cmd:?} panicked: {e}");
    for w in want {
        assert!(e.contains(w), "{cmd:?}: `{w}` not in: {e}");
    }
}

#[test]
fn eval_and_needle_backend_errors() {
    for sub in ["eval", "needle"] {
        let input = if sub == "eval" { "--text" } else { "--filler" };
        let base = [sub, "--model", FIXTURE, input, TEXT, "--context", "512"];
        let with = |extra: &[&'static str]| base.iter().copied().chain(extra.iter().copied()).collect::<Vec<_>>();
        fails(
            &with(&["--backend", "cuda", "--attention", "dense,hga,oracle-groups"]),
            &["--attention oracle-groups", "hga selector only"],
        );
        fails(&with(&["--backend", "cuda", "--kv-tier", "host"]), &["choose the CPU forward's K/V tier"]);
        fails(&with(&["--backend", "cuda", "--activations", "fp8"]), &["--activations is for --backend cpu"]);
        fails(&with(&["--backend", "cuda", "--summary", "mean"]), &["does not implement --summary mean"]);
        fails(&with(&["--backend", "cuda", "--chunk", "128"]), &["--chunk 128 / --group 16"]);
        fails(&with(&["--backend", "tpu"]), &["invalid value 'tpu' for '--backend"]);
        fails(&with(&["--gpu-memory-limit", "1GiB"]), &["--gpu-memory-limit applies to --backend cuda"]);
        fails(&with(&["--budget", "0.03,2.5"]), &["--budget `2.5`: a share of the context must be in (0, 1]"]);
        if hga::runtime::device_count() == 0 {
            fails(&with(&["--backend", "cuda"]), &["no CUDA device"]);
        }
    }
    if hga::runtime::device_count() == 0 {
        fails(
            &["demo", "--backend", "cuda"],
            &["on the GPU (--backend cuda; no CUDA device found)", "error: no CUDA device"],
        );
    }
}

fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn gpu_generate_hga_and_dense_report_their_figures() {
    if !gpu_present("gpu_generate_hga_and_dense_report_their_figures") {
        return;
    }
    // 1024 prompt tokens: past the sink (64) and window (256), so decode steps route.
    let common = [
        "generate",
        "--model",
        FIXTURE,
        "--synthetic-prompt",
        "1024",
        "--max-tokens",
        "16",
        "--stop-at-eos",
        "false",
        "--json",
    ];
    let o = hga(&[&common[..], &["--budget", "0.1"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("GPU memory (our allocations)") && e.contains("device used at peak"), "{e}");
    let v = &json_lines(&o)[0];
    eprintln!("hga: {v}");
    assert_eq!(v["attention"], "hga");
    assert_eq!(v["prompt_tokens"], 1024);
    assert!(v["gpu_memory_peak_bytes"].as_u64().unwrap() > 0, "{v}");
    assert!(v["gpu_device_used_at_peak_bytes"].as_u64().unwrap() >= v["gpu_memory_peak_bytes"].as_u64().unwrap());
    assert!(v["gpu_memory_limit_bytes"].is_null());
    // 1040 positions x 6 layers x 2 KV heads x 512 B, in whole extents.
    assert!(v["arena_bytes"].as_u64().unwrap() >= 1040 * 6 * 2 * 512, "{v}");
    let hit = v["cache_hit_rate"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&hit), "{v}");
    assert_eq!(v["decode_tokens"], 15, "{v}");
    assert!(v["h2d_bytes_per_token"].as_f64().is_some(), "{v}");
    let routed = v["routed_tokens"].as_f64().unwrap();
    assert!((320.0..=1040.0).contains(&routed), "sink + window + routed groups: {v}");
    assert!(v["ttft_s"].as_f64().is_some(), "{v}");

    let o = hga(&[&common[..], &["--attention", "dense", "--gpu-memory-limit", "8GiB"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let v = &json_lines(&o)[0];
    eprintln!("dense: {v}");
    assert_eq!(v["attention"], "dense");
    assert_eq!(v["gpu_memory_limit_bytes"], 8u64 << 30);
    assert!(v["cache_hit_rate"].is_null() && v["routed_tokens"].is_null() && v["h2d_bytes_per_token"].is_null());
    assert_eq!(v["arena_bytes"], 0);
}

#[test]
fn gpu_generate_over_the_memory_limit_fails_with_the_accountants_message() {
    if !gpu_present("gpu_generate_over_the_memory_limit_fails_with_the_accountants_message") {
        return;
    }
    for attention in ["hga", "dense"] {
        let o = hga(&[
            "generate",
            "--model",
            FIXTURE,
            "--tokens",
            "1,2,3",
            "--attention",
            attention,
            "--gpu-memory-limit",
            "1MiB",
        ]);
        let e = stderr(&o);
        eprintln!("{e}");
        assert_eq!(o.status.code(), Some(1), "{e}");
        for w in ["GPU memory limit:", "does not fit", "the limit is 1.0 MiB (1048576 bytes)", "loading"] {
            assert!(e.contains(w), "`{w}` not in: {e}");
        }
    }
}

#[test]
fn gpu_eval_and_needle_run_dense_and_hga_in_one_process() {
    if !gpu_present("gpu_eval_and_needle_run_dense_and_hga_in_one_process") {
        return;
    }
    // Budget 1.0 with no chunk stage attends to every position: HGA must match dense; 0.25 routes (512 tokens
    // of which sink + window take about 330).
    let o = hga(&[
        "eval",
        "--backend",
        "cuda",
        "--model",
        FIXTURE,
        "--text",
        TEXT,
        "--context",
        "2048",
        "--scored",
        "64",
        "--budget",
        "1.0,0.25",
        "--shortlist",
        "inf",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&rows).unwrap());
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["policy"], "dense");
    let nll = rows[0]["nll"].as_f64().unwrap();
    assert!(nll > 0.0 && nll < 5.0, "the fixture predicts its text: {nll}");
    let exact = &rows[1];
    assert_eq!(exact["policy"], "hga");
    assert!(exact["gap"].as_f64().unwrap().abs() < 0.02, "budget 1.0 is exact: {exact}");
    assert!(exact["kl"].as_f64().unwrap() < 0.02 && exact["top1_agree"].as_f64().unwrap() > 0.9, "{exact}");
    let routed = &rows[2];
    let sparsity = routed["sparsity"].as_f64().unwrap();
    assert!(sparsity < 0.5, "25% of 2048 attends well under half: {routed}");
    assert!(routed["mass"].is_null(), "not measured on the GPU: {routed}");

    let o = hga(&[
        "needle",
        "--backend",
        "cuda",
        "--model",
        FIXTURE,
        "--filler",
        TEXT,
        "--context",
        "2048",
        "--depths",
        "10,90",
        "--trials",
        "2",
        "--budget",
        "0.25",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&rows).unwrap());
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["backend"] == "cuda" && r["trials"] == 2));
    let dense_hits: u64 = rows.iter().filter(|r| r["policy"] == "dense").map(|r| r["hits"].as_u64().unwrap()).sum();
    assert!(dense_hits >= 3, "the fixture retrieves under dense attention: {rows:?}");
}

#[test]
fn generate_replay_trace_errors() {
    generate_fails(
        &["--attention", "dense", "--replay-trace", TRACE],
        &["--replay-trace", "torch-8k-64.hgakv", "replays HGA selections (--attention hga)"],
    );
    // A file that is not a trace: the parse error and the path.
    generate_fails(&["--replay-trace", TEXT], &["eval/torch.txt: not a selection trace"]);
    generate_fails(&["--replay-trace", "/nonexistent/x.hgakv"], &["reading the selection trace /nonexistent/x.hgakv"]);
    if hga::runtime::device_count() == 0 {
        // The committed trace parses: the run gets as far as the device.
        generate_fails(&["--replay-trace", TRACE], &["no CUDA device"]);
    }
}

/// `--replay-trace` on the fixture at the trace's own context (8192 prompt tokens: factor 1, and the default budget
/// of 3% selects up to 15 groups, the trace's widest step: the replay is the trace itself). The JSON says so, and
/// the cache hit rate is the one the exact CPU model of the GPU cache (CLOCK 2 / 1, twice the selection's slots)
/// computes on the trace's first steps.
#[test]
fn gpu_generate_replays_a_trace() {
    use hga::reference::kv::{clock_hits, SelectionTrace};
    if !gpu_present("gpu_generate_replays_a_trace") {
        return;
    }
    let o = hga(&[
        "generate",
        "--model",
        FIXTURE,
        "--synthetic-prompt",
        "8192",
        "--max-tokens",
        "16",
        "--chunk",
        "1024",
        "--stop-at-eos",
        "false",
        "--json",
        "--replay-trace",
        TRACE,
    ]);
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("selection: replayed trace") && e.contains("scaled x1"), "{e}");
    let v = &json_lines(&o)[0];
    eprintln!("replayed: {v}");
    assert_eq!(v["selection"], format!("replayed trace {TRACE}"));
    let r = &v["replay"];
    assert_eq!(
        (r["factor"].as_u64(), r["block"].as_u64(), r["trace_first_pos"].as_u64()),
        (Some(1), Some(1), Some(8192))
    );
    let steps = v["decode_tokens"].as_u64().unwrap() as usize;
    assert_eq!(steps, 15);
    assert_eq!(r["steps_replayed"].as_u64(), Some(15));
    let mg = r["max_groups"].as_u64().unwrap() as usize;
    let t = SelectionTrace::from_bytes(&std::fs::read(TRACE).unwrap()).unwrap();
    let s = t.scaled_to(6, 2, mg, 1);
    let (mut hits, mut all) = (0u64, 0u64);
    for l in 0..6 {
        for h in 0..2 {
            let (hi, mi) = clock_hits(&s.stream(l, h)[..steps], 2 * mg, 2, 1);
            hits += hi;
            all += hi + mi;
        }
    }
    let want = hits as f64 / all as f64;
    let got = v["cache_hit_rate"].as_f64().unwrap();
    eprintln!("hit rate: GPU {got:.4}, the CPU model of the cache on the trace {want:.4}");
    assert!((got - want).abs() < 1e-9, "GPU cache hit rate {got} under replay, the model says {want}");
    // Without the switch: the model's own selection.
    let o = hga(&["generate", "--model", FIXTURE, "--tokens", "1,2,3", "--max-tokens", "2", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_lines(&o)[0]["selection"], "model");
}
