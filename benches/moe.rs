//! MoE benchmarks (Qwen3-30B-A3B shapes: hidden 2048, 128 experts, top-8, intermediate 768) against anchors
//! measured in the same run: a 256 MiB device-to-device copy (achievable HBM bandwidth) and from it the decode
//! floor, 8 experts x (gate + up + down) = 37.75 MB of FP8 weights / copy GB/s. The eager-PyTorch anchors come
//! from tools/bench/moe.py on the same machine (run by the caller, printed beside this table).
//!
//! Device events, warm-up, median of many; the expert weights rotate over 2 full sets of 128 experts (1.2 GB) and
//! the activations over 16 sets, the router weights over 128 sets (64 MB), so nothing is served from L2 across
//! iterations (the decode kernels timed alone rotate over 16 disjoint sets of 8 experts in each weight set).
//! The decode layer (`moe_decode`, router `Auto`: the one-expert-per-block router) and the decode expert kernels
//! are timed at T = 1 and T = 4, each twice: replayed from a CUDA graph (`time_graph_ms`: no host launch cost, the
//! figure compared with the floor) and with host launches (`time_ms`, labelled "with host launch"). The down
//! kernel timed alone streams from DRAM; in the layer its weights were prefetched into L2 by gate/up (whose time
//! alone includes issuing that prefetch). The rows keep the "v3" tag of the measured history (docs/perf-moe.md).
//! Without a GPU: a SKIP line.
mod common;
use common::{time_graph_ms, time_ms};
use half::bf16;
use hga::check::moe as cm;
use hga::kernels::moe::{self as km, MoeExpertWeights, MoeWorkspace, RouterForm};
use hga::reference::moe::MoeDims;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn bf16_vec(n: usize, lo: f32, hi: f32, rng: &mut StdRng) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.gen_range(lo..hi))).collect()
}

struct Row {
    name: String,
    shape: String,
    us: f64,
    metric: String,
    ratio: String,
}

