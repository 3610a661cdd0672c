//! The CUDA runtime on cudarc (driver API, loaded at run time: nothing CUDA is needed to build).
//!
//! [`Gpu`] owns a context, a stream and the loaded kernel module. The module comes from a list of
//! [`KernelImage`]s (the `hga` crate embeds one PTX per arch and, when ptxas was present at build time, one cubin
//! per arch). [`select_image`] picks the cubin of the device's exact SM, else the PTX with the highest arch not
//! above the device's (the driver JIT-compiles it), else fails naming the device's compute capability and the
//! arches available. Images can also come from a file or bytes (for embedding in other runtimes), and the
//! environment variable `HGA_KERNEL_IMAGE` overrides the choice: `sm_89.ptx`, `sm_90.cubin`, ... (one of the
//! embedded images) or a path to a `.ptx` / `.cubin` file.
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaStream, DeviceRepr};
use cudarc::nvrtc::Ptx;

/// What an image holds: PTX text (JIT-compiled by the driver at load) or a cubin (SASS for one exact SM).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageKind {
    Ptx,
    Cubin,
}

/// One compiled form of the kernel crate.
#[derive(Clone, Debug)]
pub struct KernelImage {
    /// SM number the image was built for (89, 90, 120).
    pub sm: u32,
    pub kind: ImageKind,
    pub bytes: Cow<'static, [u8]>,
}

impl KernelImage {
    /// Reads an image from a file: `.cubin` is a cubin, anything else is PTX. The SM is read from the PTX
    /// `.target` line; for a cubin it must be in the file name (`sm_90.cubin`, `kernels.sm_90.cubin`).
    pub fn from_file(path: &Path) -> Result<Self, RuntimeError> {
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::Image(format!("reading {}: {e}", path.display())))?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let kind = if name.ends_with(".cubin") { ImageKind::Cubin } else { ImageKind::Ptx };
        Self::from_bytes(bytes, kind, name)
    }

    /// An image from bytes. `hint` is searched for `sm_NN` when the bytes do not say (cubins).
    pub fn from_bytes(bytes: Vec<u8>, kind: ImageKind, hint: &str) -> Result<Self, RuntimeError> {
        let from_text = |s: &str| {
            s.find("sm_").and_then(|i| {
                let d: String = s[i + 3..].chars().take_while(|c| c.is_ascii_digit()).collect();
                d.parse::<u32>().ok()
            })
        };
        let sm = match kind {
            ImageKind::Ptx => {
                let text = std::str::from_utf8(&bytes).map_err(|_| RuntimeError::Image("PTX is not UTF-8".into()))?;
                let target = text.lines().find(|l| l.trim_start().starts_with(".target"));
                target
                    .and_then(from_text)
                    .ok_or_else(|| RuntimeError::Image("PTX has no `.target sm_NN` line".into()))?
            }
            ImageKind::Cubin => from_text(hint).ok_or_else(|| {
                RuntimeError::Image(format!("cannot tell the SM of cubin `{hint}` (name it sm_NN.cubin)"))
            })?,
        };
        Ok(KernelImage { sm, kind, bytes: Cow::Owned(bytes) })
    }

    /// `sm_90.cubin`, `sm_89.ptx`.
    pub fn name(&self) -> String {
        format!("sm_{}.{}", self.sm, if self.kind == ImageKind::Ptx { "ptx" } else { "cubin" })
    }
}

/// Errors of the runtime layer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error(
        "no kernel image fits this GPU (compute capability {major}.{minor}, sm_{sm}); images available: {available}. \
         A cubin must match the SM exactly; PTX must be for an arch not above the device's"
    )]
    NoFittingImage { major: u32, minor: u32, sm: u32, available: String },
    #[error("kernel image: {0}")]
    Image(String),
    #[error("CUDA: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("launch of {kernel}: {msg}")]
    Launch { kernel: &'static str, msg: String },
    #[error("{0}")]
    Shape(String),
}

