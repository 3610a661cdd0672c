//! Qwen3-MoE checkpoint reader: `config.json` plus one `model.safetensors` or a sharded set named by
//! `model.safetensors.index.json`, memory-mapped (memmap2). [`Checkpoint::open`] validates everything before it returns:
//! the config, every safetensors header, the index against the shards, and every tensor against the config (name,
//! dtype, shape, block-scale shape, scale values).
//!
//! Headers are parsed and validated by the `safetensors` crate ([`read_header`] calls
//! `SafeTensors::read_metadata`: length prefix, JSON, dtypes, shapes, offsets matching dtype x shape, contiguous from
//! 0, ending at the end of the file). Its errors carry no numbers and mostly no tensor name, so [`read_header`]
//! explains them: every message names the file and, where one tensor is at fault, the tensor, with expected and found;
//! a file shorter than its header says is reported as truncated. Everything the crate does not know is ours: the
//! index, tensors across shards, and every tensor against the config.
//!
//! Rules (see ../shared/QWEN3.md and ../docs/checkpoint.md, "Which dtypes"):
//! - Expected tensors follow the transformers module tree. The config says which Linear weights are FP8: when it is
//!   quantized and no `modules_to_not_convert` entry is a substring of the module name (transformers' rule). The
//!   header says how each weight is stored:
//!   - a Linear the config calls FP8: `F8_E4M3` + `<name>_scale_inv` of shape `[ceil(out/b0), ceil(in/b1)]` (dtype
//!     BF16/F16/F32), or BF16/F16/F32 without scales (a partially quantized checkpoint: accepted with a warning; the
//!     CPU forward uses the stored values, the GPU forward quantizes them at load with the config's block size, see
//!     [`Checkpoint::fp8_weight_or_quantize`]);
//!   - a router (`model.layers.N.mlp.gate.weight`): never an FP8 matmul (transformers 5 keeps it a plain parameter,
//!     whatever `modules_to_not_convert` lists), so BF16/F16/F32; or `F8_E4M3` with its block scales when the config
//!     gives a block size, dequantized at load (`tensor_f32`; a warning says so);
//!   - norms, embeddings, biases and the Linears the config leaves unquantized: BF16, F16 or F32.
//! - Block scales exist exactly for the weights stored as `F8_E4M3`: a missing one, or one beside a float weight, is
//!   an error.
//! - A missing tensor is an error. An unexpected extra tensor is an error too (a tensor we would ignore means the file
//!   is not the architecture the config claims, e.g. attention biases with `attention_bias: false`: ignoring it would be
//!   a silent wrong answer). Two benign exceptions are accepted with a warning in [`Checkpoint::warnings`]:
//!   `lm_head.weight` when `tie_word_embeddings` is true (transformers ties it to the embedding, so it is unused), and
//!   `*.rotary_emb.inv_freq` buffers some old exporters save.
//! - With an index, every weight_map entry must point to a file that holds the tensor, and every tensor of a shard
//!   must be listed for that shard. Shard names must be plain file names in the same directory.
//!
//! [`Checkpoint::from_memory`] runs exactly the same validation on in-memory files; [`fuzz_entry`] drives it from one
//! byte string (the cargo-fuzz target in `fuzz/` and the smoke test use it).
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use gpu_kernels::num::{bf16_to_f32, e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

pub use super::config::{Fp8Quantization, Qwen3MoeConfig};
pub use super::error::ModelError;

/// Name of the single-file weights.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Suffix appended to an FP8 weight's name to name its block scales.
pub const SCALE_SUFFIX: &str = "_scale_inv";
/// Largest safetensors header (the safetensors crate's limit, 100 MB; used in messages).
const MAX_HEADER: u64 = 100_000_000;

/// Element types of safetensors (all of them are recognised so that a wrong one is reported as a wrong dtype).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// Parses the safetensors dtype string.
    pub fn parse(s: &str) -> Option<Dtype> {
        use Dtype::*;
        Some(match s {
            "BOOL" => BOOL,
            "U8" => U8,
            "I8" => I8,
            "F8_E5M2" => F8_E5M2,
            "F8_E4M3" => F8_E4M3,
            "I16" => I16,
            "U16" => U16,
            "F16" => F16,
            "BF16" => BF16,
            "I32" => I32,
            "U32" => U32,
            "F32" => F32,
            "F64" => F64,
            "I64" => I64,
            "U64" => U64,
            _ => return None,
        })
    }
    /// The safetensors dtype string.
    pub fn as_str(self) -> &'static str {
        use Dtype::*;
        match self {
            BOOL => "BOOL",
            U8 => "U8",
            I8 => "I8",
            F8_E5M2 => "F8_E5M2",
            F8_E4M3 => "F8_E4M3",
            I16 => "I16",
            U16 => "U16",
            F16 => "F16",
            BF16 => "BF16",
            I32 => "I32",
            U32 => "U32",
            F32 => "F32",
            F64 => "F64",
            I64 => "I64",
            U64 => "U64",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        use Dtype::*;
        match self {
            BOOL | U8 | I8 | F8_E5M2 | F8_E4M3 => 1,
            I16 | U16 | F16 | BF16 => 2,
            I32 | U32 | F32 => 4,
            F64 | I64 | U64 => 8,
        }
    }
    /// BF16, F16 or F32: the dtypes accepted for unquantized tensors and for scales.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::BF16 | Dtype::F16 | Dtype::F32)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the config says a tensor must be.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorKind {
    /// BF16, F16 or F32.
    Float,
    /// A Linear weight the config calls FP8: F8_E4M3 with block scales `<name>_scale_inv` of shape `scale_shape` (what
    /// the writer produces), or stored BF16/F16/F32 without scales (a partially quantized checkpoint).
    Fp8Weight { scale_shape: Vec<usize> },
    /// A MoE router (never an FP8 matmul): BF16/F16/F32 (what the writer produces), or F8_E4M3 with block scales of
    /// shape `scale_shape` when the config gives a block size (`None`: not quantized, F8_E4M3 is refused), dequantized
    /// at load.
    Router { scale_shape: Option<Vec<usize>> },
    /// BF16/F16/F32 block scales of the weight `weight` (shape `weight_shape`); present exactly when that weight is
    /// stored as F8_E4M3.
    Fp8Scale { weight: String, weight_shape: Vec<usize> },
}

