//! Routed attention (check).
