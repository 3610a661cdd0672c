//! The GPU working-set cache: per layer, a fixed pool of group slots in device memory, per KV head a device page
//! table (group -> slot or absent), replacement decided on the GPU, and hit / miss / byte counters that the host
//! reads without synchronizing the stream. Kernels: `gpu-kernels/src/kv/` (launchers: `crate::kernels::kv`),
//! formats `params/kv.rs`, CPU model `crate::reference::kv`.
//!
//! ## Layout (per layer)
//! - Slot pool `bf16 [n_kv * slots_per_head][2][16][128]` (`params/hga.rs`): per KV head 4 sink slots
//!   (positions 0..63, written by the append while `p < 64`), a ring of 20 window slots (the local window of 256
//!   tokens plus the open chunk, chunk aligned: `local_start = floor((p - 256) / 64) * 64`, at most 20 groups;
//!   group `g` in ring slot `g % 20`) and `cache_slots` slots for routed groups. 8 KB per slot.
//! - Page table `u32 [n_kv][table_groups]` (4 bytes per group of the longest context), CLOCK state per slot
//!   (group, reference count, step of last use: 12 bytes), a deduplication stamp per group (4 bytes).
//! - Outputs for routed attention: the entry list `entry_slot / entry_pos u32 [n_kv][max_entries]`, `n_entries
//!   u32 [n_kv]` with `max_entries = 24 + max_groups`.
//!
//! ## Why CLOCK
//! Replacement must run on the GPU inside the recorded step. Exact LRU needs the k oldest of N stamps (a select or
//! a sort per step); CLOCK needs one warp walking the hand 32 slots at a time (ballot), ends within two turns, and
//! its result is that of the sequential algorithm, so the CPU model reproduces it exactly. The reference counts
//! given on a hit and on a fill (`ref_hit`, `ref_fill`) are the tuning knobs (a generalized CLOCK): measured on the
//! fixture trace in docs/perf-kv.md.
//!
//! Lineage: a GPU-resident cache of fixed-size K/V blocks over host memory with a device page table, as InfLLM's
//! GPU LRU over CPU K/V and RetroInfer's GPU cluster cache; replacement by CLOCK with reference counts (GCLOCK,
//! from operating-system page replacement), chosen because one warp can run it inside a recorded step.
//!
//! ## Use
//! Per decode step and layer, in stream order (all recordable in one graph): `hga_kv_append` (the new token),
//! the routing's selection into a `u32 [n_kv][max_groups]` buffer, `hga_kv_lookup`, `hga_kv_gather`, routed
//! attention over `slots` with `entry_slot / entry_pos / n_entries`; at the end of the step `hga_kv_advance`.
//! One lookup per layer and position: the deduplication and the "used at this step" marks are stamped with
//! `p + 1`, so a second lookup at the same position (re-running a step) takes none of the groups the first one
//! took; call [`GpuCache::reset`] before replaying positions.
//!
//! ## Measured (H200, docs/perf-kv.md)
//! - Cold gather of a 64K / 3% selection (157 MB over 48 layers x 4 KV heads): 41.6 GB/s with the lookups, 45.0
//!   GB/s for the gathers alone, against 54.9 GB/s for a bulk pinned copy of the same bytes (0.76x / 0.82x);
//!   one layer's lookup + gather 74 us.
//! - Fixture selection trace (8K context, 256 decode steps): CLOCK hits 52% / 73% / 86% / 92.5% with caches of
//!   2x / 4x / 8x / 16x the selection (Belady's optimum 68% / 84% / 91% / 92.7%).
//! - Append with mapped writes: +16.8 us per step over 48 layers vs +14.4 us for one D2H (which leaves a host
//!   scatter and a host wait); the kernels write the arena directly.
//!
//! ## Bytes per token
//! The cache itself does not grow with the context (only the page table: 16 bytes per group and head, 1 byte per
//! token and head). What moves per decode step is the misses: `misses x 8 KB` over PCIe, read by the gather
//! kernel from the mapped arena (zero copy), and the new token's 512 bytes per (layer, KV head) written to the
//! arena by the append kernel.
use gpu_kernels::params::{KV_COUNTERS, KV_GROUP_BYTES, KV_SINK_SLOTS, KV_WINDOW_SLOTS};
use half::bf16;

