//! Mapped pinned host memory: an [`ExtentMemory`] whose extents GPU kernels read and write in place.
//!
//! Each extent is one `cuMemHostAlloc` with `CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE` (page-locked,
//! mapped into the device's address space, usable from every context), zeroed on the host, with its device
//! address from `cuMemHostGetDevicePointer`. The arena hands the kernels a device table `u64 [extents]` of these
//! addresses ([`device_table`]); group `g` of (layer, KV head) is then found with the arithmetic of
//! [`ArenaLayout::locate`](super::ArenaLayout::locate).
//!
//! Why mapped memory rather than a copy per group: on the H200 a kernel reading scattered 4-64 KB pieces of mapped
//! memory moves 50.7 GB/s, one `cudaMemcpyAsync` per piece 1.3-14.7 GB/s (issue 13); the gather is a kernel.
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::Arc;

use cudarc::driver::{sys, CudaContext};

use super::{Extent, ExtentMemory};

/// Mapped pinned host memory of one CUDA context.
#[derive(Clone)]
pub struct PinnedMemory {
    ctx: Arc<CudaContext>,
}

impl PinnedMemory {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        PinnedMemory { ctx }
    }
}

impl std::fmt::Debug for PinnedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedMemory(device {})", self.ctx.ordinal())
    }
}

fn cuda_err(what: &str, bytes: usize, e: sys::CUresult) -> std::io::Error {
    let kind = if e == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        std::io::ErrorKind::OutOfMemory
    } else {
        std::io::ErrorKind::Other
    };
    std::io::Error::new(kind, format!("{what} of {bytes} bytes of mapped pinned memory: {e:?}"))
}

impl ExtentMemory for PinnedMemory {
    fn name(&self) -> &'static str {
        "mapped pinned"
    }

    fn alloc(&self, bytes: usize) -> std::io::Result<Extent> {
        self.ctx.bind_to_thread().map_err(|e| std::io::Error::other(format!("binding the CUDA context: {e}")))?;
        let len = bytes.max(1);
        let mut host: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: `host` is a valid out pointer; the driver allocates `len` bytes.
        let r = unsafe { sys::cuMemHostAlloc(&mut host, len, flags) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(cuda_err("cuMemHostAlloc", bytes, r));
        }
        let free_ctx = self.ctx.clone();
        let free = move |p: NonNull<u8>, _len: usize| {
            let _ = free_ctx.bind_to_thread();
            // SAFETY: `p` came from cuMemHostAlloc and is freed once.
            unsafe { sys::cuMemFreeHost(p.as_ptr().cast()) };
        };
        let Some(hp) = NonNull::new(host.cast::<u8>()) else {
            return Err(cuda_err("cuMemHostAlloc (null)", bytes, sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        };
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `host` is a mapped allocation of this context.
        let r = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, host, 0) };
        if r != sys::CUresult::CUDA_SUCCESS || dev == 0 {
            free(hp, len);
            return Err(cuda_err("cuMemHostGetDevicePointer", bytes, r));
        }
        // SAFETY: `len` freshly allocated bytes, exclusively ours.
        unsafe { std::ptr::write_bytes(hp.as_ptr(), 0, len) };
        // SAFETY: zeroed, owned until `free`; `dev` maps the same bytes.
        Ok(unsafe { Extent::from_raw(hp, bytes, dev, Box::new(free)) })
    }
}

/// The device table of extent addresses the kernels read (`u64 [extents]`); `None` when an extent is not mapped.
pub fn device_table(extents: &[Extent]) -> Option<Vec<u64>> {
    extents.iter().map(|e| e.device_ptr()).collect()
}

/// An array of `T` in mapped pinned host memory that the kernels take wherever they take a device slice
/// (`DevicePtr`, `DevicePtrMut`): every access crosses PCIe. E.g. the embedding table under a GPU memory cap, read
/// one row per token instead of holding 0.6 GB of HBM ([`MappedSlice::upload`], written once by the host before any
/// launch reads it), or a buffer the kernels write and read ([`MappedSlice::zeroed`]: stream ordered like device
/// memory; the host reads it only through stream-ordered copies).
pub struct MappedSlice<T> {
    extent: Extent,
    len: usize,
    stream: Arc<cudarc::driver::CudaStream>,
    /// Its bytes in a host book, if booked ([`MappedSlice::booked`]): given back when it drops.
    _charge: Option<crate::memory::Charge>,
    _t: std::marker::PhantomData<T>,
}

impl<T: bytemuck::Pod> MappedSlice<T> {
    /// Copies `data` into a new extent of `memory`.
    pub fn upload(
        memory: &PinnedMemory,
        stream: &Arc<cudarc::driver::CudaStream>,
        data: &[T],
    ) -> std::io::Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut extent = memory.alloc(bytes.len())?;
        extent.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
        if extent.device_ptr().is_none() {
            return Err(std::io::Error::other("mapped pinned memory without a device address"));
        }
        Ok(MappedSlice { extent, len: data.len(), stream: stream.clone(), _charge: None, _t: std::marker::PhantomData })
    }

    /// `len` zeroed elements in a new extent of `memory`.
    pub fn zeroed(
        memory: &PinnedMemory,
        stream: &Arc<cudarc::driver::CudaStream>,
        len: usize,
    ) -> std::io::Result<Self> {
        let extent = memory.alloc(len * std::mem::size_of::<T>())?;
        if extent.device_ptr().is_none() {
            return Err(std::io::Error::other("mapped pinned memory without a device address"));
        }
        Ok(MappedSlice { extent, len, stream: stream.clone(), _charge: None, _t: std::marker::PhantomData })
    }

    /// Books its bytes under `what` in `book` (e.g. `Gpu::host_memory`) for as long as it lives.
    pub fn booked(mut self, book: &Arc<crate::memory::Accountant>, what: &'static str) -> Self {
        // A book without a limit never refuses.
        self._charge = book.charge(what, self.num_bytes() as u64).ok();
        self
    }

    /// Bytes of host memory held.
    pub fn num_bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The elements as the host sees them, to write (e.g. a table of addresses the next launch reads). The GPU
    /// sees a write once a later launch runs; the caller makes sure that no launched work still reads what it
    /// changes (the stream is idle, or that work is done).
    pub fn host_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.extent.as_mut_slice()[..self.len * std::mem::size_of::<T>()])
    }
}

impl<T> cudarc::driver::DeviceSlice<T> for MappedSlice<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<cudarc::driver::CudaStream> {
        &self.stream
    }
}

impl<T> cudarc::driver::DevicePtr<T> for MappedSlice<T> {
    fn device_ptr<'a>(
        &'a self,
        _stream: &'a cudarc::driver::CudaStream,
    ) -> (sys::CUdeviceptr, cudarc::driver::SyncOnDrop<'a>) {
        // Stream ordered like the context's device memory (event tracking is off): nothing to record.
        (self.extent.device_ptr().unwrap_or(0), cudarc::driver::SyncOnDrop::Sync(None))
    }
}

impl<T> cudarc::driver::DevicePtrMut<T> for MappedSlice<T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        _stream: &'a cudarc::driver::CudaStream,
    ) -> (sys::CUdeviceptr, cudarc::driver::SyncOnDrop<'a>) {
        (self.extent.device_ptr().unwrap_or(0), cudarc::driver::SyncOnDrop::Sync(None))
    }
}
