//! The GPU working-set cache: group slots per (layer, KV head), a device page table, GPU-side replacement.
