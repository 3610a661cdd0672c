//! The Qwen3-MoE forward on the GPU, composed of the Rust kernels, with dense attention and a GPU K/V cache.
//!
//! Per layer (QWEN3.md), for a chunk of `t` tokens at positions `start..start + t`:
//! 1. `input_layernorm` fused with the residual add of the previous layer's MLP output and with the FP8 activation
//!    quantization (`hga_rmsnorm_fp8_quant`);
//! 2. q/k/v as one block-scaled FP8 linear (the three weights stacked along n at load; `hga_fp8_linear`: the
//!    decode kernel up to 16 rows, the mma.sync pipeline above);
//! 3. per-head q/k RMSNorm + NeoX RoPE, K and V written into the layer's cache (`hga_qk_norm_rope`);
//! 4. causal GQA attention over the cache: split-K decode for one token, FlashAttention-style prefill otherwise;
//! 5. FP8 quantization of the attention output (fused into the decode merge for one token), `o_proj`;
//! 6. `post_attention_layernorm` fused with the residual add (`hga_rmsnorm`, bf16 out: the router reads bf16; for
//!    one token it runs inside the MoE router instead, `moe_decode_residual`, bit for bit the same);
//! 7. the MoE block (router, experts; the decode path for a few tokens, the grouped path above). A dense-MLP layer
//!    (`mlp_only_layers`, `decoder_sparse_step`) runs as a MoE block with one expert and weight 1, which is exactly
//!    `down(silu(gate(x)) * up(x))`.
//!
//! Then `model.norm` (with the last residual add) and the bf16 `lm_head` (f32 logits).
//!
//! ## Attention modes ([`AttentionMode`])
//! - `Dense`: steps 3-4 as above, every layer's K/V on the GPU (`2 x n_kv x 128 x 2` bytes per position and layer:
//!   6.4 GB at 64K for Qwen3-30B-A3B), or, as the anchor of what dense costs when the K/V must leave the GPU
//!   (`GpuModelOptions::dense_kv_on_host`), in mapped host memory read by the same kernels, the prompt then
//!   prefilled layer-major like HGA's.
//! - `Hga`: the K/V history lives in the host arena (mapped pinned extents of 4096 positions, grown as the context
//!   grows, never copied); per layer an [`HgaLayer`] holds the routing summaries, the GPU working-set cache and the
//!   window. A decode step stages the token's K/V through the rope kernel (`cache_by_token`), appends it to the
//!   layer's tiers, routes (stage 1, stage 2), gathers the misses from the arena and attends over sink + window +
//!   the routed groups, all in the step's recorded CUDA graph (the position is a device u32; no host round trip).
//!   A prompt from position 0 is prefilled **layer-major and exact**: each layer runs over the whole prompt in
//!   chunks with only that layer's K/V of the prompt on the GPU (`n_kv x n x 128 x 2 x 2` bytes: 134 MB at 64K),
//!   then hands it to the layer's tiers (`HgaLayer::prefill_history`). Tokens after the prompt are decode steps.
//!   The first `dense_layers` layers stay dense.
//!
//! Every device allocation goes through the [`Gpu`]'s accountant (`gpu.memory()`, labels below), so a cap
//! ([`Gpu::set_memory_limit`]) refuses what does not fit with a message naming it; under a cap what need not be in
//! HBM stays in mapped host memory: the embedding table (one row per token crosses PCIe), the layer-major prefill's
//! residual stream when the cap refuses it, and the routing sketches of the HGA layers that HBM cannot hold beside
//! everything else (the K/V state is built after every weight for that; see `build_kv`). The residual stream is bf16,
//! as in transformers. What it needs: an FP8 checkpoint (`quantization_config`), head_dim 128, hidden and
//! intermediate sizes multiples of 128 (all true of Qwen3-30B-A3B); anything else is refused with a clear error.
//!
//! Dtypes at load (the header decides, `docs/checkpoint.md`): the norms, the embedding, `lm_head` and the routers go
//! to the GPU as bf16 whatever their stored dtype (BF16 as is; F16/F32 rounded to nearest bf16; an F8_E4M3 router
//! dequantized with its block scales, then rounded), which is what the kernels read. The FP8 linears are uploaded as
//! stored; one that the config calls FP8 but that is stored in BF16/F16/F32 (a partially quantized checkpoint) is
//! quantized at load with the config's block size ([`Checkpoint::fp8_weight_or_quantize`]); a float Linear that the
//! config leaves unquantized (`modules_to_not_convert`) is refused, naming the tensor: every q/k/v/o and expert
//! projection here is a block-FP8 GEMM.
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaGraph, CudaView, CudaViewMut};
use half::bf16;

use crate::hga::gpu_layer::{HgaLayer, HgaLayerConfig};
use crate::hga::HgaParams;
use crate::kernels::attention::{
    hga_attention_decode_upto_quant, hga_attention_prefill, AttentionShape, DecodeWorkspace, DECODE_MAX_SPLITS,
};
use crate::kernels::dptr;
use crate::kernels::gemm::{hga_fp8_linear, hga_rmsnorm_fp8_quant};
use crate::kernels::head::{hga_embed_gather_dev, hga_lm_head, LM_HEAD_MAX_M};
use crate::kernels::moe::{moe_decode_residual, moe_grouped, MoeExpertWeights, MoeWorkspace, RouterForm};
use crate::kernels::rope::{hga_qk_norm_rope, QkNormRopeShape};
use crate::kernels::{hga_fp8_quant, hga_rmsnorm};
use crate::kv::arena::BlockFormat;
use crate::kv::disk::{DiskConfig, DiskStore};
use crate::kv::pinned::MappedSlice;
use crate::kv::{ArenaLayout, ArenaTable, Extent, ExtentMemory, PinnedMemory};
use crate::memory::{DeviceBuf, Placed};
use crate::model::checkpoint::{Checkpoint, Fp8Weight};
use crate::model::config::Qwen3MoeConfig;
use crate::model::error::ModelError;
use crate::reference::kv::SelectionTrace;
use crate::reference::moe::{MoeDims, MoeHostWeights};
use crate::runtime::{Gpu, RuntimeError};
use gpu_kernels::params::{HGA_HEAD_DIM, KV_GROUP_BYTES};

/// Labels of the model's device memory (the accountant of [`Gpu::memory`]).
pub const ATTENTION_WEIGHTS: &str = "attention weights";
pub const ROUTERS: &str = "routers";
pub const NORMS: &str = "norms";
pub const EMBEDDING: &str = "embedding";
pub const LM_HEAD: &str = "lm_head";
pub const DENSE_KV: &str = "dense K/V cache";
pub const ACTIVATIONS: &str = "activations";
pub const PREFILL_RESIDUAL: &str = "prefill residual stream";
pub const PREFILL_KV: &str = "prefill K/V of one layer";
/// The HGA arena's extents in the host book (`Gpu::host_memory`).
pub const HOST_ARENA: &str = "K/V arena (mapped pinned)";

/// Up to this many tokens per call the MoE block takes the decode path (no grouping).
const MOE_DECODE_MAX_TOKENS: usize = 4;

/// Errors of the GPU model.
#[derive(Debug, thiserror::Error)]
pub enum GpuModelError {
    #[error("the GPU backend cannot run this model: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::error::ModelError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    Input(String),
}

/// A block-scaled FP8 linear on the GPU: e4m3 [n, k] and f32 scales [n/128, k/128].
struct Fp8Linear {
    w: DeviceBuf<u8>,
    s: DeviceBuf<f32>,
    n: usize,
    k: usize,
}

enum Mlp {
    /// Router bf16 [experts, hidden] and the stacked experts; `dims.tokens` is set per call; `ws` indexes the
    /// workspace of these dims in `Scratch::moe`.
    Moe { router: DeviceBuf<bf16>, experts: MoeExpertWeights, dims: MoeDims, ws: usize },
}

struct Layer {
    input_layernorm: DeviceBuf<bf16>,
    post_attention_layernorm: DeviceBuf<bf16>,
    /// q_proj, k_proj and v_proj stacked along n: one launch, outputs side by side in a row of `qkv`.
    qkv_proj: Fp8Linear,
    o_proj: Fp8Linear,
    q_norm: DeviceBuf<bf16>,
    k_norm: DeviceBuf<bf16>,
    mlp: Mlp,
}

/// Where a layer keeps its K/V and how it attends.
// One per layer (48 at full size): the dense variant's two inline buffer handles cost nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum LayerKv {
    /// `[n_kv][capacity][128]` on the GPU (or in mapped host memory: `GpuModelOptions::dense_kv_on_host`), exact
    /// attention.
    Dense { k_cache: Placed<bf16>, v_cache: Placed<bf16> },
    /// The history in the host arena, routed attention (the layer's summaries, GPU cache and window).
    Hga(Box<HgaLayer>),
}

/// How the model attends ([`GpuModel::load_with`]).
#[derive(Clone, Debug, Default)]
pub enum AttentionMode {
    /// Every layer's K/V on the GPU (`capacity` positions), exact attention: the baseline.
    #[default]
    Dense,
    /// HGA: the K/V history in mapped pinned host memory (the arena), each decode step routed on the GPU (stage 1,
    /// stage 2), its working set gathered into the layer's GPU cache, exact attention over sink + window + the
    /// routed groups. Prompts are prefilled layer-major and exact (see [`GpuModel::forward`]). The first
    /// `params.dense_layers` layers stay dense.
    Hga(HgaOptions),
}

/// The HGA mode's settings.
#[derive(Clone, Debug, Default)]
pub struct HgaOptions {
    /// The routing: host/src/hga's parameters (one set means the same on both backends).
    pub params: HgaParams,
    /// Routed-group slots per KV head of each layer's GPU cache. 0 (auto): twice the selection, and under a GPU
    /// memory cap whatever HBM the cap leaves once everything else is placed, shared equally by the HGA layers
    /// (see [`CacheFit`]): a larger cache keeps more of the working set from step to step, so fewer groups cross
    /// PCIe.
    pub cache_slots: usize,
    /// Allocate the host arena for `capacity` positions at load instead of growing it extent by extent as the
    /// context grows: pinning host memory costs about 0.6 s per GB on the H200 host (4 s for a 64K context), time
    /// a prompt would otherwise wait for.
    pub arena_at_load: bool,
    /// Host bytes the arena may take (whole extents of 4096 positions): growing past it is refused with an error
    /// naming both (the disk tier that would serve beyond is not built on the GPU path).
    pub host_kv_limit: Option<u64>,
    /// Where the routing sketches live: `None` decides per layer (HBM unless a GPU memory cap cannot hold them,
    /// see [`GpuModel::load_with`]), `Some(true)` mapped host memory for every layer, `Some(false)` HBM.
    pub sketches_on_host: Option<bool>,
    /// The disk tier instead of the host arena: the K/V history in a page file under `dir`, with a RAM cache of
    /// `cache_bytes` (mapped pinned memory) in front of it (`crate::kv::disk`). Each decode step is then launched
    /// from the host, not replayed from a CUDA graph: after each HGA layer's cache lookup the host makes that
    /// layer's misses resident in RAM (reading them from disk) and writes their addresses into the group table
    /// that the gather reads ([`ArenaTable::set_group_table`]). `host_kv_limit` and `arena_at_load` do not apply.
    pub disk: Option<DiskConfig>,
}

/// One HGA layer's last selection: (layer, `[n_kv][groups ascending]`) ([`GpuModel::hga_selections`]).
pub type LayerSelection = (usize, Vec<Vec<u32>>);

