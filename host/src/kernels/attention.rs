//! Launchers of the dense attention kernels (gpu-kernels/src/attention/): `hga_attention_prefill`, and split-K
//! decode: `hga_attention_decode_v3_s3`, then the merge of the splits, `hga_attention_merge_v2`, optionally fused
//! with the FP8 quantization of the output. One kernel per job on every supported card:
//!
//! | job | kernel | sm_89, sm_120 (99 KB of shared memory per block) | sm_90 (227 KB) |
//! |---|---|---|---|
//! | prefill (a chunk of query tokens) | `hga_attention_prefill` (80 KB) | yes | yes |
//! | decode (a few query tokens), per split | `hga_attention_decode_v3_s3` (3-stage ring, 96 KB) | yes | yes |
//! | merge of the decode splits | `hga_attention_merge_v2` (one CTA per row) | yes | yes |
//!
//! `hga_attention_merge` (`MergeKernel::V1`, one warp per row, the same numbers bit for bit) is launched by no
//! path of the product; it stays as the comparison row of the routed attention's bench (bench_hga).
//!
//! A device with less than 96 KB of shared memory per block gets an error from the decode launchers.
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::memory::DeviceBuf;
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::{
    attn_decode_v3_smem, attn_merge_v2_smem, AttentionParams, ATTN_BN, ATTN_DECODE_ROWS, ATTN_DECODE_V3_STAGES,
    ATTN_HEAD_DIM, ATTN_PREFILL_BM, ATTN_PREFILL_SMEM,
};
use half::bf16;

/// Shapes of one attention call: the query tokens at positions `[start, start + tokens)` against the cache positions
/// `[0, start + tokens)` (causal). q / out bf16 [tokens, n_heads, 128], lse f32 [tokens, n_heads], K and V cache
/// bf16 [n_kv_heads, capacity, 128].
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub capacity: usize,
    pub start: usize,
}

impl AttentionShape {
    /// Context length seen by the last query token.
    pub fn ctx(&self) -> usize {
        self.start + self.tokens
    }
}

/// Default number of split-K partial slots of a [`DecodeWorkspace`].
pub const DECODE_MAX_SPLITS: usize = 256;

/// The accountant's label of [`DecodeWorkspace`].
pub const ATTENTION_WORKSPACE: &str = "attention workspace";

/// Scratch of the split-K decode: partial outputs f32 [max_splits, tokens, n_heads, 128] and LSE (booked as
/// [`ATTENTION_WORKSPACE`]).
pub struct DecodeWorkspace {
    pub(crate) part_o: DeviceBuf<f32>,
    pub(crate) part_lse: DeviceBuf<f32>,
    pub(crate) rows: usize,
    pub(crate) max_splits: usize,
}

impl DecodeWorkspace {
    /// Room for `max_splits` splits of up to `max_tokens * n_heads` query rows.
    pub fn new(gpu: &Gpu, max_tokens: usize, n_heads: usize, max_splits: usize) -> Result<Self, RuntimeError> {
        let rows = max_tokens.max(1) * n_heads.max(1);
        let max_splits = max_splits.max(1);
        let l = ATTENTION_WORKSPACE;
        Ok(DecodeWorkspace {
            part_o: gpu.alloc_zeros::<f32>(l, max_splits * rows * ATTN_HEAD_DIM)?,
            part_lse: gpu.alloc_zeros::<f32>(l, max_splits * rows)?,
            rows,
            max_splits,
        })
    }

    /// (elements of the partial outputs, elements of the partial LSE).
    pub fn lens(&self) -> (usize, usize) {
        (self.part_o.len(), self.part_lse.len())
    }

    /// The partial outputs (for tests that poison them).
    pub fn part_o_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.part_o
    }
}

