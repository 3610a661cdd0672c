//! GPU checks of the working-set cache kernels against the CPU model `reference::kv` and a host copy of every K/V
//! row: random sequences of decode steps (append every position; from a random first position on, a random
//! selection per (layer, KV head) with reuse, duplicates, padding and unselectable groups, then lookup and gather),
//! with the slot pool poisoned (NaN bytes) before the first append. After every step: the entry lists, the miss
//! lists, the page tables, the CLOCK hands and the counters (read from their mapped mirror) equal the model's;
//! hits + misses = the distinct selectable groups; the contents of every entry's slot equal the host copy bit for
//! bit (the sink and window rows up to `p`, whole blocks for routed groups). At the end the mapped arena equals
//! the host copy bit for bit. The graph form records one step (appends, lookups, gathers, `p += 1`) once and
//! replays it for every step, the selection and the new token copied into fixed buffers before each replay.
use std::collections::HashSet;

use super::Outcome;
use crate::kernels::kv::{hga_kv_advance, hga_kv_append, hga_kv_gather, hga_kv_lookup};
use crate::kv::gpu_cache::{ArenaTable, GpuCache, GpuCacheConfig};
use crate::kv::pinned::PinnedMemory;
use crate::kv::{ArenaLayout, Extent, ExtentMemory};
use crate::reference::kv::{CacheModel, StepOut, ABSENT};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::CudaSlice;
use gpu_kernels::params::{kv_local_start, HGA_HEAD_DIM, KV_GROUP_BYTES, KV_SINK_SLOTS};
use half::bf16;
use rand::Rng;

/// One check's shapes.
#[derive(Clone, Copy, Debug)]
pub struct KvCase {
    pub layers: usize,
    pub n_kv: usize,
    pub groups_per_extent: usize,
    pub cache_slots: usize,
    pub max_groups: usize,
    pub ref_hit: u32,
    pub ref_fill: u32,
    /// First position with a lookup, and the number of steps with lookups.
    pub p0: usize,
    pub steps: usize,
    /// Record one step as a CUDA graph and replay it.
    pub graph: bool,
}

impl KvCase {
    fn label(&self) -> String {
        format!(
            "layers={} kv={} E={} slots={} sel={} ref={}/{} p={}..{}{}",
            self.layers,
            self.n_kv,
            self.groups_per_extent,
            self.cache_slots,
            self.max_groups,
            self.ref_hit,
            self.ref_fill,
            self.p0,
            self.p0 + self.steps,
            if self.graph { " graph" } else { "" }
        )
    }

    /// A random case (small, with evictions).
    pub fn random(rng: &mut impl Rng, graph: bool) -> Self {
        let max_groups = [1, 5, 17, 32, 33, 64][rng.gen_range(0..6)];
        KvCase {
            layers: rng.gen_range(1..=3),
            n_kv: rng.gen_range(1..=4),
            groups_per_extent: [7, 16, 64][rng.gen_range(0..3)],
            cache_slots: max_groups + rng.gen_range(0..=2 * max_groups),
            max_groups,
            ref_hit: rng.gen_range(0..=2),
            ref_fill: rng.gen_range(0..=1),
            p0: rng.gen_range(0..1500),
            steps: rng.gen_range(1..=24),
            graph,
        }
    }
}

/// Random bf16 bits that are not NaN.
fn rand_bits(rng: &mut impl Rng) -> u16 {
    bf16::from_f32(rng.gen_range(-8.0f32..8.0)).to_bits()
}

/// Runs one case; the outcome names the first mismatch.
pub fn steps(gpu: &Gpu, case: KvCase, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let kernel = if case.graph { "hga_kv_step_graph" } else { "hga_kv_step" };
    let bad = run(gpu, &case, rng)?;
    Ok(Outcome::new(kernel, case.label(), 0.0, bad))
}

struct Layer {
    cache: GpuCache,
    k_cur: CudaSlice<bf16>,
    v_cur: CudaSlice<bf16>,
    selected: CudaSlice<u32>,
    model: CacheModel,
    /// Host copy: bits [positions][n_kv][128].
    k_all: Vec<u16>,
    v_all: Vec<u16>,
    k_dev: CudaSlice<bf16>,
    v_dev: CudaSlice<bf16>,
    prev: Vec<Vec<u32>>,
    /// This step's selection per head and the model's result.
    want: Option<(Vec<Vec<u32>>, Vec<StepOut>)>,
}

