//! Typed, validated `config.json` of a `qwen3_moe` checkpoint (see ../shared/QWEN3.md, the contract).
//!
//! Parsing is by hand over a `serde_json::Value` so that every error names its key. Unknown keys are ignored.
//!
//! Required keys (a missing one is an error naming it): `vocab_size`, `hidden_size`, `num_hidden_layers`,
//! `num_attention_heads`, `num_key_value_heads`, `head_dim`, `moe_intermediate_size`, `num_experts`,
//! `num_experts_per_tok`, `rope_theta`, `rms_norm_eps`; `intermediate_size` when some layer is dense.
//! Optional keys take the transformers `Qwen3MoeConfig` defaults: `norm_topk_prob` false, `decoder_sparse_step` 1,
//! `mlp_only_layers` [], `max_position_embeddings` 32768, `tie_word_embeddings` false, `attention_bias` false,
//! `bos_token_id`/`eos_token_id` none (a list takes its first element). Features that would change the numerics and
//! that we do not implement are refused rather than ignored: `rope_scaling` (non-null), `use_sliding_window` true,
//! `hidden_act` other than silu, `model_type` other than qwen3_moe, a `quantization_config` other than block FP8 e4m3
//! with dynamic activations.
use std::path::Path;

use serde_json::{json, Map, Value};

pub use super::error::ModelError;

/// `quantization_config` of a block-FP8 checkpoint (transformers `FineGrainedFP8Config`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Fp8Quantization {
    /// Rows x columns of one weight scale block ([128, 128] in every published checkpoint).
    pub weight_block_size: [usize; 2],
    /// Always "dynamic" (per-token-group activation scales computed at run time).
    pub activation_scheme: String,
    /// Module names (substring match, as transformers does) whose Linear weights stay unquantized.
    pub modules_to_not_convert: Vec<String>,
}

/// The Qwen3-MoE architecture parameters. `quantization` None means a bf16 (unquantized) checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Qwen3MoeConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub norm_topk_prob: bool,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub quantization: Option<Fp8Quantization>,
}

/// Upper bounds that keep every derived size far from overflow (and a fuzzer's config from asking for the moon).
const MAX_LAYERS: usize = 1 << 12;
const MAX_EXPERTS: usize = 1 << 16;
const MAX_DIM: usize = 1 << 24;

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}...", &s[..s.char_indices().nth(57).map_or(s.len(), |(i, _)| i)])
    } else {
        s
    }
}

fn get_usize(o: &Map<String, Value>, key: &str) -> Result<Option<usize>, ModelError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n as u128 <= MAX_DIM as u128 => Ok(Some(n as usize)),
            Some(n) => Err(ModelError::bad(key, &format!("an integer <= {MAX_DIM}"), n)),
            None => Err(ModelError::bad(key, "a non-negative integer", describe(v))),
        },
    }
}

fn req_usize(o: &Map<String, Value>, key: &str) -> Result<usize, ModelError> {
    get_usize(o, key)?.ok_or_else(|| ModelError::MissingKey { key: key.to_string() })
}

fn req_f64(o: &Map<String, Value>, key: &str) -> Result<f64, ModelError> {
    match o.get(key) {
        None | Some(Value::Null) => Err(ModelError::MissingKey { key: key.to_string() }),
        Some(v) => match v.as_f64() {
            Some(x) if x.is_finite() && x > 0.0 => Ok(x),
            _ => Err(ModelError::bad(key, "a positive finite number", describe(v))),
        },
    }
}

fn get_bool(o: &Map<String, Value>, key: &str, default: bool) -> Result<bool, ModelError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(ModelError::bad(key, "true or false", describe(v))),
    }
}

fn get_token(o: &Map<String, Value>, key: &str) -> Result<Option<u32>, ModelError> {
    let v = match o.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => &a[0],
        Some(v) => v,
    };
    match v.as_u64() {
        Some(n) if n <= u32::MAX as u64 => Ok(Some(n as u32)),
        _ => Err(ModelError::bad(key, "a token id (u32) or a list of them", describe(v))),
    }
}

fn get_str<'a>(o: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, ModelError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(ModelError::bad(key, "a string", describe(v))),
    }
}

