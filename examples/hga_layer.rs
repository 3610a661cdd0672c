//! The embeddable HGA attention layer in a few lines: an arena in mapped pinned host memory, one `HgaLayer`, a
//! random post-RoPE history of 4000 tokens handed to `prefill_history`, then decode steps (append + attend, the
//! position advanced on the device), replayed as one recorded CUDA graph after the first step. Prints the entries
//! attended per KV head and the cache's hits and misses. Run: `cargo run --release --example hga_layer`.
use half::bf16;
use hga::hga::gpu_layer::{advance_position, HgaLayer, HgaLayerConfig};
use hga::hga::Budget;
use hga::kv::{ArenaLayout, ArenaTable, ExtentMemory, PinnedMemory};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if hga::runtime::device_count() == 0 {
        println!("SKIP hga_layer example: no CUDA device");
        return Ok(());
    }
    let gpu = hga::open_gpu(0)?;
    let s = gpu.stream();
    let (n_heads, n_kv, d, t0, steps, max_ctx) = (32usize, 4usize, 128usize, 4000usize, 16usize, 8192usize);
    // The arena every layer shares: extents of 256 groups per (layer, KV head), here one layer.
    let layout = ArenaLayout { layers: 1, kv_heads: n_kv, groups_per_extent: 256 };
    let mem = PinnedMemory::new(gpu.context().clone());
    let n_ext = (max_ctx / 16).div_ceil(layout.groups_per_extent);
    let extents = (0..n_ext).map(|_| mem.alloc(layout.extent_bytes())).collect::<Result<Vec<_>, _>>()?;
    let arena = ArenaTable::new(&gpu, layout, &extents, n_ext)?;
    let cfg = HgaLayerConfig::new(0, n_heads, n_kv, max_ctx, Budget::Fraction(0.25));
    let mut layer = HgaLayer::new(&gpu, &cfg, &arena)?;

    // A prompt's K/V as the dense prefill leaves them: bf16 [tokens][n_kv][128].
    let mut rng = StdRng::seed_from_u64(1);
    let mut rand = |n: usize, a: f32| -> Vec<bf16> { (0..n).map(|_| bf16::from_f32(rng.gen_range(-a..a))).collect() };
    let k_all = s.clone_htod(&rand((t0 + steps) * n_kv * d, 2.0))?;
    let v_all = s.clone_htod(&rand((t0 + steps) * n_kv * d, 1.0))?;
    layer.prefill_history(&gpu, &k_all, &v_all, t0, &arena)?;

    // The runtime's own buffers: this step's K, V and query, the output and LSE, the shared device position.
    let (mut k_new, mut v_new) = (s.alloc_zeros::<bf16>(n_kv * d)?, s.alloc_zeros::<bf16>(n_kv * d)?);
    let mut q = s.alloc_zeros::<bf16>(n_heads * d)?;
    let mut out = s.alloc_zeros::<bf16>(n_heads * d)?;
    let mut lse = s.alloc_zeros::<f32>(n_heads)?;
    let mut pos = s.clone_htod(&[t0 as u32])?;
    let mut graph = None;
    for i in 0..steps {
        let p = t0 + i;
        s.memcpy_dtod(&k_all.slice(p * n_kv * d..(p + 1) * n_kv * d), &mut k_new)?;
        s.memcpy_dtod(&v_all.slice(p * n_kv * d..(p + 1) * n_kv * d), &mut v_new)?;
        s.memcpy_htod(&rand(n_heads * d, 1.5), &mut q)?;
        let mut step = || -> Result<(), hga::runtime::RuntimeError> {
            layer.append(&gpu, &pos, &k_new, &v_new, &arena)?;
            layer.attend(&gpu, &pos, &q, None, &mut out, &mut lse, &arena)?;
            advance_position(&gpu, &mut pos)
        };
        if i == 0 {
            step()?; // the first step with host launches (loads every kernel), the rest replayed
        } else {
            if graph.is_none() {
                graph = Some(gpu.capture(step)?);
            }
            graph.as_ref().unwrap().launch()?;
        }
        gpu.synchronize()?;
        let entries = s.clone_dtoh(&layer.cache.n_entries)?;
        let c = layer.cache_totals();
        let o = s.clone_dtoh(&out)?;
        println!(
            "step {i:2} position {p}: entries per KV head {entries:?} ({} tokens each at most), cache hits {} \
             misses {}, out[0..4] {:?}",
            entries.iter().max().unwrap_or(&0) * 16,
            c.hits,
            c.misses,
            &o[..4].iter().map(|x| x.to_f32()).collect::<Vec<_>>()
        );
    }
    Ok(())
}