/// Picks the image for a device of SM `sm`: the cubin of exactly that SM, else the PTX of the highest arch <= sm.
pub fn select_image(images: &[KernelImage], major: u32, minor: u32) -> Result<&KernelImage, RuntimeError> {
    let sm = major * 10 + minor;
    let cubin = images.iter().find(|i| i.kind == ImageKind::Cubin && i.sm == sm);
    let ptx = images.iter().filter(|i| i.kind == ImageKind::Ptx && i.sm <= sm).max_by_key(|i| i.sm);
    cubin.or(ptx).ok_or_else(|| RuntimeError::NoFittingImage {
        major,
        minor,
        sm,
        available: if images.is_empty() {
            "none".into()
        } else {
            images.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
        },
    })
}

/// Whether a CUDA driver and at least one device exist. Never panics (cudarc's dynamic loader would).
pub fn device_count() -> usize {
    // SAFETY: only probes for the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)).unwrap_or(0)
}

/// A kernel parameter struct passed by value (the kernel's single `.param`): any `Pod` struct of `gpu-kernels`.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct Param<T: bytemuck::Pod>(pub T);
// SAFETY: `Pod` types are plain bytes with no pointers the host owns; the kernel reads them by value.
unsafe impl<T: bytemuck::Pod> DeviceRepr for Param<T> {}

/// A device, its stream and the loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    image: String,
    name: String,
    cc: (u32, u32),
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu({}, sm_{}{}, image {})", self.name, self.cc.0, self.cc.1, self.image)
    }
}

impl Gpu {
    /// Opens device `ordinal` and loads the image chosen from `images` by [`select_image`], unless the environment
    /// variable `HGA_KERNEL_IMAGE` names another (an image name such as `sm_89.ptx`, or a file path).
    pub fn new(ordinal: usize, images: &[KernelImage]) -> Result<Self, RuntimeError> {
        let ctx = Self::open(ordinal)?;
        let (major, minor) = cc(&ctx)?;
        let image = match std::env::var("HGA_KERNEL_IMAGE") {
            Ok(want) if !want.is_empty() => match images.iter().find(|i| i.name() == want) {
                Some(i) => i.clone(),
                None if Path::new(&want).exists() => KernelImage::from_file(Path::new(&want))?,
                None => {
                    return Err(RuntimeError::Image(format!(
                        "HGA_KERNEL_IMAGE={want}: neither an embedded image ({}) nor a file",
                        images.iter().map(|i| i.name()).collect::<Vec<_>>().join(", ")
                    )))
                }
            },
            _ => select_image(images, major, minor)?.clone(),
        };
        Self::with_context(ctx, image)
    }

    /// Opens device `ordinal` with exactly this image (e.g. from [`KernelImage::from_file`]).
    pub fn with_image(ordinal: usize, image: KernelImage) -> Result<Self, RuntimeError> {
        Self::with_context(Self::open(ordinal)?, image)
    }

    fn open(ordinal: usize) -> Result<Arc<CudaContext>, RuntimeError> {
        let n = device_count();
        if n == 0 {
            return Err(RuntimeError::NoDevice("no CUDA driver library or no device found".into()));
        }
        if ordinal >= n {
            return Err(RuntimeError::NoDevice(format!("device {ordinal} requested, {n} present")));
        }
        Ok(CudaContext::new(ordinal)?)
    }

