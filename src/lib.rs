//! `hga`: Hierarchical Global Attention for long-context Qwen3-MoE FP8 inference on one GPU.
//!
//! The public facade: everything of the host crate (`runtime`, `kernels`, `reference`, `check`, `model`) plus
//! the kernel images embedded at build time ([`embedded_images`], [`open_gpu`]).
//!
//! ```no_run
//! let gpu = hga::open_gpu(0)?; // picks sm_90.cubin on an H100, else the best PTX
//! println!("{} with {}", gpu.device_name(), gpu.image_name());
//! # Ok::<(), hga::runtime::RuntimeError>(())
//! ```
pub use hga_host::*;

mod embedded;
pub use embedded::{embedded_images, open_gpu, IMAGES_FRESH};
