//! The CPU reference forward of Qwen3-MoE: the oracle for every GPU result.
//!
//! It follows transformers' `modeling_qwen3_moe.py` operation by operation (see ../shared/QWEN3.md, "Forward"):
//! embeddings; per layer `h = x + o_proj(attn(input_layernorm(x)))`, `x = h + mlp(post_attention_layernorm(h))`
//! where attention is q/k/v projections, per-head RMSNorm of q and k, NeoX RoPE, causal GQA with scale
//! `1/sqrt(head_dim)`, and the MLP is either the sparse MoE block (f32 softmax router, top-k, renormalised when
//! `norm_topk_prob`, SiLU-gated experts) or a dense SwiGLU MLP (`config.is_moe_layer`); final norm; `lm_head` (or the
//! tied embeddings).
//!
//! Weights are dequantized to f32 once at load (FP8 blocks times `weight_scale_inv`; an F8_E4M3 router too). Two
//! activation modes ([`ActivationMode`]): `F32` keeps activations unquantized (what transformers computes on the
//! dequantized weights); `Fp8` quantizes the input of every FP8-weight linear (q/k/v/o, expert and dense-MLP
//! gate/up/down: those the config calls FP8) per token per 128-wide group, as the FP8 GEMM kernels do. Dot products
//! accumulate in f64 ([`ops`]).
//!
//! A partially quantized checkpoint (a weight the config calls FP8 stored in BF16/F16/F32): `F32` uses the stored
//! values; the FP8 modes, the GPU's model, use the weight as the GPU loader quantizes it at load
//! ([`Checkpoint::fp8_weight_or_quantize`]), so they keep predicting the GPU forward.
//!
//! Attention goes through an [`AttentionPolicy`]: [`DenseAttention`] today; a sparse policy (HGA routing) can be
//! plugged in per model without touching the rest of the layer. The K/V cache ([`KvCache`]) holds the post-norm,
//! post-RoPE keys and the values of every layer, so `prefill` of a sequence and token-by-token `decode` produce the
//! same logits (bit-identical here: every output element is computed by the same operations in both paths).
//!
//! Cost: f32 weights take 4 bytes per parameter (fine for `tiny`/`small`; the 30B preset does not fit a CPU box this
//! way and is not meant to run here). Parallel (rayon) over weight-row blocks, experts, and attention heads.

pub mod ops;

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use super::checkpoint::Checkpoint;
use super::config::Qwen3MoeConfig;
use crate::kv::arena::{BlockFormat, Elem};
use crate::kv::{KvStore, KvTier};

/// Errors of the CPU forward.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A tensor could not be read from the checkpoint.
    #[error("loading tensor `{name}`: {msg}")]
    Load { name: String, msg: String },
    /// A tensor has the wrong number of elements for the config.
    #[error("tensor `{name}`: expected {expected} elements ({shape}), found {found}")]
    Size { name: String, expected: usize, shape: String, found: usize },
    /// A token id is outside the vocabulary.
    #[error("token id {token} at index {index} is out of range (vocab_size {vocab})")]
    TokenOutOfRange { token: u32, index: usize, vocab: usize },
    /// The cache was made for another model shape.
    #[error("K/V cache shape does not match the model: {0}")]
    CacheMismatch(String),
    /// An empty token sequence.
    #[error("no tokens given")]
    Empty,
    /// The K/V store (`--kv-tier host|disk`) failed: the positions stored before stay correct, this step's tokens
    /// were not accepted.
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
}

/// How the inputs of the FP8-weight linears are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationMode {
    /// Activations stay f32 (compare with transformers on dequantized f32 weights).
    F32,
    /// Dynamic per-token, per-128-group e4m3 quantization of the input of every FP8-weight linear (what the FP8
    /// GEMM kernels compute).
    Fp8,
    /// `Fp8`, with the activations also rounded to bf16 where the GPU forward stores them (`hga_host::model::gpu`):
    /// the residual stream, norm outputs, q/k/v, the attention output, projections, the expert intermediate and the
    /// MLP output. The oracle of the GPU forward: e4m3 rounding decisions depend on these roundings. Each rounding is
    /// the one the kernel's reference does (`hga_host::model::emulate`): once, f64 -> bf16; the expert / dense-MLP
    /// gate and up outputs stay f32 (the MoE kernels round only `silu(g) * u`); q/k norm and RoPE as
    /// `hga_qk_norm_rope`. Agreement with the emulation: bit-identical but for f32-level differences (f32 dequantized
    /// weights), which the chaotic e4m3 quantizer amplifies to ~1.3e-2 of the logits after a few layers.
    Fp8Bf16,
}