/// The rows of one MoE decode layer timing at T tokens, by graph replay and with host launches. T = 4: up to 32
/// expert streams (tokens may share experts; each (token, slot) streams its own copy), so bytes and floor scale by T.
fn layer_rows(rows: &mut Vec<Row>, tag: &str, t: usize, ms: [f64; 2], expert_bytes: f64, floor_us: f64) {
    let bytes = expert_bytes * t as f64;
    for (how, ms) in [("graph", ms[0]), ("with host launch", ms[1])] {
        rows.push(Row {
            name: format!("MoE decode layer {tag} ({how})"),
            shape: format!("T={t}"),
            us: ms * 1e3,
            metric: format!("{:.0} GB/s", bytes / ms / 1e6),
            ratio: format!("{:.2}x floor", ms * 1e3 / (floor_us * t as f64)),
        });
    }
}

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP moe benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    let s = gpu.stream().clone();
    println!("device: {}  image: {}  PDL: {}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());
    let mut rng = StdRng::seed_from_u64(1);
    let mut rows: Vec<Row> = Vec::new();

    // Anchor: device-to-device copy of 256 MiB (bytes read + written).
    let n_copy = 128 << 20;
    let src = s.clone_htod(&vec![bf16::from_f32(1.0); n_copy]).unwrap();
    let mut dst = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let ms = time_ms(&gpu, 5, 30, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * (n_copy * 2) as f64 / ms / 1e6;
    drop((src, dst));
    rows.push(Row {
        name: "anchor: cuMemcpyDtoD".into(),
        shape: "256 MiB".into(),
        us: ms * 1e3,
        metric: format!("{copy_gbs:.0} GB/s"),
        ratio: String::new(),
    });

    let d1 = MoeDims::qwen3_30b_a3b(1);
    let (h, e, k, inter) = (d1.hidden, d1.experts, d1.top_k, d1.inter);
    let expert_bytes = (k * d1.expert_bytes()) as f64;
    let floor_us = expert_bytes / copy_gbs / 1e3;
    rows.push(Row {
        name: "floor: 8 experts FP8 / copy".into(),
        shape: format!("{:.2} MB", expert_bytes / 1e6),
        us: floor_us,
        metric: String::new(),
        ratio: String::new(),
    });

    // Router weights: 128 sets (64 MB, past L2); activations: 16 sets of 4096 tokens.
    const RSETS: usize = 128;
    const XSETS: usize = 16;
    let rws: Vec<_> = (0..RSETS).map(|_| s.clone_htod(&bf16_vec(e * h, -0.05, 0.05, &mut rng)).unwrap()).collect();
    let xs: Vec<_> = (0..XSETS).map(|_| s.clone_htod(&bf16_vec(4096 * h, -2.0, 2.0, &mut rng)).unwrap()).collect();

    // Router alone.
    for (t, form) in
        [(1usize, RouterForm::Auto), (1, RouterForm::Batch), (4, RouterForm::Auto), (4096, RouterForm::Auto)]
    {
        let d = MoeDims::qwen3_30b_a3b(t);
        let mut ws = MoeWorkspace::new(&gpu, &d, t, false).unwrap();
        let mut router = |i: usize| {
            km::hga_moe_router(
                &gpu,
                &xs[i % XSETS].slice(0..t * h),
                &rws[i % RSETS],
                &mut ws.logits,
                &mut ws.counter,
                &mut ws.ids,
                &mut ws.weights,
                &d,
                form,
            )
            .unwrap()
        };
        let ms = time_ms(&gpu, 5, 200, &mut router);
        // The decode layer's router (T <= 4: Auto = rows form) also without host launch cost.
        let ms_g =
            if t <= 4 && form != RouterForm::Batch { Some(time_graph_ms(&gpu, 32, 50, &mut router)) } else { None };
        let bytes = (e * h * 2 + t * h * 2) as f64;
        for (how, ms) in [("", Some(ms)), (" (graph)", ms_g)] {
            let Some(ms) = ms else { continue };
            rows.push(Row {
                name: format!("hga_moe_router {form:?}{how}"),
                shape: format!("T={t} E={e} k={k}"),
                us: ms * 1e3,
                metric: format!("{:.0} GB/s", bytes / ms / 1e6),
                ratio: String::new(),
            });
        }
    }

    // Grouping.
    for t in [1usize, 4096] {
        let d = MoeDims::qwen3_30b_a3b(t);
        let ids = s.clone_htod(&cm::random_ids(&d, false, &mut rng)).unwrap();
        let mut ws = MoeWorkspace::new(&gpu, &d, t, false).unwrap();
        let ms = time_ms(&gpu, 5, 200, |_| {
            km::hga_moe_group(&gpu, &ids, &mut ws.counts, &mut ws.offsets, &mut ws.tile_start, &mut ws.perm, t, e, k)
                .unwrap()
        });
        rows.push(Row {
            name: "hga_moe_group".into(),
            shape: format!("T={t} E={e} k={k}"),
            us: ms * 1e3,
            metric: String::new(),
            ratio: String::new(),
        });
    }

    // Expert weights: 2 full sets of 128 experts.
    eprintln!("generating 2 x {:.0} MB of expert weights", (e * d1.expert_bytes()) as f64 / 1e6);
    let wsets: Vec<MoeExpertWeights> =
        (0..2).map(|_| MoeExpertWeights::upload(&gpu, &cm::random_experts(&d1, &mut rng)).unwrap()).collect();

    // Decode: the whole layer (router + gate/up + down) at T = 1 and T = 4,
    // and each expert kernel alone at T = 1. Each is timed twice: replayed from a CUDA graph (no host launch cost;
    // the figure to compare with the floor) and with host launches (`time_ms`).
    // A graph holds GRAPH_REPS consecutive calls, so the rotation below is inside every replay.
    const GRAPH_REPS: usize = 32;
    const ID_SETS: usize = 16;
    // Expert ids for the kernels alone: set j gives token tau the experts 8 T j + 8 tau .. + 8 (mod 128; disjoint
    // within a set), and call i uses weight set i % 2 with id set (i / 2) % 16, so 32 consecutive calls read distinct
    // weights (T = 1: 32 x 37.75 MB, as before; T = 4: 8 distinct sets of 151 MB, repeating after 1.2 GB).
    let id_sets = |t: usize| -> Vec<_> {
        (0..ID_SETS)
            .map(|j| {
                let ids: Vec<u32> = (0..t * k).map(|i| ((8 * t * j + 8 * (i / k) + i % k) % e) as u32).collect();
                s.clone_htod(&ids).unwrap()
            })
            .collect()
    };
    let gu_bytes = (k * 2 * h * inter) as f64;
    let dn_bytes = (k * h * inter) as f64;
    {
        let tag = "v3";
        for t in [1usize, 4] {
            let d = MoeDims::qwen3_30b_a3b(t);
            let mut ws = MoeWorkspace::new(&gpu, &d, t, false).unwrap();
            let mut outs: Vec<_> = (0..XSETS).map(|_| s.alloc_zeros::<bf16>(t * h).unwrap()).collect();
            let mut layer = |i: usize| {
                let x = xs[i % XSETS].slice(0..t * h);
                km::moe_decode(
                    &gpu,
                    &x,
                    &rws[i % RSETS],
                    &wsets[i % 2],
                    &mut ws,
                    &mut outs[i % XSETS],
                    &d,
                    RouterForm::Auto,
                )
                .unwrap()
            };
            let ms_g = time_graph_ms(&gpu, GRAPH_REPS, 50, &mut layer);
            let ms_h = time_ms(&gpu, 5, 300, &mut layer);
            layer_rows(&mut rows, tag, t, [ms_g, ms_h], expert_bytes, floor_us);
        }
        // Kernels alone at T = 1 and 4 (ids / weights / inter from the fixed sets above; inter is whatever the last
        // call left, which does not change the bytes streamed).
        for t in [1usize, 4] {
            let d = MoeDims::qwen3_30b_a3b(t);
            let ids_t = id_sets(t);
            let rw_set = s.clone_htod(&vec![1.0f32 / k as f32; t * k]).unwrap();
            let mut inter_buf = s.alloc_zeros::<bf16>(t * k * inter).unwrap();
            let mut outs: Vec<_> = (0..XSETS).map(|_| s.alloc_zeros::<bf16>(t * h).unwrap()).collect();
            let mut gate_up = |i: usize| {
                let (x, wt, ids) = (xs[i % XSETS].slice(0..t * h), &wsets[i % 2], &ids_t[(i / 2) % ID_SETS]);
                km::hga_moe_gate_up_decode(&gpu, &x, wt, ids, &mut inter_buf, &d).unwrap()
            };
            let gu = [time_graph_ms(&gpu, GRAPH_REPS, 50, &mut gate_up), time_ms(&gpu, 5, 300, &mut gate_up)];
            let mut down = |i: usize| {
                let (wt, ids, o) = (&wsets[i % 2], &ids_t[(i / 2) % ID_SETS], &mut outs[i % XSETS]);
                km::hga_moe_down_decode(&gpu, &inter_buf, wt, ids, &rw_set, o, &d).unwrap()
            };
            let dn = [time_graph_ms(&gpu, GRAPH_REPS, 50, &mut down), time_ms(&gpu, 5, 300, &mut down)];
            // The two expert kernels back to back (no router): down reads what gate/up prefetched, so
            // (this - gate_up alone) is down's time inside the layer.
            let mut both = |i: usize| {
                let (x, wt, ids) = (xs[i % XSETS].slice(0..t * h), &wsets[i % 2], &ids_t[(i / 2) % ID_SETS]);
                let o = &mut outs[i % XSETS];
                km::hga_moe_gate_up_decode(&gpu, &x, wt, ids, &mut inter_buf, &d)
                    .and_then(|_| km::hga_moe_down_decode(&gpu, &inter_buf, wt, ids, &rw_set, o, &d))
                    .unwrap()
            };
            let gd = [time_graph_ms(&gpu, GRAPH_REPS, 50, &mut both), time_ms(&gpu, 5, 300, &mut both)];
            for (kname, bytes, ms2) in [
                ("gate_up", gu_bytes * t as f64, gu),
                ("down", dn_bytes * t as f64, dn),
                ("gate_up+down", (gu_bytes + dn_bytes) * t as f64, gd),
            ] {
                for (how, ms) in [("graph", ms2[0]), ("with host launch", ms2[1])] {
                    let gbs = bytes / ms / 1e6;
                    rows.push(Row {
                        name: format!("  {kname} decode {tag} ({how})"),
                        shape: format!("T={t}"),
                        us: ms * 1e3,
                        metric: format!("{gbs:.0} GB/s"),
                        ratio: format!("{:.2}x copy", gbs / copy_gbs),
                    });
                }
            }
        }
    }

    // The post-attention norm with the layer, T = 1: hga_rmsnorm then the layer, against
    // moe_decode_residual, which runs the norm inside the router (one launch fewer, the same numbers).
    {
        let t = 1;
        let d = MoeDims::qwen3_30b_a3b(t);
        let mut ws = MoeWorkspace::new(&gpu, &d, t, false).unwrap();
        let mut outs: Vec<_> = (0..XSETS).map(|_| s.alloc_zeros::<bf16>(t * h).unwrap()).collect();
        let res = s.clone_htod(&bf16_vec(h, -8.0, 8.0, &mut rng)).unwrap();
        let nw = s.clone_htod(&bf16_vec(h, 0.5, 1.5, &mut rng)).unwrap();
        let mut ro = s.alloc_zeros::<bf16>(h).unwrap();
        let mut xn = s.alloc_zeros::<bf16>(h).unwrap();
        let eps = 1e-6;
        for fused in [false, true] {
            let mut layer = |i: usize| {
                let o = &mut outs[i % XSETS];
                if fused {
                    let f = km::moe_decode_residual(
                        &gpu,
                        o,
                        &res,
                        &mut ro,
                        &nw,
                        eps,
                        &mut xn,
                        &rws[i % RSETS],
                        &wsets[i % 2],
                        &mut ws,
                        &d,
                    );
                    assert!(f.unwrap(), "the norm was not fused");
                } else {
                    hga::kernels::hga_rmsnorm(&gpu, o, Some((&res, &mut ro)), &nw, &mut xn, t, h, eps).unwrap();
                    let (x, w) = (&xn, &wsets[i % 2]);
                    km::moe_decode(&gpu, x, &rws[i % RSETS], w, &mut ws, o, &d, RouterForm::Auto).unwrap();
                }
            };
            let ms_g = time_graph_ms(&gpu, GRAPH_REPS, 50, &mut layer);
            let ms_h = time_ms(&gpu, 5, 300, &mut layer);
            let tag = if fused { "v3 with the norm in the router" } else { "v3 after hga_rmsnorm" };
            layer_rows(&mut rows, tag, t, [ms_g, ms_h], expert_bytes, floor_us);
        }
    }

    // Prefill: the grouped path at T = 4096 (router, grouping, quantizations, grouped GEMMs, combine).
    {
        let t = 4096;
        let d = MoeDims::qwen3_30b_a3b(t);
        let mut ws = MoeWorkspace::new(&gpu, &d, t, true).unwrap();
        let mut out = s.alloc_zeros::<bf16>(t * h).unwrap();
        let ms = time_ms(&gpu, 5, 20, |i| {
            km::moe_grouped(
                &gpu,
                &xs[i % XSETS],
                &rws[i % RSETS],
                &wsets[i % 2],
                &mut ws,
                &mut out,
                &d,
                RouterForm::Auto,
            )
            .unwrap()
        });
        let flops = 2.0 * (t * k * 3 * h * inter) as f64;
        rows.push(Row {
            name: "MoE prefill layer (grouped)".into(),
            shape: format!("T={t}"),
            us: ms * 1e3,
            metric: format!("{:.1} TFLOP/s", flops / ms / 1e9),
            ratio: String::new(),
        });
    }

    println!("{:<52} {:>16} {:>12} {:>14} {:>16}", "what", "shape", "median us", "rate", "ratio");
    for r in &rows {
        println!("{:<52} {:>16} {:>12.2} {:>14} {:>16}", r.name, r.shape, r.us, r.metric, r.ratio);
    }
}