impl TensorKind {
    /// Whether a tensor of this kind may be stored as `dtype`.
    pub fn accepts(&self, dtype: Dtype) -> bool {
        match self {
            TensorKind::Fp8Weight { .. } | TensorKind::Router { scale_shape: Some(_) } => {
                dtype == Dtype::F8_E4M3 || dtype.is_float()
            }
            TensorKind::Float | TensorKind::Router { scale_shape: None } | TensorKind::Fp8Scale { .. } => {
                dtype.is_float()
            }
        }
    }

    /// The dtypes [`TensorKind::accepts`], for messages.
    pub fn expected_dtypes(&self) -> &'static str {
        match self {
            TensorKind::Fp8Weight { .. } => "F8_E4M3 (with block scales) or BF16|F16|F32",
            TensorKind::Router { scale_shape: Some(_) } => "BF16|F16|F32 or F8_E4M3 (with block scales)",
            TensorKind::Float | TensorKind::Router { scale_shape: None } => "BF16|F16|F32",
            TensorKind::Fp8Scale { .. } => "BF16|F16|F32 (block scales)",
        }
    }
}

/// Role of a tensor in the model (the generator picks its initial distribution from it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Role {
    Embedding,
    Norm,
    /// A Linear weight [out, in]; `residual` for the projections that write into the residual stream (o, down).
    Linear {
        residual: bool,
    },
    Router,
    LmHead,
    Bias,
    Scale,
}

/// A tensor the config calls for: its shape, kind and role.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub shape: Vec<usize>,
    pub kind: TensorKind,
    pub role: Role,
}

impl TensorSpec {
    fn describe(&self) -> String {
        match &self.kind {
            TensorKind::Fp8Scale { weight, .. } => {
                format!("BF16|F16|F32 block scales {:?} of the F8_E4M3 weight `{weight}`", self.shape)
            }
            k => format!("{} {:?}", k.expected_dtypes(), self.shape),
        }
    }
}

fn linear(cfg: &Qwen3MoeConfig, module: &str, out: usize, inp: usize, role: Role) -> TensorSpec {
    let shape = vec![out, inp];
    match &cfg.quantization {
        Some(q) if cfg.is_quantized_module(module) => {
            let [b0, b1] = q.weight_block_size;
            TensorSpec {
                shape,
                kind: TensorKind::Fp8Weight { scale_shape: vec![out.div_ceil(b0), inp.div_ceil(b1)] },
                role,
            }
        }
        _ => TensorSpec { shape, kind: TensorKind::Float, role },
    }
}

/// Parses a canonical decimal index (no sign, no leading zeros) below `limit`.
fn parse_index(s: &str, limit: usize) -> Option<usize> {
    if s.is_empty() || s.len() > 10 || (s.len() > 1 && s.starts_with('0')) || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&n| n < limit)
}

/// What the config expects for the tensor `name`, or None when the config does not call for such a tensor.
/// `lm_head.weight` with tied embeddings is None (the caller treats it as benign).
pub fn spec_for(cfg: &Qwen3MoeConfig, name: &str) -> Option<TensorSpec> {
    if let Some(base) = name.strip_suffix(SCALE_SUFFIX) {
        if base.ends_with(SCALE_SUFFIX) {
            return None; // no scale of a scale (and no deep recursion on hostile names)
        }
        let w = spec_for(cfg, base)?;
        return match w.kind {
            TensorKind::Fp8Weight { scale_shape } | TensorKind::Router { scale_shape: Some(scale_shape) } => {
                Some(TensorSpec {
                    shape: scale_shape,
                    kind: TensorKind::Fp8Scale { weight: base.to_string(), weight_shape: w.shape },
                    role: Role::Scale,
                })
            }
            _ => None,
        };
    }
    let h = cfg.hidden_size;
    let float = |shape: Vec<usize>, role| Some(TensorSpec { shape, kind: TensorKind::Float, role });
    match name {
        "model.embed_tokens.weight" => return float(vec![cfg.vocab_size, h], Role::Embedding),
        "model.norm.weight" => return float(vec![h], Role::Norm),
        "lm_head.weight" if !cfg.tie_word_embeddings => {
            return Some(linear(cfg, "lm_head", cfg.vocab_size, h, Role::LmHead))
        }
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (l, rest) = rest.split_once('.')?;
    let l = parse_index(l, cfg.num_hidden_layers)?;
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    match rest {
        "input_layernorm.weight" | "post_attention_layernorm.weight" => return float(vec![h], Role::Norm),
        "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => return float(vec![cfg.head_dim], Role::Norm),
        "self_attn.q_proj.weight" => return Some(linear(cfg, module, q, h, Role::Linear { residual: false })),
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => {
            return Some(linear(cfg, module, kv, h, Role::Linear { residual: false }))
        }
        "self_attn.o_proj.weight" => return Some(linear(cfg, module, h, q, Role::Linear { residual: true })),
        "self_attn.q_proj.bias" if cfg.attention_bias => return float(vec![q], Role::Bias),
        "self_attn.k_proj.bias" | "self_attn.v_proj.bias" if cfg.attention_bias => return float(vec![kv], Role::Bias),
        "self_attn.o_proj.bias" if cfg.attention_bias => return float(vec![h], Role::Bias),
        _ => {}
    }
    let mlp = rest.strip_prefix("mlp.")?;
    if cfg.is_moe_layer(l) {
        if mlp == "gate.weight" {
            // Never an FP8 matmul (transformers 5: a plain parameter that FP8 conversion does not touch), whatever
            // modules_to_not_convert lists; the header decides between float and F8_E4M3 + scales.
            let (e, [b0, b1]) = (cfg.num_experts, cfg.quantization.as_ref().map_or([0, 0], |q| q.weight_block_size));
            let scale_shape = cfg.quantization.as_ref().map(|_| vec![e.div_ceil(b0), h.div_ceil(b1)]);
            return Some(TensorSpec {
                shape: vec![e, h],
                kind: TensorKind::Router { scale_shape },
                role: Role::Router,
            });
        }
        let (e, proj) = mlp.strip_prefix("experts.")?.split_once('.')?;
        parse_index(e, cfg.num_experts)?;
        let i = cfg.moe_intermediate_size;
        match proj {
            "gate_proj.weight" | "up_proj.weight" => Some(linear(cfg, module, i, h, Role::Linear { residual: false })),
            "down_proj.weight" => Some(linear(cfg, module, h, i, Role::Linear { residual: true })),
            _ => None,
        }
    } else {
        let i = cfg.intermediate_size;
        match mlp {
            "gate_proj.weight" | "up_proj.weight" => Some(linear(cfg, module, i, h, Role::Linear { residual: false })),
            "down_proj.weight" => Some(linear(cfg, module, h, i, Role::Linear { residual: true })),
            _ => None,
        }
    }
}

/// Every tensor name the config calls for, in a canonical order (embedding, layers in order, final norm, lm_head);
/// each FP8 weight is followed by its scale. Lazy: the 30B model has ~37k names.
pub fn expected_names(cfg: &Qwen3MoeConfig) -> impl Iterator<Item = String> + '_ {
    let layers = (0..cfg.num_hidden_layers).flat_map(move |l| {
        let p = format!("model.layers.{l}.");
        let mut v: Vec<String> = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
            .iter()
            .map(|m| format!("{p}{m}.weight"))
            .collect();
        if cfg.attention_bias {
            v.extend(["q", "k", "v"].iter().map(|m| format!("{p}self_attn.{m}_proj.bias")));
        }
        v.push(format!("{p}self_attn.q_norm.weight"));
        v.push(format!("{p}self_attn.k_norm.weight"));
        v.push(format!("{p}self_attn.o_proj.weight"));
        if cfg.attention_bias {
            v.push(format!("{p}self_attn.o_proj.bias"));
        }
        v.push(format!("{p}post_attention_layernorm.weight"));
        let moe = cfg.is_moe_layer(l);
        if moe {
            v.push(format!("{p}mlp.gate.weight"));
        } else {
            v.extend(["gate", "up", "down"].iter().map(|m| format!("{p}mlp.{m}_proj.weight")));
        }
        let experts = if moe { cfg.num_experts } else { 0 };
        let p2 = p.clone();
        v.into_iter().chain((0..experts).flat_map(move |e| {
            let p2 = p2.clone();
            ["gate", "up", "down"].into_iter().map(move |m| format!("{p2}mlp.experts.{e}.{m}_proj.weight"))
        }))
    });
    let tail = std::iter::once("model.norm.weight".to_string())
        .chain((!cfg.tie_word_embeddings).then(|| "lm_head.weight".to_string()));
    std::iter::once("model.embed_tokens.weight".to_string()).chain(layers).chain(tail).flat_map(move |n| {
        let scale = match spec_for(cfg, &n) {
            Some(TensorSpec { kind: TensorKind::Fp8Weight { .. }, .. }) => Some(format!("{n}{SCALE_SUFFIX}")),
            _ => None,
        };
        std::iter::once(n).chain(scale)
    })
}