/// Counters of the HGA mode ([`GpuModel::hga_stats`]).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HgaStats {
    /// Layers that route (the rest are dense).
    pub hga_layers: usize,
    /// Routed groups found in the GPU caches / gathered from the arena, over every layer, KV head and step.
    pub hits: u64,
    pub misses: u64,
    /// Bytes gathered from the host arena over PCIe (the misses' K and V).
    pub h2d_bytes: u64,
    /// Routed decode steps counted by the caches (per layer).
    pub steps: u64,
    /// Tokens attended (sink + window + routed groups, whole groups) in the last step, mean per (layer, KV head).
    pub routed_tokens_last_step: f64,
    /// Host bytes of the arena (mapped pinned memory).
    pub arena_bytes: usize,
    /// HGA layers whose routing sketches live in mapped host memory (the rest: in HBM).
    pub sketch_host_layers: usize,
    /// The last layer-major prefill: GPU seconds of the layers' hand-off of the prompt's K/V to their tiers
    /// (arena, summaries, sink and window), and whether its residual stream was in mapped host memory.
    pub prefill_history_s: f64,
    pub prefill_residual_on_host: bool,
    /// Host seconds spent allocating (pinning) the arena's extents so far (at load with
    /// `HgaOptions::arena_at_load`, else while prompts grow the context).
    pub arena_alloc_s: f64,
    /// Routed-group slots per KV head of each HGA layer's GPU cache, and the selection width they serve (groups
    /// per KV head and step at the model's capacity).
    pub cache_slots: usize,
    pub max_groups: usize,
    /// The disk tier ([`HgaOptions::disk`]; zero without it): its counters so far (groups served from its RAM
    /// cache and read from disk, bytes read and written) and the host seconds spent in it (the prompt's hand-off
    /// and every step's reads and appends, the GPU idle meanwhile).
    pub disk_ram_hits: u64,
    pub disk_ram_misses: u64,
    pub disk_bytes_read: u64,
    pub disk_bytes_written: u64,
    pub disk_host_s: f64,
}

impl HgaStats {
    /// Hits over hits + misses (1 when nothing was looked up).
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            1.0
        } else {
            self.hits as f64 / n as f64
        }
    }
}

/// What [`GpuModel::load_with`] builds.
#[derive(Clone, Debug)]
pub struct GpuModelOptions {
    /// Longest context in positions.
    pub capacity: usize,
    /// Tokens per forward call of a prefill chunk (the scratch is sized for it).
    pub max_tokens: usize,
    pub attention: AttentionMode,
    /// Keep the embedding table in mapped pinned host memory (one row per token crosses PCIe: 2 x hidden bytes)
    /// instead of HBM. Always so when the GPU has a memory limit ([`Gpu::set_memory_limit`]): what need not be on
    /// the GPU stays off it.
    pub host_embedding: bool,
    /// Where the layer-major prefill keeps the prompt's residual stream (2 x tokens x hidden bf16: 1 GiB at 128K):
    /// `None` in HBM unless the GPU memory cap refuses it, then in mapped host memory; `Some(true)` always in host
    /// memory; `Some(false)` always in HBM.
    pub prefill_residual_on_host: Option<bool>,
    /// Dense layers keep their K/V cache (`capacity` positions) in mapped pinned host memory instead of HBM, read
    /// and written by the same kernels over PCIe: what dense attention costs when the K/V must leave the GPU (the
    /// anchor of HGA's host tier). Prompts are then prefilled layer-major, like HGA's.
    pub dense_kv_on_host: bool,
}

impl GpuModelOptions {
    /// `capacity` positions, prefill chunks of `max_tokens`, `attention`; the embedding in HBM unless a cap is set,
    /// the prefill's residual stream in HBM unless the cap refuses it, dense K/V in HBM.
    pub fn new(capacity: usize, max_tokens: usize, attention: AttentionMode) -> Self {
        GpuModelOptions {
            capacity,
            max_tokens,
            attention,
            host_embedding: false,
            prefill_residual_on_host: None,
            dense_kv_on_host: false,
        }
    }
}

/// Groups per (layer, KV head) in one extent of the HGA arena: 4096 tokens per extent (403 MB at Qwen3-30B-A3B,
/// 48 layers x 4 KV heads), so the arena grows in a few large pinned allocations and never copies.
const ARENA_GROUPS_PER_EXTENT: usize = 256;

/// The model-wide state of the HGA mode.
struct HgaState {
    options: HgaOptions,
    memory: PinnedMemory,
    extents: Vec<Extent>,
    arena: ArenaTable,
    /// u32 [1]: the decode position as the HGA layers read it.
    pos: DeviceBuf<u32>,
    /// bf16 [n_kv][1][128]: the decode token's K and V as the rope kernel stages them (`cache_by_token`).
    k_new: DeviceBuf<bf16>,
    v_new: DeviceBuf<bf16>,
    /// The last layer-major prefill: GPU seconds of the layers' hand-off to their tiers (`prefill_history`), and
    /// whether its residual stream was in host memory.
    prefill_history_s: f64,
    prefill_residual_on_host: bool,
    /// Host seconds spent allocating (pinning) arena extents so far.
    arena_alloc_s: f64,
    /// The extents' bytes in the host book (`Gpu::host_memory`, [`HOST_ARENA`]).
    extent_charges: Vec<crate::memory::Charge>,
    /// The disk tier, when the history lives there instead of in the extents.
    disk: Option<DiskTier>,
}

/// The host book's label of the disk tier's group table ([`DiskTier`]).
pub const DISK_GROUP_TABLE: &str = "K/V group table (disk tier)";

/// The disk tier on the GPU path: the store (page file + RAM cache of mapped pinned pages) and the group table
/// `u64 [layers][n_kv][table_groups]` of block addresses that the append and gather kernels read instead of the
/// arena's extents. An entry is valid while its page is held: the open group's page until it closes (the store
/// never evicts an open page), a miss's page until the layer's gather has run (the next read happens after the
/// next layer's lookup, which the host waits for).
struct DiskTier {
    store: DiskStore<PinnedMemory>,
    table: MappedSlice<u64>,
    n_kv: usize,
    table_groups: usize,
    host_s: f64,
}

impl DiskTier {
    fn set(&mut self, layer: usize, h: usize, g: usize, addr: u64) {
        let i = (layer * self.n_kv + h) * self.table_groups + g;
        self.table.host_mut()[i] = addr;
    }