use super::pinned::PinnedMemory;
use super::{ArenaLayout, Extent, ExtentMemory};
use crate::memory::DeviceBuf;
use crate::reference::kv::CacheConfig;
use crate::runtime::{Gpu, RuntimeError};

/// The accountant's label of the GPU working-set cache ([`GpuCache`]: slot pool, tables, state, entry lists).
pub const KV_CACHE: &str = "K/V cache";
/// The accountant's label of [`ArenaTable`].
pub const ARENA_TABLE: &str = "K/V arena table";

/// Shape and policy of one layer's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuCacheConfig {
    /// This layer's index in the arena.
    pub layer: usize,
    pub n_kv: usize,
    /// Routed-group slots per KV head (>= max_groups).
    pub cache_slots: usize,
    /// Page-table length: groups of the longest context.
    pub table_groups: usize,
    /// Selected groups per KV head and step (the routing's fixed output width).
    pub max_groups: usize,
    pub ref_hit: u32,
    pub ref_fill: u32,
}

impl GpuCacheConfig {
    pub fn slots_per_head(&self) -> usize {
        KV_SINK_SLOTS + KV_WINDOW_SLOTS + self.cache_slots
    }
    pub fn n_slots(&self) -> usize {
        self.n_kv * self.slots_per_head()
    }
    pub fn max_entries(&self) -> usize {
        KV_SINK_SLOTS + KV_WINDOW_SLOTS + self.max_groups
    }
    /// Device bytes of the layer's cache (pool, tables, state, entry list).
    pub fn device_bytes(&self) -> usize {
        self.n_slots() * KV_GROUP_BYTES
            + self.n_kv
                * (8 * self.table_groups + 12 * self.cache_slots + 16 * self.max_groups + 8 * self.max_entries())
    }
    /// The CPU model with the same geometry, for an arena of `arena_groups` groups.
    pub fn model(&self, arena_groups: usize) -> CacheConfig {
        CacheConfig {
            n_kv: self.n_kv,
            cache_slots: self.cache_slots,
            table_groups: self.table_groups,
            max_groups: self.max_groups,
            arena_groups,
            ref_hit: self.ref_hit,
            ref_fill: self.ref_fill,
        }
    }
}

/// The arena as the kernels see it: a device table `u64 [max_extents]` of the extents' device addresses (0 for an
/// extent not allocated yet: its length is fixed, so a recorded graph survives the arena's growth).
pub struct ArenaTable {
    pub layout: ArenaLayout,
    pub table: DeviceBuf<u64>,
    pub max_extents: usize,
    /// The disk tier's group table (`(device address, groups per (layer, KV head))`, see
    /// [`ArenaTable::set_group_table`]), or `None`: the extents.
    group_table: Option<(u64, usize)>,
}

impl ArenaTable {
    /// A table of `max_extents` entries holding the device addresses of `extents` (mapped memory).
    pub fn new(gpu: &Gpu, layout: ArenaLayout, extents: &[Extent], max_extents: usize) -> Result<Self, RuntimeError> {
        let table = gpu.alloc_zeros::<u64>(ARENA_TABLE, max_extents.max(1))?;
        let mut t = ArenaTable { layout, table, max_extents, group_table: None };
        t.update(gpu, extents)?;
        Ok(t)
    }

    /// Uploads the addresses of `extents` (after the arena grew).
    pub fn update(&mut self, gpu: &Gpu, extents: &[Extent]) -> Result<(), RuntimeError> {
        if extents.len() > self.max_extents {
            return Err(RuntimeError::Shape(format!(
                "{} extents, the table holds {}",
                extents.len(),
                self.max_extents
            )));
        }
        let mut v = vec![0u64; self.max_extents.max(1)];
        for (i, e) in extents.iter().enumerate() {
            v[i] = e.device_ptr().ok_or_else(|| RuntimeError::Shape(format!("extent {i} is not mapped memory")))?;
        }
        gpu.stream().memcpy_htod(&v, &mut self.table)?;
        Ok(())
    }

    /// Groups per (layer, KV head) the table can address.
    pub fn groups(&self) -> usize {
        self.max_extents * self.layout.groups_per_extent
    }

