//! Parameter structs of the head kernels (in progress: issue 4).
