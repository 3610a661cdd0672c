//! Attention and rope kernel benchmarks at Qwen3-30B-A3B shapes (32 query heads, 4 KV heads, head_dim 128), with the
//! same-run anchor of this binary: a large device-to-device copy (achievable HBM bandwidth, bytes read + written),
//! which gives the bytes floor of decode (K + V bytes / copy bandwidth). The torch SDPA anchors are measured by
//! `tools/bench/attention.py` in the same GPU run; it reads the `RESULT` lines printed here and prints the ratios.
//! Device events, warm-up, median of many runs, inputs rotated over enough buffer sets to exceed L2.
//!
//! Decode inside CUDA graphs (`common::time_graph_ms`: no host launch cost, as in the model's recorded decode
//! step): the decode kernel + merge, the same with a separate `hga_fp8_quant`, and with the merge's fused FP8
//! quantization (the model's step), each against the K/V bytes floor at this run's copy bandwidth.
//!
//! Run: `cargo bench --bench attention` (or the staged binary on the GPU machine). Without a GPU: a SKIP line.
mod common;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use hga::kernels::{AttentionShape, DecodeWorkspace, MergeKernel, QkNormRopeShape};
use hga::runtime::Gpu;

const NH: usize = 32;
const NKV: usize = 4;
const D: usize = 128;

/// Median over `iters` samples of the device time of one call, each sample timing `reps` back-to-back calls between
/// two events (reps = 1: an isolated call, the host's launch overhead included; reps > 1: pipelined calls, the
/// host's work for call i+1 overlapping the device's work for call i).
fn time_ms(gpu: &Gpu, iters: usize, reps: usize, mut f: impl FnMut(usize)) -> f64 {
    let ctx = gpu.context();
    for i in 0..5 {
        f(i);
    }
    let mut t = Vec::with_capacity(iters);
    let mut n = 0;
    for _ in 0..iters {
        let a = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        let b = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
        a.record(gpu.stream()).unwrap();
        for _ in 0..reps {
            f(n);
            n += 1;
        }
        b.record(gpu.stream()).unwrap();
        b.synchronize().unwrap();
        t.push(a.elapsed_ms(&b).unwrap() as f64 / reps as f64);
    }
    t.sort_by(|x, y| x.partial_cmp(y).unwrap());
    t[t.len() / 2]
}

fn rand_bf16(n: usize, seed: u64, amp: f32) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32((((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * amp)
        })
        .collect()
}