/// One tensor entry of a safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range relative to the start of the data section.
    pub begin: u64,
    pub end: u64,
}

/// A parsed safetensors header.
#[derive(Clone, Debug, PartialEq)]
pub struct Header {
    /// Byte offset of the data section in the file (8 + header length).
    pub data_start: u64,
    /// Sorted by name.
    pub tensors: Vec<HeaderEntry>,
}

impl Dtype {
    /// Our dtype for the safetensors crate's (None for a dtype a later crate version may add).
    pub fn from_safetensors(d: StDtype) -> Option<Dtype> {
        use Dtype::*;
        Some(match d {
            StDtype::BOOL => BOOL,
            StDtype::U8 => U8,
            StDtype::I8 => I8,
            StDtype::F8_E5M2 => F8_E5M2,
            StDtype::F8_E4M3 => F8_E4M3,
            StDtype::I16 => I16,
            StDtype::U16 => U16,
            StDtype::F16 => F16,
            StDtype::BF16 => BF16,
            StDtype::I32 => I32,
            StDtype::U32 => U32,
            StDtype::F32 => F32,
            StDtype::F64 => F64,
            StDtype::I64 => I64,
            StDtype::U64 => U64,
            _ => return None,
        })
    }
}

/// Reads the safetensors header of a whole file with the `safetensors` crate ([`SafeTensors::read_metadata`]: the
/// 8-byte length prefix and its 100 MB limit, UTF-8 JSON, known dtypes, shapes and offsets, offsets matching
/// dtype x shape, contiguous from 0 and ending exactly at the end of the file). The crate's errors carry no numbers and
/// mostly no tensor name, so they are turned into [`ModelError`]s that name the file and, where one tensor is at fault,
/// the tensor, with expected and found (truncation, which the crate reports like trailing bytes, becomes
/// [`ModelError::Truncated`]). `file` only names the file in errors.
pub fn read_header(file: &str, bytes: &[u8]) -> Result<Header, ModelError> {
    let len = bytes.len() as u64;
    let n = bytes.first_chunk::<8>().map_or(0, |p| u64::from_le_bytes(*p));
    // The crate's own Metadata (serde) parse of the header text, when the text lies in the file: it explains the
    // crate's errors and guards its final size check, `data end + 8 + n == file length`, which overflows (a panic
    // with overflow checks, as under cargo-fuzz) for an end offset near usize::MAX.
    let text = (n <= MAX_HEADER && len >= 8 + n).then(|| &bytes[8..(8 + n) as usize]);
    let meta: Option<Metadata> = text.and_then(|t| serde_json::from_slice(t).ok());
    let have = len.saturating_sub(n.saturating_add(8));
    if let Some(m) = &meta {
        let end = data_end(m);
        if end.checked_add(8 + n).is_none_or(|t| t > usize::MAX as u64) {
            return Err(ModelError::Truncated { file: file.to_string(), expected: end, found: have });
        }
    }
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| explain(file, bytes, text, meta.as_ref(), e))?;
    let mut tensors = Vec::with_capacity(metadata.tensors().len());
    for (name, t) in metadata.tensors() {
        let Some(dtype) = Dtype::from_safetensors(t.dtype) else {
            let message = format!("tensor `{name}`: dtype {:?} is not supported", t.dtype);
            return Err(ModelError::Header { file: file.to_string(), message });
        };
        let (begin, end) = (t.data_offsets.0 as u64, t.data_offsets.1 as u64);
        tensors.push(HeaderEntry { name, dtype, shape: t.shape.clone(), begin, end });
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Header { data_start: 8 + n, tensors })
}

/// End of the last tensor's data, relative to the data section.
fn data_end(meta: &Metadata) -> u64 {
    meta.tensors().values().map(|t| t.data_offsets.1 as u64).max().unwrap_or(0)
}

