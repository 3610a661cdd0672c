//! Parameter structs of the gemm kernels (in progress: issue 4).