fn validate(
    what: &str,
    s: &AttentionShape,
    q: usize,
    k: usize,
    v: usize,
    out: usize,
    lse: usize,
) -> Result<(), RuntimeError> {
    let bad = |m: String| Err(RuntimeError::Shape(format!("{what}: {m}")));
    if s.n_heads == 0 || s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return bad(format!("n_heads {} must be a positive multiple of n_kv_heads {}", s.n_heads, s.n_kv_heads));
    }
    if s.ctx() > s.capacity {
        return bad(format!("start + tokens = {} exceeds the cache capacity {}", s.ctx(), s.capacity));
    }
    let d = ATTN_HEAD_DIM;
    check_len(&format!("{what} q"), q, s.tokens * s.n_heads * d)?;
    check_len(&format!("{what} out"), out, s.tokens * s.n_heads * d)?;
    check_len(&format!("{what} lse"), lse, s.tokens * s.n_heads)?;
    let cache = s.n_kv_heads.checked_mul(s.capacity).and_then(|c| c.checked_mul(d));
    let cache = cache.ok_or_else(|| RuntimeError::Shape(format!("{what}: cache size overflows")))?;
    check_len(&format!("{what} k_cache"), k, cache)?;
    check_len(&format!("{what} v_cache"), v, cache)?;
    dim_u32(&format!("{what} capacity"), s.capacity)?;
    dim_u32(&format!("{what} tokens * n_heads"), s.tokens * s.n_heads)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn params(s: &AttentionShape, q: u64, k: u64, v: u64, out: u64, lse: u64, po: u64, pl: u64) -> AttentionParams {
    AttentionParams {
        q,
        k_cache: k,
        v_cache: v,
        out,
        lse,
        part_o: po,
        part_lse: pl,
        start_dev: 0,
        out_q: 0,
        out_scale: 0,
        tokens: s.tokens as u32,
        n_heads: s.n_heads as u32,
        n_kv_heads: s.n_kv_heads as u32,
        capacity: s.capacity as u32,
        start: s.start as u32,
        n_splits: 0,
        tiles_per_split: 0,
        scale_log2: std::f32::consts::LOG2_E / (ATTN_HEAD_DIM as f32).sqrt(),
    }
}

/// Causal prefill attention (FlashAttention-2 style) of `s.tokens` query tokens; writes `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_prefill(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
) -> Result<(), RuntimeError> {
    validate("attention_prefill", s, q.len(), k_cache.len(), v_cache.len(), out.len(), lse.len())?;
    if s.tokens == 0 {
        return Ok(());
    }
    let (pq, _g1) = dptr(gpu, q);
    let (pk, _g2) = dptr(gpu, k_cache);
    let (pv, _g3) = dptr(gpu, v_cache);
    let (po, _g4) = dptr_mut(gpu, out);
    let (pl, _g5) = dptr_mut(gpu, lse);
    let p = params(s, pq, pk, pv, po, pl, 0, 0);
    let cfg = LaunchConfig {
        grid_dim: (s.tokens.div_ceil(ATTN_PREFILL_BM) as u32, s.n_heads as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: ATTN_PREFILL_SMEM as u32,
    };
    // SAFETY: shapes checked by `validate`; the kernel reads cache rows < start + tokens <= capacity.
    unsafe { launch(gpu, "hga_attention_prefill", cfg, p) }
}

/// The split of a decode call: (n_splits, tiles of 64 keys per split). Aims at [`DECODE_CTAS_PER_SM`] CTAs per
/// SM with at least `min_tiles` tiles per split (short contexts get fewer splits; [`DecodeKernel::tiles_in_flight`]
/// of the kernel: a split shorter than its ring leaves stages empty), every split non-empty, at most `max_splits`.
/// Measured on an H200 at 4K context (graph replay, merge v2): with the 4-stage ring (3 tiles in flight) 16 splits
/// of 4 tiles took 10.0 us and 32 splits of 2 tiles 10.9; with the 3-stage ring (2 in flight) 32 splits of 2
/// tiles took 9.2 us and 16 splits 10.1 (docs/perf-attention.md).
pub fn decode_splits(sms: usize, s: &AttentionShape, max_splits: usize, min_tiles: usize) -> (usize, usize) {
    let base = decode_base_ctas(s);
    let tiles = s.ctx().div_ceil(ATTN_BN).max(1);
    let most = (tiles / min_tiles.max(1)).max(1) * base;
    decode_splits_for((DECODE_CTAS_PER_SM * sms).min(most), s, max_splits)
}

/// CTAs of one split: KV heads x 16-row groups of (token, query head of the KV head).
fn decode_base_ctas(s: &AttentionShape) -> usize {
    let g = s.n_heads / s.n_kv_heads;
    (s.n_kv_heads * (s.tokens * g).div_ceil(ATTN_DECODE_ROWS)).max(1)
}

/// CTAs per SM that [`decode_splits`] aims at. Measured on the H100 at 64K context with the earlier double-buffered
/// kernel, fewer splits stream faster: 1 CTA/SM 61 us, 2: 70 us, 3: 80 us, 4: 91 us (docs/perf-attention.md), so
/// one CTA per SM (each streaming a long contiguous range); the ring (96 KB of shared memory) is built for it.
pub const DECODE_CTAS_PER_SM: usize = 1;

/// [`decode_splits`] for a given target number of CTAs.
pub fn decode_splits_for(target_ctas: usize, s: &AttentionShape, max_splits: usize) -> (usize, usize) {
    let tiles = s.ctx().div_ceil(ATTN_BN).max(1);
    let want = target_ctas.div_ceil(decode_base_ctas(s)).clamp(1, tiles.min(max_splits.max(1)));
    let tps = tiles.div_ceil(want);
    (tiles.div_ceil(tps), tps)
}

/// Which split-K decode kernel a call launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeKernel {
    /// The kernel [`decode_kernel_for`] picks for the device (`V3` on every supported card).
    Auto,
    /// `hga_attention_decode_v3_s3`: the 3-stage `cp.async` ring (`ATTN_DECODE_V3_STAGES` = 3 stages x 32 KB).
    V3,
}

