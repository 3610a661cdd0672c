//! The model's head: embedding gather, bf16 lm_head GEMV, argmax and temperature / top-p sampling.
pub mod argmax;
pub mod embed;
pub mod lm_head;
pub mod sample;
