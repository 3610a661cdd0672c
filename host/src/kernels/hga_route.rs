//! Launchers of the routing kernels (gpu-kernels/src/hga/route/): `hga_route_summary` (chunk min/max + int4
//! sketches), `hga_route_base` (the normalization of every query row) and `hga_route_stage1` (chunk scores + top
//! n_c), both launched by [`hga_route_stage1`], and `hga_route_stage2` (sketch scores of the shortlisted or of every
//! candidate group + top n_g). [`hga_route`] runs both stages.
//!
//! Graph use: every launch shape depends only on the [`RouteShape`] (its maxima), never on the position: with
//! [`RoutePos::Device`] the kernels read the query position from a device u32 and compute the geometry, n_c and
//! n_g there, so one recorded CUDA graph serves every decode step (and [`SummaryChunks::Closed`] summarizes the
//! chunk that the last key closed, if any).
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::hga::{Budget, GqaMode, GroupScore, HgaParams, Selector, SummaryMode};
use crate::memory::{DeviceBuf, Placed};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{CudaSlice, LaunchConfig};
use gpu_kernels::params::{
    route_stage1_smem, route_stage2_smem, RouteParams, HGA_CHUNK, HGA_GROUP, HGA_GROUPS_PER_CHUNK, HGA_HEAD_DIM,
    ROUTE_BASE_SMEM, ROUTE_COUNTERS, ROUTE_HIST_BINS, ROUTE_MAX_ROWS, ROUTE_STATS, ROUTE_THREADS,
};
use half::bf16;

/// Shared memory of `hga_route_summary` (8 warps x 128 dims x min and max, f32).
const SUMMARY_SMEM: usize = 8 * 128 * 2 * 4;

/// What one routing launch serves: the heads, the query block length, HGA's geometry and budget (as
/// `host/src/hga::HgaParams`; chunk 64 and group 16 fixed) and the maxima that size the scratch and the grids.
#[derive(Clone, Copy, Debug)]
pub struct RouteShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Query tokens of the block (decode: 1; prefill: host/src/hga's query_block, 64).
    pub q_len: usize,
    pub sink: usize,
    pub local: usize,
    pub budget: Budget,
    /// Chunk shortlist factor (host/src/hga's `shortlist`); infinite = no chunk stage (stage 2 over every group).
    pub shortlist: f64,
    pub normalize: bool,
    /// The largest `b0 + q_len` served.
    pub max_ctx: usize,
    /// Caps of n_g and n_c (the lengths of `selected` and `kept` per KV head).
    pub max_groups: usize,
    pub max_kept: usize,
    /// Scoring CTAs per KV head of stage 1 / stage 2 (0: [`RouteShape::auto_ctas`]).
    pub ctas1: usize,
    pub ctas2: usize,
}

impl RouteShape {
    /// host/src/hga's default routing (`HgaParams::default()`: sink 64, local 256, 8x shortlist, normalized) for
    /// `n_heads` / `n_kv_heads`, query blocks of `q_len`, contexts up to `max_ctx`, with `budget`; `max_groups` /
    /// `max_kept` sized so that no cap binds.
    pub fn default_for(n_heads: usize, n_kv_heads: usize, q_len: usize, max_ctx: usize, budget: Budget) -> Self {
        // Not validated here (a bad budget is reported by the launch's checks, as for any shape).
        Self::build(&HgaParams { budget, ..HgaParams::default() }, n_heads, n_kv_heads, q_len, max_ctx)
    }