impl DecodeKernel {
    /// (entry point, dynamic shared memory bytes); `Auto` must be resolved first.
    fn entry(self) -> Result<(&'static str, usize), RuntimeError> {
        match self {
            DecodeKernel::V3 => Ok(("hga_attention_decode_v3_s3", attn_decode_v3_smem(ATTN_DECODE_V3_STAGES))),
            DecodeKernel::Auto => Err(RuntimeError::Shape("attention_decode: `Auto` is resolved at launch".into())),
        }
    }

    /// Key tiles the kernel keeps in flight per CTA (its stages - 1; `Auto`: 1): the fewest tiles a default split
    /// gets.
    pub fn tiles_in_flight(self) -> usize {
        match self {
            DecodeKernel::V3 => ATTN_DECODE_V3_STAGES - 1,
            DecodeKernel::Auto => 1,
        }
    }

    /// Dynamic shared memory of the kernel (`Auto`: 0).
    pub fn smem_bytes(self) -> usize {
        self.entry().map(|e| e.1).unwrap_or(0)
    }
}

/// Which kernel merges the split partials (both give the same numbers, bit for bit). Every launcher here runs
/// `V2`; `V1` stays as the comparison row of the routed attention's bench (bench_hga).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeKernel {
    /// `hga_attention_merge`: one warp per (token, head) row, the splits read 8 at a time (one L2 round trip per 8
    /// splits, plus one for the largest LSE): 8.9 us for 32 rows x 32 splits on an H200, alone (ncu).
    V1,
    /// `hga_attention_merge_v2`: one CTA of 4 warps per row, all of a row's splits (up to 32) read in one round,
    /// products summed in split order through shared memory.
    V2,
}

impl MergeKernel {
    pub(crate) fn launch_config(self, rows: usize, n_splits: usize) -> (&'static str, LaunchConfig) {
        match self {
            MergeKernel::V1 => (
                "hga_attention_merge",
                LaunchConfig { grid_dim: (rows.div_ceil(4) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 },
            ),
            MergeKernel::V2 => (
                "hga_attention_merge_v2",
                LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: attn_merge_v2_smem(n_splits) as u32,
                },
            ),
        }
    }
}

/// The decode kernel `Auto` picks for a device allowing `max_smem_optin` bytes of shared memory per block: the
/// 3-stage ring where its 96 KB fit (sm_89 / sm_120: 99 KB; sm_90: 227 KB), else none. 3 stages measured the
/// fastest from 16K on against 4 and 6 stages on the H200 (docs/perf-attention.md).
pub fn decode_kernel_for(max_smem_optin: usize) -> Option<DecodeKernel> {
    (attn_decode_v3_smem(ATTN_DECODE_V3_STAGES) <= max_smem_optin).then_some(DecodeKernel::V3)
}

/// The kernel [`DecodeKernel::Auto`] resolves to on this device (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`);
/// an error where the decode kernel does not fit.
pub fn decode_kernel_auto(gpu: &Gpu) -> Result<DecodeKernel, RuntimeError> {
    let optin = gpu.smem_per_block_optin();
    decode_kernel_for(optin).ok_or_else(|| {
        RuntimeError::Shape(format!(
            "attention_decode: the decode kernel needs {} bytes of shared memory per block, the device allows {optin}",
            attn_decode_v3_smem(ATTN_DECODE_V3_STAGES)
        ))
    })
}

/// Split-K decode attention of `s.tokens` (a few) query tokens: the decode kernel ([`DecodeKernel::Auto`]) writes
/// per-split partials into `ws`, `hga_attention_merge_v2` combines them into `out` and `lse`. Returns the number of
/// splits used.
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_decode(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
) -> Result<usize, RuntimeError> {
    hga_attention_decode_kernel(gpu, DecodeKernel::Auto, MergeKernel::V2, q, k_cache, v_cache, ws, out, lse, s, None)
}

