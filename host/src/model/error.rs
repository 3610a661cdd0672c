//! The one error type of the model module: config, checkpoint reader, checkpoint writer. Every message names what it
//! is about (the config key, the tensor, the file) and, where it applies, what was expected and what was found.
use std::path::PathBuf;

/// Errors of config parsing, checkpoint reading/validation and checkpoint writing.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Reading a file failed (open, read, mmap, stat).
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing a file failed (create, write, sync, rename): a full disk lands here.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` (or another JSON document named by `file`) is not valid JSON or not an object.
    #[error("{file}: invalid JSON: {message}")]
    Json { file: String, message: String },
    /// A required config key is absent.
    #[error("config.json: missing required key `{key}`")]
    MissingKey { key: String },
    /// A config key has a value of the wrong type or out of its domain.
    #[error("config.json: key `{key}`: expected {expected}, found {found}")]
    BadValue { key: String, expected: String, found: String },
    /// Config values contradict each other; `key` is the one reported as wrong.
    #[error("config.json: key `{key}`: {message}")]
    Contradiction { key: String, message: String },
    /// An unknown `--preset` name.
    #[error("unknown preset `{name}` (known: tiny, small, qwen3-30b-a3b)")]
    UnknownPreset { name: String },
    /// The directory holds neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    /// `model.safetensors.index.json` is malformed.
    #[error("{file}: bad index: {message}")]
    Index { file: String, message: String },
    /// The index names a shard file that does not exist.
    #[error("{index}: weight_map names shard `{shard}`, which does not exist")]
    MissingShard { index: String, shard: String },
    /// The index maps a tensor to a shard whose header does not contain it.
    #[error("{index}: weight_map puts tensor `{tensor}` in `{shard}`, but that file has no such tensor")]
    TensorNotInShard { index: String, tensor: String, shard: String },
    /// A shard contains a tensor the index's weight_map does not list (or lists in another file).
    #[error("{file}: tensor `{tensor}` is not listed for this file in the index weight_map")]
    TensorNotInIndex { file: String, tensor: String },
    /// A safetensors header is malformed, as the safetensors crate finds it (bad length prefix, not JSON, bad entry, bad
    /// offsets, trailing bytes); `message` names the tensor at fault, with expected and found.
    #[error("{file}: bad safetensors header: {message}")]
    Header { file: String, message: String },
    /// The header describes more bytes than the file holds (the header itself cut, or its tensor data).
    #[error("{file}: truncated: the header describes {expected} bytes of tensor data, the file holds {found}")]
    Truncated { file: String, expected: u64, found: u64 },
    /// The same tensor name appears in two files.
    #[error("tensor `{tensor}` appears in both `{first}` and `{second}`")]
    DuplicateTensor { tensor: String, first: String, second: String },
    /// A tensor the config requires is absent.
    #[error("missing tensor `{tensor}` (expected {expected})")]
    MissingTensor { tensor: String, expected: String },
    /// A tensor the config does not explain is present.
    #[error("{file}: unexpected tensor `{tensor}` (the config does not call for it)")]
    UnexpectedTensor { file: String, tensor: String },
    /// A tensor has the wrong dtype.
    #[error("{file}: tensor `{tensor}`: wrong dtype: expected {expected}, found {found}")]
    WrongDtype { file: String, tensor: String, expected: String, found: String },
    /// A tensor has the wrong shape.
    #[error("{file}: tensor `{tensor}`: wrong shape: expected {expected:?}, found {found:?}")]
    WrongShape { file: String, tensor: String, expected: Vec<usize>, found: Vec<usize> },
    /// A `weight_scale_inv` tensor has the wrong shape for its weight and the config's block size.
    #[error("{file}: tensor `{tensor}`: wrong block-scale shape: expected {expected:?} ({why}), found {found:?}")]
    WrongScaleShape { file: String, tensor: String, expected: Vec<usize>, why: String, found: Vec<usize> },
    /// A `weight_scale_inv` holds a value that is negative, NaN or infinite.
    #[error("{file}: tensor `{tensor}`: bad block scale {value} at element {index} (must be finite and >= 0)")]
    BadScale { file: String, tensor: String, index: usize, value: f32 },
    /// A `weight_scale_inv` of a weight that is stored in float: only F8_E4M3 weights have block scales.
    #[error(
        "{file}: tensor `{tensor}`: block scales of `{weight}`, which is stored as {dtype}, not F8_E4M3 (only FP8 \
         weights have block scales: drop the scales or store the weight as F8_E4M3)"
    )]
    ScaleOfFloatWeight { file: String, tensor: String, weight: String, dtype: String },
    /// A float weight cannot be quantized to block FP8 at load.
    #[error("tensor `{tensor}`: cannot quantize it to block FP8 at load: {message}")]
    CannotQuantize { tensor: String, message: String },
    /// A tensor name asked for by the caller is not in the checkpoint.
    #[error("no tensor `{tensor}` in this checkpoint")]
    NoSuchTensor { tensor: String },
    /// Output directory problems of the writer.
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
    pub(crate) fn write(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Write { path: path.into(), source }
    }
    pub(crate) fn bad(key: &str, expected: &str, found: impl std::fmt::Display) -> Self {
        ModelError::BadValue { key: key.to_string(), expected: expected.to_string(), found: found.to_string() }
    }
    pub(crate) fn contra(key: &str, message: impl Into<String>) -> Self {
        ModelError::Contradiction { key: key.to_string(), message: message.into() }
    }
}
