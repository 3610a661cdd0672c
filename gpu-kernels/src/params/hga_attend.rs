//! Parameter structs of the routed-attention kernels (`gpu-kernels/src/hga/attend/`).