impl FromStr for ActivationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "fp8" => Ok(Self::Fp8),
            "fp8-bf16" => Ok(Self::Fp8Bf16),
            _ => Err(format!("unknown activation mode `{s}` (expected f32, fp8 or fp8-bf16)")),
        }
    }
}

impl fmt::Display for ActivationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Fp8 => "fp8",
            Self::Fp8Bf16 => "fp8-bf16",
        })
    }
}

/// Logits `[tokens, vocab]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    pub tokens: usize,
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// The logits of token `t`.
    pub fn row(&self, t: usize) -> &[f32] {
        &self.data[t * self.vocab..(t + 1) * self.vocab]
    }
}

/// The K/V rows of one layer: `[positions, num_key_value_heads * head_dim]` each (keys after k_norm and RoPE).
#[derive(Clone, Debug, Default)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The K/V cache of every layer, and how many positions it holds. With the `plain` tier the rows are in
/// [`Self::layers`]; with `host` or `disk` ([`KvTier`]) the history lives in a [`KvStore`] (opened at the first
/// prefill; `layers` stays empty): each layer's new K/V rows are appended to it and the attention policy gets the
/// layer's rows read back through it, bit for bit what was stored, so the logits do not depend on the tier.
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    len: usize,
    kv_dim: usize,
    tier: KvTier,
    store: Option<KvStore>,
}

impl fmt::Debug for KvCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("kv_dim", &self.kv_dim)
            .field("tier", &self.tier.describe())
            .finish_non_exhaustive()
    }
}

impl KvCache {
    /// An empty cache for this config (the `plain` tier).
    pub fn new(config: &Qwen3MoeConfig) -> Self {
        Self::with_tier(config, KvTier::plain())
    }

    /// An empty cache whose history goes to `tier` (the store is opened by the first prefill, in the block format
    /// of the model's activation mode: bf16 for `fp8-bf16`, whose K/V are bf16, f32 otherwise).
    pub fn with_tier(config: &Qwen3MoeConfig, tier: KvTier) -> Self {
        KvCache {
            layers: vec![LayerKv::default(); config.num_hidden_layers],
            len: 0,
            kv_dim: config.num_key_value_heads * config.head_dim,
            tier,
            store: None,
        }
    }

    /// The tier the history goes to.
    pub fn tier(&self) -> &KvTier {
        &self.tier
    }

    /// The store, once opened (`None` for the plain tier).
    pub fn store(&self) -> Option<&KvStore> {
        self.store.as_ref()
    }

    /// Mutable [`Self::store`] (e.g. to flush it).
    pub fn store_mut(&mut self) -> Option<&mut KvStore> {
        self.store.as_mut()
    }

    /// One line on the store's traffic (`None` for the plain tier).
    pub fn kv_report(&self) -> Option<String> {
        let s = self.store.as_ref()?.stats();
        let mb = |b: u64| b as f64 / 1e6;
        Some(format!(
            "K/V tier {}: {} positions, groups read {} ({} hits, {} misses), {:.1} MB read from disk, {:.1} MB \
             written in {} batches, {} evictions, {:.1} MB resident",
            self.tier.describe(),
            self.len,
            s.hits + s.misses,
            s.hits,
            s.misses,
            mb(s.bytes_read),
            mb(s.bytes_written),
            s.write_batches,
            s.evictions,
            mb(s.resident_bytes)
        ))
    }
    /// Number of cached positions (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Width of one K (or V) row: `num_key_value_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }
}

/// The intermediate tensors [`CpuModel::prefill_traced`] reports, in the order they are produced. Widths: `hidden` for
/// all but `Q`/`Attn` (`num_attention_heads * head_dim`), `K`/`V` (`num_key_value_heads * head_dim`) and
/// `RouterLogits` (`num_experts`, MoE layers only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tap {
    /// Token embeddings (layer `None`).
    Embed,
    /// `input_layernorm(x)`.
    AttnNorm,
    /// Queries after q_norm and RoPE.
    Q,
    /// Keys after k_norm and RoPE (what the cache stores).
    K,
    /// Values.
    V,
    /// Attention output before `o_proj`.
    Attn,
    /// `o_proj` output (added to the residual).
    AttnOut,
    /// `post_attention_layernorm(h)`.
    MlpNorm,
    /// Router logits `x @ gate^T` (before the softmax).
    RouterLogits,
    /// MoE block or dense MLP output (added to the residual).
    MlpOut,
    /// The residual stream after the layer.
    Hidden,
    /// `model.norm` of the last hidden state (layer `None`), the input of `lm_head`.
    FinalNorm,
}