/// A [`ModelError`] for an error of [`SafeTensors::read_metadata`] on `bytes` (the whole file `file`), with the
/// numbers and the tensor the crate does not give: `text` is the header text when it lies in the file, `meta` the
/// crate's parse of it when that succeeded.
fn explain(file: &str, bytes: &[u8], text: Option<&[u8]>, meta: Option<&Metadata>, e: SafeTensorError) -> ModelError {
    let herr = |m: String| ModelError::Header { file: file.to_string(), message: m };
    let len = bytes.len() as u64;
    let n = bytes.first_chunk::<8>().map_or(0, |p| u64::from_le_bytes(*p));
    match e {
        SafeTensorError::HeaderTooSmall => {
            herr(format!("the file is {len} bytes, shorter than the 8-byte header length"))
        }
        SafeTensorError::HeaderTooLarge => herr(format!("header length {n} exceeds the {MAX_HEADER}-byte limit")),
        SafeTensorError::InvalidHeaderLength => {
            ModelError::Truncated { file: file.to_string(), expected: n.saturating_add(8), found: len }
        }
        SafeTensorError::InvalidHeader => match text.map(std::str::from_utf8) {
            Some(Err(u)) => herr(format!("header is not UTF-8: {u}")),
            _ => herr("header is not UTF-8".into()),
        },
        SafeTensorError::InvalidHeaderStart => herr("header does not start with `{`".into()),
        SafeTensorError::InvalidHeaderDeserialization => herr(text.map_or_else(
            || "header cannot be deserialized".into(),
            |t| header_json_problem(t).unwrap_or_else(|| "header cannot be deserialized".into()),
        )),
        SafeTensorError::MetadataIncompleteBuffer => {
            let have = len.saturating_sub(n.saturating_add(8));
            match meta.map(data_end) {
                Some(end) if end > have => ModelError::Truncated { file: file.to_string(), expected: end, found: have },
                Some(end) => herr(format!("{} trailing bytes after the last tensor (data ends at {end})", have - end)),
                None => herr("the tensor data does not end exactly at the end of the file".into()),
            }
        }
        SafeTensorError::InvalidOffset(_)
        | SafeTensorError::TensorInvalidInfo
        | SafeTensorError::ValidationOverflow => {
            herr(meta.and_then(|m| layout_problem(m, &e)).unwrap_or_else(|| format!("{e}")))
        }
        e => herr(format!("{e}")),
    }
}

/// Why the crate could not deserialize a header text: the JSON error, or the first entry whose own deserialization
/// (as the crate's `TensorInfo`, or `__metadata__` as a string map) fails, with its name.
fn header_json_problem(text: &[u8]) -> Option<String> {
    let v: Value = match serde_json::from_slice(text) {
        Ok(v) => v,
        Err(e) => return Some(format!("header is not valid JSON: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return Some("header is not a JSON object".into());
    };
    obj.iter().find_map(|(name, entry)| {
        if name == "__metadata__" {
            let r = Option::<HashMap<String, String>>::deserialize(entry);
            r.err().map(|e| format!("`__metadata__` is not a map of strings: {e}"))
        } else {
            TensorInfo::deserialize(entry).err().map(|e| format!("tensor `{name}`: {e}"))
        }
    })
}

/// The tensor behind the crate's layout errors (`InvalidOffset`, `TensorInvalidInfo`, `ValidationOverflow`), found as
/// the crate finds it: walking the tensors in data_offsets order from offset 0.
fn layout_problem(meta: &Metadata, e: &SafeTensorError) -> Option<String> {
    let mut infos: Vec<(String, &TensorInfo)> = meta.tensors().into_iter().collect();
    infos.sort_by(|a, b| (a.1.data_offsets, &a.0).cmp(&(b.1.data_offsets, &b.0)));
    let mut start = 0;
    for (name, t) in infos {
        let (s, end) = t.data_offsets;
        if s != start || end < s {
            // The crate names this tensor; with equal offsets ours may be another one, so the crate's name is used.
            let name = match e {
                SafeTensorError::InvalidOffset(n) => n,
                _ => &name,
            };
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {end}]: expected the data to start at {start}, where the \
                 previous tensor ends (tensors are contiguous from offset 0: a gap, an overlap or a reversed range)"
            ));
        }
        start = end;
        let Some(nbytes) = t.shape.iter().try_fold(t.dtype.size(), |a, &d| a.checked_mul(d)) else {
            return Some(format!("tensor `{name}`: {:?} {:?} overflows the byte count", t.dtype, t.shape));
        };
        if end - s != nbytes {
            return Some(format!(
                "tensor `{name}`: data_offsets [{s}, {end}] span {} bytes, but {:?} {:?} needs {nbytes}",
                end - s,
                t.dtype,
                t.shape
            ));
        }
    }
    None
}

/// The bytes of one file: a memory map or an owned buffer (in-memory checkpoints, fuzzing).
enum Backing {
    Mmap(memmap2::Mmap),
    Bytes(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Bytes(b) => b,
        }
    }
}

struct Shard {
    name: String,
    backing: Backing,
}

#[derive(Clone, Debug)]
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    begin: usize,
    end: usize,
}

/// A tensor's raw little-endian bytes as stored, with dtype and shape (for uploads without conversion).
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    /// The file that holds it.
    pub file: &'a str,
}

/// An FP8 weight: e4m3 bytes [out, in] (borrowed from the file when stored so, owned when quantized at load) and its
/// block scales converted to f32 [ceil(out/b0), ceil(in/b1)].
#[derive(Clone, Debug)]
pub struct Fp8Weight<'a> {
    pub shape: [usize; 2],
    pub data: Cow<'a, [u8]>,
    pub scale_shape: [usize; 2],
    pub scales: Vec<f32>,
    pub block: [usize; 2],
}

/// An opened, fully validated checkpoint.
pub struct Checkpoint {
    pub config: Qwen3MoeConfig,
    /// The directory it was opened from (empty for [`Checkpoint::from_memory`]).
    pub dir: PathBuf,
    shards: Vec<Shard>,
    entries: BTreeMap<String, Entry>,
    warnings: Vec<String>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files())
            .field("tensors", &self.entries.len())
            .finish()
    }
}