    /// The routing of `params` (the CPU reference's parameters, so one set means the same on both backends) for
    /// `n_heads` / `n_kv_heads`, query blocks of `q_len`, contexts up to `max_ctx`; `max_groups` / `max_kept`
    /// sized so that no cap binds. The kernels implement one geometry and one scoring: chunks of 64, groups of 16,
    /// min/max chunk bounds, int4-sketch group scores, GQA max and the HGA selector; any other value is an error
    /// that names the field. `shortlist`, `normalize`, `sink`, `local` and `budget` are free.
    pub fn from_params(
        params: &HgaParams,
        n_heads: usize,
        n_kv_heads: usize,
        q_len: usize,
        max_ctx: usize,
    ) -> Result<Self, RuntimeError> {
        params.validate().map_err(|e| RuntimeError::Shape(format!("hga_route: {e}")))?;
        let unsupported = |what: String| {
            Err(RuntimeError::Shape(format!("hga_route: {what} (the GPU routing kernels implement the default)")))
        };
        if params.chunk != HGA_CHUNK || params.group != HGA_GROUP {
            return unsupported(format!(
                "chunk {} / group {}, the kernels use {HGA_CHUNK} / {HGA_GROUP}",
                params.chunk, params.group
            ));
        }
        if params.summary != SummaryMode::MinMax {
            return unsupported(format!("summary {:?}", params.summary));
        }
        if params.group_score != GroupScore::Sketch4 {
            return unsupported(format!("group score {:?}", params.group_score));
        }
        if params.gqa != GqaMode::Max {
            return unsupported(format!("GQA mode {:?}", params.gqa));
        }
        if params.selector != Selector::Hga {
            return unsupported(format!("selector {:?}", params.selector));
        }
        Ok(Self::build(params, n_heads, n_kv_heads, q_len, max_ctx))
    }

    fn build(params: &HgaParams, n_heads: usize, n_kv_heads: usize, q_len: usize, max_ctx: usize) -> Self {
        let mut s = RouteShape {
            n_heads,
            n_kv_heads,
            q_len,
            sink: params.sink,
            local: params.local,
            budget: params.budget,
            shortlist: params.shortlist,
            normalize: params.normalize,
            max_ctx,
            max_groups: 0,
            max_kept: 0,
            ctas1: 0,
            ctas2: 0,
        };
        s.max_groups = s.max_cand_groups().max(1);
        s.max_kept = s.max_cand_chunks().max(1);
        s
    }

    /// Query rows per KV head.
    pub fn rows(&self) -> usize {
        self.q_len * (self.n_heads / self.n_kv_heads.max(1))
    }
    pub fn chunk_stage(&self) -> bool {
        !self.shortlist.is_infinite()
    }
    pub fn max_cand_chunks(&self) -> usize {
        self.max_ctx / HGA_CHUNK
    }
    pub fn max_cand_groups(&self) -> usize {
        self.max_cand_chunks() * HGA_GROUPS_PER_CHUNK
    }
    /// Largest normalization set: the sink and a window of at most `local + 63` tokens before the block.
    pub fn max_always(&self) -> usize {
        self.sink.div_ceil(HGA_CHUNK) * HGA_CHUNK + self.local + HGA_CHUNK
    }
    /// Threads per CTA of `hga_route_base`: one per key of the largest normalization set, a multiple of 32, at
    /// most 1024 (the kernel loops past it).
    pub fn base_threads(&self) -> usize {
        self.max_always().next_multiple_of(32).clamp(32, 1024)
    }
    /// Stage-2 candidates at most.
    pub fn max_stage2(&self) -> usize {
        if self.chunk_stage() {
            (self.max_kept * HGA_GROUPS_PER_CHUNK).min(self.max_cand_groups())
        } else {
            self.max_cand_groups()
        }
    }
    /// Default grids: stage 1 about one (chunk, row) item per thread (capped at 2 CTAs per SM over the layer),
    /// stage 2 about two groups per warp (capped at 2 CTAs per SM: 125 registers per thread on sm_90 fit two).
    pub fn auto_ctas(&self, sms: usize) -> (usize, usize) {
        let kv = self.n_kv_heads.max(1);
        let items = self.max_cand_chunks() * self.rows();
        let c1 =
            if self.ctas1 > 0 { self.ctas1 } else { items.div_ceil(ROUTE_THREADS).clamp(1, (2 * sms / kv).max(1)) };
        let c2 =
            if self.ctas2 > 0 { self.ctas2 } else { self.max_stage2().div_ceil(16).clamp(1, (2 * sms / kv).max(1)) };
        (c1, c2)
    }

    fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |m: String| Err(RuntimeError::Shape(format!("hga_route: {m}")));
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads {} must be a positive multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.q_len == 0 || self.rows() > ROUTE_MAX_ROWS {
            return bad(format!("q_len {} x heads per KV head must be in 1..={ROUTE_MAX_ROWS}", self.q_len));
        }
        if self.shortlist.is_nan() || self.shortlist < 1.0 {
            return bad(format!("shortlist must be >= 1, got {}", self.shortlist));
        }
        if let Budget::Fraction(f) = self.budget {
            if !(f > 0.0 && f <= 1.0) {
                return bad(format!("budget fraction must be in (0, 1], got {f}"));
            }
        }
        if let Budget::Tokens(t) = self.budget {
            if t == 0 {
                return bad("a token budget must be > 0".into());
            }
            dim_u32("budget tokens", t)?;
        }
        if self.max_groups == 0 || self.max_kept == 0 {
            return bad("max_groups and max_kept must be > 0".into());
        }
        dim_u32("max_ctx", self.max_ctx)?;
        Ok(())
    }
}

/// The accountant's label of [`RouteSummaries`].
pub const ROUTE_SUMMARIES: &str = "routing summaries";
/// The accountant's label of [`RouteWorkspace`].
pub const ROUTE_WORKSPACE: &str = "routing workspace";

/// The summaries of one layer (formats of gpu_kernels::params::hga): chunk min/max bf16 [n_kv][max_chunks][128],
/// sketches u8 [n_kv][max_tokens][64] and their f16 scales (as u16 bits) [n_kv][max_tokens]. Booked as
/// [`ROUTE_SUMMARIES`]. The sketches (64 of the 74 bytes per token and KV head) may live in mapped host memory
/// ([`RouteSummaries::new_placed`]): the kernels then read and write them over PCIe.
pub struct RouteSummaries {
    pub chunk_min: DeviceBuf<bf16>,
    pub chunk_max: DeviceBuf<bf16>,
    pub sketch: Placed<u8>,
    pub scale: Placed<u16>,
    pub n_kv_heads: usize,
    pub max_tokens: usize,
}

impl RouteSummaries {
    /// Zeroed summaries for contexts of up to `max_tokens` (rounded down to whole chunks for the min/max).
    pub fn new(gpu: &Gpu, n_kv_heads: usize, max_tokens: usize) -> Result<Self, RuntimeError> {
        Self::new_placed(gpu, n_kv_heads, max_tokens, false)
    }

    /// [`RouteSummaries::new`] with the sketches and their scales in mapped pinned host memory when
    /// `sketches_on_host`.
    pub fn new_placed(
        gpu: &Gpu,
        n_kv_heads: usize,
        max_tokens: usize,
        sketches_on_host: bool,
    ) -> Result<Self, RuntimeError> {
        let l = ROUTE_SUMMARIES;
        let mc = (max_tokens / HGA_CHUNK).max(1);
        let n = n_kv_heads * max_tokens.max(1);
        Ok(RouteSummaries {
            chunk_min: gpu.alloc_zeros(l, n_kv_heads * mc * HGA_HEAD_DIM)?,
            chunk_max: gpu.alloc_zeros(l, n_kv_heads * mc * HGA_HEAD_DIM)?,
            sketch: Placed::zeroed(gpu, l, n * HGA_HEAD_DIM / 2, sketches_on_host, false)?,
            scale: Placed::zeroed(gpu, l, n, sketches_on_host, false)?,
            n_kv_heads,
            max_tokens: max_tokens.max(1),
        })
    }
    pub fn max_chunks(&self) -> usize {
        (self.max_tokens / HGA_CHUNK).max(1)
    }
}

/// Where the keys of a KV head come from (see `RouteParams`): a dense buffer with element strides, or a table of
/// group-block addresses.
pub struct KeySource<'a> {
    k: u64,
    table: u64,
    head_stride: usize,
    row_stride: usize,
    table_len: usize,
    _keep: Option<&'a CudaSlice<bf16>>,
    _keep_t: Option<&'a CudaSlice<u64>>,
}

