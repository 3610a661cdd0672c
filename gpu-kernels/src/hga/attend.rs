//! Routed attention kernels (decode split-K and the 64-query prefill block). One kernel per file below.
