//! The GPU model's HGA mode (`AttentionMode::Hga`: the K/V history in the mapped host arena, routed decode, exact
//! layer-major prefill) against the CPU reference's HGA and against the GPU's dense mode, on the trained fixture
//! (fixtures/qwen3-moe-bytes; `HGA_FIXTURE_DIR` where a staged binary runs elsewhere). Without a CUDA device: a
//! SKIP line per test.
//!
//! Parity criterion (as tests/gpu_model.rs): two correct FP8 forwards that differ only in f32 rounding order drift
//! apart through the e4m3 requantization of every linear's input. Each test measures that floor on its own tokens
//! as the GPU's dense decode against the CPU's dense decode (both exact attention), and bounds the HGA comparison by
//! max(1e-2, 2x the floor) in relative L2 of the logits and the floor's top-1 agreement - 0.05. The same drift
//! reaches the queries, so a group whose score sits at the selection's margin can flip: the selections are compared
//! pick by pick and the share that differs is printed and bounded (10%: the kernels' own agreement on identical
//! inputs is tested exactly in tests/gpu_hga_route.rs; here the inputs drift).
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use hga::hga::{Budget, HgaAttention, HgaParams};
use hga::model::checkpoint::Checkpoint;
use hga::model::forward::{ActivationMode, CpuModel};
use hga::model::gpu::{AttentionMode, GpuModel, GpuModelOptions, HgaOptions};
use hga::runtime::Gpu;

mod common;
use common::{gpu, rel_l2};

fn fixture_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HGA_FIXTURE_DIR") {
        return PathBuf::from(d);
    }
    ["fixtures/qwen3-moe-bytes", concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes")]
        .into_iter()
        .map(PathBuf::from)
        .find(|d| d.join("config.json").exists())
        .expect("fixtures/qwen3-moe-bytes (run from the repository root or set HGA_FIXTURE_DIR)")
}

/// The fixture's held-out texts and its training log, as byte tokens: at least `n` of them.
fn fixture_tokens(dir: &std::path::Path, n: usize) -> Vec<u32> {
    let text: Vec<u8> = ["torch.txt", "numba.txt", "sympy.txt", "transformers.txt", "onnx.txt"]
        .iter()
        .flat_map(|f| std::fs::read(dir.join("eval").join(f)).unwrap_or_default())
        .chain(std::fs::read(dir.join("train.log")).unwrap())
        .collect();
    assert!(text.len() >= n, "fixture text: {} bytes, {n} wanted", text.len());
    text[..n].iter().map(|&b| b as u32).collect()
}

fn log(s: String) {
    let _ = writeln!(std::io::stderr(), "{s}");
}

fn argmax(r: &[f32]) -> usize {
    r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b })
}

/// (relative L2, top-1 agreement) of two [rows, vocab] logit sets.
fn compare(what: &str, got: &[f32], want: &[f32], v: usize) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    assert!(got.iter().all(|x| x.is_finite()), "{what}: non-finite logits");
    let rows = want.len() / v;
    let agree = (0..rows).filter(|&t| argmax(&got[t * v..(t + 1) * v]) == argmax(&want[t * v..(t + 1) * v])).count();
    let rel = rel_l2(got, want);
    log(format!("{what}: rel L2 {rel:.3e}, top-1 {agree}/{rows}"));
    (rel, agree as f64 / rows as f64)
}

/// Per decode step, per (layer, KV head): the selected groups.
type Selections = Vec<Vec<(usize, usize, Vec<u32>)>>;

/// The GPU model in `attention` mode: prefill `tokens[..split]`, then decode the rest teacher-forced; the decode
/// steps' logits and (HGA) selections.
fn gpu_decode(
    gpu: &Gpu,
    ck: &Checkpoint,
    tokens: &[u32],
    split: usize,
    attention: AttentionMode,
    graphs: bool,
) -> (Vec<f32>, Selections) {
    let opts = GpuModelOptions {
        capacity: tokens.len() + 16,
        max_tokens: 256,
        attention,
        host_embedding: false,
        prefill_residual_on_host: None,
        dense_kv_on_host: false,
    };
    gpu_decode_with(gpu, ck, tokens, split, &opts, graphs)
}

