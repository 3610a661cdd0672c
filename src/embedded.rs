//! The kernel images embedded at build time (see build.rs): PTX for sm_89, sm_90, sm_120, and cubins for the same
//! arches when ptxas was present.
use hga_host::runtime::{Gpu, ImageKind, KernelImage, RuntimeError};
use std::borrow::Cow;

mod generated {
    use super::ImageKind;
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

/// True when the embedded images were built from this checkout's kernel sources; false when the build fell back
/// to the committed PTX (no nvptx-capable toolchain).
pub const IMAGES_FRESH: bool = generated::FRESH;

/// Every embedded kernel image.
pub fn embedded_images() -> Vec<KernelImage> {
    generated::IMAGES.iter().map(|&(sm, kind, bytes)| KernelImage { sm, kind, bytes: Cow::Borrowed(bytes) }).collect()
}

/// Opens GPU `ordinal` with the best embedded image for it (or the one `HGA_KERNEL_IMAGE` names).
pub fn open_gpu(ordinal: usize) -> Result<Gpu, RuntimeError> {
    Gpu::new(ordinal, &embedded_images())
}