/// The observer of [`CpuModel::prefill_traced`]: `(point, layer, values)`.
pub type TapFn<'a> = dyn FnMut(Tap, Option<usize>, &[f32]) + 'a;

/// Attention geometry of the model, given to an [`AttentionPolicy`].
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Softmax scale, `1 / sqrt(head_dim)`.
    pub scale: f64,
}

/// The hook where a layer's attention is computed from its queries and its K/V cache.
pub trait AttentionPolicy: Send + Sync {
    /// A short name for logs.
    fn name(&self) -> &str;
    /// `q: [tokens, num_heads * head_dim]` (after q_norm and RoPE) at positions `start..start + tokens`; `kv` holds
    /// positions `0..start + tokens` (the new tokens included). Returns `[tokens, num_heads * head_dim]`.
    fn attend(&self, layer: usize, shape: &AttentionShape, start: usize, q: &[f32], kv: &LayerKv) -> Vec<f32>;
}

/// Exact causal attention over every cached position (GQA: query head `h` reads KV head
/// `h / (num_heads / num_kv_heads)`). Scores and softmax in f64. Parallel over (token, head).
#[derive(Clone, Copy, Debug, Default)]
pub struct DenseAttention;

impl AttentionPolicy for DenseAttention {
    fn name(&self) -> &str {
        "dense"
    }
    fn attend(&self, _layer: usize, s: &AttentionShape, start: usize, q: &[f32], kv: &LayerKv) -> Vec<f32> {
        let d = s.head_dim;
        let qdim = s.num_heads * d;
        let kv_dim = s.num_kv_heads * d;
        let group = s.num_heads / s.num_kv_heads;
        let tokens = q.len() / qdim;
        let mut out = vec![0f32; tokens * qdim];
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let (t, h) = (i / s.num_heads, i % s.num_heads);
            let qh = &q[t * qdim + h * d..t * qdim + (h + 1) * d];
            let r = ops::attend_one(qh, &kv.k, &kv.v, start + t + 1, kv_dim, (h / group) * d, s.scale);
            o.copy_from_slice(&r);
        });
        out
    }
}

/// Where one layer's K/V history is kept during a step.
enum LayerSink<'a> {
    Plain(&'a mut LayerKv),
    Store(&'a mut KvStore),
}

/// A bias-free linear `y = x w^T`, `w: [n, k]` dequantized to f32.
struct Linear {
    w: Vec<f32>,
    n: usize,
    k: usize,
    /// The weight is FP8 in the checkpoint, so in [`ActivationMode::Fp8`] its input is quantized.
    fp8: bool,
    /// In the FP8 modes, the weight as the GPU runs it where that is not `w`: a weight the config calls FP8 that is
    /// stored in float, quantized at load (dequantized to f32 here). `None`: `w` in every mode.
    w_fp8: Option<Vec<f32>>,
}

impl Linear {
    /// The weight of `mode`.
    fn weight(&self, mode: ActivationMode) -> &[f32] {
        match (&self.w_fp8, mode) {
            (Some(w), ActivationMode::Fp8 | ActivationMode::Fp8Bf16) => w,
            _ => &self.w,
        }
    }
}

/// The values a weight source gives the CPU model (see [`CpuModel::from_tensors`]).
type Source<'a> = dyn Fn(&str) -> Result<Vec<f32>, ForwardError> + Sync + 'a;
/// The weight the FP8 modes use instead of the source's, where it differs (see [`CpuModel::load`]).
type Requant<'a> = dyn Fn(&str) -> Result<Option<Vec<f32>>, ForwardError> + Sync + 'a;

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
}

/// SiLU-gated MLP: `down(silu(gate(x)) * up(x))`. An expert, or the dense MLP of a non-MoE layer.
struct GatedMlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

enum Mlp {
    Dense(GatedMlp),
    Moe {
        /// Router `mlp.gate.weight` [num_experts, hidden].
        gate: Vec<f32>,
        experts: Vec<GatedMlp>,
    },
}

