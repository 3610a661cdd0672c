//! Routed-attention benchmark rows.
pub fn run(_gpu: &hga::runtime::Gpu) {}
