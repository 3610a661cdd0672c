//! Launchers of the head family (gpu-kernels/src/head/): embedding gather, lm_head GEMV, argmax, sampling.
use super::{check_len, dim_u32, dptr, dptr_mut, launch};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig};
use gpu_kernels::params::{ArgmaxParams, EmbedParams, LmHeadParams, SampleParams};
use gpu_kernels::sample::{top_p_fixed, weight_coef};
use half::bf16;

/// Largest row count of `hga_lm_head`.
pub const LM_HEAD_MAX_M: usize = 16;
/// Dynamic shared memory of `hga_sample` (see gpu-kernels/src/head/sample.rs).
const SAMPLE_SMEM: u32 = ((256 + 1024 + 8) * 8) as u32;

/// `out[i, :] = table[ids[i], :]`: table bf16 [vocab, hidden], out bf16 [ids.len(), hidden]. The ids are checked
/// (< vocab) here on the host, then copied into `ids_dev` (u32 [ids.len()]) for the kernel.
pub fn hga_embed_gather(
    gpu: &Gpu,
    table: &impl DevicePtr<bf16>,
    ids: &[u32],
    ids_dev: &mut (impl DevicePtrMut<u32> + DevicePtr<u32>),
    out: &mut impl DevicePtrMut<bf16>,
    vocab: usize,
    hidden: usize,
) -> Result<(), RuntimeError> {
    if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(RuntimeError::Shape(format!("embed_gather: ids[{i}] = {id} >= vocab {vocab}")));
    }
    let rows = ids.len();
    check_len("embed_gather ids_dev", ids_dev.len(), rows)?;
    check_len("embed_gather out", out.len(), rows * hidden)?;
    if rows > 0 {
        gpu.stream().memcpy_htod(ids, ids_dev)?;
    }
    hga_embed_gather_dev(gpu, table, ids_dev, rows, out, vocab, hidden)
}