fn parse_index_json(text: &str) -> Result<Vec<(String, String)>, ModelError> {
    let ierr = |m: String| ModelError::Index { file: INDEX_FILE.into(), message: m };
    let v: Value =
        serde_json::from_str(text).map_err(|e| ModelError::Json { file: INDEX_FILE.into(), message: e.to_string() })?;
    let wm = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| ierr("no `weight_map` object".into()))?;
    let mut out = Vec::with_capacity(wm.len());
    for (t, f) in wm {
        let f = f.as_str().ok_or_else(|| ierr(format!("weight_map[`{t}`] is not a string")))?;
        if f.is_empty() || f.contains('/') || f.contains('\\') || f == "." || f == ".." || f.contains('\0') {
            return Err(ierr(format!(
                "weight_map[`{t}`] = `{f}` is not a plain file name in the checkpoint directory"
            )));
        }
        out.push((t.clone(), f.to_string()));
    }
    if out.is_empty() {
        return Err(ierr("`weight_map` is empty".into()));
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens `dir`: `config.json`, then `model.safetensors.index.json` and its shards if the index exists, else
    /// `model.safetensors`. Validates every tensor (see the module doc) before returning.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let cfg_path = dir.join("config.json");
        let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let config = Qwen3MoeConfig::from_json_str(&cfg_text)?;
        let index_path = dir.join(INDEX_FILE);
        let (index, files) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let map = parse_index_json(&text)?;
            let mut files: Vec<String> = map.iter().map(|(_, f)| f.clone()).collect();
            files.sort();
            files.dedup();
            (Some(map), files)
        } else if dir.join(SINGLE_FILE).exists() {
            (None, vec![SINGLE_FILE.to_string()])
        } else {
            return Err(ModelError::NoWeights { dir: dir.to_path_buf() });
        };
        let mut shards = Vec::with_capacity(files.len());
        for f in files {
            let p = dir.join(&f);
            if index.is_some() && !p.is_file() {
                return Err(ModelError::MissingShard { index: INDEX_FILE.into(), shard: f });
            }
            let file = std::fs::File::open(&p).map_err(|e| ModelError::io(&p, e))?;
            let len = file.metadata().map_err(|e| ModelError::io(&p, e))?.len();
            let backing = if len < 4096 {
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut &file, &mut v).map_err(|e| ModelError::io(&p, e))?;
                Backing::Bytes(v)
            } else {
                // SAFETY: the map is read-only; the checkpoint files are not expected to change while open (as every
                // safetensors loader assumes). A concurrent truncation would fault, not corrupt memory safety of
                // Rust objects other than the mapped bytes.
                let m = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(&p, e))?;
                Backing::Mmap(m)
            };
            shards.push(Shard { name: f, backing });
        }
        Self::assemble(config, dir.to_path_buf(), index, shards)
    }

    /// The same validation as [`Checkpoint::open`] over in-memory files: `config_json`, an optional index text, and
    /// the files by name (`model.safetensors` alone when there is no index). No filesystem access.
    pub fn from_memory(
        config_json: &str,
        index_json: Option<&str>,
        files: Vec<(String, Vec<u8>)>,
    ) -> Result<Self, ModelError> {
        let config = Qwen3MoeConfig::from_json_str(config_json)?;
        let mut files: HashMap<String, Vec<u8>> = files.into_iter().collect();
        let (index, shards) = match index_json {
            Some(text) => {
                let map = parse_index_json(text)?;
                let mut names: Vec<String> = map.iter().map(|(_, f)| f.clone()).collect();
                names.sort();
                names.dedup();
                let mut shards = Vec::new();
                for n in names {
                    let b = files
                        .remove(&n)
                        .ok_or_else(|| ModelError::MissingShard { index: INDEX_FILE.into(), shard: n.clone() })?;
                    shards.push(Shard { name: n, backing: Backing::Bytes(b) });
                }
                (Some(map), shards)
            }
            None => {
                let b = files
                    .remove(SINGLE_FILE)
                    .ok_or_else(|| ModelError::NoWeights { dir: PathBuf::from("<memory>") })?;
                (None, vec![Shard { name: SINGLE_FILE.into(), backing: Backing::Bytes(b) }])
            }
        };
        Self::assemble(config, PathBuf::new(), index, shards)
    }

    fn assemble(
        config: Qwen3MoeConfig,
        dir: PathBuf,
        index: Option<Vec<(String, String)>>,
        shards: Vec<Shard>,
    ) -> Result<Self, ModelError> {
        // 1. Headers.
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        for (si, s) in shards.iter().enumerate() {
            let bytes = s.backing.bytes();
            let h = read_header(&s.name, bytes)?;
            for t in h.tensors {
                let e = Entry {
                    shard: si,
                    dtype: t.dtype,
                    shape: t.shape,
                    begin: (h.data_start + t.begin) as usize,
                    end: (h.data_start + t.end) as usize,
                };
                if let Some(prev) = entries.get(&t.name) {
                    return Err(ModelError::DuplicateTensor {
                        tensor: t.name,
                        first: shards[prev.shard].name.clone(),
                        second: s.name.clone(),
                    });
                }
                entries.insert(t.name, e);
            }
        }
        // 2. Index against shards.
        if let Some(map) = &index {
            let listed: HashMap<&str, &str> = map.iter().map(|(t, f)| (t.as_str(), f.as_str())).collect();
            for (t, f) in map {
                let ok = entries.get(t).is_some_and(|e| shards[e.shard].name == *f);
                if !ok {
                    return Err(ModelError::TensorNotInShard {
                        index: INDEX_FILE.into(),
                        tensor: t.clone(),
                        shard: f.clone(),
                    });
                }
            }
            for (t, e) in &entries {
                if listed.get(t.as_str()) != Some(&shards[e.shard].name.as_str()) {
                    return Err(ModelError::TensorNotInIndex { file: shards[e.shard].name.clone(), tensor: t.clone() });
                }
            }
        }
        // 3. Every present tensor against the config.
        let mut warnings = Vec::new();
        // Weights the config calls FP8 that are stored in float; routers stored as F8_E4M3.
        let (mut partial, mut fp8_routers): (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        for (name, e) in &entries {
            let file = &shards[e.shard].name;
            let Some(spec) = spec_for(&config, name) else {
                if name == "lm_head.weight" && config.tie_word_embeddings {
                    warnings.push(format!(
                        "{file}: `lm_head.weight` present but tie_word_embeddings is true: it is ignored (the embedding is used)"
                    ));
                    continue;
                }
                if name.ends_with("rotary_emb.inv_freq") {
                    warnings.push(format!("{file}: `{name}` ignored (RoPE frequencies are computed from rope_theta)"));
                    continue;
                }
                return Err(ModelError::UnexpectedTensor { file: file.clone(), tensor: name.clone() });
            };
            if !spec.kind.accepts(e.dtype) {
                return Err(ModelError::WrongDtype {
                    file: file.clone(),
                    tensor: name.clone(),
                    expected: spec.kind.expected_dtypes().into(),
                    found: e.dtype.to_string(),
                });
            }
            if let TensorKind::Fp8Scale { weight, .. } = &spec.kind {
                if let Some(w) = entries.get(weight).filter(|w| w.dtype != Dtype::F8_E4M3) {
                    return Err(ModelError::ScaleOfFloatWeight {
                        file: file.clone(),
                        tensor: name.clone(),
                        weight: weight.clone(),
                        dtype: w.dtype.to_string(),
                    });
                }
            }
            match (&spec.kind, e.dtype) {
                // lm_head runs unquantized in both forwards (bf16 on the GPU), however it is stored.
                (TensorKind::Fp8Weight { .. }, d) if d != Dtype::F8_E4M3 && spec.role != Role::LmHead => {
                    partial.push(name.as_str())
                }
                (TensorKind::Router { .. }, Dtype::F8_E4M3) => fp8_routers.push(name.as_str()),
                _ => {}
            }
            if e.shape != spec.shape {
                if let TensorKind::Fp8Scale { weight_shape, .. } = &spec.kind {
                    let block = config.quantization.as_ref().map_or([0, 0], |q| q.weight_block_size);
                    return Err(ModelError::WrongScaleShape {
                        file: file.clone(),
                        tensor: name.clone(),
                        expected: spec.shape.clone(),
                        why: format!("weight {weight_shape:?}, blocks {block:?}"),
                        found: e.shape.clone(),
                    });
                }
                return Err(ModelError::WrongShape {
                    file: file.clone(),
                    tensor: name.clone(),
                    expected: spec.shape.clone(),
                    found: e.shape.clone(),
                });
            }
            if let TensorKind::Fp8Scale { .. } = spec.kind {
                let data = &shards[e.shard].backing.bytes()[e.begin..e.end];
                if let Some((i, v)) =
                    to_f32(e.dtype, data).into_iter().enumerate().find(|(_, v)| !(v.is_finite() && *v >= 0.0))
                {
                    return Err(ModelError::BadScale { file: file.clone(), tensor: name.clone(), index: i, value: v });
                }
            }
        }
        let block = config.quantization.as_ref().map_or([0, 0], |q| q.weight_block_size);
        let few = |v: &[&str]| {
            let mut s = v.iter().take(3).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
            if v.len() > 3 {
                s.push_str(", ...");
            }
            s
        };
        if !partial.is_empty() {
            warnings.push(format!(
                "partially quantized: {} weight(s) that quantization_config calls FP8 are stored in BF16/F16/F32 ({}): \
                 the CPU forward uses them as stored; the GPU forward quantizes them to e4m3 at load, in {block:?} \
                 blocks",
                partial.len(),
                few(&partial)
            ));
        }
        if !fp8_routers.is_empty() {
            warnings.push(format!(
                "{} router(s) stored as F8_E4M3 with block scales ({}): dequantized at load (a router is never an FP8 \
                 matmul)",
                fp8_routers.len(),
                few(&fp8_routers)
            ));
        }
        // 4. Missing tensors: every weight the config calls for, and the block scales of every weight stored as
        // F8_E4M3 (the scales of float-stored weights were refused above). All present names that matter are valid
        // and distinct, so the first missing expected name is found within about 2 x (present + 1) steps.
        let ck = Checkpoint { config, dir, shards, entries, warnings };
        for n in expected_names(&ck.config).filter(|n| !n.ends_with(SCALE_SUFFIX)) {
            let Some(e) = ck.entries.get(&n) else {
                let expected = spec_for(&ck.config, &n).map(|s| s.describe()).unwrap_or_default();
                return Err(ModelError::MissingTensor { tensor: n, expected });
            };
            let scale = format!("{n}{SCALE_SUFFIX}");
            if e.dtype == Dtype::F8_E4M3 && !ck.entries.contains_key(&scale) {
                let expected = spec_for(&ck.config, &scale).map(|s| s.describe()).unwrap_or_default();
                return Err(ModelError::MissingTensor { tensor: scale, expected });
            }
        }
        Ok(ck)
    }

    fn entry(&self, name: &str) -> Result<&Entry, ModelError> {
        self.entries.get(name).ok_or_else(|| ModelError::NoSuchTensor { tensor: name.to_string() })
    }

    /// Tensor names, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Number of tensors (weights and scales).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the checkpoint holds no tensor (never, once validated).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The shape of a tensor.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        Ok(self.entry(name)?.shape.clone())
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Result<Dtype, ModelError> {
        Ok(self.entry(name)?.dtype)
    }

    /// Whether `name` is an FP8 weight (with a `<name>_scale_inv`).
    pub fn is_fp8(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.dtype == Dtype::F8_E4M3)
    }

    /// The weight files, in the order they were opened.
    pub fn files(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.name.as_str()).collect()
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| (e.end - e.begin) as u64).sum()
    }

    /// Non-fatal findings (ignored benign tensors).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The raw stored bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>, ModelError> {
        let e = self.entry(name)?;
        let s = &self.shards[e.shard];
        Ok(RawTensor { dtype: e.dtype, shape: &e.shape, data: &s.backing.bytes()[e.begin..e.end], file: &s.name })
    }

    /// An FP8 weight's e4m3 bytes and its f32 block scales (for GPU upload).
    pub fn fp8_weight(&self, name: &str) -> Result<Fp8Weight<'_>, ModelError> {
        let w = self.raw(name)?;
        if w.dtype != Dtype::F8_E4M3 || w.shape.len() != 2 {
            return Err(ModelError::WrongDtype {
                file: w.file.to_string(),
                tensor: name.to_string(),
                expected: "F8_E4M3 [out, in]".into(),
                found: format!("{} {:?}", w.dtype, w.shape),
            });
        }
        let s = self.raw(&format!("{name}{SCALE_SUFFIX}"))?;
        let block = self.config.quantization.as_ref().map_or([1, 1], |q| q.weight_block_size);
        Ok(Fp8Weight {
            shape: [w.shape[0], w.shape[1]],
            data: Cow::Borrowed(w.data),
            scale_shape: [s.shape[0], s.shape[1]],
            scales: to_f32(s.dtype, s.data),
            block,
        })
    }

    /// A weight the config calls FP8 as block FP8 with the config's block size: as stored when it is F8_E4M3
    /// ([`Checkpoint::fp8_weight`]); quantized here when it is stored in BF16/F16/F32 (a partially quantized
    /// checkpoint), by [`quantize_fp8_blocks`] (f32 scales `absmax / 448`, as `hga checkpoint new` writes with f32
    /// scales). A float weight the config leaves unquantized (`modules_to_not_convert`), or any weight of a config
    /// without `quantization_config`, is refused: the config does not make it an FP8 linear.
    pub fn fp8_weight_or_quantize(&self, name: &str) -> Result<Fp8Weight<'_>, ModelError> {
        let w = self.raw(name)?;
        if w.dtype == Dtype::F8_E4M3 {
            return self.fp8_weight(name);
        }
        let block = match (&self.config.quantization, spec_for(&self.config, name).map(|s| s.kind)) {
            (Some(q), Some(TensorKind::Fp8Weight { .. })) => q.weight_block_size,
            _ => {
                return Err(ModelError::WrongDtype {
                    file: w.file.to_string(),
                    tensor: name.to_string(),
                    expected: "F8_E4M3, or a float weight that quantization_config calls FP8 (quantized at load)"
                        .into(),
                    found: format!("{} (the config leaves this weight unquantized)", w.dtype),
                })
            }
        };
        let &[n, k] = w.shape else {
            return Err(ModelError::CannotQuantize { tensor: name.into(), message: format!("shape {:?}", w.shape) });
        };
        let vals = to_f32(w.dtype, w.data);
        if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::CannotQuantize {
                tensor: name.into(),
                message: format!("element {i} is {} (only finite values have an e4m3 code)", vals[i]),
            });
        }
        let (q, scales) = quantize_fp8_blocks(&vals, [n, k], block);
        Ok(Fp8Weight {
            shape: [n, k],
            data: Cow::Owned(q),
            scale_shape: [n.div_ceil(block[0]), k.div_ceil(block[1])],
            scales,
            block,
        })
    }

    /// A tensor as f32: BF16/F16/F32 converted; an FP8 weight dequantized with its `weight_scale_inv` blocks
    /// (`w[i][j] = e4m3(q[i][j]) * scale[i / b0][j / b1]`).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let e = self.entry(name)?;
        let cols = e.shape.last().copied().unwrap_or(1);
        let rows = e.shape.iter().product::<usize>().checked_div(cols).unwrap_or(0);
        self.rows_f32(name, 0, rows)
    }

    /// Rows `start..start + count` of a tensor viewed as [rows, last dim], as f32 (e.g. embedding lookups without
    /// converting the whole table). FP8 weights are dequantized.
    pub fn rows_f32(&self, name: &str, start: usize, count: usize) -> Result<Vec<f32>, ModelError> {
        let e = self.entry(name)?;
        let cols = e.shape.last().copied().unwrap_or(1);
        let rows = e.shape.iter().product::<usize>().checked_div(cols).unwrap_or(0);
        if start.checked_add(count).is_none_or(|end| end > rows) {
            return Err(ModelError::WrongShape {
                file: self.shards[e.shard].name.clone(),
                tensor: name.to_string(),
                expected: vec![start.saturating_add(count), cols],
                found: e.shape.clone(),
            });
        }
        let bytes = &self.shards[e.shard].backing.bytes()[e.begin..e.end];
        let es = e.dtype.size();
        let part = &bytes[start * cols * es..(start + count) * cols * es];
        if e.dtype != Dtype::F8_E4M3 {
            return Ok(to_f32(e.dtype, part));
        }
        let w = self.fp8_weight(name)?;
        let [b0, b1] = w.block;
        let sc = w.scale_shape[1];
        let mut out = Vec::with_capacity(count * cols);
        for (r, row) in part.chunks_exact(cols.max(1)).enumerate().take(count) {
            let srow = &w.scales[((start + r) / b0) * sc..][..sc];
            out.extend(row.iter().enumerate().map(|(j, &q)| e4m3_to_f32(q) * srow[j / b1]));
        }
        Ok(out)
    }
}

