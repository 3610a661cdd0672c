//! Self-test kernels: each exercises one family of building blocks in [`crate::arch`] and writes what it saw, so
//! that the host can compare with a CPU expectation (`hga_host::reference::selftest`). They are tests, not
//! performance code. All take [`crate::params::SelfTestParams`]; the layouts of `input` / `output` are given per
//! kernel (and mirrored by the host expectations).
pub mod basic;
pub mod tensor;