/// [`gpu_decode`] with the model options given.
fn gpu_decode_with(
    gpu: &Gpu,
    ck: &Checkpoint,
    tokens: &[u32],
    split: usize,
    opts: &GpuModelOptions,
    graphs: bool,
) -> (Vec<f32>, Selections) {
    let mut m = GpuModel::load_with(gpu, ck, opts, |_, _| {}).unwrap();
    m.set_decode_graphs(graphs);
    m.forward(&tokens[..split], false).unwrap();
    let (mut logits, mut sels) = (Vec::new(), Vec::new());
    for &t in &tokens[split..] {
        logits.extend(m.forward(&[t], false).unwrap());
        let mut step = Vec::new();
        for (l, heads) in m.hga_selections().unwrap() {
            for (h, g) in heads.into_iter().enumerate() {
                step.push((l, h, g));
            }
        }
        sels.push(step);
    }
    if let Some(st) = m.hga_stats().unwrap() {
        log(format!(
            "  gpu hga: {} layers ({} with host sketches), hits {} misses {} ({:.1}% hits), {:.2} MB gathered, {:.0} \
             tokens attended per (layer, KV head) in the last step, arena {:.1} MB",
            st.hga_layers,
            st.sketch_host_layers,
            st.hits,
            st.misses,
            100.0 * st.hit_rate(),
            st.h2d_bytes as f64 / 1e6,
            st.routed_tokens_last_step,
            st.arena_bytes as f64 / 1e6
        ));
    }
    (logits, sels)
}

/// The CPU reference: a dense prefill of `tokens[..split]`, then the decode steps with `params` (HGA, its
/// selections logged) or dense.
fn cpu_decode(ck: &Checkpoint, tokens: &[u32], split: usize, params: Option<&HgaParams>) -> (Vec<f32>, Selections) {
    let model = CpuModel::load(ck, ActivationMode::Fp8Bf16).unwrap();
    let (nkv, nl) = (model.config().num_key_value_heads, model.config().num_hidden_layers);
    let mut cache = model.new_cache();
    model.prefill(&tokens[..split], &mut cache).unwrap();
    let policy = params.map(|p| Arc::new(HgaAttention::new(p.clone()).unwrap().with_selection_log()));
    let model = match &policy {
        Some(p) => model.with_attention_policy(Box::new(p.clone())),
        None => model,
    };
    let (mut logits, mut sels) = (Vec::new(), Vec::new());
    for (i, &t) in tokens[split..].iter().enumerate() {
        logits.extend(model.decode(t, &mut cache).unwrap());
        if let Some(p) = &policy {
            let mut step: Vec<(usize, usize, Vec<u32>)> =
                (0..nl).flat_map(|l| (0..nkv).map(move |h| (l, h, Vec::new()))).collect();
            for (l, h, pos, g) in p.take_selection_log() {
                assert_eq!(pos, split + i);
                step[l * nkv + h].2 = g.into_iter().map(|g| g as u32).collect();
            }
            sels.push(step);
        }
    }
    (logits, sels)
}

/// (picks that differ, picks in all) between two selection sets: the symmetric difference per (step, layer, head).
fn pick_diff(what: &str, got: &Selections, want: &Selections) -> (usize, usize) {
    assert_eq!(got.len(), want.len(), "{what}: steps");
    let (mut differ, mut total) = (0, 0);
    for (gs, ws) in got.iter().zip(want) {
        for (g, w) in gs.iter().zip(ws) {
            assert_eq!((g.0, g.1), (w.0, w.1));
            let sym = g.2.iter().filter(|x| !w.2.contains(x)).count() + w.2.iter().filter(|x| !g.2.contains(x)).count();
            differ += sym;
            total += g.2.len().max(w.2.len());
        }
    }
    log(format!("{what}: {differ} of {total} picks differ (symmetric difference)"));
    (differ, total)
}

