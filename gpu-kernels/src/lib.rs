//! HGA GPU kernels, written in Rust and compiled to PTX for sm_89, sm_90 and sm_120.
//!
//! The crate is `no_std` and builds two ways:
//! - for `nvptx64-nvidia-cuda` (by the root `build.rs`): the `extern "ptx-kernel"` entry points;
//! - for the host: the `#[repr(C)]` parameter structs and the pure helpers (FP8 / bf16 encoding, ...), so that the
//!   host launchers and the kernels share one definition. Tested with plain `cargo test`.
#![no_std]
#![cfg_attr(target_arch = "nvptx64", feature(abi_ptx, stdarch_nvptx, asm_experimental_arch))]

pub mod num;
pub mod params;
pub mod sample;

#[cfg(target_arch = "nvptx64")]
pub mod arch;
#[cfg(target_arch = "nvptx64")]
pub mod attention;
#[cfg(target_arch = "nvptx64")]
pub mod gemm;
#[cfg(target_arch = "nvptx64")]
pub mod head;
#[cfg(target_arch = "nvptx64")]
pub mod hga;
#[cfg(target_arch = "nvptx64")]
pub mod kv;
#[cfg(target_arch = "nvptx64")]
pub mod moe;
#[cfg(target_arch = "nvptx64")]
pub mod norm;
#[cfg(target_arch = "nvptx64")]
pub mod quant;
#[cfg(target_arch = "nvptx64")]
pub mod rope;
#[cfg(target_arch = "nvptx64")]
pub mod selftest;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    unsafe { core::arch::nvptx::trap() }
}