impl<'a> KeySource<'a> {
    /// Row j of KV head h at `k[h * head_stride + j * row_stride ..][..128]`: e.g. a prefill buffer
    /// `[tokens][n_kv][128]` (`head_stride` 128, `row_stride` n_kv * 128) or a cache `[n_kv][capacity][128]`
    /// (`capacity * 128`, 128). Strides must be multiples of 8 (16-byte rows).
    pub fn dense(gpu: &Gpu, k: &'a CudaSlice<bf16>, head_stride: usize, row_stride: usize) -> Self {
        let (p, _g) = dptr(gpu, k);
        KeySource { k: p, table: 0, head_stride, row_stride, table_len: 0, _keep: Some(k), _keep_t: None }
    }

    /// Row j of KV head h at `table[h * table_len + j / 16] + (j % 16) * 128` elements (group blocks: K bf16
    /// [16][128] then V, e.g. slots of the pool).
    ///
    /// # Safety
    /// Every entry the kernels read (the groups of the closing chunks, of the sink and of the local window) must be
    /// the address of a readable, 16-byte aligned bf16 [16][128] block that outlives the launches.
    pub unsafe fn table(gpu: &Gpu, table: &'a CudaSlice<u64>, table_len: usize) -> Self {
        let (p, _g) = dptr(gpu, table);
        KeySource {
            k: 0,
            table: p,
            head_stride: 0,
            row_stride: HGA_HEAD_DIM,
            table_len,
            _keep: None,
            _keep_t: Some(table),
        }
    }

    /// Checks that rows `0..rows` of every head lie inside the source.
    fn check(&self, n_kv: usize, rows: usize) -> Result<(), RuntimeError> {
        if rows == 0 {
            return Ok(());
        }
        if let Some(k) = self._keep {
            if !self.head_stride.is_multiple_of(8) || !self.row_stride.is_multiple_of(8) || self.row_stride == 0 {
                return Err(RuntimeError::Shape("hga_route keys: strides must be positive multiples of 8".into()));
            }
            let need = (n_kv - 1) * self.head_stride + (rows - 1) * self.row_stride + HGA_HEAD_DIM;
            if need > k.len() {
                return Err(RuntimeError::Shape(format!("hga_route keys: {} elements, need {need}", k.len())));
            }
        } else if let Some(t) = self._keep_t {
            if self.table_len < rows.div_ceil(HGA_GROUP) || t.len() < n_kv * self.table_len {
                return Err(RuntimeError::Shape(format!(
                    "hga_route key table: {} entries of {} per head, need {} per head",
                    t.len(),
                    self.table_len,
                    rows.div_ceil(HGA_GROUP)
                )));
            }
        }
        Ok(())
    }
}

/// The first query position of the block.
#[derive(Clone, Copy)]
pub enum RoutePos<'a> {
    Host(usize),
    /// A device u32 (graph-friendly).
    Device(&'a CudaSlice<u32>),
}