/// GPU HGA against CPU HGA at 4K and 8K (budgets 25% and 10%: the default 3% routes nothing below ~13K tokens,
/// the sink and window take it): the same selections up to the drift's margin flips, and logits within the
/// parity bounds of the dense floor measured on the same tokens.
#[test]
fn gpu_model_hga_matches_cpu_hga_on_fixture() {
    let Some(gpu) = gpu("gpu_model_hga_matches_cpu_hga_on_fixture") else { return };
    let _serial = common::serial();
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let v = ck.config.vocab_size;
    let steps: usize = std::env::var("HGA_MODEL_HGA_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(24);
    for (ctx, budget) in [(4096usize, Budget::Fraction(0.25)), (8192, Budget::Fraction(0.10))] {
        let tokens = fixture_tokens(&dir, ctx + steps);
        let params = HgaParams { budget, ..HgaParams::default() };
        let t0 = std::time::Instant::now();
        let (cpu_dense, _) = cpu_decode(&ck, &tokens, ctx, None);
        let (cpu_hga, cpu_sel) = cpu_decode(&ck, &tokens, ctx, Some(&params));
        log(format!("{ctx}: CPU dense + HGA decode in {:.1} s", t0.elapsed().as_secs_f64()));
        let (gpu_dense, _) = gpu_decode(gpu, &ck, &tokens, ctx, AttentionMode::Dense, true);
        let hga = AttentionMode::Hga(HgaOptions { params: params.clone(), ..Default::default() });
        let (gpu_hga, gpu_sel) = gpu_decode(gpu, &ck, &tokens, ctx, hga, true);
        let (floor, floor_top1) = compare(&format!("{ctx} gpu dense vs cpu dense (floor)"), &gpu_dense, &cpu_dense, v);
        let (rel_bound, top1_bound) = ((2.0 * floor).max(1e-2), (floor_top1 - 0.05).min(0.99));
        let (rel, top1) = compare(&format!("{ctx} gpu hga vs cpu hga"), &gpu_hga, &cpu_hga, v);
        compare(&format!("{ctx} cpu hga vs cpu dense (routing's effect, not a bound)"), &cpu_hga, &cpu_dense, v);
        let (differ, total) = pick_diff(&format!("{ctx} gpu hga vs cpu hga selections"), &gpu_sel, &cpu_sel);
        assert!(total > 0, "{ctx}: the budget routed nothing");
        log(format!("{ctx}: bounds rel L2 <= {rel_bound:.3e}, top-1 >= {top1_bound:.3}"));
        assert!(rel <= rel_bound && top1 >= top1_bound, "{ctx}: gpu hga vs cpu hga rel L2 {rel:.3e}, top-1 {top1}");
        // Measured on the H200 (2026-12-03): 4.6% at 4K / 25%, 5.7% at 8K / 10%, with the logits within the floor
        // bound; the kernels alone, on identical keys and queries, differ in 1 of 5304 picks (tests/gpu_hga_route.rs).
        assert!(differ * 10 <= total, "{ctx}: {differ} of {total} picks differ (more than 10%)");
        if ctx == 4096 {
            // The sketches and the prefill's residual stream in mapped host memory: the same kernels read the same
            // bytes over PCIe, so the same logits and selections, bit for bit.
            let opts = GpuModelOptions {
                capacity: tokens.len() + 16,
                max_tokens: 256,
                attention: AttentionMode::Hga(HgaOptions {
                    params: params.clone(),
                    sketches_on_host: Some(true),
                    ..Default::default()
                }),
                host_embedding: false,
                prefill_residual_on_host: Some(true),
                dense_kv_on_host: false,
            };
            let (host_hga, host_sel) = gpu_decode_with(gpu, &ck, &tokens, ctx, &opts, true);
            assert!(host_hga == gpu_hga, "{ctx}: sketches + prefill residual in host memory change the logits");
            assert!(host_sel == gpu_sel, "{ctx}: sketches + prefill residual in host memory change the selections");
            log(format!("{ctx}: sketches and prefill residual in host memory: same logits and selections"));
        }
    }
}

/// A budget that covers every candidate routes every group: HGA is then dense attention over the same keys, and
/// the GPU's HGA mode must give the GPU dense mode's logits within the floor (and the 1e-2 / 99% is
/// printed). Also: graph replay of the HGA step gives the host launches' logits bit for bit.
#[test]
fn gpu_model_hga_covering_budget_is_dense() {
    let Some(gpu) = gpu("gpu_model_hga_covering_budget_is_dense") else { return };
    let _serial = common::serial();
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let v = ck.config.vocab_size;
    let (ctx, steps) = (2000usize, 40usize);
    let tokens = fixture_tokens(&dir, ctx + steps);
    let (cpu_dense, _) = cpu_decode(&ck, &tokens, ctx, None);
    let (gpu_dense, _) = gpu_decode(gpu, &ck, &tokens, ctx, AttentionMode::Dense, true);
    let params = HgaParams { budget: Budget::Fraction(1.0), ..HgaParams::default() };
    let hga = AttentionMode::Hga(HgaOptions { params, ..Default::default() });
    let (gpu_hga, sel) = gpu_decode(gpu, &ck, &tokens, ctx, hga.clone(), true);
    let (floor, floor_top1) = compare("covering: gpu dense vs cpu dense (floor)", &gpu_dense, &cpu_dense, v);
    let (rel, top1) = compare("covering: gpu hga vs gpu dense", &gpu_hga, &gpu_dense, v);
    let (rel_bound, top1_bound) = ((2.0 * floor).max(1e-2), (floor_top1 - 0.05).min(0.99));
    log(format!(
        "covering: bounds {rel_bound:.3e} / {top1_bound:.3}; issue target 1e-2 / 0.99 {}",
        if rel <= 1e-2 && top1 >= 0.99 { "met" } else { "NOT met" }
    ));
    assert!(rel <= rel_bound && top1 >= top1_bound, "covering: rel L2 {rel:.3e}, top-1 {top1}");
    // Every closed candidate group selected at every step: the candidates are the groups of the closed chunks
    // between the sink and the window.
    let covering = HgaParams { budget: Budget::Fraction(1.0), ..HgaParams::default() };
    for (i, step) in sel.iter().enumerate() {
        let geo = hga::hga::Geometry::new(&covering, ctx + i, 1);
        let want: Vec<u32> = (geo.first_chunk as u32 * 4..geo.end_chunk as u32 * 4).collect();
        assert!(!want.is_empty());
        for (l, h, g) in step {
            assert_eq!(g, &want, "step {i} layer {l} head {h}: a covering budget selects every candidate");
        }
    }
    let (host, _) = gpu_decode(gpu, &ck, &tokens, ctx, hga, false);
    assert!(host == gpu_hga, "HGA decode: graph replay and host launches differ");
}

/// Under a GPU memory cap: a cap below the weights refuses the load with the accountant's message (naming what did
/// not fit); a cap above it loads, runs, and the peak of the model's allocations stays under it.
#[test]
fn gpu_model_hga_respects_the_memory_cap() {
    if gpu("gpu_model_hga_respects_the_memory_cap").is_none() {
        return;
    }
    // A GPU of its own (its own context and accountant): the cap must not reach the tests running beside it.
    let own = hga::open_gpu(0).unwrap();
    let gpu = &own;
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let tokens = fixture_tokens(&dir, 1500);
    let opts = GpuModelOptions {
        capacity: 2048,
        max_tokens: 256,
        attention: AttentionMode::Hga(HgaOptions {
            params: HgaParams { budget: Budget::Fraction(0.25), ..HgaParams::default() },
            ..Default::default()
        }),
        host_embedding: false,
        prefill_residual_on_host: None,
        dense_kv_on_host: false,
    };
    let base = gpu.memory().report().live;
    gpu.set_memory_limit(Some(base + (4 << 20)));
    let e = GpuModel::load_with(gpu, &ck, &opts, |_, _| {}).err().expect("a 4 MiB cap cannot hold the fixture");
    let msg = e.to_string();
    log(format!("4 MiB cap: {msg}"));
    assert!(msg.contains("does not fit") && msg.contains("exceeded by"), "{msg}");
    assert_eq!(gpu.memory().report().live, base, "a refused load gives back what it took");
    let cap = base + (512 << 20);
    gpu.set_memory_limit(Some(cap));
    // A host K/V limit below one extent of the arena: the prompt is refused, naming the limit.
    let mut limited = opts.clone();
    if let AttentionMode::Hga(o) = &mut limited.attention {
        o.host_kv_limit = Some(1 << 20);
    }
    let mut m = GpuModel::load_with(gpu, &ck, &limited, |_, _| {}).unwrap();
    let e = m.forward(&tokens[..1400], false).expect_err("a 1 MiB host K/V limit cannot hold the arena");
    log(format!("1 MiB host K/V limit: {e}"));
    assert!(e.to_string().contains("over the host K/V limit 1.0 MiB"), "{e}");
    drop(m);
    let mut m = GpuModel::load_with(gpu, &ck, &opts, |_, _| {}).unwrap();
    // The auto cache takes what the cap leaves: here more than the whole context's groups, so every group.
    let st = m.hga_stats().unwrap().unwrap();
    log(format!("512 MiB cap: {} cache slots per KV head for a selection of {}", st.cache_slots, st.max_groups));
    assert_eq!(st.cache_slots, 2048 / 16, "the auto cache under a roomy cap holds every group of the context");
    m.forward(&tokens[..1400], false).unwrap();
    for &t in &tokens[1400..] {
        m.forward(&[t], false).unwrap();
    }
    let r = gpu.memory().report();
    log(format!("512 MiB cap:\n{r}"));
    assert!(r.peak <= cap, "peak {} over the cap {cap}", r.peak);
    drop(m);
    assert_eq!(gpu.memory().report().live, base, "the model gives back what it took");
}

/// Under a cap that holds the weights and the rest but not every layer's sketches, the load puts the sketches of
/// the last layers in mapped host memory, stays under the cap, and gives the logits of the uncapped model bit for
/// bit. (The prefill's residual stream is in host memory in both runs: under the cap it would otherwise move there
/// on its own and make room for every sketch.)
#[test]
fn gpu_model_hga_places_sketches_under_the_cap() {
    if gpu("gpu_model_hga_places_sketches_under_the_cap").is_none() {
        return;
    }
    let own = hga::open_gpu(0).unwrap();
    let gpu = &own;
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let (ctx, steps) = (4096usize, 8usize);
    let tokens = fixture_tokens(&dir, ctx + steps);
    let params = HgaParams { budget: Budget::Fraction(0.25), ..HgaParams::default() };
    let capacity = tokens.len() + 16;
    let opts = GpuModelOptions {
        capacity,
        max_tokens: 256,
        attention: AttentionMode::Hga(HgaOptions { params, ..Default::default() }),
        host_embedding: true,
        prefill_residual_on_host: Some(true),
        dense_kv_on_host: false,
    };
    let base = gpu.memory().report().live;
    let (free_logits, free_sel) = gpu_decode_with(gpu, &ck, &tokens, ctx, &opts, true);
    let free_peak = gpu.memory().report().peak - base;
    let c = &ck.config;
    let (nkv, nl) = (c.num_key_value_heads, c.num_hidden_layers);
    let sketches = (nl * nkv * capacity * 66) as u64;
    // The uncapped peak holds every sketch and the prefill; take away half of the sketches' bytes.
    let cap = base + free_peak - sketches / 2;
    gpu.memory().reset_peak();
    gpu.set_memory_limit(Some(cap));
    let mut m = GpuModel::load_with(gpu, &ck, &opts, |_, _| {}).unwrap();
    let placed = m.hga_stats().unwrap().unwrap().sketch_host_layers;
    log(format!(
        "cap {:.2} MiB over the base: {placed} of {nl} layers with host sketches",
        (cap - base) as f64 / 1048576.0
    ));
    assert!(placed > 0 && placed < nl, "{placed} of {nl} layers placed their sketches in host memory");
    // The host placements are in the host book: the sketches placed there, the embedding (host_embedding).
    let host = gpu.host_memory();
    let sketch_host = host.live_of(hga::kernels::hga_route::ROUTE_SUMMARIES);
    assert_eq!(sketch_host, (placed * nkv * capacity * 66) as u64, "host book: {:?}", host.report());
    assert!(host.live_of(hga::model::gpu::EMBEDDING) > 0, "host book: {:?}", host.report());
    m.forward(&tokens[..ctx], false).unwrap();
    let mut logits = Vec::new();
    for &t in &tokens[ctx..] {
        logits.extend(m.forward(&[t], false).unwrap());
    }
    let r = gpu.memory().report();
    log(format!("under the cap:\n{r}"));
    assert!(r.peak <= cap, "peak {} over the cap {cap}", r.peak);
    assert!(logits == free_logits, "placement under the cap changed the logits");
    let _ = free_sel;
    drop(m);
    gpu.set_memory_limit(None);
}

/// Dense attention with every layer's K/V cache in mapped host memory (the anchor of the host tier): the prompt
/// prefilled layer-major, the decode kernels reading and writing the mapped cache; the same kernels on the same
/// values as the GPU dense mode, so the same logits bit for bit.
#[test]
fn gpu_model_dense_kv_in_host_memory_is_dense() {
    let Some(gpu) = gpu("gpu_model_dense_kv_in_host_memory_is_dense") else { return };
    let _serial = common::serial();
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let (ctx, steps) = (1500usize, 12usize);
    let tokens = fixture_tokens(&dir, ctx + steps);
    let (on_gpu, _) = gpu_decode(gpu, &ck, &tokens, ctx, AttentionMode::Dense, true);
    let opts = GpuModelOptions {
        capacity: tokens.len() + 16,
        max_tokens: 256,
        attention: AttentionMode::Dense,
        host_embedding: false,
        prefill_residual_on_host: None,
        dense_kv_on_host: true,
    };
    let (on_host, _) = gpu_decode_with(gpu, &ck, &tokens, ctx, &opts, true);
    assert!(on_host == on_gpu, "dense with its K/V in host memory differs from dense on the GPU");
    log(format!("dense, K/V in host memory: {} decode logits identical to the GPU cache's", on_host.len()));
}

/// Selection replay (`GpuModel::set_selection_replay`, the benchmark switch of `hga generate --replay-trace`): a
/// trace built by hand replaces the routing's selection in every HGA layer, step by step (`hga_selections` is the
/// replayed step, through recorded graphs), the GPU caches count the hits its reuse implies exactly (no eviction:
/// few distinct groups, 2 x 32 slots), the trace wraps around after its last step, a trace at half the context
/// is scaled x2 in blocks of 2, and `None` gives the routing back. Refused on a dense model.
#[test]
fn gpu_model_hga_replays_a_selection_trace() {
    use hga::reference::kv::SelectionTrace;
    let Some(gpu) = gpu("gpu_model_hga_replays_a_selection_trace") else { return };
    let _serial = common::serial();
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let (nl, nkv) = (ck.config.num_hidden_layers, ck.config.num_key_value_heads);
    let ctx = 2000usize;
    let tokens = fixture_tokens(&dir, ctx + 16);
    // Layer 0 dense: the replay maps streams by absolute layer, and skips the dense layer.
    let params = HgaParams { budget: Budget::Fraction(0.25), dense_layers: 1, ..HgaParams::default() };
    let opts = GpuModelOptions {
        capacity: tokens.len() + 16,
        max_tokens: 256,
        attention: AttentionMode::Hga(HgaOptions { params, ..Default::default() }),
        host_embedding: false,
        prefill_residual_on_host: None,
        dense_kv_on_host: false,
    };
    let mut m = GpuModel::load_with(gpu, &ck, &opts, |_, _| {}).unwrap();
    m.forward(&tokens[..ctx], false).unwrap();
    // Stream s = l * nkv + h selects groups offset by s (all below the window's first group, 108 at 2000).
    let pattern: [[u32; 3]; 4] = [[10, 40, 70], [10, 50, 70], [20, 40, 80], [10, 20, 50]];
    let hand = SelectionTrace {
        layers: nl,
        kv_heads: nkv,
        first_pos: ctx,
        steps: pattern
            .iter()
            .map(|p| (0..nl * nkv).map(|s| p.iter().map(|g| g + s as u32).collect()).collect())
            .collect(),
    };
    m.set_selection_replay(Some(hand.clone())).unwrap();
    let r = m.selection_replay().unwrap();
    assert_eq!((r.factor, r.block), (1, 1), "a trace at the model's context is replayed as it is");
    assert_eq!(r.scaled.steps, hand.steps);
    // Per stream: hits and misses of steps T0 T1 T2 T3 T0 T1 on an empty cache.
    let want = [(0u64, 3u64), (2, 1), (1, 2), (3, 0), (3, 0), (3, 0)];
    let hga_layers = m.hga_stats().unwrap().unwrap().hga_layers as u64;
    assert_eq!(hga_layers, nl as u64 - 1);
    let streams = hga_layers * nkv as u64;
    let mut last = m.hga_stats().unwrap().unwrap();
    for (i, &(hits, misses)) in want.iter().enumerate() {
        let logits = m.forward(&[tokens[ctx + i]], false).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()), "step {i}: non-finite logits under replay");
        let t = i % pattern.len();
        let sel = m.hga_selections().unwrap();
        assert_eq!(sel.len(), nl - 1);
        for (l, heads) in sel {
            for (h, g) in heads.iter().enumerate() {
                assert_eq!(g, &hand.steps[t][l * nkv + h], "step {i} (trace step {t}) layer {l} head {h}");
            }
        }
        let st = m.hga_stats().unwrap().unwrap();
        let (dh, dm) = (st.hits - last.hits, st.misses - last.misses);
        log(format!("replay step {i} (trace step {t}): {dh} hits, {dm} misses over {streams} streams"));
        assert_eq!((dh, dm), (hits * streams, misses * streams), "step {i}: cache hits and misses");
        last = st;
    }
    assert!(m.recorded_steps() > 0, "the replayed steps ran as recorded graphs");
    assert_eq!(m.selection_replay().unwrap().steps_replayed(), want.len());

    // A trace recorded at half this context: x2, each group a block of 2 (the width 4 is far below 32).
    let half = SelectionTrace {
        layers: nl,
        kv_heads: nkv,
        first_pos: m.len() / 2,
        steps: vec![(0..nl * nkv).map(|s| vec![5 + s as u32, 30 + s as u32]).collect(); 2],
    };
    m.set_selection_replay(Some(half)).unwrap();
    let r = m.selection_replay().unwrap();
    assert_eq!((r.factor, r.block), (2, 2));
    // Both steps select the same groups: the first replay finds some cached from above or none (4 looked up per
    // stream), every later one finds all 4 (step 1, and step 0 again after the wrap).
    let mut last = m.hga_stats().unwrap().unwrap();
    for i in 0..3 {
        m.forward(&[tokens[ctx + want.len() + i]], false).unwrap();
        for (l, heads) in m.hga_selections().unwrap() {
            for (h, g) in heads.iter().enumerate() {
                let (a, b) = (2 * (5 + (l * nkv + h) as u32), 2 * (30 + (l * nkv + h) as u32));
                assert_eq!(g, &vec![a, a + 1, b, b + 1], "x2 step {i} layer {l} head {h}");
            }
        }
        let st = m.hga_stats().unwrap().unwrap();
        let (dh, dm) = (st.hits - last.hits, st.misses - last.misses);
        log(format!("x2 replay step {i}: {dh} hits, {dm} misses"));
        assert_eq!(dh + dm, 4 * streams, "x2 step {i}: 4 groups per stream looked up");
        if i > 0 {
            assert_eq!((dh, dm), (4 * streams, 0), "x2 step {i}: the groups of the step before, all cached");
        }
        last = st;
    }

    // Back to the routing: the next step selects what the query routes to, not the replayed groups.
    m.set_selection_replay(None).unwrap();
    assert!(m.selection_replay().is_none());
    m.forward(&[tokens[ctx + want.len() + 3]], false).unwrap();
    let own = m.hga_selections().unwrap();
    let replayed_shape = own.iter().all(|(l, heads)| {
        heads.iter().enumerate().all(|(h, g)| {
            let (a, b) = (2 * (5 + (l * nkv + h) as u32), 2 * (30 + (l * nkv + h) as u32));
            g == &vec![a, a + 1, b, b + 1]
        })
    });
    assert!(!replayed_shape, "after set_selection_replay(None) the selection is still the replayed one");
    assert!(own.iter().any(|(_, heads)| heads.iter().any(|g| !g.is_empty())), "the routing selects groups again");

    // Dense: refused.
    let dense = GpuModelOptions { attention: AttentionMode::Dense, ..opts };
    let mut d = GpuModel::load_with(gpu, &ck, &dense, |_, _| {}).unwrap();
    let e = d.set_selection_replay(Some(hand)).expect_err("replay on a dense model");
    assert!(e.to_string().contains("HGA attention mode"), "{e}");
}

