//! The CUDA runtime on cudarc (driver API, loaded at run time: nothing CUDA is needed to build).
//!
//! [`Gpu`] owns a context, a stream and the loaded kernel module. The module comes from a list of
//! [`KernelImage`]s (the `hga` crate embeds one PTX per arch and, when ptxas was present at build time, one cubin
//! per arch). [`select_image`] picks the cubin of the device's exact SM, else the PTX with the highest arch not
//! above the device's (the driver JIT-compiles it), else fails naming the device's compute capability and the
//! arches available. Images can also come from a file or bytes (for embedding in other runtimes), and the
//! environment variable `HGA_KERNEL_IMAGE` overrides the choice: `sm_89.ptx`, `sm_90.cubin`, ... (one of the
//! embedded images) or a path to a `.ptx` / `.cubin` file.
//!
//! Programmatic dependent launch (PDL): on a device of compute capability >= 9.0 with an image whose kernels all
//! start with `griddepcontrol.wait` ([`KernelImage::pdl`]; the sm_90 and sm_120 builds), every kernel is launched
//! with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, so the GPU may launch it while its predecessor
//! finishes ([`Gpu::set_pdl`]; the environment variable `HGA_PDL=0` turns it off).
//!
//! Memory: a `Gpu` holds the one [`Accountant`] of its device (no limit by default: [`Gpu::set_memory_limit`]).
//! Long-lived buffers are allocated through [`Gpu::alloc_zeros`] and [`Gpu::upload`], which charge the book first
//! and return a [`DeviceBuf`]; see [`crate::memory`]. [`Gpu::stream`] stays available for short-lived buffers
//! (tests, benches), which the book does not see.
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaGraph, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use crate::memory::{human, Accountant, DeviceBuf, OverCap};

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
    /// Whether every kernel of the image executes `griddepcontrol.wait` before its first memory access, so that it
    /// may be launched with programmatic dependent launch (PDL) on sm_90+. For PTX this is read from the text
    /// ([`ptx_pdl_check`]); a cubin cannot be read, so one from a file or bytes says false (the embedded cubins
    /// take it from the PTX they were assembled from). Launching kernels that do not wait with PDL would let them
    /// overlap their predecessor: never set it for an image that was not built for it.
    pub pdl: bool,
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
        let pdl = kind == ImageKind::Ptx && std::str::from_utf8(&bytes).is_ok_and(|t| ptx_pdl_check(t).is_ok());
        Ok(KernelImage { sm, kind, bytes: Cow::Owned(bytes), pdl })
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
    /// The accountant refused an allocation (the GPU memory limit).
    #[error("{0}")]
    OverCap(#[from] OverCap),
    /// The driver had no memory for an allocation the accountant allowed.
    #[error(
        "out of GPU memory allocating {what} ({}, {bytes} bytes): the driver refused it with {} held by the \
         accountant{device}",
        human(*bytes),
        human(*held)
    )]
    OutOfMemory { what: &'static str, bytes: u64, held: u64, device: String },
    /// Mapped pinned host memory could not be had (what, and the driver's answer).
    #[error("mapped pinned host memory for {0}")]
    HostMemory(String),
    /// The K/V store (the disk tier) failed: its own error, naming the file and offset where it has them.
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
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

/// Checks that every kernel entry (`.entry`) of a PTX text executes `griddepcontrol.wait` before its first
/// instruction that may touch global memory (a load or store other than `.param` / `.shared` / `.local` / `.const`
/// ones, including generic ones; any `atom`, `red`, `cp.*`, `prefetch`, texture or surface access; a `call`), in
/// textual order, which is what PDL needs: see [`Gpu::set_pdl`]. The one exception is an L2 prefetch
/// (`prefetch.global.L2`) whose line carries the marker comment `pdl-early-constant` or `pdl-early-kv`: the kernels
/// issue those for model weights, which no kernel writes, and for K/V cache rows the decode attention will stream
/// (an L2 prefetch cannot make a later load stale: gpu-kernels/src/arch/pdl.rs), so that their stream overlaps the
/// previous kernel. Returns the number of
/// entries checked, or names the first entry that does not and the instruction.
pub fn ptx_pdl_check(ptx: &str) -> Result<usize, String> {
    fn code(line: &str) -> &str {
        line.split("//").next().unwrap_or("").trim()
    }
    // One PTX statement, without braces, label and guard predicate: its opcode, e.g. `ld.global.nc.v4.u32`.
    fn opcode(stmt: &str) -> &str {
        let mut s = stmt.trim_start_matches(|c: char| c == '{' || c == '}' || c.is_whitespace());
        if let Some((label, rest)) = s.split_once(':') {
            if !label.contains(char::is_whitespace) && !label.is_empty() && !rest.starts_with(':') {
                s = rest.trim_start();
            }
        }
        if s.starts_with('@') {
            s = s.split_once(char::is_whitespace).map_or("", |(_, r)| r.trim_start());
        }
        s.split(|c: char| c.is_whitespace() || c == ';').next().unwrap_or("")
    }
    fn touches_global(op: &str) -> bool {
        let mut parts = op.split('.');
        let root = parts.next().unwrap_or("");
        let mut quals = parts;
        match root {
            "ld" | "ldu" | "st" => {
                !quals.any(|q| ["param", "shared", "local", "const"].iter().any(|space| q.starts_with(space)))
            }
            "atom" | "red" | "cp" | "prefetch" | "prefetchu" | "multimem" | "tex" | "tld4" | "suld" | "sust"
            | "sured" | "call" => true,
            _ => false,
        }
    }
    let mut entries = 0;
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some((_, rest)) = code(line).split_once(".entry ") else { continue };
        let name = rest.split(|c: char| c == '(' || c.is_whitespace()).next().unwrap_or("?").to_string();
        entries += 1;
        let (mut depth, mut opened, mut waited) = (0i32, false, false);
        for line in lines.by_ref() {
            let l = code(line);
            opened |= l.contains('{');
            let early_constant = line.contains("// pdl-early-constant") || line.contains("// pdl-early-kv");
            if opened && !waited {
                for stmt in l.split(';') {
                    let op = opcode(stmt);
                    if op == "griddepcontrol.wait" {
                        waited = true;
                        break;
                    }
                    if touches_global(op) && !(early_constant && op == "prefetch.global.L2") {
                        return Err(format!("{name}: `{}` before griddepcontrol.wait", stmt.trim()));
                    }
                }
            }
            for c in l.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                break;
            }
        }
        if !waited {
            return Err(format!("{name}: no griddepcontrol.wait"));
        }
    }
    if entries == 0 {
        return Err("no .entry in the PTX".into());
    }
    Ok(entries)
}