fn parse_quantization(q: &Value) -> Result<Option<Fp8Quantization>, ModelError> {
    let o = match q {
        Value::Null => return Ok(None),
        Value::Object(o) => o,
        v => return Err(ModelError::bad("quantization_config", "an object", describe(v))),
    };
    match get_str(o, "quant_method")? {
        Some("fp8") => {}
        Some(m) => return Err(ModelError::bad("quantization_config.quant_method", "\"fp8\"", format!("\"{m}\""))),
        None => return Err(ModelError::MissingKey { key: "quantization_config.quant_method".into() }),
    }
    if let Some(f) = get_str(o, "fmt")? {
        if f != "e4m3" {
            return Err(ModelError::bad("quantization_config.fmt", "\"e4m3\"", format!("\"{f}\"")));
        }
    }
    let activation_scheme = get_str(o, "activation_scheme")?.unwrap_or("dynamic").to_string();
    if activation_scheme != "dynamic" {
        return Err(ModelError::bad(
            "quantization_config.activation_scheme",
            "\"dynamic\"",
            format!("\"{activation_scheme}\""),
        ));
    }
    let key = "quantization_config.weight_block_size";
    let weight_block_size = match o.get("weight_block_size") {
        None | Some(Value::Null) => return Err(ModelError::MissingKey { key: key.into() }),
        Some(v) => match v.as_array().map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>()) {
            Some(a) if a.len() == 2 && a.iter().all(|x| matches!(x, Some(n) if *n >= 1 && *n <= 1 << 16)) => {
                [a[0].unwrap_or(1) as usize, a[1].unwrap_or(1) as usize]
            }
            _ => return Err(ModelError::bad(key, "two positive integers [rows, cols]", describe(v))),
        },
    };
    let key = "quantization_config.modules_to_not_convert";
    let modules_to_not_convert = match o.get("modules_to_not_convert") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| ModelError::bad(key, "a list of strings", describe(x)))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(ModelError::bad(key, "a list of strings", describe(v))),
    };
    Ok(Some(Fp8Quantization { weight_block_size, activation_scheme, modules_to_not_convert }))
}

