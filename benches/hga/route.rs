//! Routing benchmark rows (H200, CUDA graphs, Qwen3-30B shapes: 32 query heads, 4 KV heads, d 128), each with its
//! same-run anchor:
//! - stage 1 + stage 2 + top-k for one layer at 64K, 3% budget, 8x shortlist, device-resident position, against
//!   our dense decode attention at 64K (`hga_attention_decode`, graph replay);
//! - sketch scores of every group + top-k (no chunk stage; stage 1 then only normalizes) at 64K against the bytes
//!   floor 4 x 64K x 66 B at the same-run copy bandwidth;
//! - the summary kernel: one closing chunk (decode, also its no-op launch) and a 4K-token prefill.
use crate::common;
use half::bf16;
use hga::hga::Budget;
use hga::kernels::hga_route::{
    hga_route, hga_route_stage1, hga_route_stage2, hga_route_summary, KeySource, RoutePos, RouteShape, RouteSummaries,
    RouteWorkspace, SummaryChunks,
};

pub fn run(gpu: &hga::runtime::Gpu) {
    let s = gpu.stream();
    let (nh, nkv, d, ctx) = (32usize, 4usize, 128usize, 65536usize);
    // Copy bandwidth (read + write) of 256 MiB.
    let n_copy = 128 << 20;
    let src = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let mut dst = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let ms = common::time_ms(gpu, 5, 20, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * (n_copy * 2) as f64 / ms / 1e6;
    drop((src, dst));
    println!("route: copy bandwidth {copy_gbs:.1} GB/s (cuMemcpyDtoD 256 MiB)");
    // Dense decode at 64K (anchor), K/V [n_kv][ctx][128].
    let kc = s.clone_htod(&common::rand_bf16(nkv * ctx * d, 1, 1.0)).unwrap();
    let vc = s.clone_htod(&common::rand_bf16(nkv * ctx * d, 2, 1.0)).unwrap();
    let qb = s.clone_htod(&common::rand_bf16(nh * d, 3, 1.0)).unwrap();
    let shape = hga::kernels::AttentionShape { tokens: 1, n_heads: nh, n_kv_heads: nkv, capacity: ctx, start: ctx - 1 };
    let mut dws = hga::kernels::DecodeWorkspace::new(gpu, 1, nh, hga::kernels::attention::DECODE_MAX_SPLITS).unwrap();
    let mut out = s.alloc_zeros::<bf16>(nh * d).unwrap();
    let mut lse = s.alloc_zeros::<f32>(nh).unwrap();
    let dense_us = 1e3
        * common::time_graph_ms(gpu, 10, 20, |_| {
            hga::kernels::hga_attention_decode(gpu, &qb, &kc, &vc, &mut dws, &mut out, &mut lse, &shape).unwrap();
        });
    println!("RESULT route_anchor dense_decode ctx={ctx} {dense_us:.2} us");
    // Summaries of the whole context (built once by the summary kernel, prefill form).
    // Four copies (19 MB each: 2 MB of min/max, 17 MB of sketches), rotated so that each replay reads from HBM
    // rather than from the 50 MB L2.
    let keys = KeySource::dense(gpu, &kc, ctx * d, d);
    let mut sets: Vec<RouteSummaries> = (0..4)
        .map(|_| {
            let mut m = RouteSummaries::new(gpu, nkv, ctx).unwrap();
            hga_route_summary(gpu, &keys, &mut m, SummaryChunks::Range { first: 0, count: ctx / 64 }).unwrap();
            m
        })
        .collect();
    let q: Vec<f32> = common::rand_bf16(nh * d, 4, 1.0).iter().map(|v| v.to_f32()).collect();
    let dq = s.clone_htod(&q).unwrap();
    let dpos = s.clone_htod(&[(ctx - 1) as u32]).unwrap();
    let mut rows = Vec::new();
    // HGA_BENCH_SHORTLIST=8|inf times one of the two modes (e.g. under a profiler).
    let only = std::env::var("HGA_BENCH_SHORTLIST").ok().and_then(|v| v.parse::<f64>().ok());
    let modes = [("route s1+s2 (8x shortlist)", 8.0), ("route no chunk stage", f64::INFINITY)];
    for (name, shortlist) in modes.into_iter().filter(|m| only.is_none_or(|o| o == m.1)) {
        let mut sh = RouteShape::default_for(nh, nkv, 1, ctx, Budget::Fraction(0.03));
        sh.shortlist = shortlist;
        if shortlist.is_infinite() {
            sh.max_kept = 1;
        }
        let mut ws = RouteWorkspace::new(gpu, &sh).unwrap();
        let mut sel = s.alloc_zeros::<u32>(nkv * sh.max_groups).unwrap();
        let pos = RoutePos::Device(&dpos);
        let us = 1e3
            * common::time_graph_ms(gpu, 20, 20, |i| {
                hga_route(gpu, &sh, &keys, &sets[i % 4], &dq, pos, &mut ws, &mut sel).unwrap();
            });
        let us1 = 1e3
            * common::time_graph_ms(gpu, 20, 20, |i| {
                hga_route_stage1(gpu, &sh, &keys, &sets[i % 4], &dq, pos, &mut ws).unwrap();
            });
        let us2 = 1e3
            * common::time_graph_ms(gpu, 20, 20, |i| {
                hga_route_stage2(gpu, &sh, &sets[i % 4], &dq, pos, &mut ws, &mut sel).unwrap();
            });
        let (c1, c2) = sh.auto_ctas(gpu.sm_count());
        let stats = s.clone_dtoh(&ws.stats).unwrap();
        let n_cand2 = if shortlist.is_infinite() { (ctx / 64 - 6) * 4 } else { stats[0] as usize * 4 };
        let floor_us = (nkv * n_cand2 * 16 * 66) as f64 / copy_gbs / 1e3;
        println!(
            "RESULT route {name} ctx={ctx} total_us={us:.2} stage1_us={us1:.2} stage2_us={us2:.2} n_c={} n_g={} \
             ctas={c1}/{c2} sketch_floor_us={floor_us:.2} vs_dense={:.3} vs_floor={:.2}",
            stats[0],
            stats[1],
            us / dense_us,
            us / floor_us
        );
        rows.push(format!(
            "{name:<30} {us:>7.2} us (s1 {us1:.2}, s2 {us2:.2}); {:.3}x dense decode {dense_us:.2} us; sketch bytes floor {floor_us:.2} us ({:.2}x)",
            us / dense_us,
            us / floor_us
        ));
    }
    // Grid sweeps (CTAs per KV head) of each stage, graph replay.
    for (shortlist, c1s, c2s) in
        [(8.0, [11usize, 22, 44], [33usize, 66, 132]), (f64::INFINITY, [3, 6, 12], [66, 132, 264])]
    {
        for (c1, c2) in c1s.iter().zip(c2s) {
            let mut sh = RouteShape::default_for(nh, nkv, 1, ctx, Budget::Fraction(0.03));
            sh.shortlist = shortlist;
            if shortlist.is_infinite() {
                sh.max_kept = 1;
            }
            sh.ctas1 = *c1;
            sh.ctas2 = c2;
            let mut ws = RouteWorkspace::new(gpu, &sh).unwrap();
            let mut sel = s.alloc_zeros::<u32>(nkv * sh.max_groups).unwrap();
            let pos = RoutePos::Device(&dpos);
            let t1 = 1e3
                * common::time_graph_ms(gpu, 20, 20, |i| {
                    hga_route_stage1(gpu, &sh, &keys, &sets[i % 4], &dq, pos, &mut ws).unwrap();
                });
            let t2 = 1e3
                * common::time_graph_ms(gpu, 20, 20, |i| {
                    hga_route_stage2(gpu, &sh, &sets[i % 4], &dq, pos, &mut ws, &mut sel).unwrap();
                });
            println!(
                "RESULT route_sweep shortlist={shortlist} ctas1={c1} stage1_us={t1:.2} ctas2={c2} stage2_us={t2:.2}"
            );
        }
    }
    // Summary kernel: decode form (one closing chunk, and a no-op step), prefill of 4K tokens.
    let closing = s.clone_htod(&[(ctx / 2) as u32]).unwrap();
    let noop = s.clone_htod(&[(ctx / 2 + 1) as u32]).unwrap();
    for (name, p) in [("summary decode (chunk closes)", &closing), ("summary decode (no-op step)", &noop)] {
        let us = 1e3
            * common::time_graph_ms(gpu, 20, 20, |_| {
                hga_route_summary(gpu, &keys, &mut sets[0], SummaryChunks::Closed(p)).unwrap();
            });
        println!("RESULT route {name} {us:.2} us");
        rows.push(format!("{name:<30} {us:>7.2} us"));
    }
    let us = 1e3
        * common::time_graph_ms(gpu, 5, 20, |i| {
            let first = (i % 8) * 64;
            hga_route_summary(gpu, &keys, &mut sets[0], SummaryChunks::Range { first, count: 64 }).unwrap();
        });
    let bytes = (nkv * 4096 * (256 + 66) + nkv * 64 * 512) as f64;
    println!("RESULT route summary prefill 4096 tokens {us:.2} us {:.1} GB/s", bytes / us / 1e3);
    rows.push(format!(
        "{:<30} {us:>7.2} us ({:.1} GB/s of {copy_gbs:.0})",
        "summary prefill 4K tokens",
        bytes / us / 1e3
    ));
    println!("\nrouting (one layer, 32/4 heads, 64K, 3% budget):");
    for r in rows {
        println!("  {r}");
    }
}
