//! MoE benchmarks (Qwen3-30B-A3B shapes: hidden 2048, 128 experts, top-8, intermediate 768) against anchors
//! measured in the same run: a 256 MiB device-to-device copy (achievable HBM bandwidth) and from it the decode
//! floor, 8 experts x (gate + up + down) = 37.75 MB of FP8 weights / copy GB/s. The eager-PyTorch anchors come
//! from tools/bench/moe.py on the same machine (run by the caller, printed beside this table).
//!
//! Device events, warm-up, median of many; the expert weights rotate over 2 full sets of 128 experts (1.2 GB) and
//! the activations over 16 sets, the router weights over 128 sets (64 MB), so nothing is served from L2 across
//! iterations. Without a GPU: a SKIP line.
mod common;
use common::time_ms;
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

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP moe benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    let s = gpu.stream().clone();
    println!("device: {}  image: {}", gpu.device_name(), gpu.image_name());
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
        [(1usize, RouterForm::Auto), (1, RouterForm::Batch), (4096, RouterForm::Auto), (4096, RouterForm::SplitK)]
    {
        let d = MoeDims::qwen3_30b_a3b(t);
        let mut ws = MoeWorkspace::new(&gpu, &d, t, false).unwrap();
        let ms = time_ms(&gpu, 5, 200, |i| {
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
        });
        let bytes = (e * h * 2 + t * h * 2) as f64;
        rows.push(Row {
            name: format!("hga_moe_router {form:?}"),
            shape: format!("T={t} E={e} k={k}"),
            us: ms * 1e3,
            metric: format!("{:.0} GB/s", bytes / ms / 1e6),
            ratio: String::new(),
        });
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

    // Decode: the whole layer (router + gate/up + down) and its parts, T = 1 and T = 4.
    for t in [1usize, 4] {
        let d = MoeDims::qwen3_30b_a3b(t);
        let mut ws = MoeWorkspace::new(&gpu, &d, t, false).unwrap();
        let mut outs: Vec<_> = (0..XSETS).map(|_| s.alloc_zeros::<bf16>(t * h).unwrap()).collect();
        let ms = time_ms(&gpu, 5, 300, |i| {
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
        });
        // Distinct experts actually streamed (T = 4 tokens may share some).
        let bytes = expert_bytes * t as f64;
        let floor = if t == 1 { floor_us } else { f64::NAN };
        rows.push(Row {
            name: "MoE decode layer (3 launches)".into(),
            shape: format!("T={t}"),
            us: ms * 1e3,
            metric: format!("{:.0} GB/s", bytes.min(expert_bytes * 128.0) / ms / 1e6),
            ratio: if t == 1 { format!("{:.2}x floor", ms * 1e3 / floor) } else { "(<= T*8 experts)".into() },
        });
        if t == 1 {
            // Parts: gate/up alone and down alone (after one full step has filled ids / inter).
            let ms_gu = time_ms(&gpu, 5, 300, |i| {
                km::hga_moe_gate_up_decode(&gpu, &xs[i % XSETS].slice(0..h), &wsets[i % 2], &ws.ids, &mut ws.inter, &d)
                    .unwrap()
            });
            let gu_bytes = (k * 2 * h * inter) as f64;
            rows.push(Row {
                name: "  hga_moe_gate_up_decode".into(),
                shape: "T=1".into(),
                us: ms_gu * 1e3,
                metric: format!("{:.0} GB/s", gu_bytes / ms_gu / 1e6),
                ratio: format!("{:.2}x copy", gu_bytes / ms_gu / 1e6 / copy_gbs),
            });
            let ms_dn = time_ms(&gpu, 5, 300, |i| {
                km::hga_moe_down_decode(&gpu, &ws.inter, &wsets[i % 2], &ws.ids, &ws.weights, &mut outs[i % XSETS], &d)
                    .unwrap()
            });
            let dn_bytes = (k * h * inter) as f64;
            rows.push(Row {
                name: "  hga_moe_down_decode".into(),
                shape: "T=1".into(),
                us: ms_dn * 1e3,
                metric: format!("{:.0} GB/s", dn_bytes / ms_dn / 1e6),
                ratio: format!("{:.2}x copy", dn_bytes / ms_dn / 1e6 / copy_gbs),
            });
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

    println!("{:<32} {:>16} {:>12} {:>14} {:>16}", "what", "shape", "median us", "rate", "ratio");
    for r in &rows {
        println!("{:<32} {:>16} {:>12.2} {:>14} {:>16}", r.name, r.shape, r.us, r.metric, r.ratio);
    }
}
