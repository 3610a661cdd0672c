//! HGA on the GPU: routing (chunk summaries and int4 sketches, stage 1, stage 2 with its top-k) and exact routed
//! attention over the sink, the local window and the selected groups. Formats: `crate::params::hga`.
pub mod attend;
pub mod cast;
pub mod route;
