//! gemm family benchmarks (Qwen3-30B-A3B shapes) with same-run anchors: a 256 MiB device-to-device copy (the HBM
//! floor of the memory-bound decode kernels: bytes / copy bandwidth) and our bf16 mma.sync peak kernel
//! (`hga_bench_mma_bf16_peak`, the portable tensor-core ceiling the prefill kernel is held against). torch's
//! `_scaled_mm` is measured by tools/bench/gemm.py in the same GPU run.
//! Device events, warm-up, median of many; decode weights rotate through > 64 MiB (more than L2).
//! Kernel rows are timed as CUDA-graph replays (`time_graph_ms`: no host launch cost in the figure); the native
//! prefill kernel is also shown through plain launches ("with host launch", the figure of earlier runs). The
//! prefill rows hold the two prefill kernels, the native-e4m3 `hga_fp8_linear_prefill` (picked on sm_89 / sm_120)
//! and the f16-conversion `hga_fp8_linear_prefill_f16_v3` (picked on sm_90), against the bf16 mma.sync ceiling
//! measured in the same run.
//! Run: `cargo bench --bench gemm` (or the staged binary on the GPU machine). Without a GPU: a SKIP line.
mod common;
use common::{time_graph_ms, time_ms};
use half::bf16;
use hga::kernels::gemm::{hga_fp8_linear_with, Fp8LinearKernel};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Finite e4m3 codes of moderate magnitude (|x| <= 28), never NaN.
    fn e4m3(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 32) as u8 & 0xDF).collect()
    }
    fn scales(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 1e-3 * (1.0 + (self.next() >> 40) as f32 / (1u64 << 24) as f32)).collect()
    }
    fn bf16(&mut self, n: usize) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32((self.next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)).collect()
    }
}

