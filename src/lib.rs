//! `hga`: the public facade.
pub use hga_host::*;
