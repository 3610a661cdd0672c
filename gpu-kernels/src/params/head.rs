//! Parameter structs of the head kernels: embedding gather, bf16 lm_head GEMV, argmax, temperature / top-p
//! sampling.

#[cfg(feature = "host")]
use bytemuck::{Pod, Zeroable};

/// Embedding gather: `out[i, :] = table[ids[i], :]` (ids >= vocab give a zero row; the launcher rejects them).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct EmbedParams {
    /// bf16 [vocab, hidden]
    pub table: u64,
    /// u32 [rows]
    pub ids: u64,
    /// bf16 [rows, hidden]
    pub out: u64,
    pub rows: u32,
    pub vocab: u32,
    pub hidden: u32,
    pub _pad: u32,
}

/// bf16 GEMV for few rows: `out[m, v] = sum_h x[m, h] w[v, h]` in f32 (m <= 16).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct LmHeadParams {
    /// bf16 [m, hidden]
    pub x: u64,
    /// bf16 [vocab, hidden]
    pub w: u64,
    /// f32 [m, vocab]
    pub out: u64,
    pub m: u32,
    pub vocab: u32,
    pub hidden: u32,
    pub _pad: u32,
}

/// Argmax per row of f32 logits (ties: lowest index; NaN never wins; an all-NaN row gives u32::MAX).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct ArgmaxParams {
    /// f32 [rows, vocab]
    pub logits: u64,
    /// u32 [rows]
    pub out: u64,
    pub rows: u32,
    pub vocab: u32,
}

/// Temperature / top-p sampling per row with the integer-exact rule of `crate::sample` (see there).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "host", derive(Pod, Zeroable))]
pub struct SampleParams {
    /// f32 [rows, vocab]
    pub logits: u64,
    /// u32 [rows]
    pub out: u64,
    /// u64 seed of the counter-based generator
    pub seed: u64,
    /// `sample::weight_coef(temperature)` (f32 log2(e) / temperature)
    pub coef: f32,
    /// `sample::top_p_fixed(top_p)` (top_p in 2^-20 units, <= 2^20)
    pub top_p: u32,
    pub rows: u32,
    pub vocab: u32,
    /// the generator's step counter for row 0; row r uses step + r
    pub step: u64,
}
