//! The kernel images embedded at build time (see build.rs): PTX for sm_89, sm_90, sm_120, and cubins for the same
//! arches when ptxas was present.
use hga_host::runtime::{Gpu, ImageKind, KernelImage, RuntimeError};
use std::borrow::Cow;
use std::sync::OnceLock;

mod generated {
    use super::ImageKind;
    include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));
}

/// True when the embedded images were built from this checkout's kernel sources; false when the build fell back
/// to the committed PTX (no nvptx-capable toolchain).
pub const IMAGES_FRESH: bool = generated::FRESH;

/// Every embedded kernel image. The build records which were built for programmatic dependent launch (sm_90,
/// sm_120); that is confirmed on the PTX text (for a cubin, the PTX of the same build it was assembled from), so a
/// stale committed PTX without the waits is never launched with PDL.
pub fn embedded_images() -> Vec<KernelImage> {
    static PDL: OnceLock<Vec<bool>> = OnceLock::new();
    let pdl = PDL.get_or_init(|| {
        let ptx_ready = |sm: u32| {
            generated::IMAGES
                .iter()
                .find(|i| i.0 == sm && i.1 == ImageKind::Ptx)
                .is_some_and(|i| std::str::from_utf8(i.2).is_ok_and(|t| hga_host::runtime::ptx_pdl_check(t).is_ok()))
        };
        generated::IMAGES.iter().map(|&(sm, _, _, built)| built && ptx_ready(sm)).collect()
    });
    generated::IMAGES
        .iter()
        .zip(pdl)
        .map(|(&(sm, kind, bytes, _), &pdl)| KernelImage { sm, kind, bytes: Cow::Borrowed(bytes), pdl })
        .collect()
}

/// Opens GPU `ordinal` with the best embedded image for it (or the one `HGA_KERNEL_IMAGE` names).
pub fn open_gpu(ordinal: usize) -> Result<Gpu, RuntimeError> {
    Gpu::new(ordinal, &embedded_images())
}
