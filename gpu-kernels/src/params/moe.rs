//! Parameter structs of the moe kernels (in progress: issue 4).
