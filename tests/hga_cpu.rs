//! HGA routing on the CPU reference model: exactness mode, the summary bound, top-k invariants, the budget and
//! causality of the selection, and the diagnostics.
use std::path::PathBuf;

use hga::hga::{
    bound_score, top_k, Budget, Geometry, GqaMode, GroupScore, HgaAttention, HgaParams, Selector, Summaries,
    SummaryMode,
};
use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::forward::{ActivationMode, CpuModel};
use hga::model::generate::{write_checkpoint, WriteOptions};
use proptest::prelude::*;

fn tiny_model() -> CpuModel {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hga-hga-tiny-{}", std::process::id()));
        write_checkpoint(&dir, &Qwen3MoeConfig::preset("tiny").unwrap(), 3, &WriteOptions::default()).unwrap();
        dir
    });
    let ckpt = Checkpoint::open(dir).unwrap();
    CpuModel::load(&ckpt, ActivationMode::F32).unwrap()
}

/// Small geometry so that a few hundred tokens exercise both stages.
fn small_params() -> HgaParams {
    HgaParams { chunk: 16, group: 4, sink: 16, local: 32, query_block: 16, ..HgaParams::default() }
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 300 + 3).collect()
}

#[test]
fn exactness_mode_equals_dense() {
    let toks = tokens(230);
    let model = tiny_model();
    let dense = model.prefill(&toks, &mut model.new_cache()).unwrap();
    let exact = HgaParams { budget: Budget::Fraction(1.0), shortlist: f64::MAX, ..small_params() };
    // Every scoring variant selects everything when the budget covers everything.
    for (group_score, normalize, gqa) in [
        (GroupScore::Summary, false, GqaMode::Max),
        (GroupScore::Sketch4, true, GqaMode::Max),
        (GroupScore::Sketch4, false, GqaMode::PerHead),
        (GroupScore::Summary, true, GqaMode::Mean),
    ] {
        let p = HgaParams { group_score, normalize, gqa, ..exact.clone() };
        let m = tiny_model().with_attention_policy(Box::new(HgaAttention::new(p).unwrap()));
        let got = m.prefill(&toks, &mut m.new_cache()).unwrap();
        let e = rel_l2(&got.data, &dense.data);
        assert!(e <= 1e-5, "exactness mode ({group_score:?}, {normalize}, {gqa:?}) differs from dense: rel L2 {e:.3e}");
    }
    let m = tiny_model().with_attention_policy(Box::new(HgaAttention::new(exact).unwrap()));
    // And by decode, token by token.
    let mut cache = m.new_cache();
    let mut last = Vec::new();
    for &t in &toks {
        last = m.decode(t, &mut cache).unwrap();
    }
    let e = rel_l2(&last, dense.row(toks.len() - 1));
    assert!(e <= 1e-5, "exactness mode (decode) differs from dense: rel L2 {e:.3e}");
}

#[test]
fn sparse_budget_runs_and_reports_diagnostics() {
    let toks = tokens(150);
    let model = tiny_model();
    let dense = model.prefill(&toks, &mut model.new_cache()).unwrap();
    let variants = [
        (Selector::Hga, GroupScore::Summary, false),
        (Selector::Hga, GroupScore::Sketch4, false),
        (Selector::Hga, GroupScore::Sketch4, true),
        (Selector::Hga, GroupScore::Summary, true),
        (Selector::OracleTokens, GroupScore::Summary, false),
        (Selector::OracleGroups, GroupScore::Summary, false),
    ];
    for (selector, group_score, normalize) in variants {
        let p = HgaParams { budget: Budget::Fraction(0.4), selector, group_score, normalize, ..small_params() };
        let policy = std::sync::Arc::new(HgaAttention::new(p).unwrap().with_diagnostics());
        let m = tiny_model().with_attention_policy(Box::new(ArcPolicy(policy.clone())));
        let got = m.prefill(&toks, &mut m.new_cache()).unwrap();
        assert!(got.data.iter().all(|v| v.is_finite()));
        let d = policy.take_diagnostics().overall();
        assert!(d.mass > 0.0 && d.mass <= 1.0 + 1e-9, "{selector:?}: mass {}", d.mass);
        assert!(d.recall32 > 0.0 && d.recall32 <= 1.0);
        assert!(d.used <= d.context, "{selector:?}: used {} > context {}", d.used, d.context);
        // Sparse: the late queries (context > 100) use well under everything on average.
        assert!(d.used / d.context < 0.9, "{selector:?}: sparsity {}", d.used / d.context);
        let e = rel_l2(&got.data, &dense.data);
        assert!(e > 0.0 && e < 1.0, "{selector:?}: rel L2 to dense {e}");
    }
}