struct Layer {
    input_layernorm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    self_attn: Attention,
    mlp: Mlp,
}

/// The CPU reference model: f32 weights, an activation mode and an attention policy.
pub struct CpuModel {
    config: Qwen3MoeConfig,
    mode: ActivationMode,
    embed_tokens: Vec<f32>,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when the embeddings are tied.
    lm_head: Option<Vec<f32>>,
    policy: Box<dyn AttentionPolicy>,
    /// Where [`Self::new_cache`]'s caches keep the K/V history.
    kv_tier: KvTier,
}

impl fmt::Debug for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CpuModel")
            .field("layers", &self.layers.len())
            .field("mode", &self.mode)
            .field("attention", &self.policy.name())
            .finish_non_exhaustive()
    }
}

impl CpuModel {
    /// Loads (dequantizes to f32) every tensor of `ckpt`. Attention policy: [`DenseAttention`].
    /// A weight the config calls FP8 that is stored in float is also kept as the GPU loader quantizes it (for the FP8
    /// modes, see the module docs).
    pub fn load(ckpt: &Checkpoint, mode: ActivationMode) -> Result<Self, ForwardError> {
        let err = |name: &str, e: crate::model::error::ModelError| ForwardError::Load {
            name: name.to_string(),
            msg: e.to_string(),
        };
        let get = |name: &str| ckpt.tensor_f32(name).map_err(|e| err(name, e));
        // Only for the weights that are FP8 linears by the config (the callers' `fp8`) and stored in float.
        let quantized = |name: &str| -> Result<Vec<f32>, ForwardError> {
            let w = ckpt.fp8_weight_or_quantize(name).map_err(|e| err(name, e))?;
            let ([_, k], [b0, b1], sc) = (w.shape, w.block, w.scale_shape[1]);
            Ok(w.data
                .iter()
                .enumerate()
                .map(|(i, &q)| gpu_kernels::num::e4m3_to_f32(q) * w.scales[(i / k / b0) * sc + (i % k) / b1])
                .collect())
        };
        let requant = |name: &str| -> Result<Option<Vec<f32>>, ForwardError> {
            if ckpt.is_fp8(name) {
                return Ok(None);
            }
            quantized(name).map(Some)
        };
        Self::build(ckpt.config.clone(), mode, &get, Some(&requant))
    }

    /// Builds the model from a tensor source: `get(name)` returns the f32 (dequantized) values of the tensor of that
    /// Hugging Face name. Only element counts are checked here (the checkpoint reader checks shapes and dtypes).
    pub fn from_tensors<F>(config: Qwen3MoeConfig, mode: ActivationMode, get: F) -> Result<Self, ForwardError>
    where
        F: Fn(&str) -> Result<Vec<f32>, ForwardError> + Sync,
    {
        Self::build(config, mode, &get, None)
    }

