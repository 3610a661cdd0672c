//! Launchers of the dense attention kernels (gpu-kernels/src/attention/): `hga_attention_prefill`, and
//! `hga_attention_decode` + `hga_attention_merge` (split-K decode).
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::{
    AttentionParams, ATTN_BN, ATTN_DECODE_ROWS, ATTN_DECODE_SMEM, ATTN_HEAD_DIM, ATTN_PREFILL_BM, ATTN_PREFILL_SMEM,
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

/// Scratch of the split-K decode: partial outputs f32 [max_splits, tokens, n_heads, 128] and LSE.
pub struct DecodeWorkspace {
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
    rows: usize,
    max_splits: usize,
}

impl DecodeWorkspace {
    /// Room for `max_splits` splits of up to `max_tokens * n_heads` query rows.
    pub fn new(gpu: &Gpu, max_tokens: usize, n_heads: usize, max_splits: usize) -> Result<Self, RuntimeError> {
        let rows = max_tokens.max(1) * n_heads.max(1);
        let max_splits = max_splits.max(1);
        let s = gpu.stream();
        Ok(DecodeWorkspace {
            part_o: s.alloc_zeros::<f32>(max_splits * rows * ATTN_HEAD_DIM)?,
            part_lse: s.alloc_zeros::<f32>(max_splits * rows)?,
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
    prefill_named(gpu, "hga_attention_prefill", q, k_cache, v_cache, out, lse, s)
}

/// As [`hga_attention_prefill`] with lazy (exact) rescaling of O: only when a row max grew by more than 2^8
/// (slower on the H100, kept as a tested alternative).
#[allow(clippy::too_many_arguments)]
pub fn hga_attention_prefill_lazy(
    gpu: &Gpu,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtrMut<bf16>,
    lse: &mut impl DevicePtrMut<f32>,
    s: &AttentionShape,
) -> Result<(), RuntimeError> {
    prefill_named(gpu, "hga_attention_prefill_lazy", q, k_cache, v_cache, out, lse, s)
}

#[allow(clippy::too_many_arguments)]
fn prefill_named(
    gpu: &Gpu,
    kernel: &'static str,
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
    unsafe { launch(gpu, kernel, cfg, p) }
}

/// The split of a decode call: (n_splits, tiles of 64 keys per split). Aims at [`DECODE_CTAS_PER_SM`] CTAs per
/// SM, every split non-empty, at most `max_splits`.
pub fn decode_splits(sms: usize, s: &AttentionShape, max_splits: usize) -> (usize, usize) {
    decode_splits_for(DECODE_CTAS_PER_SM * sms, s, max_splits)
}

/// CTAs per SM that [`decode_splits`] aims at. 3 fit on sm_90 (168 registers x 128 threads, 68 KB of shared
/// memory), but measured on the H100 at 64K context fewer splits stream faster: 1 CTA/SM 61 us, 2: 70 us,
/// 3: 80 us, 4: 91 us (docs/perf-attention.md), so one CTA per SM (each streaming a long contiguous range).
pub const DECODE_CTAS_PER_SM: usize = 1;

/// [`decode_splits`] for a given target number of CTAs.
pub fn decode_splits_for(target_ctas: usize, s: &AttentionShape, max_splits: usize) -> (usize, usize) {
    let g = s.n_heads / s.n_kv_heads;
    let base = s.n_kv_heads * (s.tokens * g).div_ceil(ATTN_DECODE_ROWS);
    let tiles = s.ctx().div_ceil(ATTN_BN).max(1);
    let want = target_ctas.div_ceil(base.max(1)).clamp(1, tiles.min(max_splits.max(1)));
    let tps = tiles.div_ceil(want);
    (tiles.div_ceil(tps), tps)
}

/// Split-K decode attention of `s.tokens` (a few) query tokens: `hga_attention_decode` writes per-split partials
/// into `ws`, `hga_attention_merge` combines them into `out` and `lse`. Returns the number of splits used.
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
    hga_attention_decode_ctas(gpu, q, k_cache, v_cache, ws, out, lse, s, decode_target_ctas(gpu)?)
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
    decode_launch(gpu, q, k_cache, v_cache, ws, out, lse, s, target_ctas, 0)
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
    decode_launch(gpu, q, k_cache, v_cache, ws, out, lse, s, decode_target_ctas(gpu)?, ps)
}

fn decode_target_ctas(gpu: &Gpu) -> Result<usize, RuntimeError> {
    let sms =
        gpu.context().attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as usize;
    Ok(DECODE_CTAS_PER_SM * sms)
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
    target_ctas: usize,
    start_dev: u64,
) -> Result<usize, RuntimeError> {
    validate("attention_decode", s, q.len(), k_cache.len(), v_cache.len(), out.len(), lse.len())?;
    if s.tokens * s.n_heads > ws.rows {
        return Err(RuntimeError::Shape(format!(
            "attention_decode: workspace holds {} query rows, call has {}",
            ws.rows,
            s.tokens * s.n_heads
        )));
    }
    if s.tokens == 0 {
        return Ok(0);
    }
    let (n_splits, tps) = decode_splits_for(target_ctas, s, ws.max_splits);
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
    p.start_dev = start_dev;
    let cfg = LaunchConfig {
        grid_dim: ((s.n_kv_heads * (s.tokens * g).div_ceil(ATTN_DECODE_ROWS)) as u32, n_splits as u32, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: ATTN_DECODE_SMEM as u32,
    };
    // SAFETY: shapes checked; every split reads keys < min(start + tokens, capacity) (start from the device when
    // start_dev is set, clamped by the kernel); the workspace holds n_splits <= max_splits slots of
    // tokens * n_heads <= rows rows.
    unsafe { launch(gpu, "hga_attention_decode", cfg, p)? };
    let cfg = LaunchConfig {
        grid_dim: ((s.tokens * s.n_heads).div_ceil(4) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; the merge reads the n_splits partials the decode kernel wrote (same stream).
    unsafe { launch(gpu, "hga_attention_merge", cfg, p)? };
    Ok(n_splits)
}
