//! The embeddable HGA attention layer: one [`HgaLayer`] per model layer, driven from the caller's stream (the
//! [`Gpu`]'s) and device buffers, with the K/V tiers behind it: the host arena (mapped pinned extents, addressed
//! through an [`ArenaTable`] shared by every layer), the layer's GPU working set ([`GpuCache`]: sink slots, window
//! ring, routed slots) and its routing summaries.
//!
//! Per decode step and layer, in stream order, all enqueued without a host synchronization and with fixed launch
//! shapes (one recorded CUDA graph serves every step; the position is a device u32 shared by the layers):
//! - [`HgaLayer::append`]: the token's post-RoPE K and V (`bf16 [n_kv][128]`) at the device position `p` go into
//!   the window ring, the sink (while `p < 64`) and the mapped arena (`hga_kv_append`); then the summary of the
//!   chunk that this key closes, if any (`hga_route_summary` with `SummaryChunks::ClosedAt(p)`: the kernel reads
//!   the position and summarizes when `p + 1` is a multiple of 64).
//! - [`HgaLayer::attend`]: the query's f32 copy (`hga_cast_bf16_f32`, unless the caller passes one), stage 1 and
//!   stage 2 of the routing (`hga_route` at the device position), the cache lookup and the gather of its misses
//!   from the arena, and the routed split-K attention with its merge (`hga_attend_decode`) into the caller's
//!   `out bf16 [n_heads][128]` and `lse f32 [n_heads]` (natural log).
//! - after the last layer, the caller advances the shared position ([`advance_position`]).
//!
//! ## Which keys the routing reads
//! The routing reads keys for two things: the normalization set (the sink, positions 0..63, and the window from
//! `local_start` to `p - 1`) and the summary of a closing chunk (its 64 keys, positions `p - 63 ..= p`). Both are
//! always on the GPU already: the sink in the 4 sink slots, everything from `local_start` on in the window ring
//! (20 groups: `p - local_start <= 319`), and a closing chunk is the newest 4 groups of the ring. So the layer keeps
//! one fixed table of group-block addresses per KV head (`KeySource::table`): group `g < 4` -> sink slot `g`,
//! group `g >= 4` -> ring slot `g % 20`. An entry is valid exactly for the groups the kernels read at that step,
//! and the table never changes, so it is recorded once. Reading the arena's mapped blocks instead would cross
//! PCIe for every normalization key of every step.
//!
//! ## After a prompt
//! [`HgaLayer::prefill_history`] takes the dense post-RoPE K and V of a prompt (`bf16 [tokens][n_kv][128]`, as the
//! dense prefill produces them), writes the summaries of its whole chunks (`SummaryChunks::Range`), copies every
//! group into the arena and the sink and the newest 20 groups into the window ring (strided device copies, one
//! per head and run of consecutive blocks), and empties the cache. The caller then sets the device position to
//! `tokens` and decodes. (The exact layer-major prefill of a long prompt is the model's; it ends here.)
//!
//! ## Replaying a selection
//! For benchmarks whose weights route uncorrelated groups step to step (random weights at full size), a layer can
//! replay a recorded selection instead ([`HgaLayer::enable_replay`], [`HgaLayer::upload_replay`] before each
//! step): the routing still runs, then a device copy puts the replayed groups over its selection, so the cache,
//! the gather and the attention see the recorded reuse. The attention's output then follows the replayed groups,
//! not the query: meaningless as a model's output, meant for timing and cache figures.
use super::{Budget, HgaParams};
use crate::kernels::attention::DecodeWorkspace;
use crate::kernels::hga_attend::{hga_attend_decode, hga_attend_decode_quant, RoutedShape};
use crate::kernels::hga_route::{
    hga_route, hga_route_summary, KeySource, RoutePos, RouteShape, RouteSummaries, RouteWorkspace, SummaryChunks,
};
use crate::kernels::kv::{hga_kv_advance, hga_kv_append, hga_kv_gather, hga_kv_lookup};
use crate::kernels::{dptr, dptr_mut, launch};
use crate::kv::gpu_cache::{ArenaTable, CacheCounters, GpuCache, GpuCacheConfig};
use crate::memory::DeviceBuf;
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{sys, CudaSlice, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::{
    HgaCastParams, HGA_CHUNK, HGA_GROUP, HGA_HEAD_DIM, KV_GROUP_BYTES, KV_GROUP_K_BYTES, KV_LOCAL, KV_SINK_SLOTS,
    KV_WINDOW_SLOTS,
};
use half::bf16;

/// The label of the layer's own device buffers (selection, key table, query copy) in the accountant.
pub const HGA_LAYER: &str = "hga layer state";

/// What one layer serves.
#[derive(Clone, Debug)]
pub struct HgaLayerConfig {
    /// This layer's index in the arena.
    pub layer: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Longest context (positions `0 .. max_ctx`).
    pub max_ctx: usize,
    /// The routing: host/src/hga's parameters, so that one set means the same on both backends. The kernels
    /// implement the default geometry and scoring ([`RouteShape::from_params`] names what they refuse); the layer's
    /// slots hold a sink of 64 tokens and a window of 256 (4 sink slots, a ring of 20 groups).
    pub params: HgaParams,
    /// Routed-group slots per KV head of the GPU cache (>= the selection width; 0: twice the selection width).
    pub cache_slots: usize,
    /// CLOCK reference counts on a hit and on a fill (see `kv::gpu_cache`).
    pub ref_hit: u32,
    pub ref_fill: u32,
    /// Keep the routing sketches (66 bytes per token and KV head: 64 of int4, a f16 scale) in mapped pinned host
    /// memory instead of HBM: stage 2 then reads the shortlisted chunks' sketches over PCIe.
    pub sketches_on_host: bool,
}

impl HgaLayerConfig {
    /// The default routing with `budget`, a cache of twice the selection and CLOCK counts (2, 1).
    pub fn new(layer: usize, n_heads: usize, n_kv_heads: usize, max_ctx: usize, budget: Budget) -> Self {
        Self::with_params(layer, n_heads, n_kv_heads, max_ctx, HgaParams { budget, ..HgaParams::default() })
    }

    /// The routing of `params` (checked when the layer is built), a cache of twice the selection and CLOCK
    /// counts (2, 1).
    pub fn with_params(layer: usize, n_heads: usize, n_kv_heads: usize, max_ctx: usize, params: HgaParams) -> Self {
        HgaLayerConfig {
            layer,
            n_heads,
            n_kv_heads,
            max_ctx,
            params,
            cache_slots: 0,
            ref_hit: 2,
            ref_fill: 1,
            sketches_on_host: false,
        }
    }

    /// The routing shape: `params` for one query token, the selection width `max_groups` sized by the budget at
    /// `max_ctx` (so that it never binds) rather than by every candidate. Refuses parameters the kernels or the
    /// layer's slots do not implement, naming the field.
    pub fn route_shape(&self) -> Result<RouteShape, RuntimeError> {
        let p = &self.params;
        if p.sink != KV_SINK_SLOTS * HGA_GROUP || p.local != KV_LOCAL {
            return Err(RuntimeError::Shape(format!(
                "hga layer: sink {} / local {}; the layer's slots hold a sink of {} and a window of {KV_LOCAL}",
                p.sink,
                p.local,
                KV_SINK_SLOTS * HGA_GROUP
            )));
        }
        let mut s = RouteShape::from_params(p, self.n_heads, self.n_kv_heads, 1, self.max_ctx)?;
        let budget = match p.budget {
            Budget::Tokens(t) => t,
            Budget::Fraction(f) => (f * self.max_ctx as f64).ceil() as usize,
        };
        s.max_groups = (budget / HGA_GROUP).min(s.max_cand_groups()).max(1);
        let kept = (s.shortlist * (s.max_groups * HGA_GROUP) as f64 / HGA_CHUNK as f64).ceil();
        s.max_kept = if kept.is_finite() { kept as usize } else { usize::MAX }.min(s.max_cand_chunks()).max(1);
        Ok(s)
    }

    /// The cache's configuration.
    pub fn cache_config(&self) -> Result<GpuCacheConfig, RuntimeError> {
        let mg = self.route_shape()?.max_groups;
        Ok(GpuCacheConfig {
            layer: self.layer,
            n_kv: self.n_kv_heads,
            cache_slots: if self.cache_slots == 0 { 2 * mg } else { self.cache_slots },
            table_groups: self.max_ctx.div_ceil(HGA_GROUP),
            max_groups: mg,
            ref_hit: self.ref_hit,
            ref_fill: self.ref_fill,
        })
    }
}

/// One layer's HGA decode attention on the GPU (see the module docs).
pub struct HgaLayer {
    cfg: HgaLayerConfig,
    route: RouteShape,
    attn: RoutedShape,
    sums: RouteSummaries,
    ws: RouteWorkspace,
    /// The last step's selection, u32 [n_kv][max_groups] (absolute groups ascending, u32::MAX padding).
    pub selected: DeviceBuf<u32>,
    pub cache: GpuCache,
    /// The routed attention's split partials (`None`: the caller passes one to [`HgaLayer::attend_in`]).
    aws: Option<DecodeWorkspace>,
    /// u64 [n_kv][table_len]: group -> address of its block in the sink slots or the window ring.
    key_table: DeviceBuf<u64>,
    table_len: usize,
    q32: DeviceBuf<f32>,
    /// A selection replayed in place of the routing's (layout of `selected`; see [`HgaLayer::enable_replay`]).
    replay: Option<DeviceBuf<u32>>,
}

impl HgaLayer {
    /// Allocates the layer's summaries, routing workspace, selection, cache and attention workspace. `arena` is
    /// the table every layer shares (checked against this layer's index and heads, and its reach).
    pub fn new(gpu: &Gpu, cfg: &HgaLayerConfig, arena: &ArenaTable) -> Result<Self, RuntimeError> {
        let mut l = Self::new_sharing_workspace(gpu, cfg, arena)?;
        l.aws = Some(Self::attention_workspace(gpu, cfg.n_heads)?);
        Ok(l)
    }

    /// The routed attention's workspace of a layer of `n_heads` query heads (one query token, 256 splits: `n_heads
    /// x 256 x (128 + 1)` f32, 4.2 MB at 32 heads). Layers that run one after the other on one stream can share
    /// one ([`HgaLayer::new_sharing_workspace`], [`HgaLayer::attend_in`]).
    pub fn attention_workspace(gpu: &Gpu, n_heads: usize) -> Result<DecodeWorkspace, RuntimeError> {
        DecodeWorkspace::new(gpu, 1, n_heads, 256)
    }

    /// [`HgaLayer::new`] without an attention workspace of its own: the caller passes one to every
    /// [`HgaLayer::attend_in`] (a model's layers share one instead of holding 48).
    pub fn new_sharing_workspace(gpu: &Gpu, cfg: &HgaLayerConfig, arena: &ArenaTable) -> Result<Self, RuntimeError> {
        let d = HGA_HEAD_DIM;
        if cfg.max_ctx == 0 || cfg.n_kv_heads == 0 {
            return Err(RuntimeError::Shape("hga layer: max_ctx and n_kv_heads must be positive".into()));
        }
        let l = &arena.layout;
        if cfg.layer >= l.layers || cfg.n_kv_heads != l.kv_heads {
            return Err(RuntimeError::Shape(format!(
                "hga layer {} with {} KV heads does not fit the arena ({} layers, {} KV heads)",
                cfg.layer, cfg.n_kv_heads, l.layers, l.kv_heads
            )));
        }
        let route = cfg.route_shape()?;
        let cc = cfg.cache_config()?;
        if cc.table_groups > arena.groups() {
            return Err(RuntimeError::Shape(format!(
                "hga layer: max_ctx {} needs {} groups, the arena table reaches {}",
                cfg.max_ctx,
                cc.table_groups,
                arena.groups()
            )));
        }
        let s = gpu.stream();
        let sums = RouteSummaries::new_placed(gpu, cfg.n_kv_heads, cfg.max_ctx, cfg.sketches_on_host)?;
        let ws = RouteWorkspace::new(gpu, &route)?;
        let selected = gpu.alloc_zeros::<u32>(HGA_LAYER, cfg.n_kv_heads * route.max_groups)?;
        let cache = GpuCache::new(gpu, cc)?;
        let attn = RoutedShape {
            tokens: 1,
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            n_slots: cc.n_slots(),
            max_entries: cc.max_entries(),
        };
        let table_len = cfg.max_ctx.div_ceil(HGA_GROUP);
        let base = cache.slots.device_ptr(s).0;
        let sph = cc.slots_per_head();
        let mut t = vec![0u64; cfg.n_kv_heads * table_len];
        for h in 0..cfg.n_kv_heads {
            for g in 0..table_len {
                let slot = h * sph + if g < KV_SINK_SLOTS { g } else { KV_SINK_SLOTS + g % KV_WINDOW_SLOTS };
                t[h * table_len + g] = base + (slot * KV_GROUP_BYTES) as u64;
            }
        }
        let key_table = gpu.upload(HGA_LAYER, &t)?;
        let q32 = gpu.alloc_zeros::<f32>(HGA_LAYER, cfg.n_heads * d)?;
        Ok(HgaLayer {
            cfg: cfg.clone(),
            route,
            attn,
            sums,
            ws,
            selected,
            cache,
            aws: None,
            key_table,
            table_len,
            q32,
            replay: None,
        })
    }

    pub fn config(&self) -> &HgaLayerConfig {
        &self.cfg
    }
    pub fn route_shape(&self) -> &RouteShape {
        &self.route
    }
    pub fn attend_shape(&self) -> &RoutedShape {
        &self.attn
    }
    pub fn summaries(&self) -> &RouteSummaries {
        &self.sums
    }
    /// The routing's by-products of the last step (stats: n_c, n_g per KV head...).
    pub fn route_workspace(&self) -> &RouteWorkspace {
        &self.ws
    }
    /// Cache hits, misses and bytes so far, summed over the KV heads (no synchronization: see `GpuCache`).
    pub fn cache_totals(&self) -> CacheCounters {
        self.cache.total()
    }

    /// Replays selections instead of the routing's: allocates the replay buffer (u32 `[n_kv][max_groups]`, the
    /// layout of `selected`, all padding until [`HgaLayer::upload_replay`]), and from now on every attend copies it
    /// over `selected` right after `hga_route` (a device-to-device copy on the stream: inside a recorded step;
    /// the routing still runs, and its time is still paid), so the cache lookup, the gather and the attention
    /// read the replayed groups. A step recorded before this call has no copy: record it again. No-op when on.
    pub fn enable_replay(&mut self, gpu: &Gpu) -> Result<(), RuntimeError> {
        if self.replay.is_none() {
            self.replay = Some(gpu.upload(HGA_LAYER, &vec![u32::MAX; self.selected.len()])?);
        }
        Ok(())
    }

    /// Back to the routing's own selection; frees the replay buffer. A recorded step that copies from it must be
    /// dropped first (its copy would read freed memory).
    pub fn disable_replay(&mut self) {
        self.replay = None;
    }

    /// Whether attends replay [`HgaLayer::upload_replay`]'s selection.
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// The selection the next attends replay: `sel` is u32 `[n_kv][max_groups]`, each head's groups strictly
    /// ascending, then `u32::MAX` padding. A host-to-device copy on the stream, enqueued outside a recorded step:
    /// stream order puts it after the steps enqueued before (it may be enqueued while the GPU runs the previous
    /// step) and before the next step's copy over `selected`.
    pub fn upload_replay(&mut self, gpu: &Gpu, sel: &[u32]) -> Result<(), RuntimeError> {
        let mg = self.route.max_groups;
        let Some(r) = self.replay.as_mut() else {
            return Err(RuntimeError::Shape(format!(
                "hga layer {}: upload_replay before enable_replay",
                self.cfg.layer
            )));
        };
        if sel.len() != r.len() {
            return Err(RuntimeError::Shape(format!(
                "hga layer {} replay: {} groups, expected {} KV heads x {mg}",
                self.cfg.layer,
                sel.len(),
                self.cfg.n_kv_heads
            )));
        }
        for (h, row) in sel.chunks(mg).enumerate() {
            let n = row.iter().position(|&g| g == u32::MAX).unwrap_or(mg);
            if !row[..n].windows(2).all(|w| w[0] < w[1]) || row[n..].iter().any(|&g| g != u32::MAX) {
                return Err(RuntimeError::Shape(format!(
                    "hga layer {} replay, KV head {h}: groups not strictly ascending then u32::MAX padding",
                    self.cfg.layer
                )));
            }
        }
        gpu.stream().memcpy_htod(sel, &mut **r)?;
        Ok(())
    }

    /// Appends the token at the device position `pos` (`k_new`, `v_new: bf16 [n_kv][128]`, post-RoPE) to the
    /// window ring, the sink and the arena, and summarizes the chunk it closes. Two kernels, stream ordered.
    pub fn append(
        &mut self,
        gpu: &Gpu,
        pos: &CudaSlice<u32>,
        k_new: &impl DevicePtr<bf16>,
        v_new: &impl DevicePtr<bf16>,
        arena: &ArenaTable,
    ) -> Result<(), RuntimeError> {
        hga_kv_append(gpu, &mut self.cache, pos, k_new, v_new, arena, true)?;
        // SAFETY: the table's entries are the addresses of this layer's sink and ring slots, which live as long as
        // `self`; the summary of the chunk closed at p reads groups p/16 - 3 ..= p/16, the newest four of the ring.
        let keys = unsafe { KeySource::table(gpu, &self.key_table, self.table_len) };
        hga_route_summary(gpu, &keys, &mut self.sums, SummaryChunks::ClosedAt(pos))
    }

    /// The attention of the query at the device position `pos` (after [`HgaLayer::append`] of that position):
    /// `q: bf16 [n_heads][128]` post-RoPE, `q_f32` its f32 copy if the caller has one (else made on the device),
    /// `out: bf16 [n_heads][128]`, `lse: f32 [n_heads]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        gpu: &Gpu,
        pos: &CudaSlice<u32>,
        q: &impl DevicePtr<bf16>,
        q_f32: Option<&CudaSlice<f32>>,
        out: &mut impl DevicePtrMut<bf16>,
        lse: &mut impl DevicePtrMut<f32>,
        arena: &ArenaTable,
    ) -> Result<(), RuntimeError> {
        self.attend_impl(gpu, pos, q, q_f32, out, lse, arena, None, None)
    }

    /// [`HgaLayer::attend`] with the caller's attention workspace (from [`HgaLayer::attention_workspace`]; it may
    /// be shared by layers that run one after the other on the stream), and optionally `fp8_out = (out_q u8
    /// [n_heads][128], out_scale f32 [n_heads])`: the merge then also writes the FP8 (e4m3) quantization of `out`
    /// that the next FP8 linear reads (`hga_fp8_quant`'s values, bit for bit, one launch fewer).
    #[allow(clippy::too_many_arguments)]
    pub fn attend_in(
        &mut self,
        gpu: &Gpu,
        pos: &CudaSlice<u32>,
        q: &impl DevicePtr<bf16>,
        q_f32: Option<&CudaSlice<f32>>,
        out: &mut impl DevicePtrMut<bf16>,
        lse: &mut impl DevicePtrMut<f32>,
        arena: &ArenaTable,
        workspace: &mut DecodeWorkspace,
        fp8_out: Option<(&mut CudaViewMut<'_, u8>, &mut CudaViewMut<'_, f32>)>,
    ) -> Result<(), RuntimeError> {
        self.attend_impl(gpu, pos, q, q_f32, out, lse, arena, Some(workspace), fp8_out)
    }

    #[allow(clippy::too_many_arguments)]
    fn attend_impl(
        &mut self,
        gpu: &Gpu,
        pos: &CudaSlice<u32>,
        q: &impl DevicePtr<bf16>,
        q_f32: Option<&CudaSlice<f32>>,
        out: &mut impl DevicePtrMut<bf16>,
        lse: &mut impl DevicePtrMut<f32>,
        arena: &ArenaTable,
        workspace: Option<&mut DecodeWorkspace>,
        fp8_out: Option<(&mut CudaViewMut<'_, u8>, &mut CudaViewMut<'_, f32>)>,
    ) -> Result<(), RuntimeError> {
        self.route_and_lookup(gpu, pos, q, q_f32, arena)?;
        match workspace {
            Some(w) => self.gather_and_attend(gpu, pos, q, out, lse, arena, w, fp8_out),
            None => {
                let mut w = self.aws.take().ok_or_else(|| {
                    RuntimeError::Shape("hga layer built without a workspace: call attend_in with one".into())
                })?;
                let r = self.gather_and_attend(gpu, pos, q, out, lse, arena, &mut w, fp8_out);
                self.aws = Some(w);
                r
            }
        }
    }

    /// The first half of a decode step's attention: routing (or the replayed selection) and the cache lookup,
    /// which leaves this step's misses in the cache's miss list ([`HgaLayer::misses`]). `q_f32`: the query in f32
    /// when the caller has it (else it is converted from `q`).
    pub fn route_and_lookup(
        &mut self,
        gpu: &Gpu,
        pos: &CudaSlice<u32>,
        q: &impl DevicePtr<bf16>,
        q_f32: Option<&CudaSlice<f32>>,
        arena: &ArenaTable,
    ) -> Result<(), RuntimeError> {
        let n = self.cfg.n_heads * HGA_HEAD_DIM;
        if q.len() != n {
            return Err(RuntimeError::Shape(format!("hga layer q: {} elements, expected {n}", q.len())));
        }
        if q_f32.is_none() {
            cast_bf16_f32(gpu, q, &mut self.q32)?;
        }
        let q32 = q_f32.unwrap_or(&self.q32);
        // SAFETY: as in `append`: the normalization keys (sink, window below p) are in the sink slots and the ring.
        let keys = unsafe { KeySource::table(gpu, &self.key_table, self.table_len) };
        hga_route(gpu, &self.route, &keys, &self.sums, q32, RoutePos::Device(pos), &mut self.ws, &mut self.selected)?;
        if let Some(r) = &self.replay {
            gpu.stream().memcpy_dtod(r, &mut self.selected)?;
        }
        hga_kv_lookup(gpu, &mut self.cache, pos, &self.selected, arena)
    }

    /// The groups the last lookup missed, per KV head (read from the device: synchronizes): what the gather will
    /// read from the arena, so what a disk tier must have in RAM first.
    pub fn misses(&self, gpu: &Gpu) -> Result<Vec<Vec<u32>>, RuntimeError> {
        let s = gpu.stream();
        let n = s.clone_dtoh(&self.cache.n_miss)?;
        let groups = s.clone_dtoh(&self.cache.miss_group)?;
        let mg = self.cache.cfg.max_groups;
        Ok(n.iter().enumerate().map(|(h, &m)| groups[h * mg..h * mg + (m as usize).min(mg)].to_vec()).collect())
    }

    /// The second half: the gather of the misses into their slots, then the routed attention (and the merge's FP8
    /// quantization with `fp8_out`).
    #[allow(clippy::too_many_arguments)]
    pub fn gather_and_attend(
        &mut self,
        gpu: &Gpu,
        pos: &CudaSlice<u32>,
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
        lse: &mut impl DevicePtrMut<f32>,
        arena: &ArenaTable,
        aws: &mut DecodeWorkspace,
        fp8_out: Option<(&mut CudaViewMut<'_, u8>, &mut CudaViewMut<'_, f32>)>,
    ) -> Result<(), RuntimeError> {
        hga_kv_gather(gpu, &mut self.cache, pos, arena)?;
        let c = &self.cache;
        let (slots, es, ep, ne, sh) = (&c.slots, &c.entry_slot, &c.entry_pos, &c.n_entries, &self.attn);
        match fp8_out {
            None => hga_attend_decode(gpu, q, slots, es, ep, ne, pos, aws, out, lse, sh)?,
            Some((oq, os)) => hga_attend_decode_quant(gpu, q, slots, es, ep, ne, pos, aws, out, lse, oq, os, sh)?,
        };
        Ok(())
    }

    /// Fills the layer from the dense post-RoPE K and V of a computed prompt (`bf16 [>= n_tokens][n_kv][128]`):
    /// the summaries of its whole chunks, every group in the arena (copies into the mapped extents, which must be
    /// allocated), the sink and the window ring, and an empty cache. The caller then sets the device position to
    /// `n_tokens`. Synchronizes (once, to read the arena's extent addresses and to empty the cache).
    pub fn prefill_history(
        &mut self,
        gpu: &Gpu,
        k_all: &CudaSlice<bf16>,
        v_all: &CudaSlice<bf16>,
        n_tokens: usize,
        arena: &ArenaTable,
    ) -> Result<(), RuntimeError> {
        let (d, nkv) = (HGA_HEAD_DIM, self.cfg.n_kv_heads);
        self.prefill_history_strided(gpu, k_all, v_all, n_tokens, (d, nkv * d), arena)
    }

    /// [`HgaLayer::prefill_history`] from K and V buffers laid out with `(head_stride, row_stride)` elements: row
    /// j of KV head h at `h * head_stride + j * row_stride` (`(128, n_kv * 128)`: token-major `[tokens][n_kv][128]`;
    /// `(capacity * 128, 128)`: a dense cache `[n_kv][capacity][128]`).
    pub fn prefill_history_strided(
        &mut self,
        gpu: &Gpu,
        k_all: &CudaSlice<bf16>,
        v_all: &CudaSlice<bf16>,
        n_tokens: usize,
        (head_stride, row_stride): (usize, usize),
        arena: &ArenaTable,
    ) -> Result<(), RuntimeError> {
        let (d, nkv) = (HGA_HEAD_DIM, self.cfg.n_kv_heads);
        if n_tokens == 0 {
            return self.cache.reset(gpu);
        }
        if n_tokens >= self.cfg.max_ctx {
            return Err(RuntimeError::Shape(format!(
                "hga layer prefill: {n_tokens} tokens leave no room under max_ctx {}",
                self.cfg.max_ctx
            )));
        }
        if row_stride < d || (head_stride < d && nkv > 1) {
            return Err(RuntimeError::Shape(format!(
                "hga layer prefill: strides ({head_stride}, {row_stride}) below a row of {d}"
            )));
        }
        let need = (nkv - 1) * head_stride + (n_tokens - 1) * row_stride + d;
        for (what, b) in [("k_all", k_all), ("v_all", v_all)] {
            if b.len() < need {
                return Err(RuntimeError::Shape(format!(
                    "hga layer prefill {what}: {} elements, need {need}",
                    b.len()
                )));
            }
        }
        self.cache.reset(gpu)?;
        let keys = KeySource::dense(gpu, k_all, head_stride, row_stride);
        hga_route_summary(gpu, &keys, &mut self.sums, SummaryChunks::Range { first: 0, count: n_tokens / HGA_CHUNK })?;
        let s = gpu.stream();
        let extents = s.clone_dtoh(&arena.table)?;
        let (pk, _gk) = dptr(gpu, k_all);
        let (pv, _gv) = dptr(gpu, v_all);
        let slots = self.cache.slots.device_ptr(s).0;
        let sph = self.cache.cfg.slots_per_head();
        let plan = prefill_plan(&arena.layout, self.cfg.layer, nkv, sph, n_tokens, (head_stride, row_stride));
        gpu.context().bind_to_thread()?;
        for c in plan {
            let dst = match c.dst {
                // The disk tier: the host stores the prompt's K/V itself.
                PrefillDst::Arena { .. } if arena.group_table().is_some() => continue,
                PrefillDst::Arena { extent, offset } => match extents.get(extent) {
                    Some(&b) if b != 0 => b + offset as u64,
                    _ => {
                        return Err(RuntimeError::Shape(format!(
                            "hga layer prefill: arena extent {extent} is not allocated"
                        )))
                    }
                },
                PrefillDst::Slot(i) => slots + (i * KV_GROUP_BYTES) as u64,
            };
            let src = if c.v { pv } else { pk } + c.src as u64;
            copy_blocks(gpu, src, row_stride * 2, dst + c.dst_off as u64, c.rows, c.blocks)?;
        }
        Ok(())
    }
}

