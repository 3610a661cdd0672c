//! The GPU working-set cache of K/V groups (kernels).
