//! The tokenizer of a model directory: `tokenizer.json` read with Hugging Face's `tokenizers` crate (pure Rust:
//! built without its C++ `onig`/`esaxx` parts, with `fancy-regex`), used for `--text` input and for decoding.
//! A directory without `tokenizer.json` (the checkpoints our generator writes) works with token ids only.

use std::path::{Path, PathBuf};

/// Errors of the tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The model directory has no `tokenizer.json`.
    #[error("{0} has no tokenizer.json: this model takes token ids only (use --tokens 1,2,3 instead of --text)")]
    Missing(PathBuf),
    /// `tokenizer.json` could not be parsed.
    #[error("reading {path}: {msg}")]
    Load { path: PathBuf, msg: String },
    /// Encoding or decoding failed.
    #[error("tokenizer: {0}")]
    Codec(String),
}

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`; [`TokenizerError::Missing`] when it does not exist.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(dir.to_path_buf()));
        }
        Self::from_file(&path)
    }

    /// Loads `dir/tokenizer.json` if present, `Ok(None)` if not.
    pub fn try_from_model_dir(dir: &Path) -> Result<Option<Self>, TokenizerError> {
        match Self::from_model_dir(dir) {
            Ok(t) => Ok(Some(t)),
            Err(TokenizerError::Missing(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Parses the JSON text of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| TokenizerError::Load { path: PathBuf::from("<bytes>"), msg: e.to_string() })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text` (without added special tokens, as `tokenizer.encode(text, add_special_tokens=False)`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode(text, false).map_err(|e| TokenizerError::Codec(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(|e| TokenizerError::Codec(e.to_string()))
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal byte-level BPE tokenizer.json (as Qwen's, with a tiny vocabulary and one merge).
    const TINY: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
      "normalizer": null,
      "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
      "post_processor": null,
      "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
      "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "vocab": {"h": 0, "i": 1, "Ġ": 2, "hi": 3}, "merges": ["h i"]}
    }"#;

    #[test]
    fn encode_decode_roundtrip() {
        let t = Tokenizer::from_json_bytes(TINY.as_bytes()).unwrap();
        let ids = t.encode("hi hi").unwrap();
        assert_eq!(ids, vec![3, 2, 3]);
        assert_eq!(t.decode(&ids).unwrap(), "hi hi");
        assert_eq!(t.vocab_size(), 4);
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("hga-tok-missing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Tokenizer::from_model_dir(&dir).unwrap_err();
        assert!(e.to_string().contains("no tokenizer.json"), "{e}");
        assert!(Tokenizer::try_from_model_dir(&dir).unwrap().is_none());
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        assert!(matches!(Tokenizer::from_model_dir(&dir), Err(TokenizerError::Load { .. })));
        std::fs::remove_dir_all(&dir).ok();
    }
}
