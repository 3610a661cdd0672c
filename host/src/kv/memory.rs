//! Memory for the arena's extents. [`HeapMemory`] is plain page-aligned host memory (the CPU backend, and the
//! buffers of O_DIRECT disk I/O); a GPU backend provides mapped pinned memory (`cuMemHostAlloc` with
//! `CU_MEMHOSTALLOC_DEVICEMAP`) through the same trait, so that its kernels read the arena in place.
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// One zeroed allocation of host memory, page aligned, optionally mapped into the GPU's address space.
pub struct Extent {
    host: NonNull<u8>,
    len: usize,
    device: u64,
    /// Frees the memory when the extent drops (called once with the host pointer and the length).
    free: Box<dyn FnOnce(NonNull<u8>, usize) + Send + Sync>,
}

// SAFETY: an extent owns its memory exclusively; access goes through `&self` / `&mut self`.
unsafe impl Send for Extent {}
unsafe impl Sync for Extent {}

impl Extent {
    /// # Safety
    /// `host` must point to `len` bytes of zeroed memory, valid and exclusively owned by this extent until `free`
    /// is called with it; `device`, if not 0, must be the device address of the same bytes.
    pub unsafe fn from_raw(
        host: NonNull<u8>,
        len: usize,
        device: u64,
        free: Box<dyn FnOnce(NonNull<u8>, usize) + Send + Sync>,
    ) -> Self {
        Extent { host, len, device, free }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the extent's first byte, when the memory is mapped for the GPU.
    pub fn device_ptr(&self) -> Option<u64> {
        (self.device != 0).then_some(self.device)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `from_raw`'s contract.
        unsafe { std::slice::from_raw_parts(self.host.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `from_raw`'s contract; `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.host.as_ptr(), self.len) }
    }
}

impl Drop for Extent {
    fn drop(&mut self) {
        let free = std::mem::replace(&mut self.free, Box::new(|_, _| {}));
        free(self.host, self.len);
    }
}

/// A source of extents.
pub trait ExtentMemory: Send + Sync {
    /// What the memory is, for reports (`heap`, `mapped pinned`).
    fn name(&self) -> &'static str;
    /// A zeroed extent of `bytes` bytes; `ErrorKind::OutOfMemory` when it cannot be had.
    fn alloc(&self, bytes: usize) -> std::io::Result<Extent>;
}

/// Page-aligned (4096) host memory from the global allocator.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapMemory;

/// Alignment of heap extents: a page, as O_DIRECT I/O needs.
pub const EXTENT_ALIGN: usize = 4096;

impl ExtentMemory for HeapMemory {
    fn name(&self) -> &'static str {
        "heap"
    }

    fn alloc(&self, bytes: usize) -> std::io::Result<Extent> {
        let oom = || std::io::Error::new(std::io::ErrorKind::OutOfMemory, format!("cannot allocate {bytes} bytes"));
        let layout = Layout::from_size_align(bytes.max(1), EXTENT_ALIGN).map_err(|_| oom())?;
        // SAFETY: the layout has a non-zero size.
        let p = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or_else(oom)?;
        // SAFETY: fresh zeroed allocation of `layout.size() >= bytes` bytes, freed with the same layout.
        Ok(unsafe { Extent::from_raw(p, bytes, 0, Box::new(move |p, _| dealloc(p.as_ptr(), layout))) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_extents_are_zeroed_aligned_and_writable() {
        let mut e = HeapMemory.alloc(3 * 4096).unwrap();
        assert_eq!(e.len(), 3 * 4096);
        assert_eq!(e.as_slice().as_ptr() as usize % EXTENT_ALIGN, 0);
        assert!(e.as_slice().iter().all(|&b| b == 0));
        e.as_mut_slice()[4097] = 7;
        assert_eq!(e.as_slice()[4097], 7);
        assert_eq!(e.device_ptr(), None);
    }
}