/// Block-FP8 quantization of a row-major [n, k] weight in `block` = [b0, b1] blocks (the last ones partial): per block
/// `scale = absmax / 448` in f32 (1 for an all-zero block), `q = e4m3(w / scale)` (round to nearest even, saturating),
/// so that `e4m3(q) * scale` is the dequantized weight. Returns (e4m3 bytes [n, k], scales [ceil(n/b0), ceil(k/b1)]).
/// The same values as `hga checkpoint new` writes with f32 scales.
pub fn quantize_fp8_blocks(w: &[f32], [n, k]: [usize; 2], [b0, b1]: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    assert_eq!(w.len(), n * k, "quantize_fp8_blocks: {} values for [{n}, {k}]", w.len());
    let (sr, sc) = (n.div_ceil(b0), k.div_ceil(b1));
    let (mut q, mut scales) = (vec![0u8; n * k], vec![1f32; sr * sc]);
    for br in 0..sr {
        let rows = br * b0..((br + 1) * b0).min(n);
        for bc in 0..sc {
            let cols = bc * b1..((bc + 1) * b1).min(k);
            let absmax =
                rows.clone().flat_map(|r| &w[r * k + cols.start..r * k + cols.end]).fold(0f32, |m, v| m.max(v.abs()));
            let s = if absmax > 0.0 { absmax / E4M3_MAX } else { 1.0 };
            scales[br * sc + bc] = s;
            for r in rows.clone() {
                for c in cols.clone() {
                    q[r * k + c] = f32_to_e4m3(w[r * k + c] / s);
                }
            }
        }
    }
    (q, scales)
}

