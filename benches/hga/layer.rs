//! One layer's HGA decode attention step end to end through the embeddable layer (`hga::hga::HgaLayer`), the
//! working set resident, Qwen3-30B-A3B shapes (32 query heads on 4 KV heads, head_dim 128, default routing: 3%
//! budget, 8x shortlist, the selection width sized from the budget at the context), at 64K / 128K / 256K context,
//! inside one CUDA graph per context, against the dense decode attention at 64K measured in the same run (issue
//! 12's goal: <= 0.25x dense at 64K, at most +20% from 64K to 256K).
//!
//! A step is `HgaLayer::append` (window ring, sink, mapped arena, the summary of a closing chunk) then
//! `HgaLayer::attend` (stage 1 + stage 2 at the device position, cache lookup, gather of the misses from mapped
//! pinned memory, routed split-K attention + merge) and the position's advance. The history comes from
//! `prefill_history` (random keys); the query stays fixed, so after the warm-up the selection is resident and a
//! step's misses are the groups its moving window hands to the routing; the hit rate of the timed replays is
//! printed beside the time. Rows also time `attend` alone (no append).
use crate::common;
use half::bf16;
use hga::hga::gpu_layer::{advance_position, HgaLayer, HgaLayerConfig};
use hga::hga::Budget;
use hga::kv::{ArenaLayout, ArenaTable, ExtentMemory, PinnedMemory};
use hga::runtime::Gpu;

const NH: usize = 32;
const NKV: usize = 4;
const D: usize = 128;
const GROUPS_PER_EXTENT: usize = 4096;