/// Number of buffer sets so that the sets together exceed ~160 MB (past the 50 MB L2), at least 2.
fn sets_for(bytes: usize) -> usize {
    (160_000_000usize.div_ceil(bytes.max(1))).clamp(2, 16)
}

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP attention benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    let s = gpu.stream().clone();
    println!("device: {}  image: {}  PDL: {}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());

    let n_copy = 128 << 20; // bf16 elements: 256 MiB
    let src = s.clone_htod(&rand_bf16(n_copy, 1, 1.0)).unwrap();
    let mut dst = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let ms = time_ms(&gpu, 30, 1, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * (n_copy * 2) as f64 / ms / 1e6;
    drop((src, dst));
    println!("RESULT copy 256MiB {:.3} {:.1}", ms * 1e3, copy_gbs);
    let mut rows: Vec<String> =
        vec![format!("{:<30} {:>14} {:>10.2} {:>9.1} GB/s", "anchor: cuMemcpyDtoD", "256 MiB", ms * 1e3, copy_gbs)];

    // Decode: one query token (and 4), 32/4 heads, contexts 4K / 16K / 64K.
    let mut ws = DecodeWorkspace::new(&gpu, 8, NH, hga::kernels::attention::DECODE_MAX_SPLITS).unwrap();
    for (ctx, tokens) in [(4096usize, 1usize), (16384, 1), (65536, 1), (65536, 4)] {
        let cache = NKV * ctx * D;
        let kv_bytes = 2 * cache * 2;
        let sets = sets_for(kv_bytes);
        let ks: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 100 + i as u64, 1.0)).unwrap()).collect();
        let vs: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 200 + i as u64, 1.0)).unwrap()).collect();
        let q = s.clone_htod(&rand_bf16(tokens * NH * D, 7, 1.0)).unwrap();
        let mut out = s.alloc_zeros::<bf16>(tokens * NH * D).unwrap();
        let mut lse = s.alloc_zeros::<f32>(tokens * NH).unwrap();
        let shape = AttentionShape { tokens, n_heads: NH, n_kv_heads: NKV, capacity: ctx, start: ctx - tokens };
        let mut splits = 0;
        let mut call = |i: usize| {
            let j = i % sets;
            splits = hga::kernels::hga_attention_decode(&gpu, &q, &ks[j], &vs[j], &mut ws, &mut out, &mut lse, &shape)
                .unwrap();
        };
        let iso = time_ms(&gpu, 50, 1, &mut call);
        let ms = time_ms(&gpu, 20, 20, &mut call);
        let gbs = kv_bytes as f64 / ms / 1e6;
        let floor_us = kv_bytes as f64 / copy_gbs / 1e3;
        println!(
            "RESULT decode ctx={ctx} tokens={tokens} {:.3} {gbs:.1} floor_us={floor_us:.2} splits={splits} iso_us={:.3}",
            ms * 1e3,
            iso * 1e3
        );
        rows.push(format!(
            "{:<30} {:>14} {:>10.2} {:>9.1} GB/s  ({:.2}x copy; floor {floor_us:.1} us; {splits} splits; isolated call {:.1} us)",
            "hga_attention_decode+merge",
            format!("ctx={ctx} T={tokens}"),
            ms * 1e3,
            gbs,
            gbs / copy_gbs,
            iso * 1e3
        ));
    }
    // Decode inside CUDA graphs (device time only), T = 1, contexts 4K / 16K / 64K.
    {
        let max_smem = gpu.smem_per_block_optin();
        let auto = hga::kernels::attention::decode_kernel_auto(&gpu).unwrap();
        println!("decode kernel: shared memory per block {max_smem} B; {auto:?}");
        let tokens = 1;
        for ctx in [4096usize, 16384, 65536] {
            let cache = NKV * ctx * D;
            let kv_bytes = 2 * cache * 2;
            let sets = sets_for(kv_bytes);
            let ks: Vec<_> =
                (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 1100 + i as u64, 1.0)).unwrap()).collect();
            let vs: Vec<_> =
                (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 1200 + i as u64, 1.0)).unwrap()).collect();
            let q = s.clone_htod(&rand_bf16(tokens * NH * D, 11, 1.0)).unwrap();
            let mut out = s.alloc_zeros::<bf16>(tokens * NH * D).unwrap();
            let mut lse = s.alloc_zeros::<f32>(tokens * NH).unwrap();
            let mut aq = s.alloc_zeros::<u8>(tokens * NH * D).unwrap();
            let mut asc = s.alloc_zeros::<f32>(tokens * NH).unwrap();
            let start_dev = s.clone_htod(&[(ctx - tokens) as u32]).unwrap();
            let shape = AttentionShape { tokens, n_heads: NH, n_kv_heads: NKV, capacity: ctx, start: ctx - tokens };
            let floor_us = kv_bytes as f64 / copy_gbs / 1e3;
            let reps = (2 * sets).max(8);
            let report = |name: String, ms: f64, splits: usize, rows: &mut Vec<String>| {
                let us = ms * 1e3;
                let gbs = kv_bytes as f64 / ms / 1e6;
                println!(
                    "RESULT decode_graph ctx={ctx} tokens={tokens} kernel={name} {us:.3} {gbs:.1} floor_us={floor_us:.2} \
                     vs_floor={:.3} splits={splits}",
                    us / floor_us
                );
                rows.push(format!(
                    "{:<30} {:>14} {:>10.2} {:>9.1} GB/s  ({:.2}x copy; {:.2}x the floor {floor_us:.1} us; graph)",
                    format!("decode {name}"),
                    format!("ctx={ctx} T={tokens}"),
                    us,
                    gbs,
                    gbs / copy_gbs,
                    us / floor_us
                ));
            };
            let m = MergeKernel::V2;
            let mut splits = 0;
            let ms = common::time_graph_ms(&gpu, reps, 20, |i| {
                let j = i % sets;
                splits = hga::kernels::hga_attention_decode_kernel(
                    &gpu, auto, m, &q, &ks[j], &vs[j], &mut ws, &mut out, &mut lse, &shape, None,
                )
                .unwrap();
            });
            report(format!("{auto:?}+merge_{m:?}"), ms, splits, &mut rows);
            // The model's step: with a separate FP8 quantization of the output, and with the fused one.
            let ms = common::time_graph_ms(&gpu, reps, 20, |i| {
                let j = i % sets;
                splits = hga::kernels::hga_attention_decode_kernel(
                    &gpu, auto, m, &q, &ks[j], &vs[j], &mut ws, &mut out, &mut lse, &shape, None,
                )
                .unwrap();
                hga::kernels::hga_fp8_quant(&gpu, &out, &mut aq, &mut asc, tokens, NH * D).unwrap();
            });
            report(format!("{auto:?}+merge_{m:?}+fp8_quant"), ms, splits, &mut rows);
            let ms = common::time_graph_ms(&gpu, reps, 20, |i| {
                let j = i % sets;
                splits = hga::kernels::hga_attention_decode_upto_quant(
                    &gpu, &q, &ks[j], &vs[j], &mut ws, &mut out, &mut lse, &mut aq, &mut asc, &shape, &start_dev,
                )
                .unwrap();
            });
            report(format!("{auto:?}+fused_fp8(upto)"), ms, splits, &mut rows);
        }
    }
    // Sensitivity of decode to the split (target CTAs per SM; DECODE_CTAS_PER_SM is the default), graph replay.
    for ctx in [4096usize, 16384, 65536] {
        let cache = NKV * ctx * D;
        let sets = sets_for(2 * cache * 2).max(2);
        let ks: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 900 + i as u64, 1.0)).unwrap()).collect();
        let vs: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 950 + i as u64, 1.0)).unwrap()).collect();
        let q = s.clone_htod(&rand_bf16(NH * D, 8, 1.0)).unwrap();
        let mut out = s.alloc_zeros::<bf16>(NH * D).unwrap();
        let mut lse = s.alloc_zeros::<f32>(NH).unwrap();
        let shape = AttentionShape { tokens: 1, n_heads: NH, n_kv_heads: NKV, capacity: ctx, start: ctx - 1 };
        let sms = gpu.sm_count();
        // Quarter- and half-SM targets (8 / 16 splits for 4 KV heads: fewer, longer splits, fewer merge batches)
        // next to the whole multiples.
        for (per_sm, target) in
            [(0.25, sms / 4), (0.5, sms / 2), (1.0, sms), (2.0, 2 * sms), (3.0, 3 * sms), (4.0, 4 * sms)]
        {
            let mut splits = 0;
            let ms = common::time_graph_ms(&gpu, 20, 20, |i| {
                let j = i % sets;
                splits = hga::kernels::attention::hga_attention_decode_ctas(
                    &gpu, &q, &ks[j], &vs[j], &mut ws, &mut out, &mut lse, &shape, target,
                )
                .unwrap();
            });
            let gbs = (2 * cache * 2) as f64 / ms / 1e6;
            println!(
                "RESULT decode_split_graph ctx={ctx} ctas_per_sm={per_sm} splits={splits} {:.3} {gbs:.1}",
                ms * 1e3
            );
        }
    }
    drop(ws);

    // Causal prefill from an empty cache: T = ctx = 4K / 16K.
    for t in [4096usize, 16384] {
        let cache = NKV * t * D;
        let sets = sets_for(2 * cache * 2 + 2 * t * NH * D * 2).min(4);
        let ks: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 300 + i as u64, 1.0)).unwrap()).collect();
        let vs: Vec<_> = (0..sets).map(|i| s.clone_htod(&rand_bf16(cache, 400 + i as u64, 1.0)).unwrap()).collect();
        let qs: Vec<_> =
            (0..sets).map(|i| s.clone_htod(&rand_bf16(t * NH * D, 500 + i as u64, 1.0)).unwrap()).collect();
        let mut out = s.alloc_zeros::<bf16>(t * NH * D).unwrap();
        let mut lse = s.alloc_zeros::<f32>(t * NH).unwrap();
        let shape = AttentionShape { tokens: t, n_heads: NH, n_kv_heads: NKV, capacity: t, start: 0 };
        // Causal flops: QK^T and PV over the t (t + 1) / 2 visible (query, key) pairs, 2 flops per MAC.
        let flops = 4.0 * D as f64 * NH as f64 * (t as f64 * (t as f64 + 1.0) / 2.0);
        let iters = if t > 8192 { 10 } else { 30 };
        let ms = time_ms(&gpu, iters, 1, |i| {
            let j = i % sets;
            hga::kernels::hga_attention_prefill(&gpu, &qs[j], &ks[j], &vs[j], &mut out, &mut lse, &shape).unwrap();
        });
        let tfs = flops / ms / 1e9;
        println!("RESULT prefill T={t} {:.3} {tfs:.1}", ms * 1e3);
        rows.push(format!(
            "{:<30} {:>14} {:>10.2} {:>9.1} TFLOP/s",
            "hga_attention_prefill",
            format!("T={t}"),
            ms * 1e3,
            tfs
        ));
    }

    // q/k RMSNorm + RoPE + K/V cache write: decode (1 token) and a 4096-token prefill chunk.
    for t in [1usize, 4096] {
        let capacity = 8192;
        let sets = 4;
        let qi: Vec<_> =
            (0..sets).map(|i| s.clone_htod(&rand_bf16(t * NH * D, 600 + i as u64, 2.0)).unwrap()).collect();
        let ki: Vec<_> =
            (0..sets).map(|i| s.clone_htod(&rand_bf16(t * NKV * D, 700 + i as u64, 2.0)).unwrap()).collect();
        let vi: Vec<_> =
            (0..sets).map(|i| s.clone_htod(&rand_bf16(t * NKV * D, 800 + i as u64, 2.0)).unwrap()).collect();
        let pos: Vec<u32> = (0..t as u32).map(|i| i + 17).collect();
        let dpos = s.clone_htod(&pos).unwrap();
        let w = s.clone_htod(&rand_bf16(D, 9, 1.0)).unwrap();
        let mut qo = s.alloc_zeros::<bf16>(t * NH * D).unwrap();
        let mut kc = s.alloc_zeros::<bf16>(NKV * capacity * D).unwrap();
        let mut vc = s.alloc_zeros::<bf16>(NKV * capacity * D).unwrap();
        let shape = QkNormRopeShape {
            tokens: t,
            n_heads: NH,
            n_kv_heads: NKV,
            capacity,
            q_stride: NH * D,
            k_stride: NKV * D,
            v_stride: NKV * D,
            cache_by_token: false,
            eps: 1e-6,
            theta: 1e7,
        };
        let ms = time_ms(&gpu, 20, 10, |i| {
            let j = i % sets;
            hga::kernels::hga_qk_norm_rope(
                &gpu, &qi[j], &ki[j], &vi[j], &dpos, &w, &w, &mut qo, &mut kc, &mut vc, &shape,
            )
            .unwrap();
        });
        let bytes = (2 * t * (NH + 2 * NKV) * D * 2) as f64;
        println!("RESULT rope T={t} {:.3} {:.1}", ms * 1e3, bytes / ms / 1e6);
        rows.push(format!(
            "{:<30} {:>14} {:>10.2} {:>9.1} GB/s  ({:.2}x copy)",
            "hga_qk_norm_rope",
            format!("T={t}"),
            ms * 1e3,
            bytes / ms / 1e6,
            bytes / ms / 1e6 / copy_gbs
        ));
    }

    println!("(decode and rope: per call, 20 / 10 calls back to back between events; prefill: isolated calls)");
    println!("{:<30} {:>14} {:>10} {:>14}", "kernel", "shape", "median us", "rate");
    for r in rows {
        println!("{r}");
    }
}