    fn with_context(ctx: Arc<CudaContext>, image: KernelImage) -> Result<Self, RuntimeError> {
        let (major, minor) = cc(&ctx)?;
        let sm = major * 10 + minor;
        if image.sm > sm || (image.kind == ImageKind::Cubin && image.sm != sm) {
            return Err(RuntimeError::NoFittingImage { major, minor, sm, available: image.name() });
        }
        let ptx = match image.kind {
            ImageKind::Ptx => Ptx::from_src(
                std::str::from_utf8(&image.bytes).map_err(|_| RuntimeError::Image("PTX is not UTF-8".into()))?,
            ),
            ImageKind::Cubin => Ptx::from_binary(image.bytes.to_vec()),
        };
        let module = ctx.load_module(ptx)?;
        // Every buffer and launch of a `Gpu` goes through its one stream, so cudarc's cross-stream event tracking
        // would only add host work per launch. The stream is a created (non-blocking) one, not the legacy default
        // stream, because only such a stream can be captured into a CUDA graph (the decode step is replayed from
        // one).
        // SAFETY: `ctx` is this `Gpu`'s own handle, no slice exists on it yet, and all work is on `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let name = ctx.name()?;
        Ok(Gpu {
            ctx,
            stream,
            module,
            image: image.name(),
            name,
            cc: (major, minor),
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The loaded image, e.g. `sm_90.cubin`.
    pub fn image_name(&self) -> &str {
        &self.image
    }
    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn device_name(&self) -> &str {
        &self.name
    }
    /// Compute capability (major, minor).
    pub fn compute_capability(&self) -> (u32, u32) {
        self.cc
    }

    /// A kernel of the loaded module (cached).
    pub fn function(&self, name: &'static str) -> Result<CudaFunction, RuntimeError> {
        let mut f = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = f.get(name) {
            return Ok(k.clone());
        }
        let k = self.module.load_function(name)?;
        f.insert(name, k.clone());
        Ok(k)
    }

    /// Records the stream work that `f` enqueues into a CUDA graph (nothing runs while recording) and
    /// instantiates it; [`CudaGraph::launch`] then replays all of it with one host call. `f` must only enqueue
    /// kernels and device-to-device work on [`Gpu::stream`]: a synchronization, a host copy or an allocation inside
    /// it fails the capture (the error is returned and the stream is usable again).
    pub fn capture(&self, f: impl FnOnce() -> Result<(), RuntimeError>) -> Result<CudaGraph, RuntimeError> {
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = f();
        // End the capture whatever happened, so the stream leaves capture mode.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        ended?.ok_or_else(|| RuntimeError::Launch { kernel: "capture", msg: "the capture recorded nothing".into() })
    }

    /// Waits for the stream and reports any asynchronous error of earlier launches.
    pub fn synchronize(&self) -> Result<(), RuntimeError> {
        self.stream.synchronize()?;
        Ok(())
    }
}

fn cc(ctx: &Arc<CudaContext>) -> Result<(u32, u32), RuntimeError> {
    let (a, b) = ctx.compute_capability()?;
    Ok((a as u32, b as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(sm: u32, kind: ImageKind) -> KernelImage {
        KernelImage { sm, kind, bytes: Cow::Borrowed(b"") }
    }

    #[test]
    fn selection_prefers_exact_cubin_then_highest_ptx() {
        let all = [
            img(89, ImageKind::Ptx),
            img(90, ImageKind::Ptx),
            img(120, ImageKind::Ptx),
            img(89, ImageKind::Cubin),
            img(90, ImageKind::Cubin),
        ];
        assert_eq!(select_image(&all, 9, 0).unwrap().name(), "sm_90.cubin");
        assert_eq!(select_image(&all, 8, 9).unwrap().name(), "sm_89.cubin");
        assert_eq!(select_image(&all, 12, 0).unwrap().name(), "sm_120.ptx");
        assert_eq!(select_image(&all, 10, 0).unwrap().name(), "sm_90.ptx");
        let e = select_image(&all, 8, 0).unwrap_err().to_string();
        assert!(e.contains("compute capability 8.0") && e.contains("sm_89.ptx, sm_90.ptx"), "{e}");
        let e = select_image(&[], 9, 0).unwrap_err().to_string();
        assert!(e.contains("images available: none"), "{e}");
    }

    #[test]
    fn image_from_bytes_reads_the_target() {
        let i = KernelImage::from_bytes(b"//\n.version 8.5\n.target sm_89\n".to_vec(), ImageKind::Ptx, "x").unwrap();
        assert_eq!(i.name(), "sm_89.ptx");
        let i = KernelImage::from_bytes(vec![0x7f, b'E'], ImageKind::Cubin, "k.sm_120.cubin").unwrap();
        assert_eq!(i.name(), "sm_120.cubin");
        assert!(KernelImage::from_bytes(vec![1], ImageKind::Cubin, "k.cubin").is_err());
        assert!(KernelImage::from_bytes(b".version 8.5\n".to_vec(), ImageKind::Ptx, "").is_err());
    }
}