/// Converts little-endian BF16/F16/F32 (and, for completeness, F8_E4M3 without scale) bytes to f32; other dtypes give
/// NaN (they never pass validation).
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
        Dtype::F16 => {
            bytes.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect()
        }
        Dtype::F8_E4M3 => bytes.iter().map(|&b| e4m3_to_f32(b)).collect(),
        d => vec![f32::NAN; bytes.len() / d.size()],
    }
}

/// Fuzz entry point: splits `data` at 0xFF bytes (never part of UTF-8 JSON) into `config.json`, the index (empty
/// part = single file) and the weight files, then runs [`Checkpoint::from_memory`] and, when it succeeds, reads every
/// tensor back and checks the invariants. A weight part that starts with `{` is a header JSON only: the 8-byte length
/// prefix is added and the data section is filled (deterministically from the header) to the size the header asks for,
/// so that the fuzzer reaches tensor validation without having to guess lengths. With an index, the weight parts are
/// assigned to the index's file names in sorted order. Returns whether the checkpoint validated.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let mut parts = data.split(|&b| b == 0xFF);
    let Some(cfg) = parts.next().and_then(|p| std::str::from_utf8(p).ok()) else {
        return false;
    };
    let Some(index) = parts.next().and_then(|p| std::str::from_utf8(p).ok()) else {
        return false;
    };
    let index = (!index.trim().is_empty()).then_some(index);
    let weights: Vec<Vec<u8>> = parts.take(16).map(synthesize_file).collect();
    let names: Vec<String> = match index.map(parse_index_json) {
        Some(Ok(map)) => {
            let mut n: Vec<String> = map.into_iter().map(|(_, f)| f).collect();
            n.sort();
            n.dedup();
            n
        }
        Some(Err(_)) => vec![],
        None => vec![SINGLE_FILE.to_string()],
    };
    let files = names.into_iter().zip(weights).collect();
    match Checkpoint::from_memory(cfg, index, files) {
        Ok(ck) => {
            let names: Vec<String> = ck.tensor_names().map(str::to_string).collect();
            for n in &names {
                let shape = ck.shape(n).expect("listed tensor has a shape");
                let v = ck.tensor_f32(n).expect("validated tensor converts");
                assert_eq!(v.len(), shape.iter().product::<usize>(), "{n}");
                if ck.is_fp8(n) {
                    let w = ck.fp8_weight(n).expect("fp8 weight has scales");
                    assert!(w.scales.iter().all(|s| s.is_finite() && *s >= 0.0));
                }
                if let Some(&rows) = shape.first() {
                    if shape.len() == 2 && rows > 0 {
                        let r = ck.rows_f32(n, rows - 1, 1).expect("last row");
                        assert_eq!(&r[..], &v[v.len() - shape[1]..]);
                    }
                }
            }
            true
        }
        Err(e) => {
            // Messages must render (Display must not panic).
            let _ = e.to_string();
            false
        }
    }
}