/// (name, shape, median us, value, unit, anchor name, ratio)
type Row = (String, String, f64, f64, &'static str, &'static str, f64);

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP gemm benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    let s = gpu.stream().clone();
    let sms = gpu.sm_count();
    println!("device: {}  image: {}  PDL: {}  SMs: {sms}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());
    let mut rng = Rng(0x9E3779B97F4A7C15);
    let mut rows: Vec<Row> = Vec::new();

    // Anchor 1: device-to-device copy of 256 MiB (bytes read + written).
    let n_copy = 256 << 20;
    let src = s.clone_htod(&rng.e4m3(n_copy)).unwrap();
    let mut dst = s.alloc_zeros::<u8>(n_copy).unwrap();
    let ms = time_ms(&gpu, 5, 30, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * n_copy as f64 / ms / 1e6;
    drop((src, dst));
    rows.push(("anchor: cuMemcpyDtoD".into(), "256 MiB".into(), ms * 1e3, copy_gbs, "GB/s", "-", 1.0));

    // Anchor 2: bf16 mma.sync peak.
    let blocks = sms * 8;
    let mut pk = s.alloc_zeros::<f32>(blocks * 256).unwrap();
    let mut flops = 0.0;
    let ms = time_ms(&gpu, 5, 20, |_| {
        flops = hga::kernels::gemm::hga_bench_mma_bf16_peak(&gpu, &mut pk, blocks, 4096).unwrap();
    });
    let peak_tfs = flops / ms / 1e9;
    rows.push((
        "anchor: bf16 mma.sync peak".into(),
        format!("{blocks}x256 thr"),
        ms * 1e3,
        peak_tfs,
        "TFLOP/s",
        "-",
        1.0,
    ));

    // Prefill: M=4096 at N=K=2048 and at q_proj (N=4096, K=2048): both prefill kernels.
    const SETS: usize = 3;
    for (m, n, k) in [(4096usize, 2048usize, 2048usize), (4096, 4096, 2048)] {
        let kb = k / 128;
        let a: Vec<_> = (0..SETS).map(|_| s.clone_htod(&rng.e4m3(m * k)).unwrap()).collect();
        let sa: Vec<_> = (0..SETS).map(|_| s.clone_htod(&rng.scales(m * kb)).unwrap()).collect();
        let w: Vec<_> = (0..SETS).map(|_| s.clone_htod(&rng.e4m3(n * k)).unwrap()).collect();
        let sw: Vec<_> = (0..SETS).map(|_| s.clone_htod(&rng.scales(n / 128 * kb)).unwrap()).collect();
        let mut out: Vec<_> = (0..SETS).map(|_| s.alloc_zeros::<bf16>(m * n).unwrap()).collect();
        let kernels = [
            (Fp8LinearKernel::Prefill, true),
            (Fp8LinearKernel::Prefill, false),
            (Fp8LinearKernel::PrefillF16V3, false),
        ];
        for (kernel, host_launch) in kernels {
            let mut run = |i: usize| {
                let j = i % SETS;
                hga_fp8_linear_with(&gpu, kernel, &a[j], &sa[j], &w[j], &sw[j], &mut out[j], m, n, k).unwrap();
            };
            let (ms, name) = if host_launch {
                (time_ms(&gpu, 5, 30, &mut run), format!("{} (with host launch)", kernel.name()))
            } else {
                (time_graph_ms(&gpu, 2 * SETS, 20, &mut run), kernel.name().to_string())
            };
            let tfs = 2.0 * (m * n * k) as f64 / ms / 1e9;
            rows.push((name, format!("{m}x{n}x{k}"), ms * 1e3, tfs, "TFLOP/s", "mma peak", tfs / peak_tfs));
        }
    }

    // Decode: M = 1, 4 (and 16) at q_proj, expert gate/up (768x2048) and down (2048x768). Weights rotate through a
    // 96 MiB pool (more than L2), activations are tiny. Graph replays of one launch per weight set (kernel times:
    // single host launches measured ~8-10 us whatever the kernel).
    let pool_bytes = 96usize << 20;
    let pool = s.clone_htod(&rng.e4m3(pool_bytes)).unwrap();
    let spool = s.clone_htod(&rng.scales(1 << 20)).unwrap();
    for (n, k, what) in [(4096usize, 2048usize, "q_proj"), (768, 2048, "expert gate/up"), (2048, 768, "expert down")] {
        let kb = k / 128;
        let nsets = pool_bytes / (n * k);
        for m in [1usize, 4, 16] {
            let a = s.clone_htod(&rng.e4m3(m * k)).unwrap();
            let sa = s.clone_htod(&rng.scales(m * kb)).unwrap();
            let mut out = s.alloc_zeros::<bf16>(m * n).unwrap();
            let sw_len = n.div_ceil(128) * kb;
            let ms = time_graph_ms(&gpu, nsets.max(24), 20, |i| {
                let j = i % nsets;
                let w = pool.slice(j * n * k..(j + 1) * n * k);
                let sw = spool.slice(j * sw_len..(j + 1) * sw_len);
                hga_fp8_linear_with(&gpu, Fp8LinearKernel::Decode, &a, &sa, &w, &sw, &mut out, m, n, k).unwrap();
            });
            let bytes = (n * k + m * k + m * kb * 4 + sw_len * 4 + m * n * 2) as f64;
            let gbs = bytes / ms / 1e6;
            rows.push((
                format!("hga_fp8_linear_decode {what}"),
                format!("{m}x{n}x{k}"),
                ms * 1e3,
                gbs,
                "GB/s",
                "copy (floor)",
                gbs / copy_gbs,
            ));
        }
    }

    // Fused RMSNorm(+residual) -> FP8 quant (prefill chunk and decode row), hidden 2048.
    for r in [4096usize, 1] {
        let d = 2048;
        let x = s.clone_htod(&rng.bf16(r * d)).unwrap();
        let res = s.clone_htod(&rng.bf16(r * d)).unwrap();
        let wt = s.clone_htod(&rng.bf16(d)).unwrap();
        let mut ro = s.alloc_zeros::<bf16>(r * d).unwrap();
        let mut q = s.alloc_zeros::<u8>(r * d).unwrap();
        let mut sc = s.alloc_zeros::<f32>(r * d / 128).unwrap();
        let ms = time_graph_ms(&gpu, 20, 20, |_| {
            hga::kernels::gemm::hga_rmsnorm_fp8_quant(
                &gpu,
                &x,
                Some((&res, &mut ro)),
                &wt,
                &mut q,
                &mut sc,
                r,
                d,
                1e-6,
            )
            .unwrap();
        });
        let bytes = (r * d * 2 * 3 + r * d + r * d / 128 * 4 + d * 2) as f64;
        let gbs = bytes / ms / 1e6;
        rows.push((
            "hga_rmsnorm_fp8_quant +res".into(),
            format!("{r}x{d}"),
            ms * 1e3,
            gbs,
            "GB/s",
            "copy",
            gbs / copy_gbs,
        ));
    }

    println!("{:<50} {:>16} {:>11} {:>10} {:<8} {:>14}", "kernel", "shape", "median us", "value", "unit", "vs anchor");
    for (name, shape, us, v, unit, anchor, ratio) in &rows {
        println!("{name:<50} {shape:>16} {us:>11.2} {v:>10.1} {unit:<8} {ratio:>6.3}x {anchor}");
    }
}