/// Which chunks the summary kernel writes.
#[derive(Clone, Copy)]
pub enum SummaryChunks<'a> {
    /// Chunks `first .. first + count` (prefill).
    Range { first: usize, count: usize },
    /// The device u32 is the number of keys written so far: the chunk it closed, if it is a positive multiple of 64
    /// (decode, graph-friendly).
    Closed(&'a CudaSlice<u32>),
    /// The device u32 is the position of the key just written (the count is one more): as `Closed`, without a
    /// device copy of the position to make the count.
    ClosedAt(&'a CudaSlice<u32>),
}

/// Scratch of the two stages, and their by-products (readable for tests: the scores, the kept chunks, `base`).
/// Booked as [`ROUTE_WORKSPACE`].
pub struct RouteWorkspace {
    /// u32 [n_kv][2][ROUTE_HIST_BINS]: the first-level histograms of stage 1's and stage 2's selects, zero
    /// between launches (each select's last CTA resets what its launch counted).
    pub hist: DeviceBuf<u32>,
    pub base: DeviceBuf<f32>,
    pub chunk_scores: DeviceBuf<f32>,
    pub kept: DeviceBuf<u32>,
    pub group_scores: DeviceBuf<f32>,
    pub counters: DeviceBuf<u32>,
    /// u32 [n_kv][4]: n_c, n_g, chunk candidates scoring -inf/NaN, group candidates scoring -inf/NaN.
    pub stats: DeviceBuf<u32>,
    shape: RouteShape,
}

impl RouteWorkspace {
    pub fn new(gpu: &Gpu, shape: &RouteShape) -> Result<Self, RuntimeError> {
        shape.validate()?;
        let l = ROUTE_WORKSPACE;
        let (kv, r) = (shape.n_kv_heads, shape.rows());
        let mcc = shape.max_cand_chunks().max(1);
        let mcg = shape.max_stage2().max(1);
        Ok(RouteWorkspace {
            hist: gpu.alloc_zeros(l, kv * 2 * ROUTE_HIST_BINS)?,
            base: gpu.alloc_zeros(l, kv * r)?,
            chunk_scores: gpu.alloc_zeros(l, kv * mcc)?,
            kept: gpu.alloc_zeros(l, kv * shape.max_kept)?,
            group_scores: gpu.alloc_zeros(l, kv * mcg)?,
            counters: gpu.alloc_zeros(l, kv * ROUTE_COUNTERS)?,
            stats: gpu.alloc_zeros(l, kv * ROUTE_STATS)?,
            shape: *shape,
        })
    }
    pub fn shape(&self) -> &RouteShape {
        &self.shape
    }
}

#[allow(clippy::too_many_arguments)]
fn params(
    shape: &RouteShape,
    dims: (usize, usize),
    keys: Option<&KeySource>,
    pos: (u64, usize),
    q: u64,
    ws: Option<&[u64; 7]>,
    selected: u64,
    ctas: usize,
) -> RouteParams {
    let w = ws.copied().unwrap_or([0; 7]);
    let (budget_tokens, budget_frac) = match shape.budget {
        Budget::Tokens(t) => (t as u32, 0.0),
        Budget::Fraction(f) => (0, f),
    };
    RouteParams {
        k: keys.map_or(0, |k| k.k),
        k_table: keys.map_or(0, |k| k.table),
        k_head_stride: keys.map_or(0, |k| k.head_stride as u64),
        chunk_min: 0,
        chunk_max: 0,
        sketch: 0,
        sketch_scale: 0,
        q,
        pos: pos.0,
        hist: w[0],
        base: w[1],
        chunk_scores: w[2],
        kept: w[3],
        group_scores: w[4],
        counters: w[5],
        stats: w[6],
        selected,
        budget_frac,
        shortlist: shape.shortlist,
        k_row_stride: keys.map_or(0, |k| k.row_stride as u32),
        k_table_len: keys.map_or(0, |k| k.table_len as u32),
        max_chunks: dims.0 as u32,
        max_tokens: dims.1 as u32,
        chunk0: 0,
        n_sum_chunks: 0,
        b0: pos.1 as u32,
        q_len: shape.q_len as u32,
        n_heads: shape.n_heads as u32,
        n_kv_heads: shape.n_kv_heads as u32,
        sink: shape.sink as u32,
        local: shape.local as u32,
        budget_tokens,
        normalize: shape.normalize as u32,
        chunk_stage: shape.chunk_stage() as u32,
        max_groups: shape.max_groups as u32,
        max_kept: shape.max_kept as u32,
        max_rows: shape.rows() as u32,
        max_cand_chunks: shape.max_cand_chunks().max(1) as u32,
        max_cand_groups: shape.max_stage2().max(1) as u32,
        ctas: ctas as u32,
        scale: 1.0 / (HGA_HEAD_DIM as f32).sqrt(),
        max_ctx: shape.max_ctx as u32,
        pad: 0,
    }
}

/// Writes the min/max summaries and the int4 sketches of the chosen chunks of every KV head from `keys`.
pub fn hga_route_summary(
    gpu: &Gpu,
    keys: &KeySource,
    sums: &mut RouteSummaries,
    chunks: SummaryChunks,
) -> Result<(), RuntimeError> {
    let n_kv = sums.n_kv_heads;
    let shape = RouteShape::default_for(n_kv, n_kv, 1, sums.max_tokens, Budget::Fraction(1.0));
    let (grid, first, pos_guard, pos) = match chunks {
        SummaryChunks::ClosedAt(p) => {
            check_len("hga_route_summary position", p.len(), 1)?;
            keys.check(n_kv, sums.max_chunks() * HGA_CHUNK)?;
            let (a, g) = dptr(gpu, p);
            (1, 1, Some(g), a)
        }
        SummaryChunks::Range { first, count } => {
            if (first + count) * HGA_CHUNK > sums.max_tokens {
                return Err(RuntimeError::Shape(format!(
                    "hga_route_summary: chunks {first}..{} exceed the {} tokens of the summaries",
                    first + count,
                    sums.max_tokens
                )));
            }
            keys.check(n_kv, (first + count) * HGA_CHUNK)?;
            if count == 0 {
                return Ok(());
            }
            (count, first, None, 0)
        }
        SummaryChunks::Closed(p) => {
            check_len("hga_route_summary position", p.len(), 1)?;
            keys.check(n_kv, sums.max_chunks() * HGA_CHUNK)?;
            let (a, g) = dptr(gpu, p);
            (1, 0, Some(g), a)
        }
    };
    let dims = (sums.max_chunks(), sums.max_tokens);
    let (pmin, _g1) = dptr_mut(gpu, &mut sums.chunk_min);
    let (pmax, _g2) = dptr_mut(gpu, &mut sums.chunk_max);
    let (psk, _g3) = dptr_mut(gpu, &mut sums.sketch);
    let (psc, _g4) = dptr_mut(gpu, &mut sums.scale);
    let mut p = params(&shape, dims, Some(keys), (pos, 0), 0, None, 0, 1);
    p.chunk_min = pmin;
    p.chunk_max = pmax;
    p.sketch = psk;
    p.sketch_scale = psc;
    p.chunk0 = dim_u32("first chunk", first)?;
    p.n_sum_chunks = grid as u32;
    let cfg = LaunchConfig {
        grid_dim: (dim_u32("chunks", grid)?, n_kv as u32, 1),
        block_dim: (ROUTE_THREADS as u32, 1, 1),
        shared_mem_bytes: SUMMARY_SMEM as u32,
    };
    let _pg = pos_guard;
    // SAFETY: the key rows read (< the chunks' end, or < max_chunks * 64 with a device position) were checked to
    // lie in the source; the summaries are sized by `RouteSummaries::new` and the kernel skips chunks past them.
    unsafe { launch(gpu, "hga_route_summary", cfg, p) }
}

/// Shared checks of the two stages; returns (b0 for a host position, device position address).
fn check_stage(
    shape: &RouteShape,
    sums: &RouteSummaries,
    q: &CudaSlice<f32>,
    pos: &RoutePos,
    ws: &RouteWorkspace,
) -> Result<usize, RuntimeError> {
    shape.validate()?;
    let w = ws.shape();
    if (w.n_kv_heads, w.rows(), w.max_ctx, w.max_groups, w.max_kept, w.chunk_stage())
        != (shape.n_kv_heads, shape.rows(), shape.max_ctx, shape.max_groups, shape.max_kept, shape.chunk_stage())
    {
        return Err(RuntimeError::Shape("hga_route: the workspace was made for another shape".into()));
    }
    if sums.n_kv_heads != shape.n_kv_heads || sums.max_tokens < shape.max_ctx {
        return Err(RuntimeError::Shape(format!(
            "hga_route: summaries for {} KV heads x {} tokens, the shape needs {} x {}",
            sums.n_kv_heads, sums.max_tokens, shape.n_kv_heads, shape.max_ctx
        )));
    }
    check_len("hga_route q", q.len(), shape.q_len * shape.n_heads * HGA_HEAD_DIM)?;
    match pos {
        RoutePos::Host(b0) => {
            if b0 + shape.q_len > shape.max_ctx {
                return Err(RuntimeError::Shape(format!(
                    "hga_route: block end {} exceeds max_ctx {}",
                    b0 + shape.q_len,
                    shape.max_ctx
                )));
            }
            Ok(*b0)
        }
        RoutePos::Device(p) => {
            check_len("hga_route position", p.len(), 1)?;
            Ok(0)
        }
    }
}

/// The device address of a device-resident position (0 for a host one), with its cudarc guard.
fn pos_ptr<'a>(gpu: &'a Gpu, pos: &RoutePos<'a>) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
    match *pos {
        RoutePos::Device(p) => {
            let (a, g) = dptr(gpu, p);
            (a, Some(g))
        }
        RoutePos::Host(_) => (0, None),
    }
}

