//! Routed attention (kernels).
