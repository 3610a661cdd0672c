//! Checkpoint generator: writes a random but forward-meaningful Qwen3-MoE checkpoint in the exact Hugging Face FP8
//! layout of ../shared/QWEN3.md (config.json with quantization_config, per-expert tensors, e4m3 weights with
//! per-128x128-block `weight_scale_inv`, shards + `model.safetensors.index.json` when larger than one shard).
//!
//! Values (deterministic for a seed; each row of each tensor has its own generator seeded from (seed, tensor name,
//! row), so values do not depend on sharding, threads or the order of writing). "Normal" below is the Irwin-Hall sum of
//! four uniforms scaled to unit variance (bounded at +-3.46 sigma, cheap enough for 31 G values):
//! - Linear weights [out, in]: normal(0, 1/sqrt(in)) (= 0.022 at hidden 2048, the usual 0.02 init), so a projection of
//!   a unit-RMS activation has unit RMS; the projections that write into the residual stream (o_proj, down_proj) are
//!   further scaled by 1/sqrt(2 * layers) so that the residual grows slowly with depth.
//! - Embedding normal(0, 1); norms 1 + normal(0, 0.1); router normal(0, 2/sqrt(hidden)) (router logits of std ~2, so
//!   experts are clearly differentiated); lm_head normal(0, 2/sqrt(hidden)) (logits of std ~2); biases normal(0, 0.02).
//! - FP8: per block of b0 x b1, `scale = absmax / 448` rounded UP to the scale dtype (so no value saturates), stored
//!   as `weight_scale_inv`; `q = e4m3(w / scale)`. Unquantized tensors are BF16.
//!
//! Streaming: the plan (names, shapes, dtypes, offsets) is computed first, so each shard's header is written before its
//! data; tensors are then generated and written in batches of row blocks (rayon), so memory stays at a few tens of MB
//! whatever the model size. Crash safety: each shard is written as `<name>.partial`, synced and renamed; the index and
//! then `config.json` are written last (temp name + rename). A failed run leaves no `config.json`, hence nothing that
//! [`super::checkpoint::Checkpoint::open`] accepts; the error names the file.
use std::io::Write;
use std::path::{Path, PathBuf};

use gpu_kernels::num::{bf16_to_f32, f32_to_bf16, f32_to_e4m3, E4M3_MAX};
use rayon::prelude::*;
use serde_json::{json, Map, Value};

use super::checkpoint::{expected_names, spec_for, Dtype, Role, TensorKind, INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE};
use super::config::Qwen3MoeConfig;
pub use super::error::ModelError;

/// Dtype of the stored `weight_scale_inv` tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ScaleDtype {
    Bf16,
    F16,
    /// Default: exact, so the dequantized weight is exactly `e4m3 * (absmax / 448)`.
    #[default]
    F32,
}

impl ScaleDtype {
    fn dtype(self) -> Dtype {
        match self {
            ScaleDtype::Bf16 => Dtype::BF16,
            ScaleDtype::F16 => Dtype::F16,
            ScaleDtype::F32 => Dtype::F32,
        }
    }
    /// Parses `bf16`, `f16` or `f32`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => Some(ScaleDtype::Bf16),
            "f16" | "fp16" | "float16" => Some(ScaleDtype::F16),
            "f32" | "fp32" | "float32" => Some(ScaleDtype::F32),
            _ => None,
        }
    }
}

/// Options of [`write_checkpoint`].
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Largest shard in bytes of tensor data (a single larger tensor gets a shard of its own). One shard is written
    /// as `model.safetensors` without an index. Default 4 GB.
    pub shard_size: u64,
    /// Dtype of `weight_scale_inv`. Default f32.
    pub scale_dtype: ScaleDtype,
    /// Show an indicatif progress bar (on stderr) over the bytes written.
    pub progress: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { shard_size: 4_000_000_000, scale_dtype: ScaleDtype::F32, progress: false }
    }
}

/// One tensor of the plan: FP8 weights carry their scale tensor along (same shard, written right after).
#[derive(Clone, Debug)]
struct Planned {
    name: String,
    shape: Vec<usize>,
    dtype: Dtype,
    role: Role,
    /// For an FP8 weight: (scale shape, block).
    fp8: Option<(Vec<usize>, [usize; 2])>,
}