fn ws_ptrs<'a>(gpu: &'a Gpu, ws: &'a mut RouteWorkspace) -> ([u64; 7], Vec<cudarc::driver::SyncOnDrop<'a>>) {
    let mut g = Vec::new();
    let mut p = [0u64; 7];
    let RouteWorkspace { hist, base, chunk_scores, kept, group_scores, counters, stats, .. } = ws;
    macro_rules! take {
        ($i:expr, $b:expr) => {{
            let (a, gg) = dptr_mut(gpu, $b);
            p[$i] = a;
            g.push(gg);
        }};
    }
    take!(0, hist);
    take!(1, base);
    take!(2, chunk_scores);
    take!(3, kept);
    take!(4, group_scores);
    take!(5, counters);
    take!(6, stats);
    (p, g)
}

/// Stage 1 for every KV head: the normalization of every query row (`ws.base`, kernel `hga_route_base`) and, with
/// a chunk stage, the chunk scores (`ws.chunk_scores`) and the kept chunks (`ws.kept`, ascending, u32::MAX
/// padding; kernel `hga_route_stage1`): one or two launches. `q` is f32 [q_len][n_heads][128] (post-RoPE, 16-byte
/// aligned); `keys` must hold the sink and local-window keys (rows below the block start).
pub fn hga_route_stage1(
    gpu: &Gpu,
    shape: &RouteShape,
    keys: &KeySource,
    sums: &RouteSummaries,
    q: &CudaSlice<f32>,
    pos: RoutePos,
    ws: &mut RouteWorkspace,
) -> Result<(), RuntimeError> {
    let b0 = check_stage(shape, sums, q, &pos, ws)?;
    keys.check(shape.n_kv_heads, if matches!(pos, RoutePos::Host(_)) { b0 } else { shape.max_ctx })?;
    let (c1, _) = shape.auto_ctas(gpu.sm_count());
    let (pq, _g0) = dptr(gpu, q);
    let (ppos, _gp) = pos_ptr(gpu, &pos);
    let (pmin, _g1) = dptr(gpu, &sums.chunk_min);
    let (pmax, _g2) = dptr(gpu, &sums.chunk_max);
    let dims = (sums.max_chunks(), sums.max_tokens);
    let (w, _gw) = ws_ptrs(gpu, ws);
    let mut p = params(shape, dims, Some(keys), (ppos, b0), pq, Some(&w), 0, c1);
    p.chunk_min = pmin;
    p.chunk_max = pmax;
    let base_cfg = LaunchConfig {
        grid_dim: (shape.rows() as u32, shape.n_kv_heads as u32, 1),
        block_dim: (shape.base_threads() as u32, 1, 1),
        shared_mem_bytes: ROUTE_BASE_SMEM as u32,
    };
    // SAFETY: shapes checked above; `base` is sized [n_kv][rows] by the workspace, the kernel routes nothing for
    // a device position past max_ctx, and the key rows it reads are below the block start (inside the source).
    unsafe { launch(gpu, "hga_route_base", base_cfg, p)? };
    if !shape.chunk_stage() {
        return Ok(());
    }
    let cfg = LaunchConfig {
        grid_dim: (c1 as u32, shape.n_kv_heads as u32, 1),
        block_dim: (ROUTE_THREADS as u32, 1, 1),
        shared_mem_bytes: route_stage1_smem(shape.max_cand_chunks().max(1), c1) as u32,
    };
    // SAFETY: as above; the chunk summaries read are those of the candidate chunks, below max_ctx / 64 (inside
    // the summaries, checked), and the scratch (scores, histogram, kept) is sized by the workspace.
    unsafe { launch(gpu, "hga_route_stage1", cfg, p) }
}

