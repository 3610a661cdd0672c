//! Parameter structs of the routing kernels (`gpu-kernels/src/hga/route/`).
