//! Naive CPU references of every kernel, written independently of the kernels (f64 accumulation), named as the
//! kernels. The GPU tests and `hga selfcheck` compare against these.
pub mod attention;
pub mod gemm;
pub mod head;
pub mod moe;
pub mod norm;
pub mod quant;
pub mod rope;
pub mod selftest;

pub use norm::hga_rmsnorm;
pub use quant::{hga_fp8_dequant, hga_fp8_quant};