/// Where a prefill copy lands: a group block of the arena (extent, byte offset) or a slot of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrefillDst {
    Arena { extent: usize, offset: usize },
    Slot(usize),
}

/// One strided copy of [`HgaLayer::prefill_history`]: `blocks` runs of `rows` token rows (K, or V with `v`) of one
/// KV head from byte `src` of the dense buffer (rows `2 row_stride` bytes apart) into consecutive blocks at `dst` +
/// `dst_off` bytes (rows 256 bytes apart, blocks 8192 apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PrefillCopy {
    pub v: bool,
    pub src: usize,
    pub dst: PrefillDst,
    pub dst_off: usize,
    pub rows: usize,
    pub blocks: usize,
}

/// The copies that fill the arena (every group, one run per extent), the sink (groups 0..3) and the window ring
/// (the newest 20 groups, runs that do not wrap) of every KV head from `n_tokens >= 1` dense rows.
pub(crate) fn prefill_plan(
    l: &crate::kv::ArenaLayout,
    layer: usize,
    nkv: usize,
    slots_per_head: usize,
    n_tokens: usize,
    (head_stride, row_stride): (usize, usize),
) -> Vec<PrefillCopy> {
    let pitch = row_stride * 2;
    let n_groups = n_tokens.div_ceil(HGA_GROUP);
    let last = n_groups - 1;
    let mut out = Vec::new();
    let mut run = |h: usize, g0: usize, n: usize, dst: PrefillDst| {
        let src_off = (h * head_stride + g0 * HGA_GROUP * row_stride) * 2;
        let rows_end = ((g0 + n) * HGA_GROUP).min(n_tokens);
        let full = (rows_end - g0 * HGA_GROUP) / HGA_GROUP;
        let tail = rows_end - (g0 + full) * HGA_GROUP;
        for (v, half) in [(false, 0usize), (true, KV_GROUP_K_BYTES)] {
            if full > 0 {
                out.push(PrefillCopy { v, src: src_off, dst, dst_off: half, rows: HGA_GROUP, blocks: full });
            }
            if tail > 0 {
                let src = src_off + full * HGA_GROUP * pitch;
                let dst_off = full * KV_GROUP_BYTES + half;
                out.push(PrefillCopy { v, src, dst, dst_off, rows: tail, blocks: 1 });
            }
        }
    };
    for h in 0..nkv {
        let mut g = 0;
        while g < n_groups {
            let e = g / l.groups_per_extent;
            let end = ((e + 1) * l.groups_per_extent).min(n_groups);
            let (_, offset) = l.locate(layer, h, g);
            run(h, g, end - g, PrefillDst::Arena { extent: e, offset });
            g = end;
        }
        run(h, 0, n_groups.min(KV_SINK_SLOTS), PrefillDst::Slot(h * slots_per_head));
        let mut g = last.saturating_sub(KV_WINDOW_SLOTS - 1);
        while g <= last {
            let r = g % KV_WINDOW_SLOTS;
            let n = (KV_WINDOW_SLOTS - r).min(last + 1 - g);
            run(h, g, n, PrefillDst::Slot(h * slots_per_head + KV_SINK_SLOTS + r));
            g += n;
        }
    }
    out
}