/// The disk tier on the GPU path (`HgaOptions::disk`): the history in a page file behind a RAM cache of a quarter
/// of the K/V (so that steps read groups back from disk), each step launched from the host with the host serving
/// each layer's misses between its lookup and its gather. The same kernels read the same bytes as from the host
/// arena, so the logits and selections equal the host tier's bit for bit; the page file is removed with the model.
#[test]
fn gpu_model_hga_disk_tier_is_the_host_tier() {
    if gpu("gpu_model_hga_disk_tier_is_the_host_tier").is_none() {
        return;
    }
    let own = hga::open_gpu(0).unwrap();
    let gpu = &own;
    let dir = fixture_dir();
    let ck = Checkpoint::open(&dir).unwrap();
    let (ctx, steps) = (3000usize, 48usize);
    let tokens = fixture_tokens(&dir, ctx + steps);
    let c = &ck.config;
    // 30% of 3064 positions: about 600 routed tokens past the sink (64) and the window (256) of every step.
    let params = HgaParams { budget: Budget::Fraction(0.3), ..HgaParams::default() };
    let hga = HgaOptions { params, arena_at_load: true, ..Default::default() };
    let opts = |hga: HgaOptions| GpuModelOptions::new(tokens.len() + 16, 256, AttentionMode::Hga(hga));
    let (host_logits, host_sel) = gpu_decode_with(gpu, &ck, &tokens, ctx, &opts(hga.clone()), false);
    let kv_bytes = (c.num_hidden_layers * c.num_key_value_heads * tokens.len() * 512) as u64;
    let kv_dir = std::env::temp_dir().join(format!("hga-gpu-disk-{}", std::process::id()));
    std::fs::create_dir_all(&kv_dir).unwrap();
    let disk = hga::kv::disk::DiskConfig { dir: kv_dir.clone(), cache_bytes: kv_bytes / 4, ..Default::default() };
    let disk_opts = opts(HgaOptions { disk: Some(disk), ..hga });
    let mut m = GpuModel::load_with(gpu, &ck, &disk_opts, |_, _| {}).unwrap();
    m.forward(&tokens[..ctx], false).unwrap();
    let after_prompt = m.hga_stats().unwrap().unwrap();
    let (mut logits, mut sels) = (Vec::new(), Vec::new());
    for &t in &tokens[ctx..] {
        logits.extend(m.forward(&[t], false).unwrap());
        let mut step = Vec::new();
        for (l, heads) in m.hga_selections().unwrap() {
            for (h, g) in heads.into_iter().enumerate() {
                step.push((l, h, g));
            }
        }
        sels.push(step);
    }
    let st = m.hga_stats().unwrap().unwrap();
    log(format!(
        "disk tier, RAM cache {:.2} MB of {:.2} MB of K/V: prompt {:.2} MB written in {:.2} s host; decode {} of {} \
         groups from RAM, {:.2} MB read from disk, GPU cache {:.1}% hits, {:.3} s host in the tier",
        kv_bytes as f64 / 4e6,
        kv_bytes as f64 / 1e6,
        after_prompt.disk_bytes_written as f64 / 1e6,
        after_prompt.disk_host_s,
        st.disk_ram_hits,
        st.disk_ram_hits + st.disk_ram_misses,
        (st.disk_bytes_read - after_prompt.disk_bytes_read) as f64 / 1e6,
        100.0 * st.hit_rate(),
        st.disk_host_s - after_prompt.disk_host_s
    ));
    assert!(
        host_sel.iter().all(|step| step.iter().any(|(_, _, g)| !g.is_empty())),
        "every step must route groups beyond the sink and the window"
    );
    assert!(after_prompt.disk_bytes_written > 0, "the prompt's K/V must reach the page file");
    assert!(st.disk_ram_misses > 0 && st.disk_bytes_read > 0, "a quarter-size RAM cache must read from disk");
    assert_eq!(sels, host_sel, "the disk tier changed a selection");
    assert!(logits == host_logits, "the disk tier changed the logits");
    let files = || std::fs::read_dir(&kv_dir).unwrap().count();
    assert_eq!(files(), 1, "one page file while the model lives");
    drop(m);
    assert_eq!(files(), 0, "the page file is removed with the model");
    std::fs::remove_dir_all(&kv_dir).ok();
}