/// [`hga_attention_decode`] with the split chosen for `target_ctas` CTAs instead of the default (for tuning).
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_decode_ctas(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
    target_ctas: usize,
) -> Result<usize, RuntimeError> {
    let t = Some(target_ctas);
    hga_attention_decode_kernel(gpu, DecodeKernel::Auto, MergeKernel::V2, q, k_cache, v_cache, ws, out, lse, s, t)
}

/// [`hga_attention_decode`] with the decode and merge kernel given (`Auto` or the resolved kernel; `MergeKernel::V2`)
/// and with `target_ctas` = None the default split, else the split for that many CTAs.
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_decode_kernel(
    gpu: &Gpu,
    kernel: DecodeKernel,
    merge: MergeKernel,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
    target_ctas: Option<usize>,
) -> Result<usize, RuntimeError> {
    let c = DecodeCall { kernel, merge, target_ctas, start_dev: 0, quant: None };
    decode_launch(gpu, q, k_cache, v_cache, ws, out, lse, s, c)
}

/// [`hga_attention_decode`] as one launch that serves every position up to a bound, for a recorded (CUDA graph)
/// decode step: the kernel reads `start` from the device u32 `start_dev` when it runs, and the split is sized for
/// the context `s.start + s.tokens` (`s.start` is the largest start the launch will see; splits past the actual
/// context do no work). The caller keeps `*start_dev <= s.start`; the kernel never reads past the cache capacity.
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_decode_upto(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
    start_dev: &impl DevicePtr<u32>,
) -> Result<usize, RuntimeError> {
    check_len("attention_decode start_dev", start_dev.len(), 1)?;
    let (ps, _gs) = dptr(gpu, start_dev);
    let c = DecodeCall {
        kernel: DecodeKernel::Auto,
        merge: MergeKernel::V2,
        target_ctas: None,
        start_dev: ps,
        quant: None,
    };
    decode_launch(gpu, q, k_cache, v_cache, ws, out, lse, s, c)
}

/// [`hga_attention_decode_upto`] whose merge also writes the FP8 (e4m3) quantization of `out` for the next FP8
/// linear: `out_q` e4m3 [tokens, n_heads * 128] and `out_scale` f32 [tokens, n_heads], one 128-group per (token,
/// head), bit-identical to `hga_fp8_quant(out)` with k = n_heads * 128 (which it replaces: one launch fewer).
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_decode_upto_quant(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    out_q: &mut impl DevicePtrMut<u8>,
    out_scale: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
    start_dev: &impl DevicePtr<u32>,
) -> Result<usize, RuntimeError> {
    check_len("attention_decode start_dev", start_dev.len(), 1)?;
    check_len("attention_decode out_q", out_q.len(), s.tokens * s.n_heads * ATTN_HEAD_DIM)?;
    check_len("attention_decode out_scale", out_scale.len(), s.tokens * s.n_heads)?;
    let (ps, _gs) = dptr(gpu, start_dev);
    let (pq, _gq) = dptr_mut(gpu, out_q);
    let (pc, _gc) = dptr_mut(gpu, out_scale);
    let c = DecodeCall {
        kernel: DecodeKernel::Auto,
        merge: MergeKernel::V2,
        target_ctas: None,
        start_dev: ps,
        quant: Some((pq, pc)),
    };
    decode_launch(gpu, q, k_cache, v_cache, ws, out, lse, s, c)
}

/// The choices of one decode launch besides its buffers.
struct DecodeCall {
    kernel: DecodeKernel,
    merge: MergeKernel,
    /// None: the default split ([`decode_splits`]); Some(n): aim at n CTAs ([`decode_splits_for`], for tuning).
    target_ctas: Option<usize>,
    /// Device address of `start` (0: `s.start`).
    start_dev: u64,
    /// Device addresses of (out_q, out_scale), already checked, for the fused FP8 quantization in the merge.
    quant: Option<(u64, u64)>,
}

