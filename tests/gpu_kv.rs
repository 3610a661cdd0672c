//! GPU tests of the working-set cache kernels (`hga_kv_append`, `hga_kv_lookup`, `hga_kv_gather`,
//! `hga_kv_advance`) against the CPU model `reference::kv` and a host copy of every K/V row (`check::kv`): a cold
//! gather into a poisoned pool, random step sequences with evictions, a recorded step replayed with the position
//! advancing on the device, and the hit rate on a replayed selection trace of the fixture (equal to the model's).
//! Without a CUDA device: one SKIP line per test.
mod common;
use common::gpu;
use std::io::Write;

use hga::check::kv::{steps, KvCase};
use hga::check::Outcome;
use hga::kernels::kv::{hga_kv_advance, hga_kv_gather, hga_kv_lookup};
use hga::kv::gpu_cache::{ArenaTable, GpuCache, GpuCacheConfig};
use hga::kv::pinned::PinnedMemory;
use hga::kv::{ArenaLayout, ExtentMemory};
use hga::reference::kv::{clock_hits, SelectionTrace};
use rand::{rngs::StdRng, SeedableRng};

fn assert_ok(o: Outcome) {
    assert!(o.ok, "{} {}: {}", o.kernel, o.shape, o.detail);
    let _ = writeln!(std::io::stderr(), "ok {} {}", o.kernel, o.shape);
}

