//! The Qwen3-MoE forward on the GPU, composed of the Rust kernels, with dense attention and a GPU K/V cache.
//!
//! Per layer (QWEN3.md), for a chunk of `t` tokens at positions `start..start + t`:
//! 1. `input_layernorm` fused with the residual add of the previous layer's MLP output and with the FP8 activation
//!    quantization (`hga_rmsnorm_fp8_quant`);
//! 2. q/k/v block-scaled FP8 linears (`hga_fp8_linear`: the decode kernel up to 16 rows, the mma.sync pipeline
//!    above);
//! 3. per-head q/k RMSNorm + NeoX RoPE, K and V written into the layer's cache (`hga_qk_norm_rope`);
//! 4. causal GQA attention over the cache: split-K decode for one token, FlashAttention-style prefill otherwise;
//! 5. FP8 quantization of the attention output, `o_proj`;
//! 6. `post_attention_layernorm` fused with the residual add (`hga_rmsnorm`, bf16 out: the router reads bf16);
//! 7. the MoE block (router, experts; the decode path for a few tokens, the grouped path above). A dense-MLP layer
//!    (`mlp_only_layers`, `decoder_sparse_step`) runs as a MoE block with one expert and weight 1, which is exactly
//!    `down(silu(gate(x)) * up(x))`.
//!
//! Then `model.norm` (with the last residual add) and the bf16 `lm_head` (f32 logits). The residual stream is bf16,
//! as in transformers. What it needs: an FP8 checkpoint (`quantization_config`), head_dim 128, hidden and
//! intermediate sizes multiples of 128 (all true of Qwen3-30B-A3B); anything else is refused with a clear error.
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use half::bf16;

use crate::kernels::attention::{
    hga_attention_decode, hga_attention_prefill, AttentionShape, DecodeWorkspace, DECODE_MAX_SPLITS,
};
use crate::kernels::gemm::{hga_fp8_linear, hga_rmsnorm_fp8_quant};
use crate::kernels::head::{hga_embed_gather, hga_lm_head, LM_HEAD_MAX_M};
use crate::kernels::moe::{moe_decode, moe_grouped, MoeExpertWeights, MoeWorkspace, RouterForm};
use crate::kernels::rope::{hga_qk_norm_rope, QkNormRopeShape};
use crate::kernels::{hga_fp8_quant, hga_rmsnorm};
use crate::model::checkpoint::{Checkpoint, Fp8Weight};
use crate::model::config::Qwen3MoeConfig;
use crate::reference::moe::{MoeDims, MoeHostWeights};
use crate::runtime::{Gpu, RuntimeError};

/// Up to this many tokens per call the MoE block takes the decode path (no grouping).
const MOE_DECODE_MAX_TOKENS: usize = 4;

/// Errors of the GPU model.
#[derive(Debug, thiserror::Error)]
pub enum GpuModelError {
    #[error("the GPU backend cannot run this model: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::error::ModelError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{0}")]
    Input(String),
}

/// A block-scaled FP8 linear on the GPU: e4m3 [n, k] and f32 scales [n/128, k/128].
struct Fp8Linear {
    w: CudaSlice<u8>,
    s: CudaSlice<f32>,
    n: usize,
    k: usize,
}

enum Mlp {
    /// Router bf16 [experts, hidden] and the stacked experts; `dims.tokens` is set per call; `ws` indexes the
    /// workspace of these dims in `Scratch::moe`.
    Moe { router: CudaSlice<bf16>, experts: MoeExpertWeights, dims: MoeDims, ws: usize },
}

struct Layer {
    input_layernorm: CudaSlice<bf16>,
    post_attention_layernorm: CudaSlice<bf16>,
    q_proj: Fp8Linear,
    k_proj: Fp8Linear,
    v_proj: Fp8Linear,
    o_proj: Fp8Linear,
    q_norm: CudaSlice<bf16>,
    k_norm: CudaSlice<bf16>,
    mlp: Mlp,
    k_cache: CudaSlice<bf16>,
    v_cache: CudaSlice<bf16>,
}

/// Activations and workspaces for up to `max_tokens` tokens per call.
struct Scratch {
    max_tokens: usize,
    h: [CudaSlice<bf16>; 2],
    mlp_out: CudaSlice<bf16>,
    xn: CudaSlice<bf16>,
    xq: CudaSlice<u8>,
    xs: CudaSlice<f32>,
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    qr: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    aq: CudaSlice<u8>,
    as_: CudaSlice<f32>,
    positions: CudaSlice<u32>,
    ids: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    decode: DecodeWorkspace,
    moe: Vec<MoeWorkspace>,
}

