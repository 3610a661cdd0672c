//! GPU working-set cache benchmark rows (H200 figures in docs/perf-kv.md, section "GPU working-set cache"):
//! 1. cold gather of a 64K / 3% selection (48 layers x 4 KV heads x 100 groups x 8 KB = 157 MB) from the mapped
//!    arena: lookup + gather of every layer in one recorded graph, each replay selecting groups disjoint from the
//!    previous one (every lookup misses, nothing is in L2); anchor: one bulk pinned `cuMemcpyHtoDAsync` of the same
//!    bytes in the same run; also one layer alone (the per-layer latency) and the lookups alone;
//! 2. the replayed fixture trace (`HGA_KV_TRACE`, else a short one recorded here): hit rate and bytes per token at
//!    caches of 2x / 4x / 8x the largest selection, on the GPU, with LRU and Belady's optimum of the same trace as
//!    yardsticks (CPU), and the CLOCK reference-count variants (CPU model, identical to the GPU);
//! 3. append of a token to 48 layers: the kernel writing the mapped arena directly vs the slot-only append plus one
//!    D2H copy of the token's K/V (96 KB) to pinned memory.
use crate::common::{time_graph_ms, time_ms};
use cudarc::driver::{result, CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;
use hga::kernels::kv::{hga_kv_advance, hga_kv_append, hga_kv_gather, hga_kv_lookup};
use hga::kv::gpu_cache::{ArenaTable, GpuCache, GpuCacheConfig};
use hga::kv::pinned::PinnedMemory;
use hga::kv::{ArenaLayout, Extent, ExtentMemory};
use hga::reference::kv::{belady_hits, clock_hits, lru_hits, SelectionTrace};
use hga::runtime::Gpu;

const LAYERS: usize = 48;
const KV: usize = 4;
const SEL: usize = 100;
const CTX_GROUPS: usize = 65536 / 16;
const E: usize = 256;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

pub fn run(gpu: &Gpu) {
    let mem = PinnedMemory::new(gpu.context().clone());
    cold_gather(gpu, &mem);
    trace_rows(gpu, &mem);
    append_rows(gpu, &mem);
}

fn arena(gpu: &Gpu, mem: &PinnedMemory, layers: usize, kv: usize, groups: usize) -> (Vec<Extent>, ArenaTable) {
    let layout = ArenaLayout { layers, kv_heads: kv, groups_per_extent: E };
    let n = groups.div_ceil(E);
    let ext: Vec<Extent> = (0..n).map(|_| mem.alloc(layout.extent_bytes()).expect("mapped pinned arena")).collect();
    let t = ArenaTable::new(gpu, layout, &ext, n).unwrap();
    (ext, t)
}

#[allow(clippy::too_many_arguments)]
fn caches(
    gpu: &Gpu,
    layers: usize,
    kv: usize,
    slots: usize,
    table: usize,
    sel: usize,
    rh: u32,
    rf: u32,
) -> Vec<GpuCache> {
    (0..layers)
        .map(|l| {
            let cfg = GpuCacheConfig {
                layer: l,
                n_kv: kv,
                cache_slots: slots,
                table_groups: table,
                max_groups: sel,
                ref_hit: rh,
                ref_fill: rf,
            };
            GpuCache::new(gpu, cfg).unwrap()
        })
        .collect()
}

fn cold_gather(gpu: &Gpu, mem: &PinnedMemory) {
    let s = gpu.stream();
    let (ext, arena) = arena(gpu, mem, LAYERS, KV, CTX_GROUPS);
    let mut cs = caches(gpu, LAYERS, KV, SEL, CTX_GROUPS, SEL, 1, 0);
    // R pairwise disjoint selections per (layer, head): with cache_slots == SEL every lookup misses.
    const R: usize = 8;
    let mut seed = 0x5eed_u64;
    let mut sels: Vec<CudaSlice<u32>> = Vec::new();
    for _ in 0..LAYERS {
        let mut v = vec![0u32; R * KV * SEL];
        for h in 0..KV {
            let mut g: Vec<u32> = (4..(CTX_GROUPS - 24) as u32).collect();
            for i in (1..g.len()).rev() {
                g.swap(i, (xorshift(&mut seed) % (i as u64 + 1)) as usize);
            }
            for r in 0..R {
                v[(r * KV + h) * SEL..(r * KV + h + 1) * SEL].copy_from_slice(&g[r * SEL..(r + 1) * SEL]);
            }
        }
        sels.push(s.clone_htod(&v).unwrap());
    }
    let mut pos = s.clone_htod(&[65536u32]).unwrap();
    let bytes = (LAYERS * KV * SEL * 8192) as f64;
    let pos_ptr: *mut CudaSlice<u32> = &mut pos;
    let step = |cs: &mut [GpuCache], layers: usize, r: usize, gather: bool| {
        // SAFETY: `pos` is only used through this pointer while the closures run.
        let pos = unsafe { &mut *pos_ptr };
        for (l, c) in cs.iter_mut().enumerate().take(layers) {
            let sel = sels[l].slice(r * KV * SEL..(r + 1) * KV * SEL);
            hga_kv_lookup(gpu, c, pos, &sel, &arena).unwrap();
            if gather {
                hga_kv_gather(gpu, c, pos, &arena).unwrap();
            }
        }
        hga_kv_advance(gpu, pos).unwrap();
    };
    let t_all = time_graph_ms(gpu, R, 20, |r| step(&mut cs, LAYERS, r, true));
    let t_lookup = time_graph_ms(gpu, R, 20, |r| step(&mut cs, LAYERS, r, false));
    let t_one = time_graph_ms(gpu, R, 50, |r| step(&mut cs, 1, r, true));
    let miss: u64 = cs.iter().map(|c| c.total().misses).sum();
    let sel_all: u64 = cs.iter().map(|c| c.total().hits + c.total().misses).sum();
    // Anchor: one bulk copy of the same bytes from pinned memory.
    let src = mem.alloc(bytes as usize).unwrap();
    let mut dst = s.alloc_zeros::<u8>(bytes as usize).unwrap();
    let t_bulk = time_ms(gpu, 3, 20, |_| {
        let (d, _g) = dst.device_ptr_mut(s);
        // SAFETY: both buffers hold `bytes` bytes; `src` is pinned and outlives the copy (synchronized below).
        unsafe { result::memcpy_htod_async(d, src.as_slice(), s.cu_stream()).unwrap() };
    });
    gpu.synchronize().unwrap();
    let gb = |ms: f64, b: f64| b / ms / 1e6;
    println!("\n## kv: cold gather, 64K / 3% (48 layers x 4 KV heads x {SEL} groups x 8 KB = {:.0} MB)", bytes / 1e6);
    println!("misses / selected over the run: {miss} / {sel_all} (every lookup a miss)");
    println!("{:<44} {:>10} {:>9} {:>7}", "what", "ms", "GB/s", "ratio");
    let anchor = gb(t_bulk, bytes);
    for (name, ms, b) in [
        ("bulk pinned cuMemcpyHtoDAsync (anchor)", t_bulk, bytes),
        ("lookup + gather, 48 layers (graph)", t_all, bytes),
        ("lookup + gather, 1 layer (latency)", t_one, bytes / LAYERS as f64),
    ] {
        println!("{name:<44} {ms:>10.3} {:>9.1} {:>6.2}x", gb(ms, b), gb(ms, b) / anchor);
    }
    println!("{:<44} {:>10.3}", "lookups alone, 48 layers", t_lookup);
    println!(
        "{:<44} {:>10.3} {:>9.1} {:>6.2}x",
        "gather alone (difference)",
        t_all - t_lookup,
        gb(t_all - t_lookup, bytes),
        gb(t_all - t_lookup, bytes) / anchor
    );
    drop(ext);
}

fn load_trace() -> SelectionTrace {
    if let Ok(p) = std::env::var("HGA_KV_TRACE") {
        let b = std::fs::read(&p).unwrap_or_else(|e| panic!("HGA_KV_TRACE={p}: {e}"));
        return SelectionTrace::from_bytes(&b).unwrap();
    }
    let dir = ["fixtures/qwen3-moe-bytes", concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/qwen3-moe-bytes")]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|d| d.join("config.json").exists())
        .expect("fixtures/qwen3-moe-bytes (run from the repository root)");
    let text = std::fs::read_to_string(dir.join("eval/torch.txt")).unwrap();
    println!("(no HGA_KV_TRACE: recording a short trace, 2048 tokens + 64 steps)");
    SelectionTrace::record(&dir, &text, 2048, 64, 16).unwrap()
}

fn trace_rows(gpu: &Gpu, mem: &PinnedMemory) {
    let t = load_trace();
    let s = gpu.stream();
    let max_sel = t.max_selected().max(1);
    let end_groups = (t.first_pos + t.steps.len()).div_ceil(16) + 1;
    let (_ext, arena) = arena(gpu, mem, t.layers, t.kv_heads, end_groups);
    let table = arena.groups();
    let selected: u64 = t.steps.iter().flatten().map(|x| x.len() as u64).sum();
    let streams: Vec<Vec<Vec<u32>>> =
        (0..t.layers).flat_map(|l| (0..t.kv_heads).map(move |h| (l, h))).map(|(l, h)| t.stream(l, h)).collect();
    println!(
        "\n## kv: replayed selection trace ({} layers x {} KV heads, {} decode steps from position {}, <= {max_sel} \
         groups per step and head, {selected} selections)",
        t.layers,
        t.kv_heads,
        t.steps.len(),
        t.first_pos
    );
    println!(
        "{:<8} {:>7} {:>10} {:>9} {:>9} {:>9} {:>12} {:>12}",
        "cache", "slots", "GPU CLOCK", "CPU LRU", "Belady", "CLOCK/Bel", "KB/token fx", "MB/tok 64K"
    );
    for mult in [2usize, 4, 8] {
        let slots = mult * max_sel;
        let mut cs = caches(gpu, t.layers, t.kv_heads, slots, table, max_sel, 1, 0);
        let mut pos = s.clone_htod(&[t.first_pos as u32]).unwrap();
        let mut sel_dev = s.alloc_zeros::<u32>(t.kv_heads * max_sel).unwrap();
        for st in 0..t.steps.len() {
            for (l, c) in cs.iter_mut().enumerate() {
                s.memcpy_htod(&t.padded_step(st, l, max_sel), &mut sel_dev).unwrap();
                hga_kv_lookup(gpu, c, &pos, &sel_dev, &arena).unwrap();
                hga_kv_gather(gpu, c, &pos, &arena).unwrap();
            }
            hga_kv_advance(gpu, &mut pos).unwrap();
        }
        gpu.synchronize().unwrap();
        let hits: u64 = cs.iter().map(|c| c.total().hits).sum();
        let bytes: u64 = cs.iter().map(|c| c.total().bytes).sum();
        let lru: u64 = streams.iter().map(|x| lru_hits(x, slots)).sum();
        let bel: u64 = streams.iter().map(|x| belady_hits(x, slots)).sum();
        let model: u64 = streams.iter().map(|x| clock_hits(x, slots, 1, 0).0).sum();
        let r = |h: u64| 100.0 * h as f64 / selected.max(1) as f64;
        let hit = r(hits);
        println!(
            "{:<8} {slots:>7} {:>9.1}% {:>8.1}% {:>8.1}% {:>9.2} {:>12.1} {:>12.1}{}",
            format!("{mult}x"),
            hit,
            r(lru),
            r(bel),
            hits as f64 / bel.max(1) as f64,
            bytes as f64 / t.steps.len() as f64 / 1e3,
            (1.0 - hit / 100.0) * (LAYERS * KV * SEL * 8192) as f64 / 1e6,
            if model == hits { "" } else { "  (GPU != CPU model!)" }
        );
        for (rh, rf) in [(2u32, 0u32), (3, 0), (1, 1), (2, 1), (3, 1)] {
            let h: u64 = streams.iter().map(|x| clock_hits(x, slots, rh, rf).0).sum();
            println!("{:<8} {:>7} {:>9.1}%  (CPU model, ref_hit {rh} ref_fill {rf})", "", "", r(h));
        }
    }
    println!("(MB/tok 64K: the miss rate applied to the 157 MB a 64K / 3% step selects over 48 layers x 4 KV heads)");
}

fn append_rows(gpu: &Gpu, mem: &PinnedMemory) {
    let s = gpu.stream();
    let (_ext, arena) = arena(gpu, mem, LAYERS, KV, 4096);
    let mut cs = caches(gpu, LAYERS, KV, 4, 4096, 4, 1, 0);
    // The token's K and V of every layer in one buffer (so that one D2H moves all of it).
    let row = KV * 128;
    let kv_all: CudaSlice<bf16> = s.clone_htod(&crate::common::rand_bf16(2 * LAYERS * row, 7, 1.0)).unwrap();
    let mut host = mem.alloc(2 * LAYERS * row * 2).unwrap();
    let mut pos = s.clone_htod(&[1000u32]).unwrap();
    let pos_ptr: *mut CudaSlice<u32> = &mut pos;
    let mut run = |cs: &mut [GpuCache], mapped: bool, d2h: bool| {
        // SAFETY: `pos` is only used through this pointer while the closures run.
        let pos = unsafe { &mut *pos_ptr };
        for (l, c) in cs.iter_mut().enumerate() {
            let k = kv_all.slice(2 * l * row..(2 * l + 1) * row);
            let v = kv_all.slice((2 * l + 1) * row..(2 * l + 2) * row);
            hga_kv_append(gpu, c, pos, &k, &v, &arena, mapped).unwrap();
        }
        if d2h {
            let (src, _g) = kv_all.device_ptr(s);
            // SAFETY: `host` is pinned and holds the whole buffer.
            unsafe { result::memcpy_dtoh_async(host.as_mut_slice(), src, s.cu_stream()).unwrap() };
        }
        hga_kv_advance(gpu, pos).unwrap();
    };
    let t_mapped = time_graph_ms(gpu, 16, 50, |_| run(&mut cs, true, false));
    let t_slots = time_graph_ms(gpu, 16, 50, |_| run(&mut cs, false, false));
    let t_d2h = time_graph_ms(gpu, 16, 50, |_| run(&mut cs, false, true));
    println!("\n## kv: append of one token, 48 layers x 4 KV heads (96 KB of K/V), per step");
    println!("{:<52} {:>9}", "what", "us");
    println!("{:<52} {:>9.2}", "append to the slots only (no arena)", t_slots * 1e3);
    println!("{:<52} {:>9.2}", "append writing the mapped arena (posted PCIe writes)", t_mapped * 1e3);
    println!("{:<52} {:>9.2}", "append to the slots + one 96 KB D2H to pinned memory", t_d2h * 1e3);
    println!("(the D2H path also needs a host scatter of 384 rows of 256 B per step into the arena, not timed)");
}