    /// From now on the kernels find each group's block through `addr`: the device address of a `u64 [layers][n_kv]
    /// [table_groups]` table of block addresses (0: not in RAM) in mapped host memory that the host keeps up to
    /// date (the disk tier's RAM cache), instead of the extents. The K/V appends and gathers then touch only the
    /// blocks the host put there, and a prefill leaves the blocks to the host ([`ArenaTable::group_table`]).
    pub fn set_group_table(&mut self, addr: u64, table_groups: usize) {
        self.group_table = Some((addr, table_groups));
    }

    /// The group table, if set: (device address, groups per (layer, KV head)).
    pub fn group_table(&self) -> Option<(u64, usize)> {
        self.group_table
    }
}

/// One layer's working-set cache on the GPU.
pub struct GpuCache {
    pub cfg: GpuCacheConfig,
    pub slots: DeviceBuf<bf16>,
    pub(crate) table: DeviceBuf<u32>,
    pub(crate) slot_group: DeviceBuf<u32>,
    pub(crate) slot_ref: DeviceBuf<u32>,
    pub(crate) slot_used: DeviceBuf<u32>,
    pub(crate) seen: DeviceBuf<u32>,
    pub(crate) hand: DeviceBuf<u32>,
    pub(crate) miss_group: DeviceBuf<u32>,
    pub(crate) miss_slot: DeviceBuf<u32>,
    pub(crate) n_miss: DeviceBuf<u32>,
    pub entry_slot: DeviceBuf<u32>,
    pub entry_pos: DeviceBuf<u32>,
    pub n_entries: DeviceBuf<u32>,
    pub(crate) counters: DeviceBuf<u64>,
    /// Mapped pinned mirror of the counters (`u64 [n_kv][4]`), written by every lookup.
    pub(crate) counters_host: Extent,
}

/// Device copies of (page tables `[n_kv][table_groups]`, slot groups `[n_kv][cache_slots]`, hands `[n_kv]`).
pub type CacheState = (Vec<u32>, Vec<u32>, Vec<u32>);

/// Hits, misses, bytes gathered and steps of one KV head.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    pub bytes: u64,
    pub steps: u64,
}

impl GpuCache {
    pub fn new(gpu: &Gpu, cfg: GpuCacheConfig) -> Result<Self, RuntimeError> {
        if cfg.n_kv == 0 || cfg.max_groups == 0 || cfg.cache_slots < cfg.max_groups {
            return Err(RuntimeError::Shape(format!(
                "kv cache: n_kv {} and max_groups {} must be positive and cache_slots {} >= max_groups",
                cfg.n_kv, cfg.max_groups, cfg.cache_slots
            )));
        }
        let l = KV_CACHE;
        let n = cfg.n_kv;
        let pinned = PinnedMemory::new(gpu.context().clone());
        let counters_host =
            pinned.alloc(n * KV_COUNTERS * 8).map_err(|e| RuntimeError::Shape(format!("kv cache counters: {e}")))?;
        let mut c = GpuCache {
            cfg,
            slots: gpu.alloc_zeros::<bf16>(l, cfg.n_slots() * KV_GROUP_BYTES / 2)?,
            table: gpu.alloc_zeros::<u32>(l, n * cfg.table_groups.max(1))?,
            slot_group: gpu.alloc_zeros::<u32>(l, n * cfg.cache_slots)?,
            slot_ref: gpu.alloc_zeros::<u32>(l, n * cfg.cache_slots)?,
            slot_used: gpu.alloc_zeros::<u32>(l, n * cfg.cache_slots)?,
            seen: gpu.alloc_zeros::<u32>(l, n * cfg.table_groups.max(1))?,
            hand: gpu.alloc_zeros::<u32>(l, n)?,
            miss_group: gpu.alloc_zeros::<u32>(l, n * cfg.max_groups)?,
            miss_slot: gpu.alloc_zeros::<u32>(l, n * cfg.max_groups)?,
            n_miss: gpu.alloc_zeros::<u32>(l, n)?,
            entry_slot: gpu.alloc_zeros::<u32>(l, n * cfg.max_entries())?,
            entry_pos: gpu.alloc_zeros::<u32>(l, n * cfg.max_entries())?,
            n_entries: gpu.alloc_zeros::<u32>(l, n)?,
            counters: gpu.alloc_zeros::<u64>(l, n * KV_COUNTERS)?,
            counters_host,
        };
        c.reset(gpu)?;
        Ok(c)
    }