pub fn run(gpu: &Gpu) {
    let s = gpu.stream();
    // The anchor: dense decode attention at 64K, K/V [n_kv][ctx][128], graph replay.
    let dense_ctx = 65536;
    let kc = s.clone_htod(&common::rand_bf16(NKV * dense_ctx * D, 11, 1.0)).unwrap();
    let vc = s.clone_htod(&common::rand_bf16(NKV * dense_ctx * D, 12, 1.0)).unwrap();
    let qb = s.clone_htod(&common::rand_bf16(NH * D, 13, 1.0)).unwrap();
    let shape = hga::kernels::AttentionShape {
        tokens: 1,
        n_heads: NH,
        n_kv_heads: NKV,
        capacity: dense_ctx,
        start: dense_ctx - 1,
    };
    let mut dws = hga::kernels::DecodeWorkspace::new(gpu, 1, NH, hga::kernels::attention::DECODE_MAX_SPLITS).unwrap();
    let mut out = s.alloc_zeros::<bf16>(NH * D).unwrap();
    let mut lse = s.alloc_zeros::<f32>(NH).unwrap();
    let dense_us = 1e3
        * common::time_graph_ms(gpu, 10, 20, |_| {
            hga::kernels::hga_attention_decode(gpu, &qb, &kc, &vc, &mut dws, &mut out, &mut lse, &shape).unwrap();
        });
    drop((kc, vc, dws));
    println!("RESULT layer_anchor dense_decode ctx={dense_ctx} {dense_us:.2} us");
    let q32: Vec<f32> = s.clone_dtoh(&qb).unwrap().iter().map(|v| v.to_f32()).collect();
    let dq = s.clone_htod(&q32).unwrap();
    let k_new = s.clone_htod(&common::rand_bf16(NKV * D, 14, 1.0)).unwrap();
    let v_new = s.clone_htod(&common::rand_bf16(NKV * D, 15, 1.0)).unwrap();
    let mut rows = Vec::new();
    let mut first_us = None;
    for ctx in [65536usize, 131072, 262144] {
        let layout = ArenaLayout { layers: 1, kv_heads: NKV, groups_per_extent: GROUPS_PER_EXTENT };
        let mem = PinnedMemory::new(gpu.context().clone());
        let n_ext = (ctx / 16).div_ceil(GROUPS_PER_EXTENT);
        let extents: Vec<_> = (0..n_ext).map(|_| mem.alloc(layout.extent_bytes()).unwrap()).collect();
        let arena = ArenaTable::new(gpu, layout, &extents, n_ext).unwrap();
        let cfg = HgaLayerConfig::new(0, NH, NKV, ctx, Budget::Fraction(0.03));
        let mut layer = HgaLayer::new(gpu, &cfg, &arena).unwrap();
        // A history of ctx - 1024 tokens, then steps: far enough back for every warm-up, capture and replay.
        let t0 = ctx - 1024;
        let k_all = s.clone_htod(&common::rand_bf16(t0 * NKV * D, 21 + ctx as u64, 1.0)).unwrap();
        let v_all = s.clone_htod(&common::rand_bf16(t0 * NKV * D, 22 + ctx as u64, 1.0)).unwrap();
        layer.prefill_history(gpu, &k_all, &v_all, t0, &arena).unwrap();
        drop((k_all, v_all));
        let mut pos = s.clone_htod(&[t0 as u32]).unwrap();
        let mut timed = |with_append: bool, pos: &mut cudarc::driver::CudaSlice<u32>, layer: &mut HgaLayer| {
            for _ in 0..3 {
                if with_append {
                    layer.append(gpu, pos, &k_new, &v_new, &arena).unwrap();
                }
                layer.attend(gpu, pos, &qb, Some(&dq), &mut out, &mut lse, &arena).unwrap();
                advance_position(gpu, pos).unwrap();
            }
            gpu.synchronize().unwrap();
            let before = layer.cache_totals();
            let us = 1e3
                * common::time_graph_ms(gpu, 20, 20, |_| {
                    if with_append {
                        layer.append(gpu, pos, &k_new, &v_new, &arena).unwrap();
                    }
                    layer.attend(gpu, pos, &qb, Some(&dq), &mut out, &mut lse, &arena).unwrap();
                    advance_position(gpu, pos).unwrap();
                });
            gpu.synchronize().unwrap();
            let after = layer.cache_totals();
            let (h, m) = (after.hits - before.hits, after.misses - before.misses);
            (us, h as f64 / (h + m).max(1) as f64, m as f64 / 440.0) // 20 warm-up calls + 21 replays of 20 recorded steps
        };
        let (us, hit, miss_per_step) = timed(true, &mut pos, &mut layer);
        let (us_attend, _, _) = timed(false, &mut pos, &mut layer);
        let n_entries = s.clone_dtoh(&layer.cache.n_entries).unwrap();
        let stats = s.clone_dtoh(&layer.route_workspace().stats).unwrap();
        let tokens = n_entries.iter().map(|&n| n as usize * 16).max().unwrap_or(0);
        let base = *first_us.get_or_insert(us);
        let cache_mb = layer.cache.cfg.device_bytes() as f64 / 1e6;
        println!(
            "RESULT layer hga ctx={ctx} step_us={us:.2} attend_only_us={us_attend:.2} vs_dense64k={:.3} vs_64k={:.3} \
             n_c={} n_g={} entries_tokens={tokens} hit_rate={hit:.4} misses_per_step={miss_per_step:.1} \
             cache_mb={cache_mb:.1}",
            us / dense_us,
            us / base,
            stats[0],
            stats[1],
        );
        rows.push(format!(
            "{:>4}K: {us:>6.2} us per layer step ({us_attend:.2} without the append) = {:.3}x dense decode at 64K \
             ({dense_us:.2} us), {:.2}x the 64K step; n_g {} ({tokens} tokens per KV head), hits {:.1}%, cache {cache_mb:.0} MB",
            ctx / 1024,
            us / dense_us,
            us / base,
            stats[1],
            100.0 * hit
        ));
    }
    println!("\nHGA decode attention, one layer, working set resident (append + route + lookup + gather + attend):");
    for r in rows {
        println!("  {r}");
    }
}