/// The model on one GPU.
pub struct GpuModel<'g> {
    gpu: &'g Gpu,
    config: Qwen3MoeConfig,
    embed: CudaSlice<bf16>,
    norm: CudaSlice<bf16>,
    lm_head: CudaSlice<bf16>,
    layers: Vec<Layer>,
    scratch: Scratch,
    capacity: usize,
    len: usize,
    /// Which of `scratch.h` holds the residual stream.
    cur: usize,
}

/// Refuses what the kernels cannot run (shared with the CPU emulation's loader).
pub(crate) fn check_supported(c: &Qwen3MoeConfig, capacity: usize, max_tokens: usize) -> Result<(), GpuModelError> {
    let unsupported = |m: String| Err(GpuModelError::Unsupported(m));
    if c.quantization.is_none() {
        return unsupported("the checkpoint is not FP8 (no quantization_config)".into());
    }
    if c.head_dim != 128 {
        return unsupported(format!("head_dim {} (the attention kernels are built for 128)", c.head_dim));
    }
    if !c.hidden_size.is_multiple_of(128) {
        return unsupported(format!("hidden_size {} is not a multiple of 128", c.hidden_size));
    }
    if capacity == 0 || max_tokens == 0 {
        return Err(GpuModelError::Input("capacity and max_tokens must be > 0".into()));
    }
    Ok(())
}

/// Layer `l`'s MLP as the MoE kernels run it: its dims (`tokens` set per call), its router tensor (`None`: a
/// dense SwiGLU MLP, run as one expert behind a zero router with routing weight 1, which is exactly
/// `down(silu(gate(x)) * up(x))`) and its expert modules.
pub(crate) fn mlp_as_moe(c: &Qwen3MoeConfig, l: usize) -> (MoeDims, Option<String>, Vec<String>) {
    let p = format!("model.layers.{l}.mlp");
    if c.is_moe_layer(l) {
        let dims = MoeDims {
            tokens: 1,
            hidden: c.hidden_size,
            inter: c.moe_intermediate_size,
            experts: c.num_experts,
            top_k: c.num_experts_per_tok,
            norm_topk: c.norm_topk_prob,
        };
        (dims, Some(format!("{p}.gate.weight")), (0..c.num_experts).map(|e| format!("{p}.experts.{e}")).collect())
    } else {
        let dims = MoeDims {
            tokens: 1,
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            experts: 1,
            top_k: 1,
            norm_topk: true,
        };
        (dims, None, vec![p])
    }
}

/// A tensor of the checkpoint as bf16 on the host.
pub(crate) fn bf16_host(ck: &Checkpoint, name: &str) -> Result<Vec<bf16>, GpuModelError> {
    Ok(ck.tensor_f32(name)?.into_iter().map(bf16::from_f32).collect())
}

fn bf16_tensor(gpu: &Gpu, ck: &Checkpoint, name: &str) -> Result<CudaSlice<bf16>, GpuModelError> {
    Ok(gpu.stream().clone_htod(&bf16_host(ck, name)?)?)
}

/// An FP8 weight the kernels can take: [128, 128] blocks, both dimensions multiples of 128.
pub(crate) fn checked_fp8_weight<'c>(ck: &'c Checkpoint, name: &str) -> Result<Fp8Weight<'c>, GpuModelError> {
    let w = ck.fp8_weight(name)?;
    if w.block != [128, 128] {
        return Err(GpuModelError::Unsupported(format!(
            "{name}: weight blocks {:?}, the kernels need [128, 128]",
            w.block
        )));
    }
    let [n, k] = w.shape;
    if !n.is_multiple_of(128) || !k.is_multiple_of(128) {
        return Err(GpuModelError::Unsupported(format!("{name}: shape [{n}, {k}] is not a multiple of 128")));
    }
    Ok(w)
}

fn fp8_linear(gpu: &Gpu, ck: &Checkpoint, name: &str) -> Result<Fp8Linear, GpuModelError> {
    let w = checked_fp8_weight(ck, name)?;
    let [n, k] = w.shape;
    let s = gpu.stream();
    Ok(Fp8Linear { w: s.clone_htod(w.data)?, s: s.clone_htod(&w.scales)?, n, k })
}

