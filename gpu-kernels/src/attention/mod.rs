//! Dense causal GQA attention, head_dim 128, returning the log-sum-exp (natural log) of every query row:
//! - [`prefill`]: FlashAttention-2 style, one CTA per (64 query rows, query head);
//! - [`decode_v3`]: flash-decoding split-K over the context for a few query tokens, all query heads of one KV head
//!   in one CTA (they share each K/V load), partial results with their LSE; an S-stage `cp.async` ring (S = 3, 4, 6)
//!   so that enough K/V bytes are in flight at one CTA per SM; [`decode`] is the double-buffered v2;
//! - [`merge`]: log-sum-exp merge of the split partials (as FlashInfer's state merge), optionally fused with the
//!   FP8 quantization of its output (one 128-group per (token, head)).
//!
//! Layouts: q / out bf16 [tokens, n_heads, 128]; K and V cache bf16 [n_kv_heads, capacity, 128] each (one KV head's
//! tokens contiguous, as HGA's groups of 16 tokens of one KV head will be); LSE f32 [tokens, n_heads].
//! Queries are the tokens at positions [start, start + tokens); they attend to cache positions [0, start + t].
//! The shared per-warp building blocks are in [`tile`].
pub mod decode;
pub mod decode_v3;
pub mod merge;
pub mod prefill;
pub mod tile;
