//! Parameter structs of the rope kernels (in progress: issue 4).
