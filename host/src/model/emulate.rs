//! The GPU forward's arithmetic on the CPU, from the kernels' reference functions.
//!
//! [`EmulatedModel`] runs exactly the composition of [`GpuModel::forward`](super::gpu::GpuModel::forward) — the same
//! kernels in the same order on the same buffers, each replaced by its CPU reference in [`crate::reference`] (the
//! functions `hga selfcheck` and the GPU kernel tests compare the kernels with):
//!
//! - embeddings: `hga_embed_gather` (bf16 residual stream);
//! - `input_layernorm`: `hga_rmsnorm_fp8_quant`, fused with the residual add of the previous layer's MLP output
//!   (`bf16(h + mlp_out)`, statistics on that bf16 sum), layer 0 without the add;
//! - q/k/v: `hga_fp8_linear` (bf16 out), then `hga_qk_norm_rope` (q out, K/V into a bf16 cache
//!   [n_kv_heads, capacity, 128] per layer);
//! - attention: `hga_attention` over the cache (exact softmax), bf16 out — the kernels (FlashAttention-2 prefill,
//!   split-K decode) round P to bf16 in the P·V product and differ from this within ~1e-3 of the output;
//! - `o_proj`: `hga_fp8_quant` of the attention output, `hga_fp8_linear` (bf16 out);
//! - `post_attention_layernorm`: `hga_rmsnorm` fused with the residual add, bf16 out (the router reads bf16);
//! - the MLP: `hga_moe_router` (bf16 router weights; a dense MLP is a one-expert MoE with a zero router, weight 1),
//!   `hga_moe_experts` (x quantized, gate/up in full precision, `bf16(silu(g) * u)` quantized, down, the weighted
//!   sum over slots unrounded), rounded to bf16 (the kernels' output);
//! - `model.norm`: `hga_rmsnorm` fused with the last residual add; `hga_lm_head` (bf16 weights, f32 logits).
//!
//! Chunking by `max_tokens`, the K/V cache and `start`/`len` follow `GpuModel` (decode and prefill use the same
//! references: the kernels of the two paths compute the same values up to f32 summation order). The reference
//! functions accumulate in f64; the kernels in f32: that and the attention's bf16 P are the only differences left,
//! so this predicts the GPU's logits to summation-order noise, and is the model of the GPU that
//! [`ActivationMode::Fp8Bf16`](super::forward::ActivationMode::Fp8Bf16) is checked against (no GPU needed).
//!
//! Intermediates are reported through the [`Tap`] points of `CpuModel::prefill_traced`, per chunk.
//! Slow (naive references): meant for small configs.
use half::bf16;
use rayon::prelude::*;

use crate::kernels::rope::QkNormRopeShape;
use crate::kernels::AttentionShape;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::Qwen3MoeConfig;
use crate::model::forward::{Tap, TapFn};
use crate::model::gpu::{bf16_host, check_supported, checked_fp8_weight, mlp_as_moe, stack_experts, GpuModelError};
use crate::reference::attention::hga_attention;
use crate::reference::gemm::hga_fp8_linear;
use crate::reference::head::{hga_embed_gather, hga_lm_head};
use crate::reference::moe::{hga_moe_experts, hga_moe_router, MoeDims, MoeHostWeights};
use crate::reference::rope::hga_qk_norm_rope;
use crate::reference::{bf16_rn, hga_fp8_quant, hga_rmsnorm};

/// A block-scaled FP8 linear: e4m3 [n, k] and f32 scales [n/128, k/128].
struct Fp8Linear {
    w: Vec<u8>,
    s: Vec<f32>,
    n: usize,
    k: usize,
}

impl Fp8Linear {
    /// `hga_fp8_linear` of quantized rows `a` [m, k] (scales [m, k/128]) -> bf16 [m, n]; rows in parallel (each row
    /// is one call of the reference, which computes every row independently).
    fn apply(&self, a: &[u8], a_scale: &[f32], m: usize) -> Vec<bf16> {
        let (k, kbs) = (self.k, self.k / 128);
        (0..m)
            .into_par_iter()
            .flat_map_iter(|i| {
                hga_fp8_linear(&a[i * k..(i + 1) * k], &a_scale[i * kbs..(i + 1) * kbs], &self.w, &self.s, 1, self.n, k)
                    .0
            })
            .collect()
    }
}

struct Layer {
    input_layernorm: Vec<bf16>,
    post_attention_layernorm: Vec<bf16>,
    q_proj: Fp8Linear,
    k_proj: Fp8Linear,
    v_proj: Fp8Linear,
    o_proj: Fp8Linear,
    q_norm: Vec<bf16>,
    k_norm: Vec<bf16>,
    /// bf16 [experts, hidden]; zeros (one expert) for a dense-MLP layer.
    router: Vec<bf16>,
    experts: MoeHostWeights,
    /// `tokens` is set per call.
    dims: MoeDims,
    is_moe: bool,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
}

