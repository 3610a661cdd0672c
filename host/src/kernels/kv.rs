//! Launchers of the GPU working-set cache kernels (gpu-kernels/src/kv/): `hga_kv_append`, `hga_kv_lookup`,
//! `hga_kv_gather`, `hga_kv_advance`. One launch per layer covering its KV heads; the position is read from the
//! device (`pos: u32 [1]`), so these launches can be recorded once into a CUDA graph and replayed every step.
use super::{check_len, launch};
use crate::kv::gpu_cache::{ArenaTable, GpuCache};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig};
use gpu_kernels::params::{KvCacheParams, HGA_HEAD_DIM, KV_GATHER_WARPS};
use half::bf16;

/// Device address of a buffer. The `Gpu` runs everything on its one stream with cudarc's event tracking off, so
/// the guard has nothing to record and is dropped at once.
fn addr<T>(gpu: &Gpu, b: &impl DevicePtr<T>) -> u64 {
    b.device_ptr(gpu.stream()).0
}

/// The parameter block of `cache` with `arena` (every launcher fills the rest).
fn params(gpu: &Gpu, c: &GpuCache, pos: &CudaSlice<u32>, arena: &ArenaTable) -> Result<KvCacheParams, RuntimeError> {
    let cfg = &c.cfg;
    check_len("kv pos", pos.len(), 1)?;
    let l = &arena.layout;
    if cfg.layer >= l.layers || cfg.n_kv != l.kv_heads {
        return Err(RuntimeError::Shape(format!(
            "kv cache of layer {} with {} KV heads does not fit the arena ({} layers, {} KV heads)",
            cfg.layer, cfg.n_kv, l.layers, l.kv_heads
        )));
    }
    if let Some((_, groups)) = arena.group_table().filter(|&(_, g)| g != cfg.table_groups) {
        return Err(RuntimeError::Shape(format!(
            "kv cache of layer {} with a page table of {} groups does not fit the group table's {groups}",
            cfg.layer, cfg.table_groups
        )));
    }
    let u = |what: &str, v: usize| super::dim_u32(what, v);
    Ok(KvCacheParams {
        pos: addr(gpu, pos),
        k_new: 0,
        v_new: 0,
        slots: addr(gpu, &c.slots),
        extents: addr(gpu, &arena.table),
        selected: 0,
        table: addr(gpu, &c.table),
        slot_group: addr(gpu, &c.slot_group),
        slot_ref: addr(gpu, &c.slot_ref),
        slot_used: addr(gpu, &c.slot_used),
        seen: addr(gpu, &c.seen),
        hand: addr(gpu, &c.hand),
        miss_group: addr(gpu, &c.miss_group),
        miss_slot: addr(gpu, &c.miss_slot),
        n_miss: addr(gpu, &c.n_miss),
        entry_slot: addr(gpu, &c.entry_slot),
        entry_pos: addr(gpu, &c.entry_pos),
        n_entries: addr(gpu, &c.n_entries),
        counters: addr(gpu, &c.counters),
        counters_host: c.counters_host.device_ptr().unwrap_or(0),
        layer: u("kv layer", cfg.layer)?,
        n_kv: u("kv n_kv", cfg.n_kv)?,
        groups_per_extent: u("kv groups_per_extent", l.groups_per_extent)?,
        n_extents: u("kv extents", arena.max_extents)?,
        slots_per_head: u("kv slots_per_head", cfg.slots_per_head())?,
        cache_slots: u("kv cache_slots", cfg.cache_slots)?,
        table_groups: u("kv table_groups", cfg.table_groups)?,
        max_groups: u("kv max_groups", cfg.max_groups)?,
        max_entries: u("kv max_entries", cfg.max_entries())?,
        ref_hit: cfg.ref_hit,
        ref_fill: cfg.ref_fill,
        write_arena: 1,
        group_addr: arena.group_table().map_or(0, |(a, _)| a),
    })
}

