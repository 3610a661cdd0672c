//! Routing kernels: summary maintenance, stage 1 (chunk scores + top-k), stage 2 (sketch scores + top-k).