/// Whether a CUDA driver and at least one device exist. Never panics (cudarc's dynamic loader would).
pub fn device_count() -> usize {
    // SAFETY: only probes for the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return 0;
    }
    std::panic::catch_unwind(|| CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)).unwrap_or(0)
}

/// A device, its stream and the loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    image: String,
    name: String,
    cc: (u32, u32),
    /// Streaming multiprocessors, and the opt-in maximum of shared memory per block (bytes): queried once here,
    /// read by launchers on every call (split sizes, persistent grids, which decode kernel fits).
    sms: usize,
    smem_per_block_optin: usize,
    /// Loaded kernels, with the dynamic shared memory limit set on each (bytes; 0: the 48 KB default).
    functions: Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
    /// The image was built for PDL and the device has compute capability >= 9.0.
    pdl_supported: bool,
    /// Launch with PDL (see [`Gpu::set_pdl`]).
    pdl: AtomicBool,
    /// The book of this device's memory (see [`crate::memory`]).
    memory: Arc<Accountant>,
    /// The book of the mapped pinned host memory the model keeps for this device (no limit; reported).
    host_memory: Arc<Accountant>,
}

impl fmt::Debug for Gpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpu({}, sm_{}{}, image {}, PDL {})", self.name, self.cc.0, self.cc.1, self.image, self.pdl_state())
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
        let attr = |a| ctx.attribute(a).map(|v| v.max(0) as usize);
        let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let smem_per_block_optin =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let pdl_supported = image.pdl && major >= 9;
        let pdl_env = std::env::var("HGA_PDL").map_or(true, |v| !matches!(v.trim(), "0" | "off" | "false"));
        let sampler_ctx = Arc::clone(&ctx);
        let memory = Accountant::with_sampler(
            None,
            Box::new(move || {
                sampler_ctx.mem_get_info().ok().map(|(free, total)| ((total - free) as u64, total as u64))
            }),
        );
        Ok(Gpu {
            ctx,
            stream,
            module,
            image: image.name(),
            name,
            cc: (major, minor),
            sms,
            smem_per_block_optin,
            functions: Mutex::new(HashMap::new()),
            pdl_supported,
            pdl: AtomicBool::new(pdl_supported && pdl_env),
            memory,
            host_memory: Accountant::new(None),
        })
    }

    /// The accountant of this device's memory (limit, live, peak, report).
    pub fn memory(&self) -> &Arc<Accountant> {
        &self.memory
    }

    /// The book of the mapped pinned host memory held for this device (the HGA arena, the embedding table under a
    /// cap, buffers placed off the GPU): bookkeeping and report only, no limit (`--host-kv-limit` caps the arena).
    pub fn host_memory(&self) -> &Arc<Accountant> {
        &self.host_memory
    }

    /// Sets (or with `None` clears) the cap on the memory allocated through [`Gpu::alloc_zeros`] and
    /// [`Gpu::upload`], in bytes. Buffers already held stay; later allocations over the cap fail with
    /// [`RuntimeError::OverCap`].
    pub fn set_memory_limit(&self, limit: Option<u64>) {
        self.memory.set_limit(limit);
    }

    /// `n` zeroed elements, booked under `what` ("K/V cache", "moe workspace", ...): charged first, so that an
    /// allocation over the limit fails with [`RuntimeError::OverCap`] before the driver is asked.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        what: &'static str,
        n: usize,
    ) -> Result<DeviceBuf<T>, RuntimeError> {
        let bytes = self.bytes_of::<T>(what, n)?;
        let charge = self.memory.charge(what, bytes)?;
        let slice = self.stream.alloc_zeros::<T>(n).map_err(|e| self.alloc_error(e, what, bytes))?;
        Ok(DeviceBuf::new(slice, charge))
    }

    /// A copy of `src` on the device, booked under `what` (charged first, like [`Gpu::alloc_zeros`]).
    pub fn upload<T: DeviceRepr>(&self, what: &'static str, src: &[T]) -> Result<DeviceBuf<T>, RuntimeError> {
        let bytes = self.bytes_of::<T>(what, src.len())?;
        let charge = self.memory.charge(what, bytes)?;
        let slice: CudaSlice<T> = self.stream.clone_htod(src).map_err(|e| self.alloc_error(e, what, bytes))?;
        Ok(DeviceBuf::new(slice, charge))
    }

    fn bytes_of<T>(&self, what: &'static str, n: usize) -> Result<u64, RuntimeError> {
        n.checked_mul(std::mem::size_of::<T>())
            .map(|b| b as u64)
            .ok_or_else(|| RuntimeError::Shape(format!("{what}: {n} elements of {} bytes overflow", size_of::<T>())))
    }

    /// A driver error of an allocation: out of memory becomes [`RuntimeError::OutOfMemory`] naming what.
    fn alloc_error(&self, e: DriverError, what: &'static str, bytes: u64) -> RuntimeError {
        if e.0 != sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return RuntimeError::Driver(e);
        }
        let device = match self.memory.device_now() {
            Some((used, total)) => format!("; the device has {} of {} in use", human(used), human(total)),
            None => String::new(),
        };
        // The charge of the failed allocation is still held here (it drops after this call).
        let held = self.memory.live().saturating_sub(bytes);
        RuntimeError::OutOfMemory { what, bytes, held, device }
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
    /// Streaming multiprocessors (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`, read when the device was opened).
    pub fn sm_count(&self) -> usize {
        self.sms
    }
    /// Shared memory a block may opt in to, in bytes (`CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`, read
    /// when the device was opened).
    pub fn smem_per_block_optin(&self) -> usize {
        self.smem_per_block_optin
    }

    /// Whether kernels can be launched with programmatic dependent launch (PDL): the loaded image was built for it
    /// (every kernel starts with `griddepcontrol.wait`: [`KernelImage::pdl`]) and the device has compute capability
    /// >= 9.0. False for the sm_89 image, also when it is JIT-compiled on an sm_90 device.
    pub fn pdl_supported(&self) -> bool {
        self.pdl_supported
    }
    /// Whether launches use PDL now (the default where supported, unless the environment says `HGA_PDL=0`).
    pub fn pdl_enabled(&self) -> bool {
        self.pdl.load(Ordering::Relaxed)
    }
    /// Turns programmatic dependent launch on or off for later launches (on only takes effect where
    /// [`Gpu::pdl_supported`]). With it on, every kernel is launched with
    /// `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`: the GPU may launch it as soon as every block of the
    /// previous kernel has executed `griddepcontrol.launch_dependents` (our kernels do so right after their
    /// `griddepcontrol.wait`), and the new kernel's own wait holds it until the previous one has completed and its
    /// memory is visible: the launch and block start-up overlap the predecessor's tail, and results are identical.
    /// A CUDA graph captured with it on keeps programmatic edges; switching it off does not change a recorded graph.
    pub fn set_pdl(&self, on: bool) {
        self.pdl.store(on && self.pdl_supported, Ordering::Relaxed);
    }
    /// `on`, `off` or `unsupported` (with the reason), for reports.
    pub fn pdl_state(&self) -> &'static str {
        match (self.pdl_enabled(), self.pdl_supported) {
            (true, _) => "on",
            (false, true) => "off",
            (false, false) if self.cc.0 < 9 => "unsupported (compute capability < 9.0)",
            (false, false) => "unsupported (the kernel image is not built for it)",
        }
    }

    /// A kernel of the loaded module (cached).
    pub fn function(&self, name: &'static str) -> Result<CudaFunction, RuntimeError> {
        self.function_for_smem(name, 0)
    }

    /// [`Gpu::function`], allowed `dyn_smem` bytes of dynamic shared memory: above the 48 KB default the limit is
    /// raised (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`) the first time a launch needs more than the
    /// kernel was given so far, not at every launch.
    pub(crate) fn function_for_smem(&self, name: &'static str, dyn_smem: u32) -> Result<CudaFunction, RuntimeError> {
        let mut map = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        let (f, limit) = match map.entry(name) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert((self.module.load_function(name)?, 0)),
        };
        if dyn_smem > 48 * 1024 && dyn_smem > *limit {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dyn_smem as i32,
            )?;
            *limit = dyn_smem;
        }
        Ok(f.clone())
    }

    /// Records the stream work that `f` enqueues into a CUDA graph (nothing runs while recording) and
    /// instantiates it; [`CudaGraph::launch`] then replays all of it with one host call. `f` must only enqueue
    /// kernels and device-to-device work on [`Gpu::stream`]: a synchronization, a host copy or an allocation inside
    /// it fails the capture (the error is returned and the stream is usable again).
    ///
    /// With PDL on ([`Gpu::pdl_enabled`]), the capture turns the programmatic launches into programmatic edges of
    /// the graph. Should the driver refuse that (a CUDA error while recording or instantiating), PDL is turned off
    /// for this `Gpu`, a warning says so on stderr, and `f` is recorded again without it.
    pub fn capture(&self, mut f: impl FnMut() -> Result<(), RuntimeError>) -> Result<CudaGraph, RuntimeError> {
        match self.capture_once(&mut f) {
            Err(e @ (RuntimeError::Driver(_) | RuntimeError::Launch { .. })) if self.pdl_enabled() => {
                eprintln!(
                    "warning: recording a CUDA graph with programmatic dependent launch failed ({e}); PDL is now off \
                     on this GPU and the graph is recorded without it (HGA_PDL=0 or `--no-pdl` avoid the attempt)"
                );
                self.set_pdl(false);
                self.capture_once(&mut f)
            }
            r => r,
        }
    }

    fn capture_once(&self, f: &mut impl FnMut() -> Result<(), RuntimeError>) -> Result<CudaGraph, RuntimeError> {
        self.stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let recorded = f();
        // End the capture whatever happened, so the stream leaves capture mode.
        let ended = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        ended?.ok_or_else(|| RuntimeError::Launch { kernel: "capture", msg: "the capture recorded nothing".into() })
    }

    /// Runs `f` between `cuProfilerStart` and `cuProfilerStop` (the stream synchronized on both sides), so that a
    /// profiler started with its capture off (`ncu --profile-from-start off`) measures exactly the work `f` launches.
    pub fn profiler_range<R>(&self, f: impl FnOnce() -> R) -> Result<R, RuntimeError> {
        self.ctx.bind_to_thread()?;
        self.synchronize()?;
        unsafe { sys::cuProfilerStart() }.result()?;
        let r = f();
        self.synchronize()?;
        unsafe { sys::cuProfilerStop() }.result()?;
        Ok(r)
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
        KernelImage { sm, kind, bytes: Cow::Borrowed(b""), pdl: false }
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