/// Appends the token at the device position `pos` (`k_new`, `v_new: bf16 [n_kv][128]`) to the window ring (and
/// the sink while `p < 64`) and, with `write_arena`, to the mapped arena. The position must lie inside the arena's
/// table (an unallocated extent is skipped).
pub fn hga_kv_append(
    gpu: &Gpu,
    cache: &mut GpuCache,
    pos: &CudaSlice<u32>,
    k_new: &impl DevicePtr<bf16>,
    v_new: &impl DevicePtr<bf16>,
    arena: &ArenaTable,
    write_arena: bool,
) -> Result<(), RuntimeError> {
    let n = cache.cfg.n_kv * HGA_HEAD_DIM;
    check_len("kv append k_new", k_new.len(), n)?;
    check_len("kv append v_new", v_new.len(), n)?;
    let mut p = params(gpu, cache, pos, arena)?;
    p.k_new = addr(gpu, k_new);
    p.v_new = addr(gpu, v_new);
    p.write_arena = write_arena as u32;
    let cfg = LaunchConfig { grid_dim: (p.n_kv, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: every buffer belongs to `cache`/`arena` with the lengths `params` describes; the kernel writes one
    // row of one ring slot (and sink slot) per head and one row of one arena block inside a mapped extent.
    unsafe { launch(gpu, "hga_kv_append", cfg, p) }
}

/// Looks up `selected: u32 [n_kv][max_groups]` (padding `u32::MAX`) at the device position: stamps hits, picks
/// CLOCK victims for the misses, writes the miss list, the entry list and the counters.
pub fn hga_kv_lookup(
    gpu: &Gpu,
    cache: &mut GpuCache,
    pos: &CudaSlice<u32>,
    selected: &impl DevicePtr<u32>,
    arena: &ArenaTable,
) -> Result<(), RuntimeError> {
    check_len("kv lookup selected", selected.len(), cache.cfg.n_kv * cache.cfg.max_groups)?;
    if cache.cfg.table_groups > arena.groups() {
        return Err(RuntimeError::Shape(format!(
            "kv lookup: table_groups {} exceeds the arena table's {} groups",
            cache.cfg.table_groups,
            arena.groups()
        )));
    }
    let mut p = params(gpu, cache, pos, arena)?;
    p.selected = addr(gpu, selected);
    let cfg = LaunchConfig { grid_dim: (p.n_kv, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: shapes checked; `cache_slots >= max_groups` (GpuCache::new) so the CLOCK sweep always finds victims;
    // table indices are bounded by `table_groups` in the kernel.
    unsafe { launch(gpu, "hga_kv_lookup", cfg, p) }
}

/// Gathers the misses of the last lookup from the mapped arena into their slots.
pub fn hga_kv_gather(
    gpu: &Gpu,
    cache: &mut GpuCache,
    pos: &CudaSlice<u32>,
    arena: &ArenaTable,
) -> Result<(), RuntimeError> {
    let p = params(gpu, cache, pos, arena)?;
    let cfg = LaunchConfig {
        grid_dim: ((cache.cfg.max_groups.div_ceil(KV_GATHER_WARPS)) as u32, p.n_kv, 1),
        block_dim: (32 * KV_GATHER_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the miss list holds at most `max_groups` entries per head with slots inside the pool and groups
    // inside `table_groups <= arena groups`; unallocated extents are skipped.
    unsafe { launch(gpu, "hga_kv_gather", cfg, p) }
}

/// `pos += 1` on the device (the last node of a recorded step).
pub fn hga_kv_advance(gpu: &Gpu, pos: &mut CudaSlice<u32>) -> Result<(), RuntimeError> {
    check_len("kv pos", pos.len(), 1)?;
    let mut p: KvCacheParams = bytemuck::Zeroable::zeroed();
    p.pos = addr(gpu, pos);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: one u32 written.
    unsafe { launch(gpu, "hga_kv_advance", cfg, p) }
}
