//! Kernel microbenchmarks against the anchor measured in the same run: a large device-to-device copy (the
//! achievable HBM bandwidth, bytes read + bytes written). Memory-bound kernels report GB/s and the ratio to it.
//! Device events, warm-up, median of many runs, inputs rotated over several buffer sets (more bytes than L2).
//!
//! Run: `cargo bench --bench kernels` (or the staged binary on the GPU machine). Without a GPU: a SKIP line.
mod common;
use common::{rand_bf16, time_graph_ms, time_ms};
use half::bf16;

const SETS: usize = 4;

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP kernel benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    let s = gpu.stream().clone();
    println!("device: {}  image: {}  PDL: {}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());

    // Anchor: device-to-device copy of 256 MiB.
    let n_copy = 128 << 20; // bf16 elements
    let src = s.clone_htod(&rand_bf16(n_copy, 1, 2.0)).unwrap();
    let mut dst = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let ms = time_ms(&gpu, 5, 30, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * (n_copy * 2) as f64 / ms / 1e6;
    drop((src, dst));
    let mut rows: Vec<(String, String, f64, f64)> =
        vec![("anchor: cuMemcpyDtoD".into(), "256 MiB".into(), ms * 1e3, copy_gbs)];

    // RMSNorm with fused residual, 4096 x 2048 (a prefill chunk at Qwen3-30B-A3B's hidden size), and decode (1 row).
    for (r, d) in [(4096usize, 2048usize), (1, 2048)] {
        let n = r * d;
        let xs: Vec<_> = (0..SETS).map(|i| s.clone_htod(&rand_bf16(n, 10 + i as u64, 2.0)).unwrap()).collect();
        let rs: Vec<_> = (0..SETS).map(|i| s.clone_htod(&rand_bf16(n, 20 + i as u64, 2.0)).unwrap()).collect();
        let w = s.clone_htod(&rand_bf16(d, 3, 2.0)).unwrap();
        let mut outs: Vec<_> = (0..SETS).map(|_| s.alloc_zeros::<bf16>(n).unwrap()).collect();
        let mut ros: Vec<_> = (0..SETS).map(|_| s.alloc_zeros::<bf16>(n).unwrap()).collect();
        let ms = time_ms(&gpu, 5, 100, |i| {
            let k = i % SETS;
            let (o, ro) = (&mut outs[k], &mut ros[k]);
            hga::kernels::hga_rmsnorm(&gpu, &xs[k], Some((&rs[k], ro)), &w, o, r, d, 1e-6).unwrap();
        });
        let bytes = (4 * n * 2 + d * 2) as f64;
        rows.push(("hga_rmsnorm +residual".into(), format!("{r}x{d}"), ms * 1e3, bytes / ms / 1e6));
    }

    // FP8 activation quantization, 4096 x 2048.
    let (r, k) = (4096usize, 2048usize);
    let xs: Vec<_> = (0..SETS).map(|i| s.clone_htod(&rand_bf16(r * k, 30 + i as u64, 2.0)).unwrap()).collect();
    let mut qs: Vec<_> = (0..SETS).map(|_| s.alloc_zeros::<u8>(r * k).unwrap()).collect();
    let mut scs: Vec<_> = (0..SETS).map(|_| s.alloc_zeros::<f32>(r * k / 128).unwrap()).collect();
    let ms = time_ms(&gpu, 5, 100, |i| {
        let j = i % SETS;
        hga::kernels::hga_fp8_quant(&gpu, &xs[j], &mut qs[j], &mut scs[j], r, k).unwrap();
    });
    let bytes = (r * k * 3 + r * k / 128 * 4) as f64;
    rows.push(("hga_fp8_quant".into(), format!("{r}x{k}"), ms * 1e3, bytes / ms / 1e6));

    // Launch chains in one CUDA graph, PDL on vs off (what programmatic dependent launch saves per boundary):
    // 200 decode-size RMSNorms (1 x 2048, pure launch cost), and 200 decode FP8 linears 1 x 4096 -> 2048 (o_proj;
    // 8 MB of weights each, 8 weight sets = 64 MB, so that L2 does not hold them; the weights are asked of L2
    // before the wait with PDL).
    if gpu.pdl_supported() {
        let (d, n, k) = (2048usize, 2048usize, 4096usize);
        let x = s.clone_htod(&rand_bf16(d, 40, 2.0)).unwrap();
        let w = s.clone_htod(&rand_bf16(d, 41, 2.0)).unwrap();
        let mut o = s.alloc_zeros::<bf16>(d).unwrap();
        let a = s.clone_htod(&vec![0x38u8; k]).unwrap();
        let a_s = s.clone_htod(&vec![1f32; k / 128]).unwrap();
        let ws: Vec<_> = (0..8).map(|i| s.clone_htod(&vec![(0x30 + i) as u8; n * k]).unwrap()).collect();
        let w_s = s.clone_htod(&vec![1f32; n / 128 * k / 128]).unwrap();
        let mut lo = s.alloc_zeros::<bf16>(n).unwrap();
        for on in [false, true] {
            gpu.set_pdl(on);
            let ms = time_graph_ms(&gpu, 200, 20, |_| {
                hga::kernels::hga_rmsnorm(&gpu, &x, None, &w, &mut o, 1, d, 1e-6).unwrap();
            });
            println!("RESULT launch_chain rmsnorm_1x2048 pdl={on} {:.3} us per launch", ms * 1e3);
            let ms = time_graph_ms(&gpu, 200, 20, |i| {
                hga::kernels::gemm::hga_fp8_linear(&gpu, &a, &a_s, &ws[i % 8], &w_s, &mut lo, 1, n, k).unwrap();
            });
            let gbs = (n * k) as f64 / ms / 1e6;
            println!(
                "RESULT launch_chain fp8_linear_decode_1x4096x2048 pdl={on} {:.3} us per launch {gbs:.0} GB/s",
                ms * 1e3
            );
        }
        gpu.set_pdl(true);
    }

    println!("{:<24} {:>12} {:>12} {:>10} {:>14}", "kernel", "shape", "median us", "GB/s", "vs copy");
    for (name, shape, us, gbs) in &rows {
        println!("{name:<24} {shape:>12} {us:>12.2} {gbs:>10.1} {:>13.2}x", gbs / copy_gbs);
    }
}