/// The GPU forward ([`GpuModel`](super::gpu::GpuModel)) computed on the CPU by the kernels' reference functions.
pub struct EmulatedModel {
    config: Qwen3MoeConfig,
    embed: Vec<bf16>,
    norm: Vec<bf16>,
    lm_head: Vec<bf16>,
    layers: Vec<Layer>,
    max_tokens: usize,
    capacity: usize,
    len: usize,
}

fn fp8_linear(ck: &Checkpoint, name: &str) -> Result<Fp8Linear, GpuModelError> {
    let w = checked_fp8_weight(ck, name)?;
    let [n, k] = w.shape;
    Ok(Fp8Linear { w: w.data.to_vec(), s: w.scales, n, k })
}

fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

impl EmulatedModel {
    /// Loads the checkpoint as `GpuModel::load` does (same refusals), with a K/V cache of `capacity` positions and
    /// chunks of at most `max_tokens` tokens.
    pub fn load(ck: &Checkpoint, capacity: usize, max_tokens: usize) -> Result<Self, GpuModelError> {
        let c = ck.config.clone();
        check_supported(&c, capacity, max_tokens)?;
        let (h, nkv) = (c.hidden_size, c.num_key_value_heads);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let is_moe = c.is_moe_layer(l);
            let (dims, router, modules) = mlp_as_moe(&c, l);
            let router = match router {
                Some(name) => bf16_host(ck, &name)?,
                None => vec![bf16::ZERO; h],
            };
            let experts = stack_experts(ck, &modules)?;
            layers.push(Layer {
                input_layernorm: bf16_host(ck, &format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: bf16_host(ck, &format!("{p}.post_attention_layernorm.weight"))?,
                q_proj: fp8_linear(ck, &format!("{p}.self_attn.q_proj.weight"))?,
                k_proj: fp8_linear(ck, &format!("{p}.self_attn.k_proj.weight"))?,
                v_proj: fp8_linear(ck, &format!("{p}.self_attn.v_proj.weight"))?,
                o_proj: fp8_linear(ck, &format!("{p}.self_attn.o_proj.weight"))?,
                q_norm: bf16_host(ck, &format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: bf16_host(ck, &format!("{p}.self_attn.k_norm.weight"))?,
                router,
                experts,
                dims,
                is_moe,
                k_cache: vec![bf16::ZERO; nkv * capacity * 128],
                v_cache: vec![bf16::ZERO; nkv * capacity * 128],
            });
        }
        let lm_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        Ok(EmulatedModel {
            embed: bf16_host(ck, "model.embed_tokens.weight")?,
            norm: bf16_host(ck, "model.norm.weight")?,
            lm_head: bf16_host(ck, lm_name)?,
            config: c,
            layers,
            max_tokens,
            capacity,
            len: 0,
        })
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
    /// Forgets the cached positions (a new sequence).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// As `GpuModel::forward`: runs `tokens` in chunks of at most `max_tokens` after the cached positions; the f32
    /// logits of every token ([tokens, vocab]) when `all_logits`, else of the last one.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, GpuModelError> {
        self.forward_traced(tokens, all_logits, &mut |_, _, _| {})
    }

    /// [`forward`](Self::forward) that reports the intermediates at the [`Tap`] points of
    /// `CpuModel::prefill_traced`, once per chunk (values `[chunk tokens, width]`). `Hidden` of a layer is the bf16
    /// residual sum that the next fused norm forms; `RouterLogits` only for MoE layers (as the CPU forward).
    pub fn forward_traced(
        &mut self,
        tokens: &[u32],
        all_logits: bool,
        tap: &mut TapFn<'_>,
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
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(GpuModelError::Input(format!("token id {bad} is out of range")));
        }
        let mut out = Vec::new();
        for chunk in tokens.chunks(self.max_tokens) {
            out.extend(self.forward_chunk(chunk, all_logits, tap));
        }
        if !all_logits {
            let v = self.config.vocab_size;
            out.drain(..out.len() - v);
        }
        Ok(out)
    }

