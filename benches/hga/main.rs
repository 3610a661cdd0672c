//! `bench_hga`: the HGA GPU kernels at Qwen3-30B-A3B shapes (4 KV heads, 8 query heads each, head_dim 128), each
//! with its anchor measured in the same run (see each part's docs). Without a GPU: a SKIP line.
//!
//! Run: `cargo bench --bench hga` (or the staged binary on the GPU machine); `HGA_BENCH_ONLY=route|attend|layer`
//! runs one part.
mod attend;
#[path = "../common/mod.rs"]
mod common;
mod layer;
mod route;

fn main() {
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP hga benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    println!("device: {}  image: {}  PDL: {}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());
    // HGA_BENCH_ONLY=route|attend|layer runs one part (e.g. under a profiler).
    let only = std::env::var("HGA_BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only == part;
    if want("route") {
        route::run(&gpu);
    }
    if want("attend") {
        attend::run(&gpu);
    }
    if want("layer") {
        layer::run(&gpu);
    }
}
