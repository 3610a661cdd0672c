//! The host arena: every group block of the K/V history in extents of host memory (RAM tier).
