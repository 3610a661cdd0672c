//! HGA routing: summaries, stage 1, stage 2 (kernels).