fn seed() -> u64 {
    std::env::var("HGA_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x6b76)
}

#[test]
fn gpu_kv_cold_gather_into_poisoned_slots() {
    let Some(g) = gpu("gpu_kv cold gather") else { return };
    let _serial = common::serial();
    let mut rng = StdRng::seed_from_u64(seed());
    for (n_kv, max_groups, p0, e) in [(4, 100, 4000, 64), (2, 256, 8200, 100), (3, 33, 2100, 7)] {
        let c = KvCase {
            layers: 2,
            n_kv,
            groups_per_extent: e,
            cache_slots: max_groups + 3,
            max_groups,
            ref_hit: 1,
            ref_fill: 0,
            p0,
            steps: 1,
            graph: false,
        };
        assert_ok(steps(g, c, &mut rng).unwrap());
    }
}

#[test]
fn gpu_kv_random_step_sequences() {
    let Some(g) = gpu("gpu_kv random steps") else { return };
    let _serial = common::serial();
    let mut rng = StdRng::seed_from_u64(seed() + 1);
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    for _ in 0..n {
        let c = KvCase::random(&mut rng, false);
        assert_ok(steps(g, c, &mut rng).unwrap());
    }
}

#[test]
fn gpu_kv_recorded_step_replays_with_the_position_on_the_device() {
    let Some(g) = gpu("gpu_kv graph replay") else { return };
    let _serial = common::serial();
    let mut rng = StdRng::seed_from_u64(seed() + 2);
    for (p0, steps_n) in [(0, 90), (700, 120)] {
        let mut c = KvCase::random(&mut rng, true);
        c.p0 = p0;
        c.steps = steps_n;
        assert_ok(steps(g, c, &mut rng).unwrap());
    }
}

/// The fixture trace: `HGA_KV_TRACE` (a file written by `SelectionTrace::to_bytes`), else a short one recorded
/// here from the CPU HGA reference.
fn trace() -> SelectionTrace {
    if let Ok(p) = std::env::var("HGA_KV_TRACE") {
        let b = std::fs::read(&p).unwrap_or_else(|e| panic!("HGA_KV_TRACE={p}: {e}"));
        return SelectionTrace::from_bytes(&b).unwrap();
    }
    let dir = ["fixtures/qwen3-moe-bytes", concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes")]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|d| d.join("config.json").exists())
        .expect("fixtures/qwen3-moe-bytes (run from the repository root)");
    let text = std::fs::read_to_string(dir.join("eval/torch.txt")).unwrap();
    SelectionTrace::record(&dir, &text, 1024, 24, 8).unwrap()
}

#[test]
fn gpu_kv_trace_hit_rate_equals_the_model() {
    let Some(g) = gpu("gpu_kv trace hit rate") else { return };
    let _serial = common::serial();
    let t = trace();
    let max_sel = t.max_selected().max(1);
    let end = t.first_pos + t.steps.len() + 1;
    let e = 64;
    let layout = ArenaLayout { layers: t.layers, kv_heads: t.kv_heads, groups_per_extent: e };
    let n_ext = end.div_ceil(16).div_ceil(e);
    let mem = PinnedMemory::new(g.context().clone());
    let extents: Vec<_> = (0..n_ext).map(|_| mem.alloc(layout.extent_bytes()).unwrap()).collect();
    let arena = ArenaTable::new(g, layout, &extents, n_ext).unwrap();
    let s = g.stream();
    for mult in [2usize, 4] {
        let mut pos = s.clone_htod(&[t.first_pos as u32]).unwrap();
        let mut caches: Vec<GpuCache> = (0..t.layers)
            .map(|l| {
                let cfg = GpuCacheConfig {
                    layer: l,
                    n_kv: t.kv_heads,
                    cache_slots: mult * max_sel,
                    table_groups: n_ext * e,
                    max_groups: max_sel,
                    ref_hit: 1,
                    ref_fill: 0,
                };
                GpuCache::new(g, cfg).unwrap()
            })
            .collect();
        let mut sel_dev = s.alloc_zeros::<u32>(t.kv_heads * max_sel).unwrap();
        for st in 0..t.steps.len() {
            for (l, c) in caches.iter_mut().enumerate() {
                s.memcpy_htod(&t.padded_step(st, l, max_sel), &mut sel_dev).unwrap();
                hga_kv_lookup(g, c, &pos, &sel_dev, &arena).unwrap();
                hga_kv_gather(g, c, &pos, &arena).unwrap();
            }
            hga_kv_advance(g, &mut pos).unwrap();
        }
        g.synchronize().unwrap();
        let (mut hits, mut sel) = (0u64, 0u64);
        for (l, c) in caches.iter().enumerate() {
            for (h, cn) in c.counters().iter().enumerate() {
                let stream = t.stream(l, h);
                let (mh, mm) = clock_hits(&stream, mult * max_sel, 1, 0);
                // `clock_hits` sizes the cache as given (>= max selected): the same cache.
                assert_eq!((cn.hits, cn.misses), (mh, mm), "layer {l} head {h}: GPU counters differ from the model");
                assert_eq!(cn.hits + cn.misses, stream.iter().map(|s| s.len() as u64).sum::<u64>());
                hits += cn.hits;
                sel += cn.hits + cn.misses;
            }
        }
        let _ = writeln!(
            std::io::stderr(),
            "trace ({} steps from {}, <= {max_sel} groups): {mult}x cache, hit rate {:.1}%",
            t.steps.len(),
            t.first_pos,
            100.0 * hits as f64 / sel.max(1) as f64
        );
        assert!(hits > 0 || t.steps.len() < 2, "no hit at all on a trace of consecutive steps");
    }
}

/// Writes a fixture trace for the bench and the hit-rate test (CPU only, minutes):
/// `HGA_KV_TRACE_OUT=FILE [HGA_KV_TRACE_SPEC=context,steps,groups] cargo test --release --test gpu_kv -- --ignored`.
#[test]
#[ignore]
fn record_fixture_trace() {
    let Ok(out) = std::env::var("HGA_KV_TRACE_OUT") else { return };
    let spec = std::env::var("HGA_KV_TRACE_SPEC").unwrap_or_else(|_| "8192,256,16".into());
    let v: Vec<usize> = spec.split(',').map(|x| x.parse().unwrap()).collect();
    let dir = ["fixtures/qwen3-moe-bytes", concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes")]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|d| d.join("config.json").exists())
        .expect("fixtures/qwen3-moe-bytes (run from the repository root)");
    let text = std::fs::read_to_string(dir.join("eval/torch.txt")).unwrap();
    let t = SelectionTrace::record(&dir, &text, v[0], v[1], v[2]).unwrap();
    let b = t.to_bytes();
    assert_eq!(SelectionTrace::from_bytes(&b).unwrap(), t);
    std::fs::write(&out, &b).unwrap();
    let _ = writeln!(
        std::io::stderr(),
        "wrote {out}: {} bytes, {} steps, <= {} groups",
        b.len(),
        t.steps.len(),
        t.max_selected()
    );
}

/// Prints the CPU model's hit rates (CLOCK as on the GPU, with its reference-count variants), LRU and Belady's
/// optimum for the trace of `HGA_KV_TRACE` at caches of 2x / 4x / 8x / 16x its largest selection (CPU only):
/// `HGA_KV_TRACE=FILE cargo test --release --test gpu_kv -- --ignored trace_hit_rates_cpu --nocapture`.
#[test]
#[ignore]
fn trace_hit_rates_cpu() {
    let Ok(p) = std::env::var("HGA_KV_TRACE") else { return };
    let t = SelectionTrace::from_bytes(&std::fs::read(&p).unwrap()).unwrap();
    let max_sel = t.max_selected().max(1);
    let streams: Vec<Vec<Vec<u32>>> =
        (0..t.layers).flat_map(|l| (0..t.kv_heads).map(move |h| (l, h))).map(|(l, h)| t.stream(l, h)).collect();
    let sel: u64 = streams.iter().flatten().map(|s| s.len() as u64).sum();
    let distinct: u64 =
        streams.iter().map(|s| s.iter().flatten().collect::<std::collections::HashSet<_>>().len() as u64).sum();
    println!(
        "trace: {} layers x {} KV heads, {} steps from {}, <= {max_sel} groups; {sel} selections, {distinct} distinct \
         (compulsory-miss bound: {:.1}% hits)",
        t.layers,
        t.kv_heads,
        t.steps.len(),
        t.first_pos,
        100.0 * (sel - distinct) as f64 / sel as f64
    );
    let r = |h: u64| 100.0 * h as f64 / sel as f64;
    for mult in [2usize, 4, 8, 16] {
        let slots = mult * max_sel;
        let clock = |rh, rf| streams.iter().map(|x| hga::reference::kv::clock_hits(x, slots, rh, rf).0).sum::<u64>();
        let lru: u64 = streams.iter().map(|x| hga::reference::kv::lru_hits(x, slots)).sum();
        let bel: u64 = streams.iter().map(|x| hga::reference::kv::belady_hits(x, slots)).sum();
        println!(
            "{mult:>2}x ({slots:>4} slots): CLOCK {:.1}% (ref 2/0 {:.1}%, 3/0 {:.1}%, 1/1 {:.1}%, 3/1 {:.1}%), LRU {:.1}%, \
             Belady {:.1}%",
            r(clock(1, 0)),
            r(clock(2, 0)),
            r(clock(3, 0)),
            r(clock(1, 1)),
            r(clock(3, 1)),
            r(lru),
            r(bel)
        );
    }
}
