//! `bench_kv`: the K/V tiers. The host and disk tiers run anywhere (the anchor: raw O_DIRECT reads of the same
//! bytes in the same run); the GPU working-set cache needs a GPU (the anchor: a bulk pinned copy of the same bytes).
//!
//! Run: `cargo bench --bench kv` (or the staged binary on the GPU machine).
#[path = "../common/mod.rs"]
mod common;
mod gpu;
mod host;

fn main() {
    host::run();
    if hga::runtime::device_count() == 0 {
        eprintln!("SKIP kv GPU-cache benchmarks: no CUDA device");
        return;
    }
    let gpu = hga::open_gpu(0).expect("open GPU");
    println!("device: {}  image: {}  PDL: {}", gpu.device_name(), gpu.image_name(), gpu.pdl_state());
    gpu::run(&gpu);
}
