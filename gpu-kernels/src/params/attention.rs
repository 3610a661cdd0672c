//! Parameter structs of the attention kernels (in progress: issue 4).