/// [`hga_embed_gather`] of `rows` ids already on the device (`ids_dev[..rows]`), enqueueing only the kernel (so it
/// can be recorded in a CUDA graph). An id >= vocab writes a zero row (the kernel checks).
pub fn hga_embed_gather_dev(
    gpu: &Gpu,
    table: &impl DevicePtr<bf16>,
    ids_dev: &impl DevicePtr<u32>,
    rows: usize,
    out: &mut impl DevicePtrMut<bf16>,
    vocab: usize,
    hidden: usize,
) -> Result<(), RuntimeError> {
    if vocab == 0 || hidden == 0 {
        return Err(RuntimeError::Shape("embed_gather: vocab and hidden must be > 0".into()));
    }
    let vh = vocab.checked_mul(hidden).ok_or_else(|| RuntimeError::Shape("embed_gather: overflow".into()))?;
    check_len("embed_gather table", table.len(), vh)?;
    if ids_dev.len() < rows {
        return Err(RuntimeError::Shape(format!("embed_gather: ids_dev holds {} ids, {rows} asked", ids_dev.len())));
    }
    check_len("embed_gather out", out.len(), rows * hidden)?;
    let (rows32, v32, h32) = (dim_u32("rows", rows)?, dim_u32("vocab", vocab)?, dim_u32("hidden", hidden)?);
    if rows == 0 {
        return Ok(());
    }
    let (pt, _gt) = dptr(gpu, table);
    let (pi, _gi) = dptr(gpu, ids_dev);
    let (po, _go) = dptr_mut(gpu, out);
    if hidden.is_multiple_of(8) && (pt % 16 != 0 || po % 16 != 0) {
        return Err(RuntimeError::Shape("embed_gather: table and out must be 16-byte aligned".into()));
    }
    let p = EmbedParams { table: pt, ids: pi, out: po, rows: rows32, vocab: v32, hidden: h32, _pad: 0 };
    let cfg = LaunchConfig { grid_dim: (rows32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: lengths checked above; the kernel writes a zero row for an id >= vocab.
    unsafe { launch(gpu, "hga_embed_gather", cfg, p) }
}

/// `out[m, v] = sum_h x[m, h] w[v, h]` (f32 out): x bf16 [m, hidden] (m <= 16), w bf16 [vocab, hidden]
/// (hidden % 32 == 0), out f32 [m, vocab].
pub fn hga_lm_head(
    gpu: &Gpu,
    x: &impl DevicePtr<bf16>,
    w: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtrMut<f32>,
    m: usize,
    vocab: usize,
    hidden: usize,
) -> Result<(), RuntimeError> {
    if m > LM_HEAD_MAX_M {
        return Err(RuntimeError::Shape(format!("lm_head: m = {m} > {LM_HEAD_MAX_M}")));
    }
    if vocab == 0 || hidden == 0 || !hidden.is_multiple_of(32) {
        return Err(RuntimeError::Shape(format!(
            "lm_head: vocab > 0 and hidden a positive multiple of 32 required (vocab={vocab}, hidden={hidden})"
        )));
    }
    let vh = vocab.checked_mul(hidden).ok_or_else(|| RuntimeError::Shape("lm_head: overflow".into()))?;
    if vh >= 1 << 31 {
        return Err(RuntimeError::Shape(format!("lm_head: vocab * hidden = {vh} >= 2^31")));
    }
    check_len("lm_head x", x.len(), m * hidden)?;
    check_len("lm_head w", w.len(), vh)?;
    check_len("lm_head out", out.len(), m * vocab)?;
    let (m32, v32, h32) = (dim_u32("m", m)?, dim_u32("vocab", vocab)?, dim_u32("hidden", hidden)?);
    if m == 0 {
        return Ok(());
    }
    let (px, _gx) = dptr(gpu, x);
    let (pw, _gw) = dptr(gpu, w);
    let (po, _go) = dptr_mut(gpu, out);
    if px % 16 != 0 || pw % 16 != 0 {
        return Err(RuntimeError::Shape("lm_head: x and w must be 16-byte aligned".into()));
    }
    let p = LmHeadParams { x: px, w: pw, out: po, m: m32, vocab: v32, hidden: h32, _pad: 0 };
    let cfg = LaunchConfig {
        grid_dim: (dim_u32("blocks", vocab.div_ceil(8))?, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 4 * 32 * 4 * 4,
    };
    // SAFETY: lengths, divisibility and alignment checked above.
    unsafe { launch(gpu, "hga_lm_head", cfg, p) }
}

/// Argmax per row of f32 logits [rows, vocab] into u32 [rows] (ties: lowest index; NaN never wins).
pub fn hga_argmax(
    gpu: &Gpu,
    logits: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<u32>,
    rows: usize,
    vocab: usize,
) -> Result<(), RuntimeError> {
    if vocab == 0 {
        return Err(RuntimeError::Shape("argmax: vocab must be > 0".into()));
    }
    check_len("argmax logits", logits.len(), rows * vocab)?;
    check_len("argmax out", out.len(), rows)?;
    let (r32, v32) = (dim_u32("rows", rows)?, dim_u32("vocab", vocab)?);
    if rows == 0 {
        return Ok(());
    }
    let (pl, _gl) = dptr(gpu, logits);
    let (po, _go) = dptr_mut(gpu, out);
    if vocab.is_multiple_of(4) && pl % 16 != 0 {
        return Err(RuntimeError::Shape("argmax: logits must be 16-byte aligned".into()));
    }
    let p = ArgmaxParams { logits: pl, out: po, rows: r32, vocab: v32 };
    let cfg = LaunchConfig { grid_dim: (r32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 256 };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_argmax", cfg, p) }
}

/// Temperature / top-p sampling per row of f32 logits [rows, vocab] into u32 [rows], with the rule of
/// `gpu_kernels::sample` (row r draws the uniform of (seed, step + r)). temperature > 0 (use [`hga_argmax`] for
/// greedy decoding), top_p in (0, 1].
#[allow(clippy::too_many_arguments)]
pub fn hga_sample(
    gpu: &Gpu,
    logits: &impl DevicePtr<f32>,
    out: &mut impl DevicePtrMut<u32>,
    rows: usize,
    vocab: usize,
    temperature: f32,
    top_p: f32,
    seed: u64,
    step: u64,
) -> Result<(), RuntimeError> {
    if vocab == 0 {
        return Err(RuntimeError::Shape("sample: vocab must be > 0".into()));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(RuntimeError::Shape(format!("sample: temperature must be finite and > 0, got {temperature}")));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RuntimeError::Shape(format!("sample: top_p must be in (0, 1], got {top_p}")));
    }
    check_len("sample logits", logits.len(), rows * vocab)?;
    check_len("sample out", out.len(), rows)?;
    let (r32, v32) = (dim_u32("rows", rows)?, dim_u32("vocab", vocab)?);
    if rows == 0 {
        return Ok(());
    }
    let (pl, _gl) = dptr(gpu, logits);
    let (po, _go) = dptr_mut(gpu, out);
    let p = SampleParams {
        logits: pl,
        out: po,
        seed,
        coef: weight_coef(temperature),
        top_p: top_p_fixed(top_p),
        rows: r32,
        vocab: v32,
        step,
    };
    let cfg = LaunchConfig { grid_dim: (r32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: SAMPLE_SMEM };
    // SAFETY: lengths checked above.
    unsafe { launch(gpu, "hga_sample", cfg, p) }
}
