//! Rotary position embedding kernels (NeoX layout), fused with the per-head q/k RMSNorm of Qwen3 and the K/V cache
//! write.
pub mod qk_norm_rope;