impl Planned {
    fn elems(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    fn bytes(&self, sd: ScaleDtype) -> u64 {
        self.elems() * self.dtype.size() as u64
            + self
                .fp8
                .as_ref()
                .map_or(0, |(s, _)| s.iter().map(|&d| d as u64).product::<u64>() * sd.dtype().size() as u64)
    }
}

/// The tensors the writer will produce (weights with their scales), in file order.
fn plan(cfg: &Qwen3MoeConfig) -> Vec<Planned> {
    let mut v = Vec::new();
    for name in expected_names(cfg) {
        let Some(spec) = spec_for(cfg, &name) else {
            continue;
        };
        let (dtype, fp8) = match spec.kind {
            TensorKind::Float | TensorKind::Router { .. } => (Dtype::BF16, None),
            TensorKind::Fp8Weight { scale_shape } => {
                let block = cfg.quantization.as_ref().map_or([128, 128], |q| q.weight_block_size);
                (Dtype::F8_E4M3, Some((scale_shape, block)))
            }
            TensorKind::Fp8Scale { .. } => continue,
        };
        v.push(Planned { name, shape: spec.shape, dtype, role: spec.role, fp8 });
    }
    v
}

/// Total bytes of tensor data `write_checkpoint` would write for `cfg`.
pub fn planned_bytes(cfg: &Qwen3MoeConfig, scale_dtype: ScaleDtype) -> u64 {
    plan(cfg).iter().map(|p| p.bytes(scale_dtype)).sum()
}

// ---- deterministic values ------------------------------------------------------------------------------------------

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Approximately standard normal (Irwin-Hall of four 16-bit uniforms, unit variance) from one 64-bit draw.
#[inline]
fn normal(r: u64) -> f32 {
    let s = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
    // Sum of 4 U[0,1) has mean 2, variance 1/3.
    ((s as f32 + 2.0) / 65536.0 - 2.0) * 1.732_050_8
}

/// (mean, std) of the values of a tensor.
fn distribution(cfg: &Qwen3MoeConfig, role: Role, shape: &[usize]) -> (f32, f32) {
    let inp = *shape.last().unwrap_or(&1) as f32;
    let h = cfg.hidden_size as f32;
    match role {
        Role::Embedding => (0.0, 1.0),
        Role::Norm => (1.0, 0.1),
        Role::Linear { residual: false } => (0.0, 1.0 / inp.sqrt()),
        Role::Linear { residual: true } => (0.0, 1.0 / inp.sqrt() / (2.0 * cfg.num_hidden_layers as f32).sqrt()),
        Role::Router | Role::LmHead => (0.0, 2.0 / h.sqrt()),
        Role::Bias => (0.0, 0.02),
        Role::Scale => (1.0, 0.0),
    }
}

/// Row `row` of the tensor (`cols` values) for `seed`.
fn gen_row(tensor_seed: u64, row: usize, cols: usize, mean: f32, std: f32, out: &mut [f32]) {
    let mut st = tensor_seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    splitmix(&mut st);
    for o in out.iter_mut().take(cols) {
        *o = mean + std * normal(splitmix(&mut st));
    }
}

/// The f32 values the generator uses for tensor `name` of `cfg` with `seed` (before FP8/bf16 rounding). Tests and
/// checks use it to compare a written checkpoint with its intended values.
pub fn reference_values(cfg: &Qwen3MoeConfig, seed: u64, name: &str) -> Option<Vec<f32>> {
    let spec = spec_for(cfg, name)?;
    if matches!(spec.kind, TensorKind::Fp8Scale { .. }) {
        return None;
    }
    let (mean, std) = distribution(cfg, spec.role, &spec.shape);
    let cols = *spec.shape.last()?;
    let rows = spec.shape.iter().product::<usize>() / cols.max(1);
    let ts = tensor_seed(seed, name);
    let mut v = vec![0f32; rows * cols];
    for (r, row) in v.chunks_exact_mut(cols.max(1)).enumerate() {
        gen_row(ts, r, cols, mean, std, row);
    }
    Some(v)
}

fn tensor_seed(seed: u64, name: &str) -> u64 {
    let mut s = seed ^ fnv1a(name).rotate_left(17);
    splitmix(&mut s)
}

/// Rounds a positive scale to the stored dtype, upwards (so that `absmax / stored <= 448`). Returns (bytes, value).
fn store_scale(s: f32, sd: ScaleDtype) -> (Vec<u8>, f32) {
    match sd {
        ScaleDtype::F32 => (s.to_le_bytes().to_vec(), s),
        ScaleDtype::Bf16 => {
            let mut b = f32_to_bf16(s);
            if bf16_to_f32(b) < s {
                b += 1;
            }
            (b.to_le_bytes().to_vec(), bf16_to_f32(b))
        }
        ScaleDtype::F16 => {
            let mut h = half::f16::from_f32(s);
            if h.to_f32() < s {
                h = half::f16::from_bits(h.to_bits() + 1);
            }
            (h.to_bits().to_le_bytes().to_vec(), h.to_f32())
        }
    }
}

/// Generates rows `r0..r0 + n` of `p` and encodes them: (tensor bytes, scale bytes for these rows' blocks).
/// For FP8, `r0` and `n` are multiples of the block height (except at the end).
fn encode_rows(p: &Planned, cfg: &Qwen3MoeConfig, ts: u64, sd: ScaleDtype, r0: usize, n: usize) -> (Vec<u8>, Vec<u8>) {
    let cols = *p.shape.last().unwrap_or(&1);
    let (mean, std) = distribution(cfg, p.role, &p.shape);
    let mut vals = vec![0f32; n * cols];
    for (i, row) in vals.chunks_exact_mut(cols.max(1)).enumerate() {
        gen_row(ts, r0 + i, cols, mean, std, row);
    }
    match &p.fp8 {
        None => (vals.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect(), Vec::new()),
        Some((_, [b0, b1])) => {
            let (b0, b1) = (*b0, *b1);
            let mut q = vec![0u8; n * cols];
            let mut scales = Vec::new();
            for br in (0..n).step_by(b0) {
                let rows = b0.min(n - br);
                for bc in (0..cols).step_by(b1) {
                    let w = b1.min(cols - bc);
                    let mut absmax = 0f32;
                    for r in br..br + rows {
                        for &v in &vals[r * cols + bc..r * cols + bc + w] {
                            absmax = absmax.max(v.abs());
                        }
                    }
                    let s = if absmax > 0.0 { absmax / E4M3_MAX } else { 1.0 };
                    let (sb, sv) = store_scale(s, sd);
                    scales.extend(sb);
                    for r in br..br + rows {
                        for c in bc..bc + w {
                            q[r * cols + c] = f32_to_e4m3(vals[r * cols + c] / sv);
                        }
                    }
                }
            }
            (q, scales)
        }
    }
}

// ---- files ---------------------------------------------------------------------------------------------------------

fn header_bytes(entries: &[(String, Dtype, Vec<usize>, u64, u64)]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    for (name, dtype, shape, b, e) in entries {
        m.insert(name.clone(), json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [b, e]}));
    }
    let mut h = Value::Object(m).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ModelError> {
    let tmp = path.with_extension("tmp-write");
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(ModelError::write(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| ModelError::write(path, e))
}

fn looks_like_checkpoint_file(name: &str) -> bool {
    name == "config.json" || name == INDEX_FILE || (name.starts_with("model") && name.ends_with(".safetensors"))
}

/// Writes a checkpoint of `config` with values from `seed` into `dir` (created if missing; refused if it already
/// holds checkpoint files).
pub fn write_checkpoint(dir: &Path, config: &Qwen3MoeConfig, seed: u64, opts: &WriteOptions) -> Result<(), ModelError> {
    config.validate()?;
    std::fs::create_dir_all(dir).map_err(|e| ModelError::write(dir, e))?;
    let existing = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    for e in existing.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if looks_like_checkpoint_file(&n) {
            return Err(ModelError::Output {
                path: dir.to_path_buf(),
                message: format!("already holds `{n}`; remove the old checkpoint or choose another directory"),
            });
        }
    }
    let sd = opts.scale_dtype;
    let tensors = plan(config);
    // Shards: greedy in order.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut cur = 0u64;
    for (i, p) in tensors.iter().enumerate() {
        let b = p.bytes(sd);
        if cur > 0 && cur + b > opts.shard_size.max(1) {
            shards.push(vec![]);
            cur = 0;
        }
        if let Some(s) = shards.last_mut() {
            s.push(i);
        }
        cur += b;
    }
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec![SINGLE_FILE.to_string()]
    } else {
        (1..=n).map(|k| format!("model-{k:05}-of-{n:05}.safetensors")).collect()
    };
    let total: u64 = tensors.iter().map(|p| p.bytes(sd)).sum();
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut weight_map = Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        bar.set_message(file.clone());
        let path = dir.join(file);
        let partial = dir.join(format!("{file}.partial"));
        if let Err(e) = write_shard(&partial, shard, &tensors, config, seed, opts, &bar) {
            let _ = std::fs::remove_file(&partial);
            return Err(ModelError::write(&partial, e));
        }
        std::fs::rename(&partial, &path).map_err(|e| ModelError::write(&path, e))?;
        for &i in shard {
            weight_map.insert(tensors[i].name.clone(), json!(file));
            if tensors[i].fp8.is_some() {
                weight_map.insert(format!("{}{SCALE_SUFFIX}", tensors[i].name), json!(file));
            }
        }
    }
    bar.finish_and_clear();
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let text = serde_json::to_string_pretty(&index).unwrap_or_default();
        write_atomic(&dir.join(INDEX_FILE), text.as_bytes())?;
    }
    let cfg = serde_json::to_string_pretty(&config.to_json()).unwrap_or_default();
    write_atomic(&dir.join("config.json"), cfg.as_bytes())
}