/// Shares one policy between the model and the test (to read the diagnostics back).
struct ArcPolicy(std::sync::Arc<HgaAttention>);
impl hga::model::forward::AttentionPolicy for ArcPolicy {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn attend(
        &self,
        layer: usize,
        s: &hga::model::forward::AttentionShape,
        start: usize,
        q: &[f32],
        kv: &hga::model::forward::LayerKv,
    ) -> Vec<f32> {
        self.0.attend(layer, s, start, q, kv)
    }
}

#[test]
fn labels_name_what_differs_from_the_defaults() {
    assert_eq!(HgaParams::default().label(), "default");
    assert_eq!(HgaParams::version1().label(), "summary no-norm s2");
    let p = HgaParams { shortlist: f64::INFINITY, ..HgaParams::default() };
    assert_eq!(p.label(), "s-inf");
    let p = HgaParams { chunk: 128, group: 32, gqa: GqaMode::PerHead, ..HgaParams::default() };
    assert_eq!(p.label(), "128/32 gqa-perhead");
}

#[test]
fn geometry_respects_budget_sink_window_and_causality() {
    let p = HgaParams { budget: Budget::Tokens(100), ..small_params() };
    for b0 in [0usize, 5, 47, 48, 49, 200, 511] {
        let g = Geometry::new(&p, b0, 16);
        assert!(
            g.n_groups * p.group + g.sink_end.min(b0 + 16) + (b0 + 16 - g.local_start.min(b0 + 16)) <= 100 + p.group
        );
        assert!(g.first_chunk <= g.end_chunk && g.end_chunk * p.chunk <= g.local_start.max(g.sink_end));
        let groups: Vec<usize> = (g.first_chunk * 4..g.end_chunk * 4).take(g.n_groups).collect();
        for pos in b0..b0 + 16 {
            let v = g.positions(p.group, &groups, pos);
            assert!(v.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
            assert!(v.iter().all(|&j| j <= pos), "causal");
            assert!((0..p.sink.min(pos + 1)).all(|j| v.contains(&j)), "sink");
            assert!((pos.saturating_sub(p.local)..=pos).all(|j| v.contains(&j)), "local window");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// No key's score exceeds its block's min/max bound, nor its ball bound (mean + radius).
    #[test]
    fn bound_covers_every_key(d in 1usize..40, n in 1usize..80, seed in any::<u64>()) {
        let mut s = seed | 1;
        let mut r = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0 };
        let keys: Vec<f32> = (0..n * d).map(|_| r()).collect();
        let q: Vec<f32> = (0..d).map(|_| r()).collect();
        for block in [1usize, 4, 16] {
            let sm = Summaries::build(&keys, d, 0, d, n, block);
            for b in 0..n / block {
                let bound = sm.score(SummaryMode::MinMax, &q, b);
                prop_assert!((bound - bound_score(&q, &sm.min[b * d..(b + 1) * d], &sm.max[b * d..(b + 1) * d])).abs() < 1e-12);
                let ball = sm.score(SummaryMode::Ball, &q, b);
                for j in b * block..(b + 1) * block {
                    let dot: f64 = q.iter().zip(&keys[j * d..(j + 1) * d]).map(|(a, b)| *a as f64 * *b as f64).sum();
                    prop_assert!(dot <= bound + 1e-9, "key {j} scores {dot} above its block's bound {bound}");
                    prop_assert!(dot <= ball + 1e-9, "key {j} scores {dot} above its block's ball bound {ball}");
                }
            }
        }
    }

    /// top_k: count, uniqueness, range, and every chosen score >= every unchosen one (ties allowed).
    #[test]
    fn top_k_invariants(scores in prop::collection::vec(prop_oneof![-5i32..5, Just(0)], 0..60), k in 0usize..70) {
        let s: Vec<f64> = scores.iter().map(|&v| v as f64).collect();
        let t = top_k(&s, k);
        prop_assert_eq!(t.len(), k.min(s.len()));
        let mut u = t.clone();
        u.sort_unstable();
        u.dedup();
        prop_assert_eq!(u.len(), t.len());
        prop_assert!(t.iter().all(|&i| i < s.len()));
        let kth = t.iter().map(|&i| s[i]).fold(f64::INFINITY, f64::min);
        for (i, v) in s.iter().enumerate() {
            if !t.contains(&i) {
                prop_assert!(*v <= kth);
            }
        }
    }
}

mod common;
use common::rel_l2;

#[test]
fn cli_eval_reports_every_policy() {
    let dir = std::env::temp_dir().join(format!("hga-eval-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_checkpoint(&dir, &Qwen3MoeConfig::preset("tiny").unwrap(), 5, &WriteOptions::default()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), common::ascii_tokenizer_json()).unwrap();
    let text = dir.join("t.txt");
    let body: String = (0..40).map(|i| format!("line {i}: the key is {} and so on. ", i * 7 % 13)).collect();
    std::fs::write(&text, body).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hga"))
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--text")
        .arg(&text)
        .args(["--context", "260", "--scored", "40", "--budget", "0.5,120", "--chunk", "16", "--group", "4"])
        .args([
            "--sink",
            "16",
            "--local",
            "32",
            "--query-block",
            "16",
            "--attention",
            "dense,hga,oracle-groups",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    // dense + 2 budgets x 2 selectors.
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(rows[0]["policy"], "dense");
    for r in &rows[1..] {
        let gap = r["gap"].as_f64().unwrap();
        let kl = r["kl"].as_f64().unwrap();
        assert!(gap.is_finite() && kl >= -1e-12, "{r}");
        assert!(r["sparsity"].as_f64().unwrap() < 1.0, "{r}");
    }
    // Errors are clear: a context longer than the file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hga"))
        .args(["eval", "--model"])
        .arg(&dir)
        .arg("--text")
        .arg(&text)
        .args(["--context", "100000"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("every file is shorter than every --context"));
}

#[test]
fn cli_needle_runs_every_policy_and_depth() {
    let dir = std::env::temp_dir().join(format!("hga-needle-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_checkpoint(&dir, &Qwen3MoeConfig::preset("tiny").unwrap(), 6, &WriteOptions::default()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), common::ascii_tokenizer_json()).unwrap();
    let filler = dir.join("f.txt");
    std::fs::write(&filler, "the quick brown fox jumps over the lazy dog. ".repeat(10)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hga"))
        .args(["needle", "--model"])
        .arg(&dir)
        .arg("--filler")
        .arg(&filler)
        .args(["--context", "200", "--depths", "0,100", "--trials", "1", "--budget", "0.4", "--chunk", "16"])
        .args(["--group", "4", "--sink", "16", "--local", "32", "--query-block", "16", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 4, "dense + hga at 2 depths: {rows:?}");
    assert!(rows.iter().all(|r| r["trials"] == 1 && r["hits"].as_u64().unwrap() <= 1));
}

#[test]
fn cli_demo_runs_on_a_model_dir_and_explains_a_missing_fixture() {
    let hga = env!("CARGO_BIN_EXE_hga");
    let out = std::process::Command::new(hga).args(["demo", "--model", "/nonexistent-fixture"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no trained fixture at /nonexistent-fixture"));
    let dir = std::env::temp_dir().join(format!("hga-demo-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_checkpoint(&dir, &Qwen3MoeConfig::preset("tiny").unwrap(), 8, &WriteOptions::default()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), common::ascii_tokenizer_json()).unwrap();
    std::fs::create_dir_all(dir.join("eval")).unwrap();
    std::fs::write(dir.join("eval/a.txt"), "a small text for the demo, repeated. ".repeat(12)).unwrap();
    let out = std::process::Command::new(hga)
        .args(["demo", "--backend", "cpu", "--context", "200", "--model"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("dense") && table.contains("hga") && table.contains("oracle-groups"), "{table}");
}