    fn forward_chunk(&mut self, tokens: &[u32], all_logits: bool, tap: &mut TapFn<'_>) -> Vec<f32> {
        let c = &self.config;
        let t = tokens.len();
        let (h, nh, nkv, v) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size);
        let (qw, kw) = (nh * 128, nkv * 128);
        let start = self.len;
        let eps = c.rms_norm_eps as f32;
        let positions: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        // The residual stream (bf16) and the output of the last block (o_proj or MLP), added by the next fused norm.
        let mut resid = hga_embed_gather(&self.embed, tokens, h);
        tap(Tap::Embed, None, &to_f32(&resid));
        let mut mlp_out: Vec<bf16> = Vec::new();
        let ashape = AttentionShape { tokens: t, n_heads: nh, n_kv_heads: nkv, capacity: self.capacity, start };
        for (l, layer) in self.layers.iter_mut().enumerate() {
            // 1. input norm (+ the previous MLP output into the residual) -> FP8. `hga_rmsnorm_fp8_quant`'s reference
            //    is exactly `hga_fp8_quant(hga_rmsnorm(..))`; written out to report the bf16 norm.
            let (xn, summed) = if l == 0 {
                hga_rmsnorm(&resid, None, &layer.input_layernorm, t, h, eps)
            } else {
                hga_rmsnorm(&mlp_out, Some(&resid), &layer.input_layernorm, t, h, eps)
            };
            if let Some(s) = summed {
                resid = s;
                tap(Tap::Hidden, Some(l - 1), &to_f32(&resid));
            }
            tap(Tap::AttnNorm, Some(l), &to_f32(&xn));
            let (xq, xs) = hga_fp8_quant(&xn, t, h);
            // 2. q, k, v.
            let q = layer.q_proj.apply(&xq, &xs, t);
            let k = layer.k_proj.apply(&xq, &xs, t);
            let vv = layer.v_proj.apply(&xq, &xs, t);
            // 3. q/k norm + RoPE, K/V into the cache.
            let rs = QkNormRopeShape {
                tokens: t,
                n_heads: nh,
                n_kv_heads: nkv,
                capacity: self.capacity,
                q_stride: qw,
                k_stride: kw,
                v_stride: kw,
                cache_by_token: false,
                eps,
                theta: c.rope_theta,
            };
            let qr = hga_qk_norm_rope(
                &q,
                &k,
                &vv,
                &positions,
                &layer.q_norm,
                &layer.k_norm,
                &mut layer.k_cache,
                &mut layer.v_cache,
                &rs,
            );
            tap(Tap::Q, Some(l), &to_f32(&qr));
            let cache_rows = |cache: &[bf16]| -> Vec<f32> {
                // [t, nkv * 128] from the cache [nkv, capacity, 128].
                let mut o = Vec::with_capacity(t * kw);
                for p in start..start + t {
                    for kh in 0..nkv {
                        let r = (kh * self.capacity + p) * 128;
                        o.extend(cache[r..r + 128].iter().map(|x| x.to_f32()));
                    }
                }
                o
            };
            tap(Tap::K, Some(l), &cache_rows(&layer.k_cache));
            tap(Tap::V, Some(l), &cache_rows(&layer.v_cache));
            // 4. attention (bf16 out, as both attention kernels write).
            let (att, _lse) = hga_attention(&qr, &layer.k_cache, &layer.v_cache, &ashape);
            let att: Vec<bf16> = att.iter().map(|&x| bf16_rn(x)).collect();
            tap(Tap::Attn, Some(l), &to_f32(&att));
            // 5. o_proj.
            let (aq, as_) = hga_fp8_quant(&att, t, qw);
            let o = layer.o_proj.apply(&aq, &as_, t);
            tap(Tap::AttnOut, Some(l), &to_f32(&o));
            // 6. post-attention norm (+ the attention output into the residual), bf16 out.
            let (xn, summed) = hga_rmsnorm(&o, Some(&resid), &layer.post_attention_layernorm, t, h, eps);
            resid = summed.expect("residual");
            tap(Tap::MlpNorm, Some(l), &to_f32(&xn));
            // 7. MoE (or the dense MLP as a one-expert MoE), bf16 out.
            let d = MoeDims { tokens: t, ..layer.dims };
            let r = hga_moe_router(&xn, &layer.router, &d);
            if layer.is_moe {
                tap(Tap::RouterLogits, Some(l), &r.logits.iter().map(|&x| x as f32).collect::<Vec<_>>());
            }
            let y = hga_moe_experts(&xn, &r.ids, &r.weights, &layer.experts, &d);
            mlp_out = y.iter().map(|&x| bf16::from_f32(x)).collect();
            tap(Tap::MlpOut, Some(l), &to_f32(&mlp_out));
        }
        // Final norm (+ the last MLP output into the residual), then lm_head.
        let (xn, summed) = hga_rmsnorm(&mlp_out, Some(&resid), &self.norm, t, h, eps);
        tap(Tap::Hidden, Some(self.layers.len() - 1), &to_f32(summed.as_deref().expect("residual")));
        tap(Tap::FinalNorm, None, &to_f32(&xn));
        self.len += t;
        let (r0, m) = if all_logits { (0, t) } else { (t - 1, 1) };
        let x = &xn[r0 * h..(r0 + m) * h];
        // `hga_lm_head` over slices of the vocabulary in parallel (each logit is one independent dot product).
        const VB: usize = 512;
        let parts: Vec<Vec<f32>> =
            self.lm_head.par_chunks(VB * h).map(|w| hga_lm_head(x, w, m, w.len() / h, h)).collect();
        let mut logits = vec![0f32; m * v];
        for (b, part) in parts.iter().enumerate() {
            let n = part.len() / m;
            for i in 0..m {
                logits[i * v + b * VB..i * v + b * VB + n].copy_from_slice(&part[i * n..(i + 1) * n]);
            }
        }
        logits
    }
}