/// Stage 2 for every KV head: the sketch scores of the candidate groups (`ws.group_scores`) and the top n_g
/// (`selected`, u32 [n_kv][max_groups], absolute group indices ascending, u32::MAX padding). Reads `ws.base` and
/// `ws.kept` from [`hga_route_stage1`] of the same block.
pub fn hga_route_stage2(
    gpu: &Gpu,
    shape: &RouteShape,
    sums: &RouteSummaries,
    q: &CudaSlice<f32>,
    pos: RoutePos,
    ws: &mut RouteWorkspace,
    selected: &mut CudaSlice<u32>,
) -> Result<(), RuntimeError> {
    let b0 = check_stage(shape, sums, q, &pos, ws)?;
    check_len("hga_route selected", selected.len(), shape.n_kv_heads * shape.max_groups)?;
    let (_, c2) = shape.auto_ctas(gpu.sm_count());
    let (pq, _g0) = dptr(gpu, q);
    let (ppos, _gp) = pos_ptr(gpu, &pos);
    let (psk, _g1) = dptr(gpu, &sums.sketch);
    let (psc, _g2) = dptr(gpu, &sums.scale);
    let dims = (sums.max_chunks(), sums.max_tokens);
    let (psel, _g3) = dptr_mut(gpu, selected);
    let (w, _gw) = ws_ptrs(gpu, ws);
    let mut p = params(shape, dims, None, (ppos, b0), pq, Some(&w), psel, c2);
    p.sketch = psk;
    p.sketch_scale = psc;
    let smem = route_stage2_smem(shape.max_stage2().max(1));
    let cfg = LaunchConfig {
        grid_dim: (c2 as u32, shape.n_kv_heads as u32, 1),
        block_dim: (ROUTE_THREADS as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: as stage 1; the candidate groups are below max_ctx, inside the summaries (checked).
    unsafe { launch(gpu, "hga_route_stage2", cfg, p) }
}

/// Stage 1 then stage 2 (two launches on the stream).
#[allow(clippy::too_many_arguments)]
pub fn hga_route(
    gpu: &Gpu,
    shape: &RouteShape,
    keys: &KeySource,
    sums: &RouteSummaries,
    q: &CudaSlice<f32>,
    pos: RoutePos,
    ws: &mut RouteWorkspace,
    selected: &mut CudaSlice<u32>,
) -> Result<(), RuntimeError> {
    hga_route_stage1(gpu, shape, keys, sums, q, pos, ws)?;
    hga_route_stage2(gpu, shape, sums, q, pos, ws, selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `HgaParams` means the same on both backends: the default parameters give `default_for`'s shape, the
    /// free fields carry over, and what the kernels do not implement is refused, naming the field.
    #[test]
    fn route_shape_follows_the_cpu_parameters() {
        let d = RouteShape::from_params(&HgaParams::default(), 32, 4, 1, 65536).unwrap();
        let e = RouteShape::default_for(32, 4, 1, 65536, HgaParams::default().budget);
        assert_eq!(format!("{d:?}"), format!("{e:?}"));
        let p = HgaParams {
            sink: 128,
            local: 512,
            shortlist: f64::INFINITY,
            normalize: false,
            budget: Budget::Tokens(2048),
            ..HgaParams::default()
        };
        let s = RouteShape::from_params(&p, 16, 2, 64, 8192).unwrap();
        assert_eq!((s.sink, s.local, s.normalize, s.q_len), (128, 512, false, 64));
        assert!(!s.chunk_stage());
        assert!(matches!(s.budget, Budget::Tokens(2048)));
        let refused = [
            (HgaParams { chunk: 128, ..HgaParams::default() }, "chunk 128"),
            (HgaParams { summary: SummaryMode::Mean, ..HgaParams::default() }, "summary Mean"),
            (HgaParams { group_score: GroupScore::Summary, ..HgaParams::default() }, "group score Summary"),
            (HgaParams { gqa: GqaMode::Mean, ..HgaParams::default() }, "GQA mode Mean"),
            (HgaParams { selector: Selector::OracleGroups, ..HgaParams::default() }, "selector OracleGroups"),
            (HgaParams { budget: Budget::Fraction(0.0), ..HgaParams::default() }, "budget fraction"),
        ];
        for (p, what) in refused {
            let e = RouteShape::from_params(&p, 32, 4, 1, 4096).unwrap_err().to_string();
            assert!(e.contains(what), "{e:?} should name {what:?}");
        }
    }
}