    /// [`Self::from_tensors`]; `requant(name)`, called for the weights that are FP8 linears by the config, gives the
    /// weight the FP8 modes use instead of `get(name)` (`None`: the same).
    fn build(
        config: Qwen3MoeConfig,
        mode: ActivationMode,
        get: &Source<'_>,
        requant: Option<&Requant<'_>>,
    ) -> Result<Self, ForwardError> {
        let c = &config;
        let h = c.hidden_size;
        let fetch = |name: String, dims: &[usize]| -> Result<Vec<f32>, ForwardError> {
            let v = get(&name)?;
            let expected: usize = dims.iter().product();
            if v.len() != expected {
                return Err(ForwardError::Size { name, expected, shape: format!("{dims:?}"), found: v.len() });
            }
            Ok(v)
        };
        let linear = |module: String, n: usize, k: usize| -> Result<Linear, ForwardError> {
            let fp8 = c.is_quantized_module(&module);
            let name = format!("{module}.weight");
            let w_fp8 = match requant {
                Some(r) if fp8 => r(&name)?,
                _ => None,
            };
            if let Some(v) = &w_fp8 {
                if v.len() != n * k {
                    return Err(ForwardError::Size {
                        name,
                        expected: n * k,
                        shape: format!("{:?}", [n, k]),
                        found: v.len(),
                    });
                }
            }
            Ok(Linear { w: fetch(name, &[n, k])?, n, k, fp8, w_fp8 })
        };
        let gated = |prefix: String, inter: usize| -> Result<GatedMlp, ForwardError> {
            Ok(GatedMlp {
                gate_proj: linear(format!("{prefix}.gate_proj"), inter, h)?,
                up_proj: linear(format!("{prefix}.up_proj"), inter, h)?,
                down_proj: linear(format!("{prefix}.down_proj"), h, inter)?,
            })
        };
        let (nh, nkv, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let layers = (0..c.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let self_attn = Attention {
                    q_proj: linear(format!("{p}.self_attn.q_proj"), nh * d, h)?,
                    k_proj: linear(format!("{p}.self_attn.k_proj"), nkv * d, h)?,
                    v_proj: linear(format!("{p}.self_attn.v_proj"), nkv * d, h)?,
                    o_proj: linear(format!("{p}.self_attn.o_proj"), h, nh * d)?,
                    q_norm: fetch(format!("{p}.self_attn.q_norm.weight"), &[d])?,
                    k_norm: fetch(format!("{p}.self_attn.k_norm.weight"), &[d])?,
                };
                let mlp = if c.is_moe_layer(l) {
                    let experts = (0..c.num_experts)
                        .into_par_iter()
                        .map(|e| gated(format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size))
                        .collect::<Result<Vec<_>, _>>()?;
                    Mlp::Moe { gate: fetch(format!("{p}.mlp.gate.weight"), &[c.num_experts, h])?, experts }
                } else {
                    Mlp::Dense(gated(format!("{p}.mlp"), c.intermediate_size)?)
                };
                Ok(Layer {
                    input_layernorm: fetch(format!("{p}.input_layernorm.weight"), &[h])?,
                    post_attention_layernorm: fetch(format!("{p}.post_attention_layernorm.weight"), &[h])?,
                    self_attn,
                    mlp,
                })
            })
            .collect::<Result<Vec<_>, ForwardError>>()?;
        let embed_tokens = fetch("model.embed_tokens.weight".into(), &[c.vocab_size, h])?;
        let norm = fetch("model.norm.weight".into(), &[h])?;
        let lm_head =
            if c.tie_word_embeddings { None } else { Some(fetch("lm_head.weight".into(), &[c.vocab_size, h])?) };
        Ok(CpuModel {
            config,
            mode,
            embed_tokens,
            layers,
            norm,
            lm_head,
            policy: Box::new(DenseAttention),
            kv_tier: KvTier::plain(),
        })
    }

    /// Replaces the attention policy (e.g. a sparse one); the default is [`DenseAttention`].
    pub fn with_attention_policy(mut self, policy: Box<dyn AttentionPolicy>) -> Self {
        self.policy = policy;
        self
    }

    /// Changes the activation mode (the weights are the same in both).
    pub fn set_activation_mode(&mut self, mode: ActivationMode) {
        self.mode = mode;
    }

    pub fn activation_mode(&self) -> ActivationMode {
        self.mode
    }

    pub fn config(&self) -> &Qwen3MoeConfig {
        &self.config
    }

    /// Where the caches of [`Self::new_cache`] keep the K/V history (default: `plain`). Checked here, opened by
    /// each cache's first prefill.
    pub fn with_kv_tier(mut self, tier: KvTier) -> Result<Self, ForwardError> {
        tier.validate()?;
        self.kv_tier = tier;
        Ok(self)
    }

    pub fn kv_tier(&self) -> &KvTier {
        &self.kv_tier
    }

