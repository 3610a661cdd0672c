//! head family benchmarks with a same-run anchor: a 256 MiB device-to-device copy (HBM floor = bytes / copy
//! bandwidth). lm_head GEMV (151936 x 2048 bf16, 622 MB: far more than L2) for 1, 4, 16 rows; argmax and sampling
//! over 151936 logits; embedding gather. Device events, warm-up, median.
//! Run: `cargo bench --bench head` (or the staged binary). Without a GPU: a SKIP line.
mod common;
use common::{rand_bf16, time_ms};
use half::bf16;

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP head benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    let s = gpu.stream().clone();
    println!("device: {}  image: {}  PDL: {}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());
    let mut rows: Vec<(String, String, f64, f64, f64)> = Vec::new();

    let n_copy = 128 << 20;
    let src = s.clone_htod(&rand_bf16(n_copy, 1, 0.1)).unwrap();
    let mut dst = s.alloc_zeros::<bf16>(n_copy).unwrap();
    let ms = time_ms(&gpu, 3, 30, |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_gbs = 2.0 * (n_copy * 2) as f64 / ms / 1e6;
    drop((src, dst));
    rows.push(("anchor: cuMemcpyDtoD".into(), "256 MiB".into(), ms * 1e3, copy_gbs, 1.0));

    let (v, h) = (151936usize, 2048usize);
    let w = s.clone_htod(&rand_bf16(v * h, 2, 0.1)).unwrap();
    for m in [1usize, 4, 16] {
        let x = s.clone_htod(&rand_bf16(m * h, 3, 0.1)).unwrap();
        let mut out = s.alloc_zeros::<f32>(m * v).unwrap();
        let ms = time_ms(&gpu, 3, 30, |_| hga::kernels::head::hga_lm_head(&gpu, &x, &w, &mut out, m, v, h).unwrap());
        let bytes = (v * h * 2 + m * h * 2 + m * v * 4) as f64;
        let gbs = bytes / ms / 1e6;
        rows.push(("hga_lm_head".into(), format!("{m}x{v}x{h}"), ms * 1e3, gbs, gbs / copy_gbs));
    }

    // Logits: realistic spread (a few large values).
    let mut lg: Vec<f32> = rand_bf16(16 * v, 4, 0.1).iter().map(|x| x.to_f32() * 100.0).collect();
    for r in 0..16 {
        lg[r * v + 1234 * (r + 1)] = 30.0;
    }
    let dl = s.clone_htod(&lg).unwrap();
    for r in [1usize, 16] {
        let l = dl.slice(0..r * v);
        let mut out = s.alloc_zeros::<u32>(r).unwrap();
        let ms = time_ms(&gpu, 3, 100, |_| hga::kernels::head::hga_argmax(&gpu, &l, &mut out, r, v).unwrap());
        let gbs = (r * v * 4) as f64 / ms / 1e6;
        rows.push(("hga_argmax".into(), format!("{r}x{v}"), ms * 1e3, gbs, gbs / copy_gbs));
        let ms = time_ms(&gpu, 3, 50, |i| {
            hga::kernels::head::hga_sample(&gpu, &l, &mut out, r, v, 0.7, 0.9, 42, i as u64).unwrap()
        });
        let gbs = (r * v * 4) as f64 / ms / 1e6;
        rows.push(("hga_sample T=0.7 top_p=0.9".into(), format!("{r}x{v}"), ms * 1e3, gbs, gbs / copy_gbs));
    }

    // Embedding gather (table = the lm_head-sized buffer), 1 and 4096 tokens.
    for r in [1usize, 4096] {
        let ids: Vec<u32> = (0..r as u32).map(|i| (i * 7919) % v as u32).collect();
        let mut di = s.alloc_zeros::<u32>(r).unwrap();
        let mut out = s.alloc_zeros::<bf16>(r * h).unwrap();
        let ms = time_ms(&gpu, 3, 50, |_| {
            hga::kernels::head::hga_embed_gather(&gpu, &w, &ids, &mut di, &mut out, v, h).unwrap()
        });
        let gbs = (2 * r * h * 2) as f64 / ms / 1e6;
        rows.push(("hga_embed_gather (+ids upload)".into(), format!("{r}x{h}"), ms * 1e3, gbs, gbs / copy_gbs));
    }

    println!("{:<30} {:>18} {:>11} {:>10} {:>14}", "kernel", "shape", "median us", "GB/s", "vs copy");
    for (name, shape, us, gbs, ratio) in &rows {
        println!("{name:<30} {shape:>18} {us:>11.2} {gbs:>10.1} {ratio:>13.3}x");
    }
}