fn synthesize_file(part: &[u8]) -> Vec<u8> {
    if part.first() != Some(&b'{') {
        return part.to_vec();
    }
    let need = std::str::from_utf8(part)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| {
            v.as_object().map(|o| {
                o.values().filter_map(|e| e.get("data_offsets")?.as_array()?.get(1)?.as_u64()).max().unwrap_or(0)
            })
        })
        .unwrap_or(0)
        .min(1 << 20) as usize;
    let mut f = Vec::with_capacity(8 + part.len() + need);
    f.extend_from_slice(&(part.len() as u64).to_le_bytes());
    f.extend_from_slice(part);
    let mut x = part.len() as u64 ^ 0x9E37_79B9_7F4A_7C15;
    for _ in 0..need {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // Mostly small positive values: keep scales valid often enough that the fuzzer gets past them.
        f.push(((x >> 59) as u8) | 0x30);
    }
    f
}

/// Seed inputs for [`fuzz_entry`] (all valid checkpoints of a micro config, in the header-only form): single file,
/// sharded with an index and bf16 scales, unquantized, tied embeddings with mixed dense/MoE layers.
pub fn fuzz_seeds() -> Vec<Vec<u8>> {
    let micro = |quantized: bool, tied: bool, mlp_only: Vec<usize>| {
        let mut c = Qwen3MoeConfig {
            vocab_size: 16,
            hidden_size: 16,
            intermediate_size: 24,
            moe_intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 8,
            num_experts: 3,
            num_experts_per_tok: 2,
            norm_topk_prob: true,
            decoder_sparse_step: 1,
            mlp_only_layers: mlp_only,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            attention_bias: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            quantization: None,
        };
        if quantized {
            c.quantization = Some(Fp8Quantization {
                weight_block_size: [8, 8],
                activation_scheme: "dynamic".into(),
                modules_to_not_convert: c.default_modules_to_not_convert(),
            });
        }
        c
    };
    let header = |cfg: &Qwen3MoeConfig, names: &[String], scale: Dtype| {
        let mut m = serde_json::Map::new();
        let mut off = 0u64;
        for n in names {
            let Some(s) = spec_for(cfg, n) else { continue };
            let dtype = match s.kind {
                TensorKind::Float | TensorKind::Router { .. } => Dtype::BF16,
                TensorKind::Fp8Weight { .. } => Dtype::F8_E4M3,
                TensorKind::Fp8Scale { .. } => scale,
            };
            let b = s.shape.iter().product::<usize>() as u64 * dtype.size() as u64;
            m.insert(
                n.clone(),
                serde_json::json!({"dtype": dtype.as_str(), "shape": s.shape, "data_offsets": [off, off + b]}),
            );
            off += b;
        }
        Value::Object(m).to_string().into_bytes()
    };
    let mut seeds = Vec::new();
    let cases = [
        (micro(true, false, vec![]), 1, Dtype::F32),
        (micro(true, false, vec![]), 2, Dtype::BF16),
        (micro(false, false, vec![]), 1, Dtype::F32),
        (micro(true, true, vec![0]), 2, Dtype::F16),
    ];
    for (cfg, shards, scale) in cases {
        let names: Vec<String> = expected_names(&cfg).collect();
        let mut input = cfg.to_json().to_string().into_bytes();
        input.push(0xFF);
        if shards == 1 {
            input.push(0xFF);
            input.extend(header(&cfg, &names, scale));
        } else {
            let files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
            let half = names.len() / 2;
            let map: serde_json::Map<String, Value> = names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), Value::from(files[usize::from(i >= half)])))
                .collect();
            input.extend(serde_json::json!({"weight_map": map}).to_string().into_bytes());
            for part in [&names[..half], &names[half..]] {
                input.push(0xFF);
                input.extend(header(&cfg, part, scale));
            }
        }
        seeds.push(input);
    }
    seeds
}
