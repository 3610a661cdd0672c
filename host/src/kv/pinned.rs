//! Mapped pinned host memory (an [`ExtentMemory`](super::ExtentMemory) whose extents GPU kernels read in place).
