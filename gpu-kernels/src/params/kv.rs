//! Parameter structs of the GPU working-set cache kernels (`gpu-kernels/src/kv/`).