    /// An empty K/V cache for this model, in its K/V tier ([`Self::with_kv_tier`]).
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_tier(&self.config, self.kv_tier.clone())
    }

    /// The block format a store of this model uses: the model's head_dim, bf16 when the activation mode rounds
    /// K/V to bf16 (`fp8-bf16`: the shared group block of the GPU for head_dim 128), f32 otherwise.
    pub fn kv_block_format(&self) -> BlockFormat {
        let elem = if self.mode == ActivationMode::Fp8Bf16 { Elem::Bf16 } else { Elem::F32 };
        BlockFormat { head_dim: self.config.head_dim, elem }
    }

    /// Runs `tokens` at positions `cache.len()..`, appends their K/V to `cache`, returns their logits
    /// `[tokens, vocab]`.
    pub fn prefill(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Logits, ForwardError> {
        self.prefill_traced(tokens, cache, &mut |_, _, _| {})
    }

    /// [`prefill`](Self::prefill) that also hands every intermediate tensor to `tap(point, layer, values)`
    /// (`layer` is `None` for the embeddings and the final norm); values are `[tokens, width]` row-major, see
    /// [`Tap`]. For comparing a GPU forward stage by stage.
    pub fn prefill_traced(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        tap: &mut TapFn<'_>,
    ) -> Result<Logits, ForwardError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(ForwardError::Empty);
        }
        if cache.layers.len() != c.num_hidden_layers || cache.kv_dim != c.num_key_value_heads * c.head_dim {
            return Err(ForwardError::CacheMismatch(format!(
                "cache has {} layers of K/V width {}, model {} of {}",
                cache.layers.len(),
                cache.kv_dim,
                c.num_hidden_layers,
                c.num_key_value_heads * c.head_dim
            )));
        }
        for (index, &token) in tokens.iter().enumerate() {
            if token as usize >= c.vocab_size {
                return Err(ForwardError::TokenOutOfRange { token, index, vocab: c.vocab_size });
            }
        }
        if cache.store.is_none() {
            cache.store = cache.tier.open(c.num_hidden_layers, c.num_key_value_heads, self.kv_block_format())?;
        }
        let h = c.hidden_size;
        let t = tokens.len();
        let start = cache.len;
        let mut x = Vec::with_capacity(t * h);
        for &tok in tokens {
            x.extend_from_slice(&self.embed_tokens[tok as usize * h..(tok as usize + 1) * h]);
        }
        let rope: Vec<(Vec<f32>, Vec<f32>)> =
            (0..t).map(|i| ops::rope_cos_sin(start + i, c.head_dim, c.rope_theta)).collect();
        tap(Tap::Embed, None, &x);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut a = x.clone();
            self.norm(&mut a, &layer.input_layernorm);
            tap(Tap::AttnNorm, Some(l), &a);
            let kv = match &mut cache.store {
                Some(store) => LayerSink::Store(store),
                None => LayerSink::Plain(&mut cache.layers[l]),
            };
            let attn = self.attention(l, layer, &a, t, start, &rope, kv, tap)?;
            tap(Tap::AttnOut, Some(l), &attn);
            add_in_place(&mut x, &attn);
            self.bf16(&mut x);
            let mut m = x.clone();
            self.norm(&mut m, &layer.post_attention_layernorm);
            tap(Tap::MlpNorm, Some(l), &m);
            let mlp = match &layer.mlp {
                Mlp::Dense(mlp) => {
                    let mut y = self.gated_mlp(mlp, &m, t);
                    self.bf16(&mut y);
                    y
                }
                Mlp::Moe { gate, experts } => self.moe(l, gate, experts, &m, t, tap),
            };
            tap(Tap::MlpOut, Some(l), &mlp);
            add_in_place(&mut x, &mlp);
            self.bf16(&mut x);
            tap(Tap::Hidden, Some(l), &x);
        }
        cache.len += t;
        self.norm(&mut x, &self.norm);
        tap(Tap::FinalNorm, None, &x);
        let head = self.lm_head.as_deref().unwrap_or(&self.embed_tokens);
        let data = ops::linear(&x, t, h, head, c.vocab_size);
        Ok(Logits { tokens: t, vocab: c.vocab_size, data })
    }

    /// Runs one token at position `cache.len()`; returns its logits `[vocab]`.
    pub fn decode(&self, token: u32, cache: &mut KvCache) -> Result<Vec<f32>, ForwardError> {
        Ok(self.prefill(&[token], cache)?.data)
    }

    /// `x: [t, lin.k] -> [t, lin.n]`; in `Fp8` mode the input of an FP8-weight linear is quantized first.
    /// The output is rounded to bf16 in [`ActivationMode::Fp8Bf16`] (see [`Self::linear_f32`]).
    fn linear(&self, lin: &Linear, x: &[f32], t: usize) -> Vec<f32> {
        if self.mode != ActivationMode::Fp8Bf16 {
            return self.linear_f32(lin, x, t);
        }
        // One rounding, f64 -> bf16 (as `hga_fp8_linear`'s reference; f64 -> f32 -> bf16 differs on f32 ties).
        let round = |v: f64| crate::reference::bf16_rn(v).to_f32();
        let w = lin.weight(self.mode);
        if lin.fp8 {
            ops::linear_rounded(&ops::fp8_quant_dequant_rows(x, lin.k), t, lin.k, w, lin.n, round)
        } else {
            ops::linear_rounded(x, t, lin.k, w, lin.n, round)
        }
    }

    /// As [`Self::linear`] with the output left in f32 (the expert down projections: the GPU sums them in f32).
    fn linear_f32(&self, lin: &Linear, x: &[f32], t: usize) -> Vec<f32> {
        let w = lin.weight(self.mode);
        if lin.fp8 && self.mode != ActivationMode::F32 {
            ops::linear(&ops::fp8_quant_dequant_rows(x, lin.k), t, lin.k, w, lin.n)
        } else {
            ops::linear(x, t, lin.k, w, lin.n)
        }
    }

    /// Rounds to bf16 in [`ActivationMode::Fp8Bf16`] (a no-op otherwise).
    fn bf16(&self, v: &mut [f32]) {
        if self.mode == ActivationMode::Fp8Bf16 {
            for x in v.iter_mut() {
                *x = half::bf16::from_f32(*x).to_f32();
            }
        }
    }

    /// RMSNorm of each row; in [`ActivationMode::Fp8Bf16`] as the GPU kernels' references (`hga_rmsnorm`,
    /// `hga_qk_norm_rope`): `bf16(w * bf16(x * inv))`, `inv = 1 / sqrt(f32(mean(x^2)) + eps)`, the mean of squares
    /// and `x * inv` in f64 (the kernels: f32), each rounding to bf16 done once.
    fn norm(&self, x: &mut [f32], w: &[f32]) {
        let eps = self.config.rms_norm_eps;
        if self.mode != ActivationMode::Fp8Bf16 {
            return ops::rms_norm_rows(x, w, eps);
        }
        for row in x.chunks_exact_mut(w.len()) {
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64;
            let inv = 1.0 / ((ms as f32 + eps as f32) as f64).sqrt();
            for (v, g) in row.iter_mut().zip(w) {
                let h = crate::reference::bf16_rn(*v as f64 * inv).to_f32();
                *v = half::bf16::from_f32(g * h).to_f32();
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: usize,
        layer: &Layer,
        a: &[f32],
        t: usize,
        start: usize,
        rope: &[(Vec<f32>, Vec<f32>)],
        kv: LayerSink<'_>,
        tap: &mut TapFn<'_>,
    ) -> Result<Vec<f32>, ForwardError> {
        let c = &self.config;
        let d = c.head_dim;
        let (qdim, kvdim) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let w = &layer.self_attn;
        let mut q = self.linear(&w.q_proj, a, t);
        let mut k = self.linear(&w.k_proj, a, t);
        let v = self.linear(&w.v_proj, a, t);
        self.norm(&mut q, &w.q_norm);
        self.norm(&mut k, &w.k_norm);
        if self.mode == ActivationMode::Fp8Bf16 {
            // As `hga_qk_norm_rope`: the rotation of the bf16 normed values in full precision, one rounding to bf16.
            let round = |v: f64| crate::reference::bf16_rn(v).to_f32();
            for i in 0..t {
                let pos = start + i;
                ops::apply_rope_f64(&mut q[i * qdim..(i + 1) * qdim], d, pos, c.rope_theta, round);
                ops::apply_rope_f64(&mut k[i * kvdim..(i + 1) * kvdim], d, pos, c.rope_theta, round);
            }
        } else {
            for (i, (cos, sin)) in rope.iter().enumerate() {
                ops::apply_rope(&mut q[i * qdim..(i + 1) * qdim], d, cos, sin);
                ops::apply_rope(&mut k[i * kvdim..(i + 1) * kvdim], d, cos, sin);
            }
        }
        self.bf16(&mut q);
        self.bf16(&mut k);
        tap(Tap::Q, Some(l), &q);
        tap(Tap::K, Some(l), &k);
        tap(Tap::V, Some(l), &v);
        // The history of this layer, the new tokens included: the plain rows, or the store's read back.
        let stored;
        let kv: &LayerKv = match kv {
            LayerSink::Plain(kv) => {
                kv.k.extend_from_slice(&k);
                kv.v.extend_from_slice(&v);
                kv
            }
            LayerSink::Store(store) => {
                store.append(l, start, &k, &v)?;
                let (k, v) = store.read_layer(l, start + t)?;
                stored = LayerKv { k, v };
                &stored
            }
        };
        let shape = AttentionShape {
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let mut o = self.policy.attend(l, &shape, start, &q, kv);
        self.bf16(&mut o);
        tap(Tap::Attn, Some(l), &o);
        Ok(self.linear(&w.o_proj, &o, t))
    }

    /// `down(silu(gate(x)) * up(x))`. Gate and up stay f32 (the MoE kernels keep them in registers and round only
    /// `silu(g) * u` to bf16); the down output is left f32 for the caller (the weighted expert sum).
    fn gated_mlp(&self, m: &GatedMlp, x: &[f32], t: usize) -> Vec<f32> {
        let g = self.linear_f32(&m.gate_proj, x, t);
        let u = self.linear_f32(&m.up_proj, x, t);
        let mut act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| ops::silu(*g) * u).collect();
        self.bf16(&mut act);
        self.linear_f32(&m.down_proj, &act, t)
    }

    /// Sparse MoE block: router softmax (f64, rounded to f32) over all experts, top-k, renormalised when
    /// `norm_topk_prob`; each expert runs on the tokens routed to it (in parallel over experts); a token's expert
    /// outputs are added in ascending expert order.
    fn moe(&self, l: usize, gate: &[f32], experts: &[GatedMlp], x: &[f32], t: usize, tap: &mut TapFn<'_>) -> Vec<f32> {
        let c = &self.config;
        let h = c.hidden_size;
        let ne = c.num_experts;
        let router = ops::linear(x, t, h, gate, ne);
        tap(Tap::RouterLogits, Some(l), &router);
        // routed[e] = [(token, weight)]
        let mut routed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ne];
        for tok in 0..t {
            let p = ops::softmax(&router[tok * ne..(tok + 1) * ne]);
            let top = ops::top_k(&p, c.num_experts_per_tok);
            let sum: f32 = top.iter().map(|&e| p[e]).sum();
            for &e in &top {
                let w = if c.norm_topk_prob { p[e] / sum } else { p[e] };
                routed[e].push((tok, w));
            }
        }
        let outs: Vec<Option<Vec<f32>>> = routed
            .par_iter()
            .enumerate()
            .map(|(e, toks)| {
                if toks.is_empty() {
                    return None;
                }
                let mut xe = Vec::with_capacity(toks.len() * h);
                for &(tok, _) in toks {
                    xe.extend_from_slice(&x[tok * h..(tok + 1) * h]);
                }
                Some(self.gated_mlp(&experts[e], &xe, toks.len()))
            })
            .collect();
        let mut y = vec![0f32; t * h];
        for (toks, out) in routed.iter().zip(&outs) {
            let Some(out) = out else { continue };
            for (i, &(tok, w)) in toks.iter().enumerate() {
                for (yv, ov) in y[tok * h..(tok + 1) * h].iter_mut().zip(&out[i * h..(i + 1) * h]) {
                    *yv += ov * w;
                }
            }
        }
        self.bf16(&mut y);
        y
    }
}