fn run(gpu: &Gpu, c: &KvCase, rng: &mut impl Rng) -> Result<Option<String>, RuntimeError> {
    const D: usize = HGA_HEAD_DIM;
    let s = gpu.stream();
    let end = c.p0 + c.steps;
    let groups = end.div_ceil(16) + 1;
    let n_ext = groups.div_ceil(c.groups_per_extent);
    let layout = ArenaLayout { layers: c.layers, kv_heads: c.n_kv, groups_per_extent: c.groups_per_extent };
    let mem = PinnedMemory::new(gpu.context().clone());
    let extents: Vec<Extent> = (0..n_ext)
        .map(|_| mem.alloc(layout.extent_bytes()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| RuntimeError::Shape(format!("kv check arena: {e}")))?;
    // One spare (unallocated) entry: the table is longer than the arena.
    let arena = ArenaTable::new(gpu, layout, &extents, n_ext + 1)?;
    let table_groups = n_ext * c.groups_per_extent;
    let mut layers = Vec::new();
    for l in 0..c.layers {
        let cfg = GpuCacheConfig {
            layer: l,
            n_kv: c.n_kv,
            cache_slots: c.cache_slots,
            table_groups,
            max_groups: c.max_groups,
            ref_hit: c.ref_hit,
            ref_fill: c.ref_fill,
        };
        let mut cache = GpuCache::new(gpu, cfg)?;
        let poison = vec![bf16::from_bits(0xFFFF); cache.slots.len()];
        s.memcpy_htod(&poison, &mut cache.slots)?;
        let k_all: Vec<u16> = (0..end * c.n_kv * D).map(|_| rand_bits(rng)).collect();
        let v_all: Vec<u16> = (0..end * c.n_kv * D).map(|_| rand_bits(rng)).collect();
        let to_bf = |v: &[u16]| v.iter().map(|&b| bf16::from_bits(b)).collect::<Vec<_>>();
        layers.push(Layer {
            k_dev: s.clone_htod(&to_bf(&k_all))?,
            v_dev: s.clone_htod(&to_bf(&v_all))?,
            k_cur: s.alloc_zeros(c.n_kv * D)?,
            v_cur: s.alloc_zeros(c.n_kv * D)?,
            selected: s.clone_htod(&vec![ABSENT; c.n_kv * c.max_groups])?,
            model: CacheModel::new(cfg.model(table_groups)),
            cache,
            k_all,
            v_all,
            prev: vec![Vec::new(); c.n_kv],
            want: None,
        });
    }
    let mut pos = s.clone_htod(&[0u32])?;
    let row = c.n_kv * D;
    let stage = |layers: &mut [Layer], p: usize| -> Result<(), RuntimeError> {
        for ly in layers.iter_mut() {
            s.memcpy_dtod(&ly.k_dev.slice(p * row..(p + 1) * row), &mut ly.k_cur)?;
            s.memcpy_dtod(&ly.v_dev.slice(p * row..(p + 1) * row), &mut ly.v_cur)?;
        }
        Ok(())
    };
    // Positions before the first lookup: appends only.
    for p in 0..c.p0 {
        stage(&mut layers, p)?;
        for ly in layers.iter_mut() {
            hga_kv_append(gpu, &mut ly.cache, &pos, &ly.k_cur, &ly.v_cur, &arena, true)?;
        }
        hga_kv_advance(gpu, &mut pos)?;
    }
    let step = |layers: &mut [Layer], pos: &mut CudaSlice<u32>| -> Result<(), RuntimeError> {
        for ly in layers.iter_mut() {
            hga_kv_append(gpu, &mut ly.cache, pos, &ly.k_cur, &ly.v_cur, &arena, true)?;
        }
        for ly in layers.iter_mut() {
            hga_kv_lookup(gpu, &mut ly.cache, pos, &ly.selected, &arena)?;
        }
        for ly in layers.iter_mut() {
            hga_kv_gather(gpu, &mut ly.cache, pos, &arena)?;
        }
        hga_kv_advance(gpu, pos)
    };
    let graph = if c.graph {
        // Kernel handles loaded before the recording (a module lookup is not a stream operation).
        for k in ["hga_kv_append", "hga_kv_lookup", "hga_kv_gather", "hga_kv_advance"] {
            gpu.function(k)?;
        }
        Some(gpu.capture(|| step(&mut layers, &mut pos))?)
    } else {
        None
    };
    for p in c.p0..end {
        stage(&mut layers, p)?;
        let pu = p as u32;
        let w0 = (kv_local_start(pu) as usize / 16).max(KV_SINK_SLOTS);
        for ly in layers.iter_mut() {
            let mut sel = Vec::with_capacity(c.n_kv * c.max_groups);
            let mut sel_h = Vec::new();
            for h in 0..c.n_kv {
                let mut v: Vec<u32> = Vec::new();
                let k = rng.gen_range(0..=c.max_groups);
                for i in 0..k {
                    let g = if !ly.prev[h].is_empty() && rng.gen_ratio(2, 3) {
                        ly.prev[h][rng.gen_range(0..ly.prev[h].len())]
                    } else if i % 7 == 3 {
                        // Sometimes a sink, window, future or out-of-table group: never taken.
                        [0, 3, w0 as u32, p as u32 / 16, table_groups as u32 + 5][rng.gen_range(0..5)]
                    } else {
                        rng.gen_range(0..w0.max(1) as u32)
                    };
                    v.push(g);
                }
                v.resize(c.max_groups, ABSENT);
                // Padding anywhere, not only at the end.
                for _ in 0..c.max_groups / 4 {
                    let (a, b) = (rng.gen_range(0..c.max_groups), rng.gen_range(0..c.max_groups));
                    v.swap(a, b);
                }
                ly.prev[h] = v.iter().copied().filter(|&g| g != ABSENT && (g as usize) < w0).collect();
                sel.extend_from_slice(&v);
                sel_h.push(v);
            }
            s.memcpy_htod(&sel, &mut ly.selected)?;
            let want = ly.model.lookup(pu, &sel_h);
            ly.want = Some((sel_h, want));
        }
        match &graph {
            Some(g) => g.launch()?,
            None => step(&mut layers, &mut pos)?,
        }
        gpu.synchronize()?;
        for (l, ly) in layers.iter_mut().enumerate() {
            if let Some(m) = compare(gpu, c, ly, pu, table_groups)? {
                return Ok(Some(format!("layer {l}, p {p}: {m}")));
            }
        }
    }
    let got_pos = s.clone_dtoh(&pos)?[0];
    if got_pos as usize != end {
        return Ok(Some(format!("position after the steps {got_pos}, expected {end}")));
    }
    // The arena, bit for bit.
    for (l, ly) in layers.iter().enumerate() {
        for h in 0..c.n_kv {
            for g in 0..groups.min(table_groups) {
                let (e, off) = layout.locate(l, h, g);
                let got = &extents[e].as_slice()[off..off + KV_GROUP_BYTES];
                if got != expected_block(ly, c.n_kv, h, g, end).as_slice() {
                    return Ok(Some(format!("arena block of layer {l}, head {h}, group {g} differs")));
                }
            }
        }
    }
    Ok(None)
}

/// The group block (layer of `ly`, head `h`, group `g`) as the arena holds it once positions `< appended` are in.
fn expected_block(ly: &Layer, n_kv: usize, h: usize, g: usize, appended: usize) -> Vec<u8> {
    const D: usize = HGA_HEAD_DIM;
    let mut b = vec![0u8; KV_GROUP_BYTES];
    for r in 0..16 {
        let p = 16 * g + r;
        if p >= appended {
            break;
        }
        for (half, all) in [(0, &ly.k_all), (1, &ly.v_all)] {
            let src = &all[(p * n_kv + h) * D..(p * n_kv + h + 1) * D];
            let at = half * KV_GROUP_BYTES / 2 + r * D * 2;
            for (d, &bits) in src.iter().enumerate() {
                b[at + 2 * d..at + 2 * d + 2].copy_from_slice(&bits.to_le_bytes());
            }
        }
    }
    b
}

fn compare(gpu: &Gpu, c: &KvCase, ly: &Layer, p: u32, table_groups: usize) -> Result<Option<String>, RuntimeError> {
    let (sel, want) = ly.want.as_ref().expect("a step's selection");
    let entries = ly.cache.entries(gpu)?;
    let misses = ly.cache.misses(gpu)?;
    let (table, slot_group, hand) = ly.cache.state(gpu)?;
    let counters = ly.cache.counters();
    let slots: Vec<bf16> = gpu.stream().clone_dtoh(&ly.cache.slots)?;
    let w0 = (kv_local_start(p) as usize / 16).max(KV_SINK_SLOTS);
    let sph = ly.cache.cfg.slots_per_head();
    for h in 0..c.n_kv {
        let m = &ly.model.heads[h];
        if entries[h] != want[h].entries {
            return Ok(Some(format!("head {h}: entries {:?}, expected {:?}", entries[h], want[h].entries)));
        }
        if misses[h] != want[h].misses {
            return Ok(Some(format!("head {h}: misses {:?}, expected {:?}", misses[h], want[h].misses)));
        }
        let tg = table_groups;
        if table[h * tg..(h + 1) * tg] != m.table[..] {
            return Ok(Some(format!("head {h}: page table differs from the model")));
        }
        let n = c.cache_slots;
        if slot_group[h * n..(h + 1) * n] != m.slot_group[..] || hand[h] != m.hand {
            return Ok(Some(format!(
                "head {h}: slot groups or hand ({} vs {}) differ from the model",
                hand[h], m.hand
            )));
        }
        let cn = counters[h];
        if [cn.hits, cn.misses, cn.bytes, cn.steps] != m.counters {
            return Ok(Some(format!("head {h}: counters {cn:?}, expected {:?}", m.counters)));
        }
        let distinct: HashSet<u32> =
            sel[h].iter().copied().filter(|&g| g >= 4 && (g as usize) < w0 && (g as usize) < table_groups).collect();
        if want[h].hits as usize + want[h].misses.len() != distinct.len() {
            return Ok(Some(format!("head {h}: hits + misses != {} selected", distinct.len())));
        }
        for &(slot, pos0) in &entries[h] {
            let g = pos0 as usize / 16;
            let want_b = expected_block(ly, c.n_kv, h, g, p as usize + 1);
            let got: Vec<u8> = slots[slot as usize * KV_GROUP_BYTES / 2..(slot as usize + 1) * KV_GROUP_BYTES / 2]
                .iter()
                .flat_map(|x| x.to_bits().to_le_bytes())
                .collect();
            let rows = if (slot as usize % sph) < KV_SINK_SLOTS + gpu_kernels::params::KV_WINDOW_SLOTS {
                (p as usize + 1 - pos0 as usize).min(16)
            } else {
                16
            };
            for r in 0..rows {
                for half in 0..2 {
                    let a = half * KV_GROUP_BYTES / 2 + r * 256;
                    if got[a..a + 256] != want_b[a..a + 256] {
                        return Ok(Some(format!(
                            "head {h}: slot {slot} (group {g}) row {r} {} differs from the host copy",
                            if half == 0 { "K" } else { "V" }
                        )));
                    }
                }
            }
        }
    }
    Ok(None)
}

/// The rows of `hga selfcheck`: a cold gather, random step sequences, a recorded step replayed.
pub fn selfcheck_rows(gpu: &Gpu, rng: &mut impl Rng) -> Result<Vec<Outcome>, RuntimeError> {
    let mut v = Vec::new();
    let cold = KvCase {
        layers: 2,
        n_kv: 4,
        groups_per_extent: 64,
        cache_slots: 200,
        max_groups: 100,
        ref_hit: 1,
        ref_fill: 0,
        p0: 4000,
        steps: 2,
        graph: false,
    };
    v.push(steps(gpu, cold, rng)?);
    for graph in [false, true] {
        let c = KvCase::random(rng, graph);
        v.push(steps(gpu, c, rng)?);
    }
    Ok(v)
}
