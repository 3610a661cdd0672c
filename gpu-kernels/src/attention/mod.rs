//! Dense causal GQA attention, head_dim 128, returning the log-sum-exp (natural log) of every query row:
//! - [`prefill`]: FlashAttention-2 style, one CTA per (64 query rows, query head);
//! - [`decode_v3`]: flash-decoding split-K over the context for a few query tokens, all query heads of one KV head
//!   in one CTA (they share each K/V load), partial results with their LSE; a 3-stage `cp.async` ring so that
//!   enough K/V bytes are in flight at one CTA per SM; [`decode`] holds its split and epilogue pieces;
//! - [`merge`]: log-sum-exp merge of the split partials (as FlashInfer's state merge), optionally fused with the
//!   FP8 quantization of its output (one 128-group per (token, head)).
//!
//! One kernel per job, the same on sm_89, sm_90 and sm_120 (host/src/kernels/attention.rs):
//!
//! | job | kernel | shared memory |
//! |---|---|---|
//! | prefill | `hga_attention_prefill` | 80 KB |
//! | decode, per split | `hga_attention_decode_v3_s3` | 96 KB (fits the 99 KB of sm_89 / sm_120) |
//! | merge of the splits | `hga_attention_merge_v2` | 17 KB at 32 splits |
//!
//! `hga_attention_merge` (the first merge, one warp per row, the same numbers bit for bit) is picked by no path; it
//! stays as the comparison row of the routed attention's bench. The `_v3_s3` / `_v2` names are those of the
//! measured history (docs/perf-attention.md; the double-buffered decode, the 4- and 6-stage rings and the
//! lazy-rescaling prefill are in git history).
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