#[allow(clippy::too_many_arguments)]
fn decode_launch(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    ws: &mut DecodeWorkspace,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
    c: DecodeCall,
) -> Result<usize, RuntimeError> {
    validate("attention_decode", s, q.len(), k_cache.len(), v_cache.len(), out.len(), lse.len())?;
    if s.tokens * s.n_heads > ws.rows {
        return Err(RuntimeError::Shape(format!(
            "attention_decode: workspace holds {} query rows, call has {}",
            ws.rows,
            s.tokens * s.n_heads
        )));
    }
    let kernel = match c.kernel {
        DecodeKernel::Auto => decode_kernel_auto(gpu)?,
        k => k,
    };
    let (name, smem) = kernel.entry()?;
    if s.tokens == 0 {
        return Ok(0);
    }
    let (n_splits, tps) = match c.target_ctas {
        None => decode_splits(gpu.sm_count(), s, ws.max_splits, kernel.tiles_in_flight()),
        Some(t) => decode_splits_for(t, s, ws.max_splits),
    };
    let g = s.n_heads / s.n_kv_heads;
    let (pq, _g1) = dptr(gpu, q);
    let (pk, _g2) = dptr(gpu, k_cache);
    let (pv, _g3) = dptr(gpu, v_cache);
    let (po, _g4) = dptr_mut(gpu, out);
    let (pl, _g5) = dptr_mut(gpu, lse);
    let (ppo, _g6) = dptr_mut(gpu, &mut ws.part_o);
    let (ppl, _g7) = dptr_mut(gpu, &mut ws.part_lse);
    let mut p = params(s, pq, pk, pv, po, pl, ppo, ppl);
    p.n_splits = n_splits as u32;
    p.tiles_per_split = tps as u32;
    p.start_dev = c.start_dev;
    let cfg = LaunchConfig {
        grid_dim: ((s.n_kv_heads * (s.tokens * g).div_ceil(ATTN_DECODE_ROWS)) as u32, n_splits as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: shapes checked; every split reads keys < min(start + tokens, capacity) (start from the device when
    // start_dev is set, clamped by the kernel); the workspace holds n_splits <= max_splits slots of
    // tokens * n_heads <= rows rows.
    unsafe { launch(gpu, name, cfg, p)? };
    if let Some((q8, sc)) = c.quant {
        p.out_q = q8;
        p.out_scale = sc;
    }
    let (merge, cfg) = c.merge.launch_config(s.tokens * s.n_heads, n_splits);
    // SAFETY: as above; the merge reads the n_splits partials the decode kernel wrote (same stream); with the
    // fused quantization, out_q / out_scale were checked to hold tokens * n_heads rows of 128 / 1 by the caller.
    unsafe { launch(gpu, merge, cfg, p)? };
    Ok(n_splits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_kernel_follows_shared_memory_per_block() {
        assert_eq!(decode_kernel_for(232_448), Some(DecodeKernel::V3)); // sm_90: 227 KB
        assert_eq!(decode_kernel_for(166_912), Some(DecodeKernel::V3)); // sm_80: 163 KB
        assert_eq!(decode_kernel_for(101_376), Some(DecodeKernel::V3)); // sm_89 / sm_120: 99 KB
        assert_eq!(decode_kernel_for(98_304), Some(DecodeKernel::V3)); // exactly the ring
        assert_eq!(decode_kernel_for(98_303), None);
        assert_eq!(decode_kernel_for(70_000), None);
        assert_eq!(DecodeKernel::V3.smem_bytes(), 98_304);
        assert_eq!(DecodeKernel::Auto.smem_bytes(), 0);
        assert!(DecodeKernel::Auto.entry().is_err());
    }

    #[test]
    fn decode_splits_fill_the_ring_on_short_contexts() {
        // Qwen3-30B-A3B decode: 32 query heads on 4 KV heads, one token: 4 CTAs per split; 132 SMs (H100 / H200).
        let at = |ctx: usize| AttentionShape { tokens: 1, n_heads: 32, n_kv_heads: 4, capacity: ctx, start: ctx - 1 };
        let s3 = DecodeKernel::V3.tiles_in_flight();
        let s4 = 3; // a 4-stage ring (measured, docs/perf-attention.md): 3 tiles in flight
        assert_eq!((s3, DecodeKernel::Auto.tiles_in_flight()), (2, 1));
        assert_eq!(decode_splits(132, &at(4096), 256, s3), (32, 2)); // 64 tiles: one CTA per SM, 2 tiles each
        assert_eq!(decode_splits(132, &at(4096), 256, s4), (16, 4)); // 3 in flight: at most 21 splits, of 4 tiles
        assert_eq!(decode_splits(132, &at(2048), 256, s3), (16, 2));
        assert_eq!(decode_splits(132, &at(16384), 256, s4), (32, 8)); // one CTA per SM from here on
        assert_eq!(decode_splits(132, &at(65536), 256, s3), (32, 32));
        assert_eq!(decode_splits(132, &at(100), 256, s3), (1, 2)); // fewer tiles than the ring: one split
        assert_eq!(decode_splits(132, &at(65536), 8, s3), (8, 128)); // the workspace's limit
                                                                     // The tuning form aims at the given CTAs whatever the tiles per split.
        assert_eq!(decode_splits_for(132, &at(4096), 256), (32, 2));
    }
}
