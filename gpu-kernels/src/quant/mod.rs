//! Quantization kernels.
pub mod fp8_quant;