/// Every tensor the forward reads, with its shape: the Hugging Face names of QWEN3.md (FP8 weights listed by their
/// `.weight` name only; their `weight_scale_inv` is the checkpoint reader's business). Used to build models from
/// other tensor sources (tests).
pub fn tensor_shapes(c: &Qwen3MoeConfig) -> Vec<(String, Vec<usize>)> {
    let (h, d) = (c.hidden_size, c.head_dim);
    let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![qd, h]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kvd, h]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kvd, h]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, qd]));
        v.push((format!("{p}.self_attn.q_norm.weight"), vec![d]));
        v.push((format!("{p}.self_attn.k_norm.weight"), vec![d]));
        let mut gated = |prefix: String, inter: usize| {
            v.push((format!("{prefix}.gate_proj.weight"), vec![inter, h]));
            v.push((format!("{prefix}.up_proj.weight"), vec![inter, h]));
            v.push((format!("{prefix}.down_proj.weight"), vec![h, inter]));
        };
        if c.is_moe_layer(l) {
            for e in 0..c.num_experts {
                gated(format!("{p}.mlp.experts.{e}"), c.moe_intermediate_size);
            }
            v.push((format!("{p}.mlp.gate.weight"), vec![c.num_experts, h]));
        } else {
            gated(format!("{p}.mlp"), c.intermediate_size);
        }
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    v
}

/// Bytes of f32 weights a [`CpuModel`] of this config holds (4 per parameter).
pub fn f32_weight_bytes(c: &Qwen3MoeConfig) -> u64 {
    tensor_shapes(c).iter().map(|(_, s)| s.iter().product::<usize>() as u64 * 4).sum()
}

fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests;
