//! Kernel microbenchmarks against the anchor measured in the same run: a large device-to-device copy (the
//! achievable HBM bandwidth, bytes read + bytes written). Memory-bound kernels report GB/s and the ratio to it.
//! Device events, warm-up, median of many runs, inputs rotated over several buffer sets (more bytes than L2).
//!
//! Run: `cargo bench --bench kernels` (or the staged binary on the GPU machine). Without a GPU: a SKIP line.
mod common;
use common::{rand_bf16, time_ms};
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

    println!("{:<24} {:>12} {:>12} {:>10} {:>14}", "kernel", "shape", "median us", "GB/s", "vs copy");
    for (name, shape, us, gbs) in &rows {
        println!("{name:<24} {shape:>12} {us:>12.2} {gbs:>10.1} {:>13.2}x", gbs / copy_gbs);
    }
}