impl Qwen3MoeConfig {
    /// Parses and validates a `config.json` text.
    pub fn from_json_str(s: &str) -> Result<Self, ModelError> {
        let v: Value = serde_json::from_str(s)
            .map_err(|e| ModelError::Json { file: "config.json".into(), message: e.to_string() })?;
        let o = match &v {
            Value::Object(o) => o,
            other => {
                return Err(ModelError::Json {
                    file: "config.json".into(),
                    message: format!("expected an object, found {}", describe(other)),
                })
            }
        };
        if let Some(t) = get_str(o, "model_type")? {
            if t != "qwen3_moe" {
                return Err(ModelError::bad("model_type", "\"qwen3_moe\"", format!("\"{t}\"")));
            }
        }
        if let Some(a) = get_str(o, "hidden_act")? {
            if a != "silu" {
                return Err(ModelError::bad("hidden_act", "\"silu\"", format!("\"{a}\"")));
            }
        }
        match o.get("rope_scaling") {
            None | Some(Value::Null) => {}
            Some(v) => {
                return Err(ModelError::bad("rope_scaling", "null (RoPE scaling is not supported)", describe(v)))
            }
        }
        if get_bool(o, "use_sliding_window", false)? {
            return Err(ModelError::bad("use_sliding_window", "false (sliding window is not supported)", true));
        }
        let mlp_only_layers = match o.get("mlp_only_layers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) if a.len() > MAX_LAYERS => {
                return Err(ModelError::bad("mlp_only_layers", &format!("at most {MAX_LAYERS} entries"), a.len()))
            }
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| match x.as_u64() {
                    Some(n) if n <= MAX_LAYERS as u64 * 2 => Ok(n as usize),
                    _ => Err(ModelError::bad("mlp_only_layers", "a list of layer indices", describe(x))),
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(ModelError::bad("mlp_only_layers", "a list of layer indices", describe(v))),
        };
        let c = Qwen3MoeConfig {
            vocab_size: req_usize(o, "vocab_size")?,
            hidden_size: req_usize(o, "hidden_size")?,
            intermediate_size: get_usize(o, "intermediate_size")?.unwrap_or(0),
            moe_intermediate_size: req_usize(o, "moe_intermediate_size")?,
            num_hidden_layers: req_usize(o, "num_hidden_layers")?,
            num_attention_heads: req_usize(o, "num_attention_heads")?,
            num_key_value_heads: req_usize(o, "num_key_value_heads")?,
            head_dim: req_usize(o, "head_dim")?,
            num_experts: req_usize(o, "num_experts")?,
            num_experts_per_tok: req_usize(o, "num_experts_per_tok")?,
            norm_topk_prob: get_bool(o, "norm_topk_prob", false)?,
            decoder_sparse_step: get_usize(o, "decoder_sparse_step")?.unwrap_or(1),
            mlp_only_layers,
            rope_theta: req_f64(o, "rope_theta")?,
            rms_norm_eps: req_f64(o, "rms_norm_eps")?,
            max_position_embeddings: get_usize(o, "max_position_embeddings")?.unwrap_or(32768),
            tie_word_embeddings: get_bool(o, "tie_word_embeddings", false)?,
            attention_bias: get_bool(o, "attention_bias", false)?,
            bos_token_id: get_token(o, "bos_token_id")?,
            eos_token_id: get_token(o, "eos_token_id")?,
            quantization: parse_quantization(o.get("quantization_config").unwrap_or(&Value::Null))?,
        };
        let any_dense = c.num_hidden_layers <= MAX_LAYERS && (0..c.num_hidden_layers).any(|l| !c.is_moe_layer(l));
        if any_dense && !o.contains_key("intermediate_size") {
            return Err(ModelError::MissingKey { key: "intermediate_size".into() });
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads and validates `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let p = dir.join("config.json");
        let s = std::fs::read_to_string(&p).map_err(|e| ModelError::io(&p, e))?;
        Self::from_json_str(&s)
    }

    /// Checks that the values are mutually consistent (the reader and the writer both call it).
    pub fn validate(&self) -> Result<(), ModelError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("decoder_sparse_step", self.decoder_sparse_step),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(ModelError::bad(k, "a positive integer", 0));
            }
        }
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(ModelError::bad("num_hidden_layers", &format!("at most {MAX_LAYERS}"), self.num_hidden_layers));
        }
        if self.num_experts > MAX_EXPERTS {
            return Err(ModelError::bad("num_experts", &format!("at most {MAX_EXPERTS}"), self.num_experts));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ModelError::bad("head_dim", "an even number (RoPE rotates halves)", self.head_dim));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ModelError::contra(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if let Some(&l) = self.mlp_only_layers.iter().find(|&&l| l >= self.num_hidden_layers) {
            return Err(ModelError::contra(
                "mlp_only_layers",
                format!("layer {l} is out of range (num_hidden_layers = {})", self.num_hidden_layers),
            ));
        }
        let any_moe = (0..self.num_hidden_layers).any(|l| self.is_moe_layer(l));
        let any_dense = (0..self.num_hidden_layers).any(|l| !self.is_moe_layer(l));
        if any_moe {
            if self.moe_intermediate_size == 0 {
                return Err(ModelError::bad("moe_intermediate_size", "a positive integer", 0));
            }
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return Err(ModelError::contra(
                    "num_experts_per_tok",
                    format!("{} is not in 1..=num_experts = {}", self.num_experts_per_tok, self.num_experts),
                ));
            }
        }
        if any_dense && self.intermediate_size == 0 {
            return Err(ModelError::bad("intermediate_size", "a positive integer (some layers are dense)", 0));
        }
        // Every derived tensor size must fit comfortably: elements of the largest 2-D tensors.
        let products = [
            ("vocab_size", self.vocab_size, self.hidden_size),
            ("num_attention_heads", self.num_attention_heads * self.head_dim, self.hidden_size),
            ("intermediate_size", self.intermediate_size, self.hidden_size),
            ("moe_intermediate_size", self.moe_intermediate_size, self.hidden_size),
            ("num_experts", self.num_experts, self.hidden_size),
        ];
        for (k, a, b) in products {
            if a.checked_mul(b).is_none_or(|n| n > 1 << 40) {
                return Err(ModelError::contra(k, format!("tensor of {a} x {b} elements is too large")));
            }
        }
        Ok(())
    }

    /// Whether `layer` has a sparse MoE block (else a dense SwiGLU MLP of `intermediate_size`), as transformers decides:
    /// not in `mlp_only_layers`, `num_experts > 0` and `(layer + 1) % decoder_sparse_step == 0`.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Whether the Linear module `module` (e.g. `model.layers.3.self_attn.q_proj`, `lm_head`) holds FP8 weights: the
    /// config is quantized and no `modules_to_not_convert` entry is a substring of the name (transformers' rule).
    pub fn is_quantized_module(&self, module: &str) -> bool {
        match &self.quantization {
            None => false,
            Some(q) => !q.modules_to_not_convert.iter().any(|m| module.contains(m.as_str())),
        }
    }

    /// The Hugging Face `config.json` of this config (with `quantization_config` when quantized).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_sparse_step": self.decoder_sparse_step,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "mlp_only_layers": self.mlp_only_layers,
            "moe_intermediate_size": self.moe_intermediate_size,
            "norm_topk_prob": self.norm_topk_prob,
            "num_attention_heads": self.num_attention_heads,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "output_router_logits": false,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "router_aux_loss_coef": 0.001,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
        });
        if let Some(q) = &self.quantization {
            v["quantization_config"] = json!({
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": q.activation_scheme,
                "weight_block_size": q.weight_block_size,
                "modules_to_not_convert": q.modules_to_not_convert,
            });
        }
        v
    }

    /// The `modules_to_not_convert` list the published Qwen3-MoE FP8 checkpoints use: `lm_head`, and per layer the two
    /// norms and (for MoE layers) the router `mlp.gate`.
    pub fn default_modules_to_not_convert(&self) -> Vec<String> {
        let mut m = vec!["lm_head".to_string()];
        for l in 0..self.num_hidden_layers {
            m.push(format!("model.layers.{l}.input_layernorm"));
            m.push(format!("model.layers.{l}.post_attention_layernorm"));
            if self.is_moe_layer(l) {
                m.push(format!("model.layers.{l}.mlp.gate"));
            }
        }
        m
    }

    /// Built-in shapes: `tiny` (CPU forward in milliseconds; hidden 192 so FP8 blocks are partial), `small` (a few
    /// hundred MB, head_dim 128, 8 query / 2 KV heads, layer 0 dense), `qwen3-30b-a3b` (the real model, ~31 GB).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let mut c = match name {
            "tiny" => Qwen3MoeConfig {
                vocab_size: 320,
                hidden_size: 192,
                intermediate_size: 384,
                moe_intermediate_size: 96,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 48,
                num_experts: 4,
                num_experts_per_tok: 2,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![],
                rope_theta: 10_000.0,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 4096,
                tie_word_embeddings: false,
                attention_bias: false,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                quantization: None,
            },
            "small" => Qwen3MoeConfig {
                vocab_size: 32_000,
                hidden_size: 1024,
                intermediate_size: 2048,
                moe_intermediate_size: 512,
                num_hidden_layers: 6,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                head_dim: 128,
                num_experts: 16,
                num_experts_per_tok: 4,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![0],
                rope_theta: 1_000_000.0,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 32_768,
                tie_word_embeddings: false,
                attention_bias: false,
                bos_token_id: Some(1),
                eos_token_id: Some(2),
                quantization: None,
            },
            "qwen3-30b-a3b" => Qwen3MoeConfig {
                vocab_size: 151_936,
                hidden_size: 2048,
                intermediate_size: 6144,
                moe_intermediate_size: 768,
                num_hidden_layers: 48,
                num_attention_heads: 32,
                num_key_value_heads: 4,
                head_dim: 128,
                num_experts: 128,
                num_experts_per_tok: 8,
                norm_topk_prob: true,
                decoder_sparse_step: 1,
                mlp_only_layers: vec![],
                rope_theta: 10_000_000.0,
                rms_norm_eps: 1e-6,
                max_position_embeddings: 262_144,
                tie_word_embeddings: false,
                attention_bias: false,
                bos_token_id: Some(151_643),
                eos_token_id: Some(151_645),
                quantization: None,
            },
            _ => return Err(ModelError::UnknownPreset { name: name.to_string() }),
        };
        c.quantization = Some(Fp8Quantization {
            weight_block_size: [128, 128],
            activation_scheme: "dynamic".into(),
            modules_to_not_convert: c.default_modules_to_not_convert(),
        });
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_roundtrip_through_json() {
        for p in ["tiny", "small", "qwen3-30b-a3b"] {
            let c = Qwen3MoeConfig::preset(p).unwrap();
            let back = Qwen3MoeConfig::from_json_str(&c.to_json().to_string()).unwrap();
            assert_eq!(c, back, "{p}");
        }
    }

    #[test]
    fn moe_layer_rule() {
        let mut c = Qwen3MoeConfig::preset("tiny").unwrap();
        c.num_hidden_layers = 6;
        c.decoder_sparse_step = 2;
        c.mlp_only_layers = vec![3];
        let moe: Vec<bool> = (0..6).map(|l| c.is_moe_layer(l)).collect();
        assert_eq!(moe, [false, true, false, false, false, true]);
    }

    #[test]
    fn not_convert_is_substring_match() {
        let c = Qwen3MoeConfig::preset("qwen3-30b-a3b").unwrap();
        assert!(!c.is_quantized_module("lm_head"));
        assert!(!c.is_quantized_module("model.layers.7.mlp.gate"));
        assert!(c.is_quantized_module("model.layers.7.mlp.experts.3.gate_proj"));
        assert!(c.is_quantized_module("model.layers.11.self_attn.q_proj"));
    }
}
