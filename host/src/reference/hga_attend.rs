//! Routed attention (reference).