    /// Position `pos` of `layer` made writable for the append kernel (the GPU idle).
    fn open(&mut self, layer: usize, pos: usize) -> Result<(), crate::kv::KvError> {
        let t0 = std::time::Instant::now();
        let blocks = self.store.append_device(layer, pos)?;
        for (h, b) in blocks.into_iter().enumerate() {
            self.set(layer, h, pos / 16, b);
        }
        self.host_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// This step's misses of `layer` (per KV head) made resident, their addresses in the table (the GPU idle).
    fn serve(&mut self, layer: usize, misses: &[Vec<u32>]) -> Result<(), crate::kv::KvError> {
        let t0 = std::time::Instant::now();
        let sel: Vec<(usize, usize, usize)> =
            misses.iter().enumerate().flat_map(|(h, gs)| gs.iter().map(move |&g| (layer, h, g as usize))).collect();
        let blocks = self.store.device_blocks(&sel)?;
        for (&(l, h, g), b) in sel.iter().zip(blocks) {
            self.set(l, h, g, b);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.host_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// A prompt's K/V of `layer` (`[n_kv][n][128]` bf16 each, copied from the GPU) stored from position 0.
    fn store_prompt(&mut self, layer: usize, n: usize, k: &[bf16], v: &[bf16]) -> Result<(), crate::kv::KvError> {
        let t0 = std::time::Instant::now();
        self.store.append_raw(layer, 0, n, n, bytemuck::cast_slice(k), bytemuck::cast_slice(v))?;
        self.host_s += t0.elapsed().as_secs_f64();
        Ok(())
    }
}

/// One layer's K and V over a prompt of `len` tokens, `[n_kv][len][128]`: what the layer-major prefill's exact
/// attention reads, then hands to the layer's [`HgaLayer::prefill_history`].
struct PrefillKv {
    k: DeviceBuf<bf16>,
    v: DeviceBuf<bf16>,
    len: usize,
}

/// Activations and workspaces for up to `max_tokens` tokens per call.
struct Scratch {
    max_tokens: usize,
    h: [DeviceBuf<bf16>; 2],
    mlp_out: DeviceBuf<bf16>,
    xn: DeviceBuf<bf16>,
    xq: DeviceBuf<u8>,
    xs: DeviceBuf<f32>,
    /// [t, q | k | v] (the stacked projection's output)
    qkv: DeviceBuf<bf16>,
    qr: DeviceBuf<bf16>,
    attn: DeviceBuf<bf16>,
    lse: DeviceBuf<f32>,
    aq: DeviceBuf<u8>,
    as_: DeviceBuf<f32>,
    positions: DeviceBuf<u32>,
    ids: DeviceBuf<u32>,
    logits: DeviceBuf<f32>,
    decode: DecodeWorkspace,
    moe: Vec<MoeWorkspace>,
}

/// The embedding table: in HBM, or (under a GPU memory cap) in mapped pinned host memory, read one row per token.
enum Embedding {
    Device(DeviceBuf<bf16>),
    Host(MappedSlice<bf16>),
}

/// The model on one GPU.
pub struct GpuModel<'g> {
    gpu: &'g Gpu,
    config: Qwen3MoeConfig,
    embed: Embedding,
    norm: DeviceBuf<bf16>,
    lm_head: DeviceBuf<bf16>,
    layers: Vec<Layer>,
    /// Per layer: where its K/V lives and how it attends.
    kv: Vec<LayerKv>,
    scratch: Scratch,
    capacity: usize,
    len: usize,
    /// Which of `scratch.h` holds the residual stream (a forward flips it 2 x layers times: it never changes).
    cur: usize,
    /// Replay one-token steps from CUDA graphs (see [`GpuModel::set_decode_graphs`]).
    use_graphs: bool,
    /// Recorded one-token steps, one per context bound (`decode_bound`), in the order recorded.
    graphs: Vec<(usize, CudaGraph)>,
    /// Whether the GPU launched with programmatic dependent launch when `graphs` were recorded: a recording keeps
    /// the launch mode of its time, so they are recorded again when [`Gpu::set_pdl`] changed it.
    graphs_pdl: bool,
    /// The HGA mode's arena and staging buffers (`None`: dense).
    hga: Option<HgaState>,
    /// [`GpuModelOptions::prefill_residual_on_host`].
    prefill_residual_on_host: Option<bool>,
    /// Whether the dense layers' K/V caches are in mapped host memory ([`GpuModelOptions::dense_kv_on_host`]).
    dense_kv_on_host: bool,
    /// During a layer-major prefill: one layer's K/V over the prompt.
    prefill: Option<PrefillKv>,
    /// Record events between the kinds of work of a layer-major prefill ([`GpuModel::set_profile_prefill`]).
    profile_prefill: bool,
    prefill_parts: Parts,
    /// A selection trace replayed in place of the HGA routing ([`GpuModel::set_selection_replay`]).
    replay: Option<SelectionReplay>,
}

/// How a chunk's attention finds its start position.
#[derive(Clone, Copy)]
enum StartAt {
    /// Known on the host: a launch for exactly this start (prefill chunks: causal prefill attention).
    Host(usize),
    /// One token whose position is read from `scratch.positions[0]` when the kernel runs: split-K decode attention
    /// sized for any context up to this bound, so the same launches serve (and a recorded step replays) every
    /// position up to it.
    DeviceUpTo(usize),
}

/// Event marks between the launches of a profiled step ([`GpuModel::profile_decode_step`]).
enum Marks {
    Off,
    On(Vec<(&'static str, CudaEvent)>),
}

/// (what, marks merged, GPU ms), in first-seen order.
pub type Parts = Vec<(&'static str, usize, f64)>;

impl Marks {
    /// The GPU time between consecutive marks, merged by the later mark's label (after the stream has reached the
    /// last mark). Empty when off.
    fn parts(&self) -> Result<Parts, RuntimeError> {
        let Marks::On(marks) = self else { return Ok(Vec::new()) };
        let mut parts: Parts = Vec::new();
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1)? as f64;
            match parts.iter_mut().find(|p| p.0 == w[1].0) {
                Some(p) => {
                    p.1 += 1;
                    p.2 += ms;
                }
                None => parts.push((w[1].0, 1, ms)),
            }
        }
        Ok(parts)
    }

    /// Records an event after the work enqueued so far, labelled with the work since the previous mark.
    fn mark(&mut self, gpu: &Gpu, label: &'static str) -> Result<(), RuntimeError> {
        if let Marks::On(v) = self {
            let e = gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            e.record(gpu.stream())?;
            v.push((label, e));
        }
        Ok(())
    }
}

/// Where the GPU time of one decode step goes ([`GpuModel::profile_decode_step`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepProfile {
    /// Context length the step attended over (its position + 1).
    pub context: usize,
    /// (what, launches' marks merged, GPU ms over the whole step), in step order.
    pub parts: Vec<(&'static str, usize, f64)>,
    /// Sum of the parts, ms: the step's kernels back to back with the GPU never waiting for the host.
    pub total_ms: f64,
    /// Device-to-device copy bandwidth measured in the same call (GB/s, bytes read + written).
    pub copy_gbps: f64,
    /// The host had not finished enqueueing the step when the GPU got to it (then the parts include idle time).
    pub gpu_waited: bool,
}

/// The context bound of the recorded one-token step that serves context length `ctx`: the key tiles (64) rounded
/// up to a quarter of their power of two (at least 16 tiles), so the decode attention's split, sized for the
/// bound, runs at least 3/4 of its CTAs on real keys, and a 64K context needs about 30 recordings in all.
fn decode_bound(ctx: usize, capacity: usize) -> usize {
    let tiles = ctx.div_ceil(64).max(1);
    let step = (tiles.next_power_of_two() / 4).max(16);
    (tiles.div_ceil(step) * step * 64).min(capacity)
}

/// Refuses what the kernels cannot run (shared with the CPU emulation's loader).
pub(crate) fn check_supported(c: &Qwen3MoeConfig, capacity: usize, max_tokens: usize) -> Result<(), GpuModelError> {
    let unsupported = |m: String| Err(GpuModelError::Unsupported(m));
    if c.quantization.is_none() {
        return unsupported("the checkpoint is not FP8 (no quantization_config)".into());
    }
    if c.head_dim != 128 {
        return unsupported(format!("head_dim {} (the attention kernels are built for 128)", c.head_dim));
    }
    if !c.hidden_size.is_multiple_of(128) {
        return unsupported(format!("hidden_size {} is not a multiple of 128", c.hidden_size));
    }
    if capacity == 0 || max_tokens == 0 {
        return Err(GpuModelError::Input("capacity and max_tokens must be > 0".into()));
    }
    Ok(())
}

/// Layer `l`'s MLP as the MoE kernels run it: its dims (`tokens` set per call), its router tensor (`None`: a
/// dense SwiGLU MLP, run as one expert behind a zero router with routing weight 1, which is exactly
/// `down(silu(gate(x)) * up(x))`) and its expert modules.
pub(crate) fn mlp_as_moe(c: &Qwen3MoeConfig, l: usize) -> (MoeDims, Option<String>, Vec<String>) {
    let p = format!("model.layers.{l}.mlp");
    if c.is_moe_layer(l) {
        let dims = MoeDims {
            tokens: 1,
            hidden: c.hidden_size,
            inter: c.moe_intermediate_size,
            experts: c.num_experts,
            top_k: c.num_experts_per_tok,
            norm_topk: c.norm_topk_prob,
        };
        (dims, Some(format!("{p}.gate.weight")), (0..c.num_experts).map(|e| format!("{p}.experts.{e}")).collect())
    } else {
        let dims = MoeDims {
            tokens: 1,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            experts: 1,
            top_k: 1,
            norm_topk: true,
        };
        (dims, None, vec![p])
    }
}

/// A tensor of the checkpoint as bf16 on the host (any stored float dtype, or an F8_E4M3 tensor dequantized with its
/// block scales, via f32: round to nearest even).
pub(crate) fn bf16_host(ck: &Checkpoint, name: &str) -> Result<Vec<bf16>, GpuModelError> {
    Ok(ck.tensor_f32(name)?.into_iter().map(bf16::from_f32).collect())
}

fn bf16_tensor(gpu: &Gpu, what: &'static str, ck: &Checkpoint, name: &str) -> Result<DeviceBuf<bf16>, GpuModelError> {
    Ok(gpu.upload(what, &bf16_host(ck, name)?)?)
}

/// An FP8 weight the kernels can take: [128, 128] blocks, both dimensions multiples of 128. A weight the config calls
/// FP8 that is stored in float is quantized here ([`Checkpoint::fp8_weight_or_quantize`]).
pub(crate) fn checked_fp8_weight<'c>(ck: &'c Checkpoint, name: &str) -> Result<Fp8Weight<'c>, GpuModelError> {
    let w = ck.fp8_weight_or_quantize(name).map_err(|e| match e {
        ModelError::WrongDtype { .. } => GpuModelError::Unsupported(format!(
            "{e}: the GPU forward runs every attention and expert projection as a block-FP8 GEMM"
        )),
        e => e.into(),
    })?;
    if w.block != [128, 128] {
        return Err(GpuModelError::Unsupported(format!(
            "{name}: weight blocks {:?}, the kernels need [128, 128]",
            w.block
        )));
    }
    let [n, k] = w.shape;
    if !n.is_multiple_of(128) || !k.is_multiple_of(128) {
        return Err(GpuModelError::Unsupported(format!("{name}: shape [{n}, {k}] is not a multiple of 128")));
    }
    Ok(w)
}

fn fp8_linear(gpu: &Gpu, ck: &Checkpoint, name: &str) -> Result<Fp8Linear, GpuModelError> {
    fp8_linear_stacked(gpu, ck, &[name])
}

/// FP8 linears of one input stacked along n into one: their rows one after the other, and (n being multiples of
/// 128) their [n/128, k/128] scale blocks too. Each output is the same dot product as in its own linear; the
/// outputs of one input row lie side by side.
fn fp8_linear_stacked(gpu: &Gpu, ck: &Checkpoint, names: &[impl AsRef<str>]) -> Result<Fp8Linear, GpuModelError> {
    let (mut data, mut scales, mut n, mut k) = (Vec::new(), Vec::new(), 0, None);
    for name in names {
        let w = checked_fp8_weight(ck, name.as_ref())?;
        if k.is_some_and(|k| k != w.shape[1]) {
            return Err(GpuModelError::Unsupported(format!(
                "{}: {} input features, the linears stacked with it have {}",
                name.as_ref(),
                w.shape[1],
                k.unwrap_or(0)
            )));
        }
        k = Some(w.shape[1]);
        n += w.shape[0];
        data.extend_from_slice(&w.data);
        scales.extend_from_slice(&w.scales);
    }
    Ok(Fp8Linear {
        w: gpu.upload(ATTENTION_WEIGHTS, &data)?,
        s: gpu.upload(ATTENTION_WEIGHTS, &scales)?,
        n,
        k: k.unwrap_or(0),
    })
}

/// What decides whether an HGA layer's sketches go to HBM under a cap ([`build_kv`]).
#[derive(Clone, Copy, Debug)]
struct SketchFit {
    /// Bytes the accountant holds now.
    live: u64,
    /// The layer's sketches and scales.
    sketch_bytes: u64,
    /// One HGA layer's state without its sketches (each layer still to build needs it).
    other: u64,
    /// HGA layers after this one.
    later: usize,
    /// The layer-major prefill's K/V of one layer at the model's capacity.
    prefill_reserve: u64,
}

impl SketchFit {
    /// Whether HBM under `limit` holds this layer's sketches beside its own state, every later layer's state and
    /// the prefill's K/V.
    fn fits(&self, limit: u64) -> bool {
        let need = self.live + self.sketch_bytes + self.other * (1 + self.later as u64) + self.prefill_reserve;
        need <= limit
    }
}

/// How many routed-group slots per KV head the auto cache adds to every HGA layer under a GPU memory cap: what
/// the cap leaves once the weights, every layer's state and the scratch are in, less the prefill's transient
/// buffers (`transient`: the K/V of one layer and, unless it is forced to host memory, the residual stream, both at
/// the model's capacity) and a headroom for what is allocated outside the accountant's sight (CUDA graphs, the
/// driver's own), split equally over the HGA layers and their KV heads.
struct CacheFit {
    limit: u64,
    live: u64,
    transient: u64,
    hga_layers: usize,
    kv_heads: usize,
}

/// HBM the auto cache leaves unused under a cap ([`CacheFit`]).
const CACHE_HEADROOM: u64 = 256 << 20;

impl CacheFit {
    /// Extra slots per KV head and layer (0 when nothing is left).
    fn extra_slots(&self) -> usize {
        let left = self.limit.saturating_sub(self.live + self.transient + CACHE_HEADROOM);
        let per_slot = (KV_GROUP_BYTES + 12) as u64 * (self.hga_layers * self.kv_heads).max(1) as u64;
        (left / per_slot) as usize
    }
}

/// Each layer's K/V state: a dense GPU cache of `capacity` positions, or (HGA, from layer `dense_layers` on) an
/// [`HgaLayer`] sharing the model's attention workspace. Under a GPU memory cap the routing sketches (66 bytes per
/// token and KV head) of the HGA layers stay in HBM while HBM holds them beside everything else the model needs
/// (the other layers' state and the prefill's K/V of one layer at `capacity`, `PREFILL_KV`), and go to mapped host
/// memory otherwise, layer by layer from the last (`HgaOptions::sketches_on_host` forces one placement). Then, with
/// the auto cache (`HgaOptions::cache_slots` 0) under a cap, every HGA layer's GPU cache grows by the slots the cap
/// still leaves ([`CacheFit`]): the sketches come first (without them stage 2 reads over PCIe every step), the
/// cache gets the rest.
fn build_kv(
    gpu: &Gpu,
    c: &Qwen3MoeConfig,
    capacity: usize,
    hga: Option<&HgaState>,
    dense_on_host: bool,
    residual_on_host: Option<bool>,
) -> Result<Vec<LayerKv>, GpuModelError> {
    let (nh, nkv, nl) = (c.num_attention_heads, c.num_key_value_heads, c.num_hidden_layers);
    let dense = |gpu: &Gpu| -> Result<LayerKv, GpuModelError> {
        let cache = || Placed::<bf16>::zeroed(gpu, DENSE_KV, nkv * capacity * 128, dense_on_host, false);
        Ok(LayerKv::Dense { k_cache: cache()?, v_cache: cache()? })
    };
    let Some(st) = hga else { return (0..nl).map(|_| dense(gpu)).collect() };
    let first_hga = st.options.params.dense_layers.min(nl);
    let mut out: Vec<LayerKv> = (0..first_hga).map(|_| dense(gpu)).collect::<Result<_, _>>()?;
    let mem = gpu.memory();
    let sketch_bytes = (nkv * capacity * (HGA_HEAD_DIM / 2 + 2)) as u64;
    let prefill_reserve = (2 * nkv * capacity * HGA_HEAD_DIM * 2) as u64;
    // Bytes of one HGA layer without its sketches: measured on the first.
    let mut other: Option<u64> = None;
    for l in first_hga..nl {
        let fit =
            SketchFit { live: mem.live(), sketch_bytes, other: other.unwrap_or(0), later: nl - 1 - l, prefill_reserve };
        let on_host = match (st.options.sketches_on_host, mem.limit()) {
            (Some(forced), _) => forced,
            (None, None) => false,
            (None, Some(limit)) => !fit.fits(limit),
        };
        let mut cfg = HgaLayerConfig::with_params(l, nh, nkv, capacity, st.options.params.clone());
        cfg.cache_slots = st.options.cache_slots;
        cfg.sketches_on_host = on_host;
        let before = mem.live();
        out.push(LayerKv::Hga(Box::new(HgaLayer::new_sharing_workspace(gpu, &cfg, &st.arena)?)));
        if other.is_none() {
            other = Some((mem.live() - before).saturating_sub(if on_host { 0 } else { sketch_bytes }));
        }
    }
    // The auto cache under a cap: rebuild each (still empty) HGA layer with the slots the cap leaves.
    if let (0, Some(limit)) = (st.options.cache_slots, mem.limit()) {
        let residual = if residual_on_host == Some(true) { 0 } else { (2 * capacity * c.hidden_size * 2) as u64 };
        let fit = CacheFit {
            limit,
            live: mem.live(),
            transient: prefill_reserve + residual,
            hga_layers: nl - first_hga,
            kv_heads: nkv,
        };
        let extra = fit.extra_slots();
        if extra > 0 {
            for kv in std::mem::take(&mut out) {
                out.push(match kv {
                    LayerKv::Hga(hl) => {
                        let mut cfg = hl.config().clone();
                        // More slots than the context has groups would never be used.
                        let cc = cfg.cache_config()?;
                        cfg.cache_slots = (cc.cache_slots + extra).min(cc.table_groups.max(cc.cache_slots));
                        // The old layer goes first, so that the new one finds its HBM.
                        drop(hl);
                        LayerKv::Hga(Box::new(HgaLayer::new_sharing_workspace(gpu, &cfg, &st.arena)?))
                    }
                    dense => dense,
                });
            }
        }
    }
    Ok(out)
}

impl<'g> GpuModel<'g> {
    /// Uploads the checkpoint (`progress(done, total)` is called per layer) and allocates a K/V cache of
    /// `capacity` positions and scratch for up to `max_tokens` tokens per call.
    pub fn load(
        gpu: &'g Gpu,
        ck: &Checkpoint,
        capacity: usize,
        max_tokens: usize,
        progress: impl FnMut(usize, usize),
    ) -> Result<Self, GpuModelError> {
        let options = GpuModelOptions::new(capacity, max_tokens, AttentionMode::Dense);
        Self::load_with(gpu, ck, &options, progress)
    }