/// `pos += 1` on the device: the end of a decode step, once for all layers sharing `pos`.
pub fn advance_position(gpu: &Gpu, pos: &mut CudaSlice<u32>) -> Result<(), RuntimeError> {
    hga_kv_advance(gpu, pos)
}

/// `dst = f32(src)` on the device (`hga_cast_bf16_f32`).
pub fn cast_bf16_f32(gpu: &Gpu, src: &impl DevicePtr<bf16>, dst: &mut CudaSlice<f32>) -> Result<(), RuntimeError> {
    let n = src.len();
    if dst.len() != n || n == 0 {
        return Err(RuntimeError::Shape(format!("hga cast: {n} bf16 into {} f32", dst.len())));
    }
    let (ps, _g0) = dptr(gpu, src);
    let (pd, _g1) = dptr_mut(gpu, dst);
    let p = HgaCastParams { src: ps, dst: pd, n: crate::kernels::dim_u32("hga cast n", n)?, _pad: 0 };
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: n elements of each buffer, checked above.
    unsafe { launch(gpu, "hga_cast_bf16_f32", cfg, p) }
}

/// Copies `blocks` runs of `rows` rows of 256 bytes (one head's K or V rows of 16 consecutive tokens, `src_pitch`
/// bytes apart) into consecutive group blocks at `dst` (rows 256 bytes apart, blocks 8192 bytes apart): one 3D copy
/// on the stream with unified addresses (device memory or mapped host memory on either side); should the driver
/// refuse that descriptor, the same copy with device addresses, and last one row copy per row.
fn copy_blocks(
    gpu: &Gpu,
    src: u64,
    src_pitch: usize,
    dst: u64,
    rows: usize,
    blocks: usize,
) -> Result<(), RuntimeError> {
    let row = HGA_HEAD_DIM * 2;
    let stream = gpu.stream().cu_stream();
    for ty in [sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED, sys::CUmemorytype::CU_MEMORYTYPE_DEVICE] {
        // Every field spelled out: the memory-type enum has no zero value, so the descriptor cannot be zeroed.
        let c = sys::CUDA_MEMCPY3D {
            srcXInBytes: 0,
            srcY: 0,
            srcZ: 0,
            srcLOD: 0,
            srcMemoryType: ty,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            reserved0: std::ptr::null_mut(),
            srcPitch: src_pitch,
            srcHeight: HGA_GROUP,
            dstXInBytes: 0,
            dstY: 0,
            dstZ: 0,
            dstLOD: 0,
            dstMemoryType: ty,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            reserved1: std::ptr::null_mut(),
            dstPitch: row,
            dstHeight: KV_GROUP_BYTES / row,
            WidthInBytes: row,
            Height: rows,
            Depth: blocks,
        };
        // SAFETY: the caller passes source rows inside the dense K/V buffer and destination blocks inside the slot
        // pool or an allocated arena extent; the driver reads the descriptor during the call.
        if unsafe { sys::cuMemcpy3DAsync_v2(&c, stream) } == sys::CUresult::CUDA_SUCCESS {
            return Ok(());
        }
    }
    for b in 0..blocks {
        for r in 0..rows {
            let s = src + ((b * HGA_GROUP + r) * src_pitch) as u64;
            let d = dst + (b * KV_GROUP_BYTES + r * row) as u64;
            // SAFETY: as above, one row of 256 bytes.
            unsafe { sys::cuMemcpyDtoDAsync_v2(d, s, row, stream) }.result()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hga::{Geometry, HgaParams};

    /// The selection width and the kept-chunk width sized from the budget never bind: at every position below
    /// max_ctx, host/src/hga's geometry (uncapped) fits them, so the GPU routes exactly what the oracle routes.
    #[test]
    fn route_widths_never_bind() {
        for (max_ctx, budget) in [
            (1100usize, Budget::Tokens(768)),
            (4096, Budget::Fraction(0.03)),
            (3100, Budget::Fraction(0.3)),
            (70_000, Budget::Fraction(0.03)),
            (2200, Budget::Fraction(1.0)),
            (5000, Budget::Tokens(64)),
        ] {
            let cfg = HgaLayerConfig::new(0, 32, 4, max_ctx, budget);
            let s = cfg.route_shape().unwrap();
            let p = HgaParams { budget, ..HgaParams::default() };
            for b0 in (0..max_ctx).step_by(7).chain([max_ctx - 1]) {
                let g = Geometry::new(&p, b0, 1);
                assert!(g.n_groups <= s.max_groups, "{max_ctx} {budget:?} at {b0}: {} > {}", g.n_groups, s.max_groups);
                assert!(g.n_chunks <= s.max_kept, "{max_ctx} {budget:?} at {b0}: {} > {}", g.n_chunks, s.max_kept);
                let r = crate::reference::hga_route::geometry(&s, b0);
                assert_eq!((r.n_groups, r.n_chunks), (g.n_groups, g.n_chunks));
            }
            let c = cfg.cache_config().unwrap();
            assert!(c.cache_slots >= c.max_groups && c.table_groups * 16 >= max_ctx);
        }
    }

    /// Every key the routing reads at position p (the sink, the window below p) and the closing chunk's keys lie in
    /// slots that the key table maps and that hold them at that step: group g < 4 in sink slot g, the rest in ring
    /// slot g % 20, with the ring holding groups p / 16 - 19 ..= p / 16.
    #[test]
    fn key_table_covers_what_the_routing_reads() {
        let p = HgaParams::default();
        for pos in 64..5000usize {
            let g = Geometry::new(&p, pos, 1);
            let pg = pos / 16;
            let ring_ok = |grp: usize| grp + KV_WINDOW_SLOTS > pg && grp <= pg;
            for j in g.always() {
                let grp = j / 16;
                assert!(grp < KV_SINK_SLOTS || ring_ok(grp), "pos {pos}: key {j}");
            }
            if (pos + 1) % 64 == 0 {
                for j in pos - 63..=pos {
                    assert!(j / 16 < KV_SINK_SLOTS || ring_ok(j / 16));
                }
            }
            // The lookup's window (kv_local_start) is the routing's local_start.
            let w0 = gpu_kernels::params::kv_local_start(pos as u32) as usize;
            assert_eq!(w0.max(64), g.local_start.max(64), "pos {pos}");
        }
    }

    /// The data movement of the layer on the CPU, by construction of its parts: `prefill_plan`'s copies applied to
    /// host buffers, then decode appends (the rule of `hga_kv_append`), lookups of the cache model
    /// (`reference::kv`, the kernel's model) with random selections and their gathers from the arena. At every
    /// step, every key row the routing reads through the key table is the token's key, and every row the entry
    /// list makes visible holds the K and V of its position, the visible positions being exactly the oracle's
    /// sink + window + selected groups (`Geometry::positions`).
    #[test]
    fn prefill_append_lookup_gather_place_every_row() {
        use crate::kv::ArenaLayout;
        use crate::reference::kv::{CacheModel, ABSENT};
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(7);
        for (t0, nkv, gpe, steps) in
            [(1000usize, 2usize, 16usize, 70usize), (2077, 1, 50, 30), (64, 1, 7, 280), (333, 3, 4, 70)]
        {
            let (d, layers, layer) = (HGA_HEAD_DIM, 2usize, 1usize);
            let max_ctx = t0 + steps + 16;
            let cfg = HgaLayerConfig::new(layer, 8 * nkv, nkv, max_ctx, Budget::Tokens(512));
            let cc = cfg.cache_config().unwrap();
            let sph = cc.slots_per_head();
            let l = ArenaLayout { layers, kv_heads: nkv, groups_per_extent: gpe };
            let n_ext = cc.table_groups.div_ceil(gpe);
            // Rows identify (token, head, K or V) in every element.
            let val = |t: usize, h: usize, v: usize, i: usize| ((t * 7 + h * 3 + v) * 131 + i) as u16;
            let n = t0 + steps;
            let mut k = vec![0u16; n * nkv * d];
            let mut vv = vec![0u16; n * nkv * d];
            for t in 0..n {
                for h in 0..nkv {
                    for i in 0..d {
                        k[(t * nkv + h) * d + i] = val(t, h, 0, i);
                        vv[(t * nkv + h) * d + i] = val(t, h, 1, i);
                    }
                }
            }
            let kb: &[u8] = bytemuck::cast_slice(&k);
            let vb: &[u8] = bytemuck::cast_slice(&vv);
            // The prompt's rows as the prefill hands them: token-major, or head-major (a dense cache of capacity
            // n + 5) for every other case.
            let head_major = nkv > 1 && t0 % 2 == 1 || t0 == 64;
            let strides = if head_major { ((n + 5) * d, d) } else { (d, nkv * d) };
            let strided = |src: &[u16]| -> Vec<u8> {
                let mut out = vec![0u16; (nkv - 1) * strides.0 + (n - 1) * strides.1 + d];
                for t in 0..n {
                    for h in 0..nkv {
                        let o = h * strides.0 + t * strides.1;
                        out[o..o + d].copy_from_slice(&src[(t * nkv + h) * d..][..d]);
                    }
                }
                bytemuck::cast_slice(&out).to_vec()
            };
            let (kp, vp) = (strided(&k), strided(&vv));
            let mut ext = vec![vec![0xEEu8; l.extent_bytes()]; n_ext];
            let mut pool = vec![0xEEu8; cc.n_slots() * KV_GROUP_BYTES];
            let pitch = strides.1 * 2;
            for c in prefill_plan(&l, layer, nkv, sph, t0, strides) {
                let src = if c.v { &vp } else { &kp };
                for b in 0..c.blocks {
                    for r in 0..c.rows {
                        let so = c.src + (b * HGA_GROUP + r) * pitch;
                        let doff = c.dst_off + b * KV_GROUP_BYTES + r * 256;
                        let dst = match c.dst {
                            PrefillDst::Arena { extent, offset } => &mut ext[extent][offset + doff..][..256],
                            PrefillDst::Slot(i) => &mut pool[i * KV_GROUP_BYTES + doff..][..256],
                        };
                        dst.copy_from_slice(&src[so..so + 256]);
                    }
                }
            }
            let row_of = |buf: &[u8], off: usize| -> Vec<u16> {
                buf[off..off + 256].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
            };
            let want = |t: usize, h: usize, v: usize| -> Vec<u16> { (0..d).map(|i| val(t, h, v, i)).collect() };
            let mut model = CacheModel::new(cc.model(n_ext * gpe));
            let hp = HgaParams::default();
            for p in t0..n {
                // hga_kv_append's rule.
                let g = p / 16;
                for h in 0..nkv {
                    let mut targets = vec![(h * sph + KV_SINK_SLOTS + g % KV_WINDOW_SLOTS) * KV_GROUP_BYTES];
                    if g < KV_SINK_SLOTS {
                        targets.push((h * sph + g) * KV_GROUP_BYTES);
                    }
                    let inner = (p % 16) * 256;
                    for (v, src) in [(0usize, kb), (1, vb)] {
                        let so = (p * nkv + h) * 256;
                        for &t in &targets {
                            pool[t + v * KV_GROUP_K_BYTES + inner..][..256].copy_from_slice(&src[so..so + 256]);
                        }
                        let (e, off) = l.locate(layer, h, g);
                        ext[e][off + v * KV_GROUP_K_BYTES + inner..][..256].copy_from_slice(&src[so..so + 256]);
                    }
                }
                // The key table's rows: the normalization set and a closing chunk.
                let geo = Geometry::new(&hp, p, 1);
                let key_slot = |h: usize, grp: usize| {
                    h * sph + if grp < KV_SINK_SLOTS { grp } else { KV_SINK_SLOTS + grp % KV_WINDOW_SLOTS }
                };
                let closing: Vec<usize> = if (p + 1) % 64 == 0 { (p - 63..=p).collect() } else { Vec::new() };
                for h in 0..nkv {
                    for j in geo.always().chain(closing.iter().copied()) {
                        let off = key_slot(h, j / 16) * KV_GROUP_BYTES + (j % 16) * 256;
                        assert_eq!(row_of(&pool, off), want(j, h, 0), "t0 {t0} p {p} h {h}: key {j}");
                    }
                }
                // A random selection of candidates, the lookup and the gather.
                let cand: Vec<u32> = (geo.first_chunk * 4..geo.end_chunk * 4).map(|x| x as u32).collect();
                let sel: Vec<Vec<u32>> = (0..nkv)
                    .map(|_| {
                        let mut s: Vec<u32> = cand.iter().copied().filter(|_| rng.gen_bool(0.3)).collect();
                        s.truncate(cc.max_groups);
                        s.resize(cc.max_groups, ABSENT);
                        s
                    })
                    .collect();
                let outs = model.lookup(p as u32, &sel);
                for (h, o) in outs.iter().enumerate() {
                    for &(grp, slot) in &o.misses {
                        let (e, off) = l.locate(layer, h, grp as usize);
                        let blk = ext[e][off..off + KV_GROUP_BYTES].to_vec();
                        pool[slot as usize * KV_GROUP_BYTES..][..KV_GROUP_BYTES].copy_from_slice(&blk);
                    }
                    let mut seen = Vec::new();
                    for &(slot, pos0) in &o.entries {
                        for r in 0..16 {
                            let t = pos0 as usize + r;
                            if t > p {
                                break;
                            }
                            let off = slot as usize * KV_GROUP_BYTES + r * 256;
                            assert_eq!(row_of(&pool, off), want(t, h, 0), "t0 {t0} p {p} h {h}: K of {t}");
                            assert_eq!(row_of(&pool, off + KV_GROUP_K_BYTES), want(t, h, 1), "V of {t}");
                            seen.push(t);
                        }
                    }
                    seen.sort_unstable();
                    let groups: Vec<usize> = sel[h].iter().filter(|&&x| x != ABSENT).map(|&x| x as usize).collect();
                    assert_eq!(seen, geo.positions(16, &groups, p), "t0 {t0} p {p} h {h}: visible positions");
                }
            }
        }
    }
}