impl<'g> GpuModel<'g> {
    /// Uploads the checkpoint (`progress(done, total)` is called per layer) and allocates a K/V cache of
    /// `capacity` positions and scratch for up to `max_tokens` tokens per call.
    pub fn load(
        gpu: &'g Gpu,
        ck: &Checkpoint,
        capacity: usize,
        max_tokens: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, GpuModelError> {
        let c = ck.config.clone();
        check_supported(&c, capacity, max_tokens)?;
        let s = gpu.stream();
        let (h, nh, nkv) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut moe_dims: Vec<MoeDims> = Vec::new();
        // One workspace per distinct (inter, experts, top_k): a layer always uses its own.
        let mut ws_of = |d: &MoeDims| match moe_dims
            .iter()
            .position(|m| m.inter == d.inter && m.experts == d.experts && m.top_k == d.top_k)
        {
            Some(i) => i,
            None => {
                moe_dims.push(*d);
                moe_dims.len() - 1
            }
        };
        for l in 0..c.num_hidden_layers {
            progress(l, c.num_hidden_layers);
            let p = format!("model.layers.{l}");
            let (dims, router, modules) = mlp_as_moe(&c, l);
            let router = match router {
                Some(name) => bf16_tensor(gpu, ck, &name)?,
                None => s.clone_htod(&vec![bf16::ZERO; h])?,
            };
            let mlp = Mlp::Moe {
                router,
                experts: MoeExpertWeights::upload(gpu, &stack_experts(ck, &modules)?)?,
                ws: ws_of(&dims),
                dims,
            };
            layers.push(Layer {
                input_layernorm: bf16_tensor(gpu, ck, &format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: bf16_tensor(gpu, ck, &format!("{p}.post_attention_layernorm.weight"))?,
                q_proj: fp8_linear(gpu, ck, &format!("{p}.self_attn.q_proj.weight"))?,
                k_proj: fp8_linear(gpu, ck, &format!("{p}.self_attn.k_proj.weight"))?,
                v_proj: fp8_linear(gpu, ck, &format!("{p}.self_attn.v_proj.weight"))?,
                o_proj: fp8_linear(gpu, ck, &format!("{p}.self_attn.o_proj.weight"))?,
                q_norm: bf16_tensor(gpu, ck, &format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: bf16_tensor(gpu, ck, &format!("{p}.self_attn.k_norm.weight"))?,
                mlp,
                k_cache: s.alloc_zeros::<bf16>(nkv * capacity * 128)?,
                v_cache: s.alloc_zeros::<bf16>(nkv * capacity * 128)?,
            });
        }
        progress(c.num_hidden_layers, c.num_hidden_layers);
        let lm_name = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let t = max_tokens;
        let z16 = |n: usize| s.alloc_zeros::<bf16>(n);
        let scratch = Scratch {
            max_tokens: t,
            h: [z16(t * h)?, z16(t * h)?],
            mlp_out: z16(t * h)?,
            xn: z16(t * h)?,
            xq: s.alloc_zeros::<u8>(t * h)?,
            xs: s.alloc_zeros::<f32>(t * h / 128)?,
            q: z16(t * nh * 128)?,
            k: z16(t * nkv * 128)?,
            v: z16(t * nkv * 128)?,
            qr: z16(t * nh * 128)?,
            attn: z16(t * nh * 128)?,
            lse: s.alloc_zeros::<f32>(t * nh)?,
            aq: s.alloc_zeros::<u8>(t * nh * 128)?,
            as_: s.alloc_zeros::<f32>(t * nh)?,
            positions: s.alloc_zeros::<u32>(t)?,
            ids: s.alloc_zeros::<u32>(t)?,
            logits: s.alloc_zeros::<f32>(LM_HEAD_MAX_M * c.vocab_size)?,
            decode: DecodeWorkspace::new(gpu, 1, nh, DECODE_MAX_SPLITS)?,
            moe: moe_dims
                .iter()
                .map(|d| MoeWorkspace::new(gpu, d, t, t > MOE_DECODE_MAX_TOKENS))
                .collect::<Result<_, _>>()?,
        };
        Ok(GpuModel {
            gpu,
            embed: bf16_tensor(gpu, ck, "model.embed_tokens.weight")?,
            norm: bf16_tensor(gpu, ck, "model.norm.weight")?,
            lm_head: bf16_tensor(gpu, ck, lm_name)?,
            config: c,
            layers,
            scratch,
            capacity,
            len: 0,
            cur: 0,
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
    /// Cache capacity in positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Runs `tokens` (in chunks of at most `max_tokens`) after the cached positions and returns the f32 logits of
    /// every token ([tokens, vocab], row-major) when `all_logits`, else of the last one only.
    pub fn forward(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, GpuModelError> {
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
        let mut out = Vec::new();
        for chunk in tokens.chunks(self.scratch.max_tokens) {
            let logits = self.forward_chunk(chunk, all_logits)?;
            out.extend(logits);
        }
        if !all_logits {
            let v = self.config.vocab_size;
            out.drain(..out.len() - v);
        }
        Ok(out)
    }

    fn forward_chunk(&mut self, tokens: &[u32], all_logits: bool) -> Result<Vec<f32>, GpuModelError> {
        let gpu = self.gpu;
        let s = gpu.stream().clone();
        let c = &self.config;
        let t = tokens.len();
        let (h, nh, nkv, v) = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size);
        let (qw, kw) = (nh * 128, nkv * 128);
        let start = self.len;
        let eps = c.rms_norm_eps as f32;
        let sc = &mut self.scratch;
        let pos: Vec<u32> = (start..start + t).map(|p| p as u32).collect();
        s.memcpy_htod(&pos, &mut sc.positions.slice_mut(0..t))?;
        // Embeddings into the residual stream.
        let cur = self.cur;
        hga_embed_gather(
            gpu,
            &self.embed,
            tokens,
            &mut sc.ids.slice_mut(0..t),
            &mut sc.h[cur].slice_mut(0..t * h),
            v,
            h,
        )?;
        let mut cur = cur;
        let ashape = AttentionShape { tokens: t, n_heads: nh, n_kv_heads: nkv, capacity: self.capacity, start };
        for (l, layer) in self.layers.iter_mut().enumerate() {
            // 1. input norm (+ the previous MLP output into the residual) -> FP8.
            if l == 0 {
                hga_rmsnorm_fp8_quant(
                    gpu,
                    &sc.h[cur].slice(0..t * h),
                    None,
                    &layer.input_layernorm,
                    &mut sc.xq.slice_mut(0..t * h),
                    &mut sc.xs.slice_mut(0..t * h / 128),
                    t,
                    h,
                    eps,
                )?;
            } else {
                let (a, b) = split_pair(&mut sc.h, cur);
                hga_rmsnorm_fp8_quant(
                    gpu,
                    &sc.mlp_out.slice(0..t * h),
                    Some((&a.slice(0..t * h), &mut b.slice_mut(0..t * h))),
                    &layer.input_layernorm,
                    &mut sc.xq.slice_mut(0..t * h),
                    &mut sc.xs.slice_mut(0..t * h / 128),
                    t,
                    h,
                    eps,
                )?;
                cur ^= 1;
            }
            // 2. q, k, v.
            let (xq, xs) = (sc.xq.slice(0..t * h), sc.xs.slice(0..t * h / 128));
            linear(gpu, &layer.q_proj, &xq, &xs, &mut sc.q.slice_mut(0..t * qw), t)?;
            linear(gpu, &layer.k_proj, &xq, &xs, &mut sc.k.slice_mut(0..t * kw), t)?;
            linear(gpu, &layer.v_proj, &xq, &xs, &mut sc.v.slice_mut(0..t * kw), t)?;
            // 3. q/k norm + RoPE, K/V into the cache.
            let rs = QkNormRopeShape {
                tokens: t,
                n_heads: nh,
                n_kv_heads: nkv,
                capacity: self.capacity,
                q_stride: qw,
                k_stride: kw,
                v_stride: kw,
                eps,
                theta: c.rope_theta,
            };
            hga_qk_norm_rope(
                gpu,
                &sc.q.slice(0..t * qw),
                &sc.k.slice(0..t * kw),
                &sc.v.slice(0..t * kw),
                &sc.positions.slice(0..t),
                &layer.q_norm,
                &layer.k_norm,
                &mut sc.qr.slice_mut(0..t * qw),
                &mut layer.k_cache,
                &mut layer.v_cache,
                &rs,
            )?;
            // 4. attention.
            if t == 1 {
                hga_attention_decode(
                    gpu,
                    &sc.qr.slice(0..qw),
                    &layer.k_cache,
                    &layer.v_cache,
                    &mut sc.decode,
                    &mut sc.attn.slice_mut(0..qw),
                    &mut sc.lse.slice_mut(0..nh),
                    &ashape,
                )?;
            } else {
                hga_attention_prefill(
                    gpu,
                    &sc.qr.slice(0..t * qw),
                    &layer.k_cache,
                    &layer.v_cache,
                    &mut sc.attn.slice_mut(0..t * qw),
                    &mut sc.lse.slice_mut(0..t * nh),
                    &ashape,
                )?;
            }
            // 5. o_proj.
            hga_fp8_quant(
                gpu,
                &sc.attn.slice(0..t * qw),
                &mut sc.aq.slice_mut(0..t * qw),
                &mut sc.as_.slice_mut(0..t * nh),
                t,
                qw,
            )?;
            linear(
                gpu,
                &layer.o_proj,
                &sc.aq.slice(0..t * qw),
                &sc.as_.slice(0..t * nh),
                &mut sc.mlp_out.slice_mut(0..t * h),
                t,
            )?;
            // 6. post-attention norm (+ the attention output into the residual), bf16 out.
            let (a, b) = split_pair(&mut sc.h, cur);
            hga_rmsnorm(
                gpu,
                &sc.mlp_out.slice(0..t * h),
                Some((&a.slice(0..t * h), &mut b.slice_mut(0..t * h))),
                &layer.post_attention_layernorm,
                &mut sc.xn.slice_mut(0..t * h),
                t,
                h,
                eps,
            )?;
            cur ^= 1;
            // 7. MoE (or the dense MLP as a one-expert MoE).
            let Mlp::Moe { router, experts, dims, ws } = &layer.mlp;
            let d = MoeDims { tokens: t, ..*dims };
            let ws = &mut sc.moe[*ws];
            let x = sc.xn.slice(0..t * h);
            let mut o = sc.mlp_out.slice_mut(0..t * h);
            if t <= MOE_DECODE_MAX_TOKENS {
                moe_decode(gpu, &x, router, experts, ws, &mut o, &d, RouterForm::Auto)?;
            } else {
                moe_grouped(gpu, &x, router, experts, ws, &mut o, &d, RouterForm::Auto)?;
            }
        }
        // Final norm (+ the last MLP output into the residual), then lm_head in slices of LM_HEAD_MAX_M rows.
        let (a, b) = split_pair(&mut sc.h, cur);
        hga_rmsnorm(
            gpu,
            &sc.mlp_out.slice(0..t * h),
            Some((&a.slice(0..t * h), &mut b.slice_mut(0..t * h))),
            &self.norm,
            &mut sc.xn.slice_mut(0..t * h),
            t,
            h,
            eps,
        )?;
        cur ^= 1;
        self.cur = cur;
        self.len += t;
        let rows: Vec<usize> = if all_logits { (0..t).collect() } else { vec![t - 1] };
        let mut out = Vec::with_capacity(rows.len() * v);
        for r in rows.chunks(LM_HEAD_MAX_M) {
            let (r0, m) = (r[0], r.len());
            hga_lm_head(
                gpu,
                &sc.xn.slice(r0 * h..(r0 + m) * h),
                &self.lm_head,
                &mut sc.logits.slice_mut(0..m * v),
                m,
                v,
                h,
            )?;
            out.extend(s.clone_dtoh(&sc.logits.slice(0..m * v))?);
        }
        gpu.synchronize()?;
        Ok(out)
    }
}

/// (the buffer holding the residual, the other one).
fn split_pair(h: &mut [CudaSlice<bf16>; 2], cur: usize) -> (&CudaSlice<bf16>, &mut CudaSlice<bf16>) {
    let (x, y) = h.split_at_mut(1);
    if cur == 0 {
        (&x[0], &mut y[0])
    } else {
        (&y[0], &mut x[0])
    }
}

fn linear(
    gpu: &Gpu,
    w: &Fp8Linear,
    a: &CudaView<'_, u8>,
    a_scale: &CudaView<'_, f32>,
    out: &mut CudaViewMut<'_, bf16>,
    m: usize,
) -> Result<(), RuntimeError> {
    hga_fp8_linear(gpu, a, a_scale, &w.w, &w.s, out, m, w.n, w.k)
}

/// Stacks the gate/up/down FP8 weights of `modules` (`{module}.gate_proj.weight`, ...) as the MoE kernels expect.
pub(crate) fn stack_experts(ck: &Checkpoint, modules: &[String]) -> Result<MoeHostWeights, GpuModelError> {
    let mut w =
        MoeHostWeights { w_gate: vec![], s_gate: vec![], w_up: vec![], s_up: vec![], w_down: vec![], s_down: vec![] };
    for m in modules {
        for (proj, wv, sv) in [
            ("gate_proj", &mut w.w_gate, &mut w.s_gate),
            ("up_proj", &mut w.w_up, &mut w.s_up),
            ("down_proj", &mut w.w_down, &mut w.s_down),
        ] {
            let name = format!("{m}.{proj}.weight");
            let f = ck.fp8_weight(&name)?;
            if f.block != [128, 128] || !f.shape[0].is_multiple_of(128) || !f.shape[1].is_multiple_of(128) {
                return Err(GpuModelError::Unsupported(format!("{name}: shape {:?} blocks {:?}", f.shape, f.block)));
            }
            wv.extend_from_slice(f.data);
            sv.extend_from_slice(&f.scales);
        }
    }
    Ok(w)
}