    /// Uploads the checkpoint (`progress(done, total)` per layer) with the attention mode of `options`: dense
    /// allocates a GPU K/V cache of `capacity` positions per layer; HGA allocates each layer's routing state and
    /// GPU cache for contexts up to `capacity` and keeps the K/V history in a host arena that grows with the
    /// context.
    pub fn load_with(
        gpu: &'g Gpu,
        ck: &Checkpoint,
        options: &GpuModelOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, GpuModelError> {
        let (capacity, max_tokens) = (options.capacity, options.max_tokens);
        let c = ck.config.clone();
        check_supported(&c, capacity, max_tokens)?;
        let hga_opts = match &options.attention {
            AttentionMode::Dense => None,
            AttentionMode::Hga(o) => Some(o.clone()),
        };
        let hga = match &hga_opts {
            None => None,
            Some(o) => {
                o.params.validate().map_err(|e| GpuModelError::Input(format!("hga parameters: {e}")))?;
                let layout = ArenaLayout {
                    layers: c.num_hidden_layers,
                    kv_heads: c.num_key_value_heads,
                    groups_per_extent: ARENA_GROUPS_PER_EXTENT,
                };
                let max_extents = capacity.div_ceil(16).div_ceil(ARENA_GROUPS_PER_EXTENT);
                let mut arena = ArenaTable::new(gpu, layout, &[], max_extents)?;
                let disk = match &o.disk {
                    None => None,
                    Some(cfg) => {
                        let memory = PinnedMemory::new(gpu.context().clone());
                        let store = DiskStore::open(
                            memory.clone(),
                            layout.layers,
                            layout.kv_heads,
                            BlockFormat::STANDARD,
                            cfg.clone(),
                        )
                        .map_err(RuntimeError::from)?;
                        let table_groups = capacity.div_ceil(16);
                        let n = layout.layers * layout.kv_heads * table_groups;
                        let mut table = MappedSlice::<u64>::zeroed(&memory, gpu.stream(), n)
                            .map_err(|e| RuntimeError::HostMemory(format!("the disk tier's group table: {e}")))?
                            .booked(gpu.host_memory(), DISK_GROUP_TABLE);
                        arena.set_group_table(dptr(gpu, &table).0, table_groups);
                        table.host_mut().fill(0);
                        Some(DiskTier { store, table, n_kv: layout.kv_heads, table_groups, host_s: 0.0 })
                    }
                };
                Some(HgaState {
                    options: o.clone(),
                    memory: PinnedMemory::new(gpu.context().clone()),
                    extents: Vec::new(),
                    arena,
                    pos: gpu.alloc_zeros::<u32>(ACTIVATIONS, 1)?,
                    k_new: gpu.alloc_zeros::<bf16>(ACTIVATIONS, c.num_key_value_heads * 128)?,
                    v_new: gpu.alloc_zeros::<bf16>(ACTIVATIONS, c.num_key_value_heads * 128)?,
                    prefill_history_s: 0.0,
                    prefill_residual_on_host: false,
                    arena_alloc_s: 0.0,
                    extent_charges: Vec::new(),
                    disk,
                })
            }
        };
        let (h, nh, nkv) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut moe_dims: Vec<MoeDims> = Vec::new();
        // One workspace per distinct (inter, experts, top_k): a layer always uses its own.
        let mut ws_of = |d: &MoeDims| match moe_dims
            .iter()
            .position(|m| m.inter == d.inter && m.experts == d.experts && m.top_k == d.top_k)
        {
            Some(i) => i,
            None => {
                moe_dims.push(*d);
                moe_dims.len() - 1
            }
        };
        for l in 0..c.num_hidden_layers {
            progress(l, c.num_hidden_layers);
            let p = format!("model.layers.{l}");
            let (dims, router, modules) = mlp_as_moe(&c, l);
            let router = match router {
                Some(name) => bf16_tensor(gpu, ROUTERS, ck, &name)?,
                None => gpu.upload(ROUTERS, &vec![bf16::ZERO; h])?,
            };
            let mlp = Mlp::Moe {
                router,
                experts: MoeExpertWeights::upload(gpu, &stack_experts(ck, &modules)?)?,
                ws: ws_of(&dims),
                dims,
            };
            layers.push(Layer {
                input_layernorm: bf16_tensor(gpu, NORMS, ck, &format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: bf16_tensor(gpu, NORMS, ck, &format!("{p}.post_attention_layernorm.weight"))?,
                qkv_proj: fp8_linear_stacked(
                    gpu,
                    ck,
                    &["q_proj", "k_proj", "v_proj"].map(|m| format!("{p}.self_attn.{m}.weight")),
                )?,
                o_proj: fp8_linear(gpu, ck, &format!("{p}.self_attn.o_proj.weight"))?,
                q_norm: bf16_tensor(gpu, NORMS, ck, &format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: bf16_tensor(gpu, NORMS, ck, &format!("{p}.self_attn.k_norm.weight"))?,
                mlp,
            });
        }
        let lm_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let t = max_tokens;
        let z16 = |n: usize| gpu.alloc_zeros::<bf16>(ACTIVATIONS, n);
        let scratch = Scratch {
            max_tokens: t,
            h: [z16(t * h)?, z16(t * h)?],
            mlp_out: z16(t * h)?,
            xn: z16(t * h)?,
            xq: gpu.alloc_zeros::<u8>(ACTIVATIONS, t * h)?,
            xs: gpu.alloc_zeros::<f32>(ACTIVATIONS, t * h / 128)?,
            qkv: z16(t * (nh + 2 * nkv) * 128)?,
            qr: z16(t * nh * 128)?,
            attn: z16(t * nh * 128)?,
            lse: gpu.alloc_zeros::<f32>(ACTIVATIONS, t * nh)?,
            aq: gpu.alloc_zeros::<u8>(ACTIVATIONS, t * nh * 128)?,
            as_: gpu.alloc_zeros::<f32>(ACTIVATIONS, t * nh)?,
            positions: gpu.alloc_zeros::<u32>(ACTIVATIONS, t)?,
            ids: gpu.alloc_zeros::<u32>(ACTIVATIONS, t)?,
            logits: gpu.alloc_zeros::<f32>(ACTIVATIONS, LM_HEAD_MAX_M * c.vocab_size)?,
            decode: DecodeWorkspace::new(gpu, 1, nh, DECODE_MAX_SPLITS)?,
            moe: moe_dims
                .iter()
                .map(|d| MoeWorkspace::new(gpu, d, t, t > MOE_DECODE_MAX_TOKENS))
                .collect::<Result<_, _>>()?,
        };
        let embed = if options.host_embedding || gpu.memory().limit().is_some() {
            let table = bf16_host(ck, "model.embed_tokens.weight")?;
            Embedding::Host(
                MappedSlice::upload(&PinnedMemory::new(gpu.context().clone()), gpu.stream(), &table)
                    .map_err(|e| GpuModelError::Input(format!("the embedding table in mapped host memory: {e}")))?
                    .booked(gpu.host_memory(), EMBEDDING),
            )
        } else {
            Embedding::Device(bf16_tensor(gpu, EMBEDDING, ck, "model.embed_tokens.weight")?)
        };
        let norm = bf16_tensor(gpu, NORMS, ck, "model.norm.weight")?;
        let lm_head = bf16_tensor(gpu, LM_HEAD, ck, lm_name)?;
        // The K/V state last, once every weight is in: under a cap, the HGA layers' sketches go to host memory
        // where HBM cannot hold them beside the rest (see `build_kv`).
        let kv = build_kv(gpu, &c, capacity, hga.as_ref(), options.dense_kv_on_host, options.prefill_residual_on_host)?;
        progress(c.num_hidden_layers, c.num_hidden_layers);
        let mut model = GpuModel {
            gpu,
            embed,
            norm,
            lm_head,
            kv,
            config: c,
            layers,
            scratch,
            capacity,
            len: 0,
            cur: 0,
            use_graphs: true,
            graphs: Vec::new(),
            graphs_pdl: gpu.pdl_enabled(),
            hga,
            prefill_residual_on_host: options.prefill_residual_on_host,
            dense_kv_on_host: options.dense_kv_on_host,
            prefill: None,
            profile_prefill: false,
            prefill_parts: Vec::new(),
            replay: None,
        };
        if hga_opts.as_ref().is_some_and(|o| o.arena_at_load) {
            model.ensure_arena(capacity)?;
        }
        Ok(model)
    }

    pub fn config(&self) -> &Qwen3MoeConfig {
        &self.config
    }
    /// Positions in the cache (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Forgets the cached positions (a new sequence; in HGA mode the layers' GPU caches are emptied when it
    /// starts).
    pub fn reset(&mut self) {
        self.len = 0;
    }
    /// The attention mode's name: "dense" or "hga".
    pub fn attention_name(&self) -> &'static str {
        if self.hga.is_some() {
            "hga"
        } else {
            "dense"
        }
    }
    /// Cache capacity in positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Whether one-token steps are replayed from CUDA graphs (the default): the whole step (about 12 launches per
    /// layer) is recorded once per context bound and then costs one host call, so the GPU never waits for the
    /// host between kernels. Off: the same launches, with the same parameters, are issued from the host one by
    /// one (the results are identical, bit for bit). Either way the kernels are launched with programmatic
    /// dependent launch where the `Gpu` has it on ([`Gpu::set_pdl`]); recorded steps follow a change of that
    /// setting (they are recorded again).
    pub fn set_decode_graphs(&mut self, on: bool) {
        self.use_graphs = on;
    }
    /// Profile the next layer-major prefills (HGA, or dense with its K/V in host memory): an event between every
    /// kind of work of every layer and chunk ([`GpuModel::prefill_profile`]). The events keep PDL from overlapping
    /// the parts, so a profiled prefill runs a little slower.
    pub fn set_profile_prefill(&mut self, on: bool) {
        self.profile_prefill = on;
    }
    /// The last profiled layer-major prefill: (what, times, GPU ms) summed over the layers and chunks, in order
    /// (empty when not profiled).
    pub fn prefill_profile(&self) -> &[(&'static str, usize, f64)] {
        &self.prefill_parts
    }
    /// How many one-token steps are recorded (CUDA graphs held).
    pub fn recorded_steps(&self) -> usize {
        self.graphs.len()
    }

    /// Runs `tokens` (in chunks of at most `max_tokens`) after the cached positions and returns the f32 logits of
    /// every token ([tokens, vocab], row-major) when `all_logits`, else of the last one only.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, GpuModelError> {
        self.forward_with_progress(tokens, all_logits, |_, _| {})
    }

    /// [`GpuModel::forward`], calling `progress(tokens done, tokens)` after each chunk (for a progress bar on long
    /// prefills).
    pub fn forward_with_progress(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<f32>, GpuModelError> {
        if tokens.is_empty() {
            return Err(GpuModelError::Input("no tokens given".into()));
        }
        if self.len + tokens.len() > self.capacity {
            return Err(GpuModelError::Input(format!(
                "{} cached + {} new tokens exceed the K/V cache capacity {}",
                self.len,
                tokens.len(),
                self.capacity
            )));
        }
        if self.hga.is_some() || self.dense_kv_on_host {
            self.ensure_arena(self.len + tokens.len())?;
            let v = self.config.vocab_size;
            if let Some((i, id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= v) {
                return Err(GpuModelError::Input(format!("token {i} is {id}, not below the vocabulary size {v}")));
            }
            if self.len == 0 && tokens.len() > 1 {
                return self.prefill_layer_major(tokens, all_logits, progress);
            }
            // After a prompt (or for a one-token prompt): decode steps (HGA: each routed; a dense cache in host
            // memory: each over the mapped cache). A sequence that starts here empties the layers' GPU caches first
            // (a prefill does so itself).
            if self.len == 0 {
                for kv in &mut self.kv {
                    if let LayerKv::Hga(hl) = kv {
                        hl.cache.reset(self.gpu)?;
                    }
                }
            }
            let n = tokens.len();
            let mut out = Vec::with_capacity(if all_logits { n * v } else { v });
            for (i, &tk) in tokens.iter().enumerate() {
                let logits = self.forward_chunk(&[tk], true, true)?;
                if all_logits || i + 1 == n {
                    out.extend(logits);
                }
                progress(i + 1, n);
            }
            return Ok(out);
        }
        let mut out = Vec::new();
        let (n, chunk) = (tokens.len(), self.scratch.max_tokens);
        for (i, c) in tokens.chunks(chunk).enumerate() {
            // Without all_logits only the last chunk's last row is wanted: earlier chunks skip the lm_head.
            let last = (i + 1) * chunk >= n;
            out = if all_logits || last {
                let logits = self.forward_chunk(c, all_logits, true)?;
                if all_logits {
                    out.extend(logits);
                    out
                } else {
                    logits
                }
            } else {
                self.forward_chunk(c, false, false)?;
                out
            };
            progress((i * chunk + c.len()).min(n), n);
        }
        Ok(out)
    }

    /// Grows the HGA arena to hold positions `0 .. tokens`: new extents of mapped pinned memory (nothing already
    /// there moves) and their addresses in the device table.
    fn ensure_arena(&mut self, tokens: usize) -> Result<(), GpuModelError> {
        let Some(st) = self.hga.as_mut().filter(|st| st.disk.is_none()) else { return Ok(()) };
        let need = tokens.div_ceil(16).div_ceil(ARENA_GROUPS_PER_EXTENT);
        if need <= st.extents.len() {
            return Ok(());
        }
        let bytes = st.arena.layout.extent_bytes();
        if let Some(limit) = st.options.host_kv_limit.filter(|&l| (need * bytes) as u64 > l) {
            return Err(GpuModelError::Input(format!(
                "the HGA arena for {tokens} positions needs {need} extents of {} ({}), over the host K/V limit {}",
                crate::memory::human(bytes as u64),
                crate::memory::human((need * bytes) as u64),
                crate::memory::human(limit)
            )));
        }
        let t0 = std::time::Instant::now();
        while st.extents.len() < need {
            let e = st.memory.alloc(bytes).map_err(|e| {
                GpuModelError::Input(format!(
                    "the HGA arena (mapped pinned host memory) could not grow to {need} extents of {:.1} MiB for \
                     {tokens} positions: {e}",
                    bytes as f64 / (1u64 << 20) as f64
                ))
            })?;
            st.extents.push(e);
            st.extent_charges.extend(self.gpu.host_memory().charge(HOST_ARENA, bytes as u64).ok());
        }
        st.arena.update(self.gpu, &st.extents)?;
        st.arena_alloc_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The disk tier (if on): position `pos` of every HGA layer opened for the append kernel, before a decode
    /// step (the GPU idle). Returns whether the disk tier is on.
    fn disk_open_step(&mut self, pos: usize) -> Result<bool, RuntimeError> {
        let Some(d) = self.hga.as_mut().and_then(|st| st.disk.as_mut()) else { return Ok(false) };
        for (l, kv) in self.kv.iter().enumerate() {
            if let LayerKv::Hga(_) = kv {
                d.open(l, pos)?;
            }
        }
        Ok(true)
    }

    /// The HGA mode's counters so far (`None` when dense): the layers' GPU caches summed (read from mapped memory,
    /// no synchronization: exact once the stream is idle) and the tokens the last step attended per (layer, KV
    /// head) (read from the device: synchronizes).
    pub fn hga_stats(&self) -> Result<Option<HgaStats>, GpuModelError> {
        let Some(st) = self.hga.as_ref() else { return Ok(None) };
        let disk = st.disk.as_ref().map(|d| (d.store.stats(), d.host_s));
        let mut out = HgaStats {
            arena_bytes: match &disk {
                Some((ds, _)) => ds.resident_bytes as usize,
                None => st.extents.len() * st.arena.layout.extent_bytes(),
            },
            disk_ram_hits: disk.as_ref().map_or(0, |(d, _)| d.hits),
            disk_ram_misses: disk.as_ref().map_or(0, |(d, _)| d.misses),
            disk_bytes_read: disk.as_ref().map_or(0, |(d, _)| d.bytes_read),
            disk_bytes_written: disk.as_ref().map_or(0, |(d, _)| d.bytes_written),
            disk_host_s: disk.as_ref().map_or(0.0, |d| d.1),
            prefill_history_s: st.prefill_history_s,
            prefill_residual_on_host: st.prefill_residual_on_host,
            arena_alloc_s: st.arena_alloc_s,
            ..Default::default()
        };
        let mut entries = Vec::new();
        for kv in &self.kv {
            if let LayerKv::Hga(hl) = kv {
                let c = hl.cache_totals();
                out.hga_layers += 1;
                let cc = hl.cache.cfg;
                (out.cache_slots, out.max_groups) = (cc.cache_slots, cc.max_groups);
                out.sketch_host_layers += usize::from(hl.summaries().sketch.is_host());
                out.hits += c.hits;
                out.misses += c.misses;
                out.h2d_bytes += c.bytes;
                // `total` sums the KV heads' counters, each of which counts every step.
                out.steps = out.steps.max(c.steps / self.config.num_key_value_heads as u64);
                entries.extend(self.gpu.stream().clone_dtoh(&hl.cache.n_entries)?);
            }
        }
        if !entries.is_empty() {
            out.routed_tokens_last_step = entries.iter().map(|&e| e as f64 * 16.0).sum::<f64>() / entries.len() as f64;
        }
        Ok(Some(out))
    }

    /// The groups the last decode step selected, per HGA layer and KV head: `(layer, [n_kv][groups ascending])`
    /// (read from the device: synchronizes).
    pub fn hga_selections(&self) -> Result<Vec<LayerSelection>, GpuModelError> {
        let mut out = Vec::new();
        for (l, kv) in self.kv.iter().enumerate() {
            if let LayerKv::Hga(hl) = kv {
                let sel = self.gpu.stream().clone_dtoh(&hl.selected)?;
                let per = sel.len() / self.config.num_key_value_heads;
                out.push((
                    l,
                    sel.chunks(per).map(|c| c.iter().copied().filter(|&g| g != u32::MAX).collect()).collect(),
                ));
            }
        }
        Ok(out)
    }

    /// Host bytes of the HGA arena (0 when dense).
    pub fn arena_bytes(&self) -> usize {
        self.hga.as_ref().map_or(0, |st| st.extents.len() * st.arena.layout.extent_bytes())
    }

    /// The exact layer-major prefill of a prompt (HGA mode, from position 0): every layer runs over the whole
    /// prompt in chunks of `max_tokens` with only that layer's K/V of the prompt on the GPU (`[n_kv][n][128]`,
    /// exact causal prefill attention), which then goes to the layer's tiers (`HgaLayer::prefill_history`: the
    /// arena, the summaries, the sink and the window). The residual stream of the prompt and the pending MLP
    /// output live on the GPU for the prefill (2 x n x hidden bf16). Returns the logits as `forward`.
    fn prefill_layer_major(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        progress: impl FnMut(usize, usize),
    ) -> Result<Vec<f32>, GpuModelError> {
        let r = self.prefill_layer_major_in(tokens, all_logits, progress);
        // The prompt's K/V of one layer is freed whatever happened.
        self.prefill = None;
        r
    }

    fn prefill_layer_major_in(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<f32>, GpuModelError> {
        let gpu = self.gpu;
        let s = gpu.stream().clone();
        let (n, chunk) = (tokens.len(), self.scratch.max_tokens);
        let c = &self.config;
        let (h, v, nkv, nl) = (c.hidden_size, c.vocab_size, c.num_key_value_heads, c.num_hidden_layers);
        if let Some((i, id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(GpuModelError::Input(format!("token {i} is {id}, not below the vocabulary size {v}")));
        }
        let kv = |_| gpu.alloc_zeros::<bf16>(PREFILL_KV, nkv * n * 128);
        let (k, v_) = (kv(0)?, kv(1)?);
        self.prefill = Some(PrefillKv { k, v: v_, len: n });
        // The prompt's residual stream and pending MLP output: in HBM when the cap holds them, else in mapped host
        // memory; each chunk is copied in and out of the scratch per layer either way.
        let host = self.prefill_residual_on_host;
        let h_all = Placed::<bf16>::zeroed(gpu, PREFILL_RESIDUAL, n * h, host == Some(true), host.is_none())?;
        let mlp_all = Placed::<bf16>::zeroed(gpu, PREFILL_RESIDUAL, n * h, host == Some(true), host.is_none())?;
        let (ph, pm) = (dptr(gpu, &h_all).0, dptr(gpu, &mlp_all).0);
        let row = (h * 2) as u64;
        let chunks: Vec<(usize, usize)> = (0..n).step_by(chunk).map(|s0| (s0, (n - s0).min(chunk))).collect();
        for &(s0, t) in &chunks {
            s.memcpy_htod(&tokens[s0..s0 + t], &mut self.scratch.ids.slice_mut(0..t))?;
            let sc = &mut self.scratch;
            embed_rows(gpu, &self.embed, &sc.ids.slice(0..t), t, &mut sc.h[0].slice_mut(0..t * h), v, h)?;
            copy_async(gpu, ph + s0 as u64 * row, dptr(gpu, &*sc.h[0]).0, t as u64 * row)?;
        }
        // Events around each layer's hand-off to its tiers (`prefill_history`): their GPU time is reported. With
        // `profile_prefill`, events between every kind of work too.
        let mut history = Vec::with_capacity(nl);
        let mut marks = if self.profile_prefill { Marks::On(Vec::new()) } else { Marks::Off };
        marks.mark(gpu, "start")?;
        {
            for l in 0..nl {
                for &(s0, t) in &chunks {
                    let pos: Vec<u32> = (s0..s0 + t).map(|p| p as u32).collect();
                    let sc = &mut self.scratch;
                    s.memcpy_htod(&pos, &mut sc.positions.slice_mut(0..t))?;
                    let (off, bytes) = (s0 as u64 * row, t as u64 * row);
                    copy_async(gpu, dptr(gpu, &*sc.h[0]).0, ph + off, bytes)?;
                    if l > 0 {
                        copy_async(gpu, dptr(gpu, &*sc.mlp_out).0, pm + off, bytes)?;
                    }
                    marks.mark(gpu, "residual stream copies (in and out)")?;
                    let cur = self.enqueue_layer(l, t, StartAt::Host(s0), 0, &mut marks)?;
                    let sc = &self.scratch;
                    copy_async(gpu, ph + off, dptr(gpu, &*sc.h[cur]).0, bytes)?;
                    copy_async(gpu, pm + off, dptr(gpu, &*sc.mlp_out).0, bytes)?;
                    marks.mark(gpu, "residual stream copies (in and out)")?;
                }
                let p = self.prefill.as_ref().expect("the prefill's K/V were allocated above");
                let ev = || gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
                let (e0, e1) = (ev()?, ev()?);
                e0.record(&s)?;
                match (&mut self.kv[l], self.hga.as_mut()) {
                    (LayerKv::Hga(hl), Some(st)) => {
                        hl.prefill_history_strided(gpu, &p.k, &p.v, n, (n * 128, 128), &st.arena)?;
                        // The disk tier: the layer's K/V to the host, then into the store.
                        if let Some(d) = st.disk.as_mut() {
                            let (k, v) = (s.clone_dtoh(&*p.k)?, s.clone_dtoh(&*p.v)?);
                            d.store_prompt(l, n, &k, &v).map_err(RuntimeError::from)?;
                        }
                    }
                    // A dense cache in host memory: the prompt's rows of each KV head, one copy each.
                    (LayerKv::Dense { k_cache, v_cache }, _) if k_cache.is_host() => {
                        let (cap, head) = (self.capacity as u64, (n * 128 * 2) as u64);
                        for (dst, src) in
                            [(dptr(gpu, &*k_cache).0, dptr(gpu, &*p.k).0), (dptr(gpu, &*v_cache).0, dptr(gpu, &*p.v).0)]
                        {
                            for kh in 0..nkv as u64 {
                                copy_async(gpu, dst + kh * cap * 256, src + kh * head, head)?;
                            }
                        }
                    }
                    _ => {}
                }
                e1.record(&s)?;
                history.push((e0, e1));
                marks.mark(gpu, "hand-off to the tiers (summaries, arena, window)")?;
                progress(((l + 1) * n) / nl, n);
            }
        }
        // The final norm and lm_head of the rows asked for.
        let mut out = Vec::with_capacity(if all_logits { n * v } else { v });
        for &(s0, t) in &chunks {
            if !all_logits && s0 + t < n {
                continue;
            }
            let (sc, off, bytes) = (&self.scratch, s0 as u64 * row, t as u64 * row);
            copy_async(gpu, dptr(gpu, &*sc.h[0]).0, ph + off, bytes)?;
            copy_async(gpu, dptr(gpu, &*sc.mlp_out).0, pm + off, bytes)?;
            self.enqueue_final_norm(t, 0, &mut Marks::Off)?;
            let rows: Vec<usize> = if all_logits { (0..t).collect() } else { vec![t - 1] };
            for r in rows.chunks(LM_HEAD_MAX_M) {
                self.enqueue_lm_head(r[0], r.len())?;
                out.extend(s.clone_dtoh(&self.scratch.logits.slice(0..r.len() * v))?);
            }
        }
        self.len = n;
        gpu.synchronize()?;
        let mut history_ms = 0.0;
        for (e0, e1) in &history {
            history_ms += e0.elapsed_ms(e1)? as f64;
        }
        self.prefill_parts = marks.parts()?;
        if let Some(st) = self.hga.as_mut() {
            st.prefill_history_s = history_ms * 1e-3;
            st.prefill_residual_on_host = h_all.is_host() || mlp_all.is_host();
        }
        Ok(out)
    }

    /// One chunk: the logits of every token (`all_logits`) or of the last, or none (`!want_logits`: the chunk only
    /// fills the cache).
    fn forward_chunk(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        want_logits: bool,
    ) -> Result<Vec<f32>, GpuModelError> {
        let gpu = self.gpu;
        let s = gpu.stream().clone();
        let (t, v) = (tokens.len(), self.config.vocab_size);
        if let Some((i, id)) = tokens.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            return Err(GpuModelError::Input(format!("token {i} is {id}, not below the vocabulary size {v}")));
        }
        let start = self.len;
        let pos: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        let sc = &mut self.scratch;
        s.memcpy_htod(&pos, &mut sc.positions.slice_mut(0..t))?;
        s.memcpy_htod(tokens, &mut sc.ids.slice_mut(0..t))?;
        if let Some(st) = self.hga.as_mut() {
            s.memcpy_htod(&pos[..1], &mut st.pos)?;
        }
        let mut out = Vec::with_capacity(if all_logits { t * v } else { v });
        if t == 1 {
            // One token: the recorded step (or, with graphs off, the same launches from the host: same results).
            // The disk tier's steps are launched from the host (they wait for each layer's lookup).
            let bound = decode_bound(start + 1, self.capacity);
            let disk = self.disk_open_step(start)?;
            if self.use_graphs && !disk {
                if self.graphs_pdl != gpu.pdl_enabled() {
                    self.graphs.clear();
                    self.graphs_pdl = gpu.pdl_enabled();
                }
                let at = match self.graphs.iter().position(|(b, _)| *b == bound) {
                    Some(i) => i,
                    None => {
                        let cur = self.cur;
                        let graph = gpu.capture(|| {
                            let c = self.enqueue_layers(1, StartAt::DeviceUpTo(bound), &mut Marks::Off)?;
                            debug_assert_eq!(c, cur, "a forward flips the residual buffers an even number of times");
                            self.enqueue_lm_head(0, 1)
                        })?;
                        // A capture that the driver refused with PDL is recorded without it (Gpu::capture).
                        self.graphs_pdl = gpu.pdl_enabled();
                        self.graphs.push((bound, graph));
                        self.graphs.len() - 1
                    }
                };
                self.graphs[at].1.launch()?;
            } else {
                self.cur = self.enqueue_layers(1, StartAt::DeviceUpTo(bound), &mut Marks::Off)?;
                self.enqueue_lm_head(0, 1)?;
            }
            self.replay_next_step()?;
            out.extend(s.clone_dtoh(&self.scratch.logits.slice(0..v))?);
        } else {
            self.cur = self.enqueue_layers(t, StartAt::Host(start), &mut Marks::Off)?;
            let rows: Vec<usize> = match (want_logits, all_logits) {
                (false, _) => vec![],
                (true, true) => (0..t).collect(),
                (true, false) => vec![t - 1],
            };
            for r in rows.chunks(LM_HEAD_MAX_M) {
                self.enqueue_lm_head(r[0], r.len())?;
                out.extend(s.clone_dtoh(&self.scratch.logits.slice(0..r.len() * v))?);
            }
        }
        self.len += t;
        gpu.synchronize()?;
        Ok(out)
    }

    /// Runs one decode step of `token` (like `forward(&[token], false)`, whose logits it returns) with an event
    /// between its kinds of work, and reports the GPU time of each: the parts, summed, are the step as its kernels
    /// run back to back. The launches are the ones a recorded step replays (issued from the host here); the GPU is
    /// first kept busy with device copies (which also give the copy bandwidth of this call) so that the host has
    /// queued the whole step before the GPU starts it.
    pub fn profile_decode_step(&mut self, token: u32) -> Result<(StepProfile, Vec<f32>), GpuModelError> {
        let gpu = self.gpu;
        let s = gpu.stream().clone();
        let v = self.config.vocab_size;
        if token as usize >= v {
            return Err(GpuModelError::Input(format!("token {token} is not below the vocabulary size {v}")));
        }
        if self.len + 1 > self.capacity {
            return Err(GpuModelError::Input(format!("the K/V cache is full ({} positions)", self.capacity)));
        }
        let start = self.len;
        s.memcpy_htod(&[start as u32], &mut self.scratch.positions.slice_mut(0..1))?;
        s.memcpy_htod(&[token], &mut self.scratch.ids.slice_mut(0..1))?;
        if self.hga.is_some() {
            if start == 0 {
                return Err(GpuModelError::Input("profile a decode step after a prompt".into()));
            }
            self.ensure_arena(start + 1)?;
            self.disk_open_step(start)?;
            let st = self.hga.as_mut().expect("checked above");
            s.memcpy_htod(&[start as u32], &mut st.pos)?;
        }
        const COPY: usize = 256 << 20;
        const COPIES: usize = 64;
        let copy_buf = || gpu.alloc_zeros::<u8>("profile copy buffers", COPY);
        let (mut a, mut b) = (copy_buf()?, copy_buf()?);
        let ev = || gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let (c0, c1) = (ev()?, ev()?);
        c0.record(&s)?;
        for i in 0..COPIES {
            if i % 2 == 0 {
                s.memcpy_dtod(&a, &mut b)?;
            } else {
                s.memcpy_dtod(&b, &mut a)?;
            }
        }
        c1.record(&s)?;
        let mut marks = Marks::On(Vec::new());
        marks.mark(gpu, "start")?;
        let bound = decode_bound(start + 1, self.capacity);
        self.cur = self.enqueue_layers(1, StartAt::DeviceUpTo(bound), &mut marks)?;
        self.enqueue_lm_head(0, 1)?;
        marks.mark(gpu, "lm_head")?;
        let gpu_waited = c1.try_is_complete()?;
        let logits = s.clone_dtoh(&self.scratch.logits.slice(0..v))?;
        gpu.synchronize()?;
        self.len += 1;
        let copy_gbps = (2 * COPY * COPIES) as f64 / (c0.elapsed_ms(&c1)? as f64 * 1e-3) / 1e9;
        let parts = marks.parts()?;
        let total_ms = parts.iter().map(|p| p.2).sum();
        Ok((StepProfile { context: start + 1, parts, total_ms, copy_gbps, gpu_waited }, logits))
    }

    /// Bytes a decode step at context `ctx` must read at least: every weight it uses once (attention projections,
    /// norms, routers, the top-k experts of every MoE layer or the dense MLP, lm_head, one embedding row) and, per
    /// layer, the K/V it attends: a dense layer's cache of `ctx` positions; an HGA layer's routed working set
    /// (sink + window + the selection's groups, at most `ctx`) plus what its routing reads (the min/max of every
    /// closed chunk, 512 B per chunk and KV head, and the sketches of the shortlisted chunks, 66 B per token).
    /// The misses an HGA step gathers over PCIe are not counted (another floor: bytes over the link).
    pub fn decode_bytes_floor(&self, ctx: usize) -> u64 {
        let c = &self.config;
        let (h, nh, nkv) = (c.hidden_size as u64, c.num_attention_heads as u64, c.num_key_value_heads as u64);
        let fp8 = |n: u64, k: u64| n * k + (n / 128) * (k / 128) * 4;
        let mut total = 2 * c.vocab_size as u64 * h + 2 * h + 2 * h; // lm_head, an embedding row, the final norm
        for l in 0..c.num_hidden_layers {
            total += fp8(nh * 128, h) + 2 * fp8(nkv * 128, h) + fp8(h, nh * 128) + 2 * 2 * h + 2 * 2 * 128;
            let (d, router, _) = mlp_as_moe(c, l);
            if router.is_some() {
                total += 2 * d.experts as u64 * h;
            }
            let i = d.inter as u64;
            total += d.top_k as u64 * (2 * fp8(i, h) + fp8(h, i));
            total += match &self.kv[l] {
                LayerKv::Dense { .. } => 2 * 2 * nkv * 128 * ctx as u64,
                LayerKv::Hga(hl) => {
                    let r = hl.route_shape();
                    let attended = (hl.attend_shape().max_entries * 16).min(ctx) as u64;
                    let shortlisted = (r.max_kept * 64).min(ctx) as u64;
                    nkv * (2 * 2 * 128 * attended + 512 * (ctx / 64) as u64 + 66 * shortlisted)
                }
            };
        }
        total
    }

    /// lm_head of the final-norm rows `r0 .. r0 + m` (m <= LM_HEAD_MAX_M) into `scratch.logits`.
    fn enqueue_lm_head(&mut self, r0: usize, m: usize) -> Result<(), RuntimeError> {
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let sc = &mut self.scratch;
        hga_lm_head(
            self.gpu,
            &sc.xn.slice(r0 * h..(r0 + m) * h),
            &self.lm_head,
            &mut sc.logits.slice_mut(0..m * v),
            m,
            v,
            h,
        )
    }

    /// Enqueues the forward of the `t` tokens whose ids and positions are in `scratch.ids` / `scratch.positions`
    /// (embedding, every layer, the final norm into `scratch.xn`) and returns the residual buffer index after it.
    /// Only kernel launches (and, when profiling, event records): it can be recorded into a CUDA graph.
    fn enqueue_layers(&mut self, t: usize, at: StartAt, marks: &mut Marks) -> Result<usize, RuntimeError> {
        let gpu = self.gpu;
        let (h, v) = (self.config.hidden_size, self.config.vocab_size);
        let sc = &mut self.scratch;
        // Embeddings into the residual stream.
        let mut cur = self.cur;
        embed_rows(gpu, &self.embed, &sc.ids.slice(0..t), t, &mut sc.h[cur].slice_mut(0..t * h), v, h)?;
        marks.mark(gpu, "embedding")?;
        for l in 0..self.layers.len() {
            cur = self.enqueue_layer(l, t, at, cur, marks)?;
        }
        self.enqueue_final_norm(t, cur, marks)
    }

    /// The final norm (+ the last MLP output into the residual) of `t` rows into `scratch.xn`; returns the residual
    /// buffer index after it.
    fn enqueue_final_norm(&mut self, t: usize, cur: usize, marks: &mut Marks) -> Result<usize, RuntimeError> {
        let (gpu, h) = (self.gpu, self.config.hidden_size);
        let sc = &mut self.scratch;
        let (a, b) = split_pair(&mut sc.h, cur);
        hga_rmsnorm(
            gpu,
            &sc.mlp_out.slice(0..t * h),
            Some((&a.slice(0..t * h), &mut b.slice_mut(0..t * h))),
            &self.norm,
            &mut sc.xn.slice_mut(0..t * h),
            t,
            h,
            self.config.rms_norm_eps as f32,
        )?;
        marks.mark(gpu, "final norm")?;
        Ok(cur ^ 1)
    }

    /// Enqueues layer `l` of the `t` tokens whose positions are in `scratch.positions`, the residual in
    /// `scratch.h[cur]` and (for l > 0) the previous layer's MLP output in `scratch.mlp_out`; returns the residual
    /// buffer index after it (the layer's MLP output is then in `scratch.mlp_out`). Only kernel launches (and
    /// event records): it can be recorded into a CUDA graph. Where the layer's K/V goes:
    /// - a dense layer: its cache, at the positions;
    /// - an HGA layer, one token at a device position (`DeviceUpTo`): staged by the rope kernel, appended to the
    ///   layer's tiers and attended by routing (`HgaLayer`), the position read from `hga.pos`;
    /// - an HGA layer, a chunk at a host start: the layer-major prefill's K/V of the prompt (`hga.prefill`), exact
    ///   prefill attention over it.
    fn enqueue_layer(
        &mut self,
        l: usize,
        t: usize,
        at: StartAt,
        mut cur: usize,
        marks: &mut Marks,
    ) -> Result<usize, RuntimeError> {
        let gpu = self.gpu;
        let c = &self.config;
        let (h, nh, nkv) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads);
        let (qw, kw) = (nh * 128, nkv * 128);
        let start = match at {
            StartAt::Host(s) => s,
            StartAt::DeviceUpTo(bound) => bound - t,
        };
        let eps = c.rms_norm_eps as f32;
        let sc = &mut self.scratch;
        let layer = &self.layers[l];
        // 1. input norm (+ the previous MLP output into the residual) -> FP8.
        if l == 0 {
            hga_rmsnorm_fp8_quant(
                gpu,
                &sc.h[cur].slice(0..t * h),
                None,
                &layer.input_layernorm,
                &mut sc.xq.slice_mut(0..t * h),
                &mut sc.xs.slice_mut(0..t * h / 128),
                t,
                h,
                eps,
            )?;
        } else {
            let (a, b) = split_pair(&mut sc.h, cur);
            hga_rmsnorm_fp8_quant(
                gpu,
                &sc.mlp_out.slice(0..t * h),
                Some((&a.slice(0..t * h), &mut b.slice_mut(0..t * h))),
                &layer.input_layernorm,
                &mut sc.xq.slice_mut(0..t * h),
                &mut sc.xs.slice_mut(0..t * h / 128),
                t,
                h,
                eps,
            )?;
            cur ^= 1;
        }
        marks.mark(gpu, "input norm + FP8 quant")?;
        // 2. q, k, v.
        let (xq, xs) = (sc.xq.slice(0..t * h), sc.xs.slice(0..t * h / 128));
        let qkvw = qw + 2 * kw;
        linear(gpu, &layer.qkv_proj, &xq, &xs, &mut sc.qkv.slice_mut(0..t * qkvw), t)?;
        marks.mark(gpu, "q/k/v FP8 linear (stacked)")?;
        // 3. q/k norm + RoPE, K/V into the layer's cache, the HGA staging buffer or the prefill's K/V.
        enum Kv<'a> {
            Dense(&'a mut Placed<bf16>, &'a mut Placed<bf16>, usize),
            Decode(&'a mut HgaLayer, &'a mut HgaState),
            Prefill(&'a mut PrefillKv),
        }
        let no_hga = || RuntimeError::Shape("an HGA layer without the model's HGA state".into());
        let no_prefill = || RuntimeError::Shape("a chunk of an off-GPU K/V layer outside a layer-major prefill".into());
        let mut kv = match (&mut self.kv[l], at) {
            // A dense cache in host memory: the layer-major prefill's K/V on the GPU, copied there after the layer.
            (LayerKv::Dense { k_cache, .. }, StartAt::Host(_)) if k_cache.is_host() => {
                Kv::Prefill(self.prefill.as_mut().ok_or_else(no_prefill)?)
            }
            (LayerKv::Dense { k_cache, v_cache }, _) => Kv::Dense(k_cache, v_cache, self.capacity),
            (LayerKv::Hga(hl), StartAt::DeviceUpTo(_)) => Kv::Decode(hl, self.hga.as_mut().ok_or_else(no_hga)?),
            (LayerKv::Hga(_), StartAt::Host(_)) => Kv::Prefill(self.prefill.as_mut().ok_or_else(no_prefill)?),
        };
        let (capacity, by_token) = match &kv {
            Kv::Dense(_, _, cap) => (*cap, false),
            Kv::Decode(..) => (1, true),
            Kv::Prefill(p) => (p.len, false),
        };
        let rs = QkNormRopeShape {
            tokens: t,
            n_heads: nh,
            n_kv_heads: nkv,
            capacity,
            q_stride: qkvw,
            k_stride: qkvw,
            v_stride: qkvw,
            cache_by_token: by_token,
            eps,
            theta: c.rope_theta,
        };
        let w = (qw, kw, qkvw);
        match &mut kv {
            Kv::Dense(k, v, _) => rope_into(gpu, sc, layer, w, &mut **k, &mut **v, &rs)?,
            Kv::Decode(_, st) => rope_into(gpu, sc, layer, w, &mut *st.k_new, &mut *st.v_new, &rs)?,
            Kv::Prefill(p) => rope_into(gpu, sc, layer, w, &mut *p.k, &mut *p.v, &rs)?,
        }
        marks.mark(gpu, "q/k norm + RoPE + cache write")?;
        // 4. attention; 5. its FP8 quantization (fused into the dense decode merge for one token), o_proj.
        let ashape = AttentionShape { tokens: t, n_heads: nh, n_kv_heads: nkv, capacity, start };
        let quant = |sc: &mut Scratch| {
            hga_fp8_quant(
                gpu,
                &sc.attn.slice(0..t * qw),
                &mut sc.aq.slice_mut(0..t * qw),
                &mut sc.as_.slice_mut(0..t * nh),
                t,
                qw,
            )
        };
        match kv {
            Kv::Dense(k, v, _) => {
                if let StartAt::DeviceUpTo(_) = at {
                    hga_attention_decode_upto_quant(
                        gpu,
                        &sc.qr.slice(0..t * qw),
                        k,
                        v,
                        &mut sc.decode,
                        &mut sc.attn.slice_mut(0..t * qw),
                        &mut sc.lse.slice_mut(0..t * nh),
                        &mut sc.aq.slice_mut(0..t * qw),
                        &mut sc.as_.slice_mut(0..t * nh),
                        &ashape,
                        &sc.positions.slice(0..1),
                    )?;
                } else {
                    let (k, v) = (&*k, &*v);
                    hga_attention_prefill(
                        gpu,
                        &sc.qr.slice(0..t * qw),
                        k,
                        v,
                        &mut sc.attn.slice_mut(0..t * qw),
                        &mut sc.lse.slice_mut(0..t * nh),
                        &ashape,
                    )?;
                    quant(sc)?;
                }
            }
            Kv::Decode(hl, st) => {
                hl.append(gpu, &st.pos, &st.k_new, &st.v_new, &st.arena)?;
                marks.mark(gpu, "hga append + summary")?;
                // The model's decode workspace (256 splits of every query head) serves every layer in turn. With
                // the disk tier the host makes the lookup's misses resident before the gather reads them.
                let q = sc.qr.slice(0..qw);
                hl.route_and_lookup(gpu, &st.pos, &q, None, &st.arena)?;
                if let Some(d) = st.disk.as_mut() {
                    d.serve(l, &hl.misses(gpu)?)?;
                }
                hl.gather_and_attend(
                    gpu,
                    &st.pos,
                    &q,
                    &mut sc.attn.slice_mut(0..qw),
                    &mut sc.lse.slice_mut(0..nh),
                    &st.arena,
                    &mut sc.decode,
                    Some((&mut sc.aq.slice_mut(0..qw), &mut sc.as_.slice_mut(0..nh))),
                )?;
                // The merge wrote the FP8 quantization of the output too.
                marks.mark(gpu, "hga route + gather + attend (+ FP8 quant)")?;
            }
            Kv::Prefill(p) => {
                hga_attention_prefill(
                    gpu,
                    &sc.qr.slice(0..t * qw),
                    &p.k,
                    &p.v,
                    &mut sc.attn.slice_mut(0..t * qw),
                    &mut sc.lse.slice_mut(0..t * nh),
                    &ashape,
                )?;
                quant(sc)?;
            }
        }
        marks.mark(gpu, "attention (+ FP8 quant)")?;
        linear(
            gpu,
            &layer.o_proj,
            &sc.aq.slice(0..t * qw),
            &sc.as_.slice(0..t * nh),
            &mut sc.mlp_out.slice_mut(0..t * h),
            t,
        )?;
        marks.mark(gpu, "o_proj")?;
        // 6. post-attention norm (+ the attention output into the residual), bf16 out; 7. MoE (or the dense
        // MLP as a one-expert MoE). For one token the norm runs inside the MoE router (one launch fewer).
        let Mlp::Moe { router, experts, dims, ws } = &layer.mlp;
        let d = MoeDims { tokens: t, ..*dims };
        let ws = &mut sc.moe[*ws];
        let (a, b) = split_pair(&mut sc.h, cur);
        let (res, res_out) = (a.slice(0..t * h), &mut b.slice_mut(0..t * h));
        let norm_w = &layer.post_attention_layernorm;
        let (mut io, mut xn) = (sc.mlp_out.slice_mut(0..t * h), sc.xn.slice_mut(0..t * h));
        if t <= MOE_DECODE_MAX_TOKENS {
            let fused =
                moe_decode_residual(gpu, &mut io, &res, res_out, norm_w, eps, &mut xn, router, experts, ws, &d)?;
            let what =
                if fused { "post-attention norm + MoE (norm in the router)" } else { "post-attention norm + MoE" };
            marks.mark(gpu, what)?;
        } else {
            hga_rmsnorm(gpu, &io, Some((&res, res_out)), norm_w, &mut xn, t, h, eps)?;
            marks.mark(gpu, "post-attention norm")?;
            moe_grouped(gpu, &xn, router, experts, ws, &mut io, &d, RouterForm::Auto)?;
            marks.mark(gpu, "MoE (router, gate/up, down)")?;
        }
        Ok(cur ^ 1)
    }
}

/// The embedding rows of `ids` (`hga_embed_gather_dev`) from wherever the table lives.
fn embed_rows(
    gpu: &Gpu,
    table: &Embedding,
    ids: &CudaView<'_, u32>,
    rows: usize,
    out: &mut CudaViewMut<'_, bf16>,
    vocab: usize,
    hidden: usize,
) -> Result<(), RuntimeError> {
    match table {
        Embedding::Device(t) => hga_embed_gather_dev(gpu, t, ids, rows, out, vocab, hidden),
        Embedding::Host(t) => hga_embed_gather_dev(gpu, t, ids, rows, out, vocab, hidden),
    }
}

/// Step 3 of a layer: q/k norm + RoPE of the `rs.tokens` rows of `sc.qkv` (widths `(q, k, q + 2k)`), q into
/// `sc.qr`, K and V into `k` and `v` as `rs` lays them out.
fn rope_into(
    gpu: &Gpu,
    sc: &mut Scratch,
    layer: &Layer,
    (qw, kw, qkvw): (usize, usize, usize),
    k: &mut impl cudarc::driver::DevicePtrMut<bf16>,
    v: &mut impl cudarc::driver::DevicePtrMut<bf16>,
    rs: &QkNormRopeShape,
) -> Result<(), RuntimeError> {
    let t = rs.tokens;
    hga_qk_norm_rope(
        gpu,
        &sc.qkv.slice(0..t * qkvw),
        &sc.qkv.slice(qw..t * qkvw),
        &sc.qkv.slice(qw + kw..t * qkvw),
        &sc.positions.slice(0..t),
        &layer.q_norm,
        &layer.k_norm,
        &mut sc.qr.slice_mut(0..t * qw),
        k,
        v,
        rs,
    )
}

/// `bytes` from `src` to `dst` on the model's stream, unified addresses (HBM or mapped host memory either side).
fn copy_async(gpu: &Gpu, dst: u64, src: u64, bytes: u64) -> Result<(), RuntimeError> {
    gpu.context().bind_to_thread()?;
    // SAFETY: the callers pass ranges inside live buffers of this context (scratch rows, the prefill's residual
    // stream), ordered on the stream like every kernel that touches them.
    unsafe { cudarc::driver::sys::cuMemcpyAsync(dst, src, bytes as usize, gpu.stream().cu_stream()) }.result()?;
    Ok(())
}

/// (the buffer holding the residual, the other one).
fn split_pair(h: &mut [DeviceBuf<bf16>; 2], cur: usize) -> (&DeviceBuf<bf16>, &mut DeviceBuf<bf16>) {
    let (x, y) = h.split_at_mut(1);
    if cur == 0 {
        (&x[0], &mut y[0])
    } else {
        (&y[0], &mut x[0])
    }
}

fn linear(
    gpu: &Gpu,
    w: &Fp8Linear,
    a: &CudaView<'_, u8>,
    a_scale: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, bf16>,
    m: usize,
) -> Result<(), RuntimeError> {
    hga_fp8_linear(gpu, a, a_scale, &w.w, &w.s, out, m, w.n, w.k)
}

/// Stacks the gate/up/down FP8 weights of `modules` (`{module}.gate_proj.weight`, ...) as the MoE kernels expect.
pub(crate) fn stack_experts(ck: &Checkpoint, modules: &[String]) -> Result<MoeHostWeights, GpuModelError> {
    let mut w =
        MoeHostWeights { w_gate: vec![], s_gate: vec![], w_up: vec![], s_up: vec![], w_down: vec![], s_down: vec![] };
    for m in modules {
        for (proj, wv, sv) in [
            ("gate_proj", &mut w.w_gate, &mut w.s_gate),
            ("up_proj", &mut w.w_up, &mut w.s_up),
            ("down_proj", &mut w.w_down, &mut w.s_down),
        ] {
            let f = checked_fp8_weight(ck, &format!("{m}.{proj}.weight"))?;
            wv.extend_from_slice(&f.data);
            sv.extend_from_slice(&f.scales);
        }
    }
    Ok(w)
}

/// A selection trace replayed in place of the HGA routing ([`GpuModel::set_selection_replay`]).
#[derive(Clone, Debug)]
pub struct SelectionReplay {
    /// The trace as given (recorded on a trained fixture, `SelectionTrace::record`).
    pub source: SelectionTrace,
    /// The trace scaled to this model ([`SelectionTrace::scaled_to`]): what the HGA layers replay.
    pub scaled: SelectionTrace,
    /// The context factor of the scaling: a trace group stands for `factor` groups of this model's context.
    pub factor: usize,
    /// Groups of this model per trace group ([`SelectionTrace::scale_block`]).
    pub block: usize,
    /// The selection width the trace was scaled to (the HGA layers' `route_shape().max_groups`, the smallest).
    pub max_groups: usize,
    /// One-token steps replayed so far: the next one replays scaled step `next % steps`.
    next: usize,
}

impl SelectionReplay {
    /// One-token steps replayed since the trace was set.
    pub fn steps_replayed(&self) -> usize {
        self.next
    }
    /// The scaled step the next one-token step replays.
    pub fn next_step(&self) -> usize {
        self.next % self.scaled.steps.len()
    }
}

/// Selection replay: decode figures at full size with a trained model's reuse pattern.
impl<'g> GpuModel<'g> {
    /// Replays `trace` in place of the HGA routing's selection (`None`: back to the routing). The trace is scaled
    /// to the model ([`SelectionTrace::scaled_to`]): its layers x KV heads streams onto this model's (stream
    /// `(l, h)` replays trace stream `(l * kv_heads + h) % streams`), its groups onto this context with
    /// `factor = max(1, context / trace.first_pos)` (`context`: the cached positions when there are any, else the
    /// capacity; so set it after the prompt for the figures of that context) and blocks of
    /// [`SelectionTrace::scale_block`] groups so that a step selects about the layers' `max_groups`. From then on
    /// the `k`-th one-token step (forward of one token; `k` from 0) replays scaled step `k % steps` in every HGA
    /// layer: the step is uploaded ahead (step 0 here, step `k + 1` right after step `k` is enqueued, while the GPU
    /// runs it: one host-to-device copy per HGA layer, outside the recorded graph, stream ordered after step `k`)
    /// and copied over the routing's selection inside the step ([`HgaLayer::enable_replay`]; the routing still
    /// runs). Recorded steps are dropped (recorded again with the copy). [`GpuModel::profile_decode_step`]
    /// neither uploads nor counts: it replays the step uploaded for the next one-token step.
    ///
    /// **The logits under replay are meaningless**: the attention reads the trace's groups, not the groups the
    /// query routes to. What it is for: decode time, gathered bytes and the GPU caches' hit rate of a model whose
    /// weights cannot route with a trained model's reuse (random weights at full size), labelled as replayed.
    ///
    /// Refused on a dense model, for an empty trace or one whose first position is 0.
    pub fn set_selection_replay(&mut self, trace: Option<SelectionTrace>) -> Result<(), GpuModelError> {
        let Some(trace) = trace else {
            if self.replay.take().is_some() {
                self.disable_replay_buffers();
            }
            return Ok(());
        };
        if self.hga.is_none() {
            return Err(GpuModelError::Input(
                "selection replay needs the HGA attention mode (this model attends dense)".into(),
            ));
        }
        if trace.steps.is_empty() || trace.first_pos == 0 || trace.layers * trace.kv_heads == 0 {
            return Err(GpuModelError::Input(format!(
                "selection replay: an empty trace ({} layers x {} KV heads, {} steps from position {})",
                trace.layers,
                trace.kv_heads,
                trace.steps.len(),
                trace.first_pos
            )));
        }
        let max_groups = self
            .kv
            .iter()
            .filter_map(|kv| match kv {
                LayerKv::Hga(hl) => Some(hl.route_shape().max_groups),
                LayerKv::Dense { .. } => None,
            })
            .min()
            .ok_or_else(|| GpuModelError::Input("selection replay: every layer is dense (dense_layers)".into()))?;
        let c = &self.config;
        let context = if self.len > 0 { self.len } else { self.capacity };
        let factor = (context / trace.first_pos).max(1);
        let block = trace.scale_block(max_groups, factor);
        let scaled = trace.scaled_to(c.num_hidden_layers, c.num_key_value_heads, max_groups, factor);
        self.graphs.clear();
        self.replay = None;
        let gpu = self.gpu;
        let enabled = self.kv.iter_mut().try_for_each(|kv| match kv {
            LayerKv::Hga(hl) => hl.enable_replay(gpu),
            LayerKv::Dense { .. } => Ok(()),
        });
        if let Err(e) = enabled {
            self.disable_replay_buffers();
            return Err(e.into());
        }
        self.replay = Some(SelectionReplay { source: trace, scaled, factor, block, max_groups, next: 0 });
        let first = self.upload_replay_step();
        if first.is_err() {
            self.replay = None;
            self.disable_replay_buffers();
        }
        first
    }

    /// Frees every HGA layer's replay buffer, dropping the recorded steps first (they copy from the buffers).
    fn disable_replay_buffers(&mut self) {
        self.graphs.clear();
        for kv in &mut self.kv {
            if let LayerKv::Hga(hl) = kv {
                hl.disable_replay();
            }
        }
    }

    /// The replayed trace and its scaling (`None`: the routing's own selection).
    pub fn selection_replay(&self) -> Option<&SelectionReplay> {
        self.replay.as_ref()
    }

    /// Uploads the scaled step `next_step()` into every HGA layer's replay buffer (stream ordered: after what is
    /// enqueued, before the next step).
    fn upload_replay_step(&mut self) -> Result<(), GpuModelError> {
        let Some(r) = self.replay.as_ref() else { return Ok(()) };
        let t = r.next_step();
        for (l, kv) in self.kv.iter_mut().enumerate() {
            if let LayerKv::Hga(hl) = kv {
                let sel = r.scaled.padded_step(t, l, hl.route_shape().max_groups);
                hl.upload_replay(self.gpu, &sel)?;
            }
        }
        Ok(())
    }

    /// Called by `forward_chunk` once a one-token step is enqueued: counts it and uploads the next step's
    /// selection, while the GPU runs this one (stream order puts the copies after it).
    fn replay_next_step(&mut self) -> Result<(), GpuModelError> {
        let Some(r) = self.replay.as_mut() else { return Ok(()) };
        r.next += 1;
        self.upload_replay_step()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sketches_stay_in_hbm_while_the_rest_still_fits() {
        const MIB: u64 = 1 << 20;
        let at = |live: u64, later: usize| SketchFit {
            live,
            sketch_bytes: 64 * MIB,
            other: 16 * MIB,
            later,
            prefill_reserve: 128 * MIB,
        };
        // 1000 + 64 + 16 * 3 + 128 = 1240 MiB.
        assert!(at(1000 * MIB, 2).fits(1240 * MIB));
        assert!(!at(1000 * MIB, 2).fits(1239 * MIB));
        // The later layers' own state is reserved: with more of them to come, the same live total no longer fits.
        assert!(!at(1000 * MIB, 3).fits(1240 * MIB));
        // The last layer needs only its own state beside its sketches.
        assert!(at(1000 * MIB + 48 * MIB, 0).fits(1256 * MIB));
    }

    #[test]
    fn the_auto_cache_takes_what_the_cap_leaves_after_the_prefill_and_the_headroom() {
        const MIB: u64 = 1 << 20;
        let per = (KV_GROUP_BYTES + 12) as u64 * 47 * 4;
        let at = |limit: u64| CacheFit { limit, live: 1000 * MIB, transient: 640 * MIB, hga_layers: 47, kv_heads: 4 };
        let base = 1000 * MIB + 640 * MIB + CACHE_HEADROOM;
        assert_eq!(at(base).extra_slots(), 0);
        assert_eq!(at(base - 1).extra_slots(), 0, "over the cap: nothing, not an underflow");
        assert_eq!(at(base + per - 1).extra_slots(), 0);
        assert_eq!(at(base + per).extra_slots(), 1);
        assert_eq!(at(base + 1000 * per + 5).extra_slots(), 1000);
    }
}
