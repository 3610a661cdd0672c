//! GPU working-set cache benchmark rows.
pub fn run(_gpu: &hga::runtime::Gpu) {}
