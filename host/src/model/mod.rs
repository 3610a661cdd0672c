//! The Qwen3-MoE model: config, checkpoint I/O (safetensors, FP8 block-scaled), checkpoint generator, CPU reference
//! forward and tokenizer. See ../shared/QWEN3.md (the contract) and the module docs.
pub mod checkpoint;
pub mod config;
pub mod emulate;
pub mod error;
pub mod forward;
pub mod generate;
pub mod gpu;
pub mod tokenizer;