    /// Empties the cache (a new sequence): every table entry and slot absent, counters 0. Stream ordered.
    pub fn reset(&mut self, gpu: &Gpu) -> Result<(), RuntimeError> {
        let s = gpu.stream();
        s.memcpy_htod(&vec![u32::MAX; self.table.len()], &mut self.table)?;
        s.memcpy_htod(&vec![u32::MAX; self.slot_group.len()], &mut self.slot_group)?;
        s.memset_zeros(&mut self.slot_ref)?;
        s.memset_zeros(&mut self.slot_used)?;
        s.memset_zeros(&mut self.seen)?;
        s.memset_zeros(&mut self.hand)?;
        s.memset_zeros(&mut self.n_miss)?;
        s.memset_zeros(&mut self.n_entries)?;
        s.memset_zeros(&mut self.counters)?;
        gpu.synchronize()?;
        self.counters_host.as_mut_slice().fill(0);
        Ok(())
    }

    /// The counters as of the last completed lookup, from the mapped mirror: no synchronization (values of a
    /// lookup still running may be read half updated; read after an event or between steps for exact figures).
    pub fn counters(&self) -> Vec<CacheCounters> {
        let b = self.counters_host.as_slice();
        (0..self.cfg.n_kv)
            .map(|h| {
                // SAFETY-free read: 8-byte loads of the mirror the GPU writes (volatile, it changes under us).
                let at = |k: usize| {
                    let p = b[(h * KV_COUNTERS + k) * 8..].as_ptr().cast::<u64>();
                    // SAFETY: in bounds and 8-byte aligned (page-aligned allocation).
                    unsafe { std::ptr::read_volatile(p) }
                };
                CacheCounters { hits: at(0), misses: at(1), bytes: at(2), steps: at(3) }
            })
            .collect()
    }

    /// Counters summed over the KV heads.
    pub fn total(&self) -> CacheCounters {
        self.counters().iter().fold(CacheCounters::default(), |a, c| CacheCounters {
            hits: a.hits + c.hits,
            misses: a.misses + c.misses,
            bytes: a.bytes + c.bytes,
            steps: a.steps + c.steps,
        })
    }

    /// Device copies of the state (for tests): (table, slot_group, hand) per head, synchronizing.
    pub fn state(&self, gpu: &Gpu) -> Result<CacheState, RuntimeError> {
        let s = gpu.stream();
        Ok((s.clone_dtoh(&self.table)?, s.clone_dtoh(&self.slot_group)?, s.clone_dtoh(&self.hand)?))
    }

    /// The entry lists per head (`(slot, pos)` in order), synchronizing.
    pub fn entries(&self, gpu: &Gpu) -> Result<Vec<Vec<(u32, u32)>>, RuntimeError> {
        let s = gpu.stream();
        let (es, ep, n) =
            (s.clone_dtoh(&self.entry_slot)?, s.clone_dtoh(&self.entry_pos)?, s.clone_dtoh(&self.n_entries)?);
        let me = self.cfg.max_entries();
        Ok((0..self.cfg.n_kv)
            .map(|h| {
                let k = (n[h] as usize).min(me);
                (0..k).map(|e| (es[h * me + e], ep[h * me + e])).collect()
            })
            .collect())
    }

    /// The miss lists per head (`(group, slot)`), synchronizing.
    pub fn misses(&self, gpu: &Gpu) -> Result<Vec<Vec<(u32, u32)>>, RuntimeError> {
        let s = gpu.stream();
        let (g, sl, n) = (s.clone_dtoh(&self.miss_group)?, s.clone_dtoh(&self.miss_slot)?, s.clone_dtoh(&self.n_miss)?);
        let m = self.cfg.max_groups;
        Ok((0..self.cfg.n_kv)
            .map(|h| (0..(n[h] as usize).min(m)).map(|i| (g[h * m + i], sl[h * m + i])).collect())
            .collect())
    }
}
