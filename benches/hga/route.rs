//! Routing benchmark rows (filled by the routing kernels).
pub fn run(_gpu: &hga::runtime::Gpu) {}
