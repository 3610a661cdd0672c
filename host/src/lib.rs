//! HGA host crate: the CUDA runtime on cudarc, one safe launcher per kernel, the CPU reference of every kernel and of
//! the whole Qwen3-MoE forward, checkpoint I/O.
pub mod check;
pub mod hga;
pub mod kernels;
pub mod kv;
pub mod memory;
pub mod model;
pub mod reference;
pub mod runtime;