fn write_shard(
    path: &PathBuf,
    shard: &[usize],
    tensors: &[Planned],
    cfg: &Qwen3MoeConfig,
    seed: u64,
    opts: &WriteOptions,
    bar: &indicatif::ProgressBar,
) -> std::io::Result<()> {
    let sd = opts.scale_dtype;
    // Values generated per batch: bounded by a quarter shard, so memory stays well below one shard.
    let batch_elems = (opts.shard_size / 4).clamp(1 << 16, 1 << 22) as usize;
    let mut entries = Vec::new();
    let mut off = 0u64;
    for &i in shard {
        let p = &tensors[i];
        let b = p.elems() * p.dtype.size() as u64;
        entries.push((p.name.clone(), p.dtype, p.shape.clone(), off, off + b));
        off += b;
        if let Some((ss, _)) = &p.fp8 {
            let sb = ss.iter().map(|&d| d as u64).product::<u64>() * sd.dtype().size() as u64;
            entries.push((format!("{}{SCALE_SUFFIX}", p.name), sd.dtype(), ss.clone(), off, off + sb));
            off += sb;
        }
    }
    let file = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header_bytes(&entries))?;
    for &i in shard {
        let p = &tensors[i];
        let ts = tensor_seed(seed, &p.name);
        let cols = (*p.shape.last().unwrap_or(&1)).max(1);
        let rows = (p.elems() as usize) / cols;
        let step = p.fp8.as_ref().map_or(64, |(_, b)| b[0]);
        let blocks: Vec<usize> = (0..rows).step_by(step).collect();
        let per_batch = (batch_elems / (step * cols)).max(1);
        let mut scales = Vec::new();
        for batch in blocks.chunks(per_batch) {
            let out: Vec<(Vec<u8>, Vec<u8>)> =
                batch.par_iter().map(|&r0| encode_rows(p, cfg, ts, sd, r0, step.min(rows - r0))).collect();
            for (t, s) in out {
                w.write_all(&t)?;
                bar.inc(t.len() as u64);
                scales.extend(s);
            }
        }
        if p.fp8.is_some() {
            w.write_all(&scales)?;
            bar.inc(scales.len() as u64);
        }
    }
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}
