//! Normalization kernels.
pub mod rmsnorm;
