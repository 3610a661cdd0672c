//! The disk tier: the arena becomes a RAM cache of a user-set size (`--host-kv-limit`) over a page file in a
//! user-named directory (`--kv-dir`).
//!
//! ## Layout
//! - **Page**: one group block ([`BlockFormat`], the shared 8 KB group block for the standard format) of one
//!   (layer, KV head), padded to a multiple of 4096 bytes (so O_DIRECT can move it): 8192 bytes for the standard
//!   format, no padding. Whole groups move, never rows.
//! - **Page file** `hga-kv-<pid>-<n>.pages`, one per store, created in the directory and removed when the store
//!   drops. Page `p = (group * layers + layer) * kv_heads + kv_head` is at byte `p * page_bytes`: a closed group of
//!   every (layer, KV head) is one contiguous run, so the pages a step closes are written by a few large writes.
//! - **Page table** (RAM, 12 bytes per page: 1.1 KB per token for Qwen3-30B-A3B, 0.2% of the K/V): per page its
//!   state (absent / open / dirty / on disk), its RAM slot if resident, and the crc32c of the page as written. Every
//!   read from disk is verified against it: a truncated or corrupt page is an error naming the file and the offset
//!   ([`KvError::Truncated`], [`KvError::Corrupt`]), and nothing read wrong becomes resident, so attention never
//!   sees a wrong byte. [`PageTable`] serializes it (the fuzz target feeds arbitrary page tables and page files to
//!   [`verify_page_file`]).
//! - **RAM cache**: `cache_bytes / page_bytes` slots in extents of [`ExtentMemory`] (allocated as needed, page
//!   aligned for O_DIRECT; mapped pinned memory plugs in for a GPU). The open group of every (layer, KV head) is
//!   pinned in RAM and written in place; a group that closes becomes dirty; dirty groups are written in batches
//!   (when half of the free slots are dirty, or at [`DiskStore::flush`]), sorted and coalesced into runs of
//!   adjacent pages (one `pwritev` or one io_uring `writev` each). Only groups on disk are evicted, by CLOCK
//!   (second chance on a reference bit).
//! - **Reads**: the misses of a read are fetched in one batch: O_DIRECT, in parallel, through io_uring (the
//!   `io-uring` crate, `queue_depth` reads in flight) or a pool of `threads` threads calling `pread`
//!   ([`IoMode`]); see docs/perf-kv.md for the two measured against raw O_DIRECT reads of the same bytes.
//!
//! ## Bytes per token
//! Disk: `layers * kv_heads * page_bytes / 16` (96 KB per token for Qwen3-30B-A3B: 6.3 GB at 64K); RAM: the cache
//! (`--host-kv-limit`) plus the page table (12 bytes per page).
//!
//! ## Faults
//! A missing, non-directory or read-only directory fails when the store opens ([`KvError::Dir`]). A full disk fails
//! the write batch ([`KvError::DiskFull`], file and offset): the pages not written stay dirty in RAM, so every
//! position stored so far stays readable and correct, and the caller stops with the error. The page file is checked
//! before every batch of I/O: deleted or replaced underneath gives [`KvError::Deleted`]. No fault panics.
//!
//! ## Why
//! Whole groups: HGA selects groups, and 8 KB is the smallest read that reaches the disk's random-read bandwidth
//! anywhere near its sequential one (DESIGN.md: random 8 KB 0.40 GB/s, 64 KB 1.0 GB/s on the H200 host).
//! O_DIRECT: the RAM cache is the cache (the page cache would hold a second copy and evict unpredictably). Writes
//! only of closed groups, batched: the open group changes every token. crc32c: hardware-accelerated (SSE4.2),
//! far above the disk. A single file: one descriptor; the offset is arithmetic.
//!
//! ## Measured
//! On the 2-core build machine's virtio disk (docs/perf-kv.md, "Disk tier", 2026-12-03; the H200 host's disk was not
//! measured), misses of random 3% selections of a 536 MB history through a 16 MB cache: io_uring 0.53-0.63 GB/s =
//! 0.83-1.01x raw O_DIRECT reads of the same offsets in the same run (three runs); the pread pool 0.48-0.51 GB/s =
//! 0.90-1.04x raw pread reads, 0.75-0.81x raw io_uring. crc32c: 7.9 GB/s per core. io_uring is the default (the pread pool where io_uring is refused, with a warning). Appends
//! with batched writes: 7-10K tokens/s (0.7-1.0 GB/s).
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::arena::{check_read, check_rows, BlockFormat, Elem, GROUP};
use super::store::{BlockSink, IoMode, KvError, KvStats};
use super::{Extent, ExtentMemory};

/// Alignment of pages (offsets, lengths and buffers) for O_DIRECT.
pub const PAGE_ALIGN: usize = 4096;

/// Slots kept beyond the open groups at the least.
pub const MIN_SPARE_SLOTS: usize = 8;

/// Bytes of one page of `format`: its block padded to [`PAGE_ALIGN`].
pub fn page_bytes(format: &BlockFormat) -> usize {
    format.block_bytes().next_multiple_of(PAGE_ALIGN)
}

/// The checksum of a page (crc32c, hardware-accelerated where the CPU has it), as the page table keeps it.
pub fn page_checksum(page: &[u8]) -> u32 {
    crc32c::crc32c(page)
}

/// Options of the disk tier.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Directory of the page file.
    pub dir: PathBuf,
    /// RAM for cached pages.
    pub cache_bytes: u64,
    pub io: IoMode,
    /// Threads of the pread pool.
    pub threads: usize,
    /// io_uring reads in flight.
    pub queue_depth: u32,
    /// Slots per RAM extent.
    pub slots_per_extent: usize,
    /// Open the page file with O_DIRECT (falls back to buffered I/O where the file system refuses it).
    pub direct: bool,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            dir: PathBuf::new(),
            cache_bytes: super::store::DEFAULT_DISK_CACHE_BYTES,
            io: IoMode::Uring,
            threads: 16,
            queue_depth: 64,
            slots_per_extent: 256,
            direct: true,
        }
    }
}

const NONE: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Never stored (or dropped by a rewind).
    Absent,
    /// The group being filled: resident, written in place, not on disk.
    Open,
    /// Closed, resident, not (or not currently) on disk.
    Dirty,
    /// On disk with `crc`; resident if `slot != NONE`.
    Clean,
}

#[derive(Clone, Copy, Debug)]
struct Page {
    slot: u32,
    crc: u32,
    state: State,
}

const ABSENT: Page = Page { slot: NONE, crc: 0, state: State::Absent };

/// The page file: its descriptor and the identity of what the path named when it was created.
struct PageFile {
    file: File,
    path: PathBuf,
    dev: u64,
    ino: u64,
    direct: bool,
}

static FILE_SEQ: AtomicU64 = AtomicU64::new(0);

impl PageFile {
    fn create(dir: &Path, direct: bool) -> Result<Self, KvError> {
        let derr = |msg: String| KvError::Dir { dir: dir.to_path_buf(), msg };
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(derr("does not exist".into())),
            Err(e) => return Err(derr(format!("cannot be inspected: {e}"))),
            Ok(m) if !m.is_dir() => return Err(derr("is not a directory".into())),
            Ok(_) => {}
        }
        let name = format!("hga-kv-{}-{}.pages", std::process::id(), FILE_SEQ.fetch_add(1, Ordering::Relaxed));
        let path = dir.join(&name);
        let open = |flags: i32| {
            std::fs::OpenOptions::new().read(true).write(true).create_new(true).custom_flags(flags).open(&path)
        };
        let (file, direct) = match open(if direct { libc::O_DIRECT } else { 0 }) {
            Ok(f) => (f, direct),
            // File systems without O_DIRECT refuse it with EINVAL: buffered I/O there.
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                (open(0).map_err(|e| open_err(dir, &name, e))?, false)
            }
            Err(e) => return Err(open_err(dir, &name, e)),
        };
        let m = file.metadata().map_err(|e| derr(format!("cannot stat the new page file {name}: {e}")))?;
        Ok(PageFile { file, path, dev: m.dev(), ino: m.ino(), direct })
    }

    /// The path still names this file.
    fn check(&self) -> Result<(), KvError> {
        let gone = |msg: String| KvError::Deleted { file: self.path.clone(), msg };
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(gone("the path no longer exists".into())),
            Err(e) => Err(gone(format!("the path cannot be inspected: {e}"))),
            Ok(m) if (m.dev(), m.ino()) != (self.dev, self.ino) => Err(gone("the path names another file".into())),
            Ok(_) => Ok(()),
        }
    }
}

fn open_err(dir: &Path, name: &str, e: std::io::Error) -> KvError {
    let why = match e.raw_os_error() {
        Some(libc::EROFS) => "is on a read-only file system".to_string(),
        Some(libc::EACCES) | Some(libc::EPERM) => "is not writable (permission denied)".to_string(),
        Some(libc::ENOSPC) => "has no space left".to_string(),
        _ => format!("refused the page file: {e}"),
    };
    KvError::Dir { dir: dir.to_path_buf(), msg: format!("{why}: cannot create the page file {name} ({e})") }
}

impl Drop for PageFile {
    fn drop(&mut self) {
        if self.check().is_ok() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// One I/O: `len` bytes at `offset` from / into `ptr`.
#[derive(Clone, Copy)]
struct Req {
    offset: u64,
    ptr: usize,
    len: usize,
}

/// A run of adjacent pages to write: the iovecs point into RAM slots.
struct Run {
    offset: u64,
    iov: Vec<libc::iovec>,
    len: usize,
}

// SAFETY: the iovecs point to RAM slots that no one touches while the batch runs.
unsafe impl Send for Run {}
unsafe impl Sync for Run {}

enum Engine {
    Uring { ring: Box<io_uring::IoUring>, depth: u32 },
    Pool(rayon::ThreadPool),
}

/// `pread` until `len` bytes or the end of the file (`EINTR` retried).
fn pread_full(fd: i32, r: Req) -> std::io::Result<usize> {
    let mut done = 0;
    while done < r.len {
        // SAFETY: `r.ptr..r.ptr + r.len` is a slot of the RAM cache (or a bench buffer) owned by this batch.
        let n = unsafe {
            libc::pread(fd, (r.ptr + done) as *mut libc::c_void, r.len - done, (r.offset + done as u64) as libc::off_t)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// `pwritev` of a run; returns the bytes written (short only when the device refuses more).
fn pwritev_run(fd: i32, run: &Run) -> std::io::Result<usize> {
    loop {
        // SAFETY: the iovecs point to resident slots, unchanged during the batch.
        let n = unsafe { libc::pwritev(fd, run.iov.as_ptr(), run.iov.len() as i32, run.offset as libc::off_t) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        return Ok(n as usize);
    }
}

impl Engine {
    fn new(io: IoMode, threads: usize, depth: u32) -> Result<Self, KvError> {
        match io {
            IoMode::Uring => {
                let ring = io_uring::IoUring::new(depth.max(1))
                    .map_err(|e| KvError::Io(format!("io_uring is not available here ({e})")))?;
                Ok(Engine::Uring { ring: Box::new(ring), depth: depth.max(1) })
            }
            IoMode::Pread => rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .thread_name(|i| format!("hga-kv-io-{i}"))
                .build()
                .map(Engine::Pool)
                .map_err(|e| KvError::Io(format!("cannot start the pread pool: {e}"))),
        }
    }

    /// Reads every request; per request the bytes read (short at the end of the file) or the error.
    fn read(&mut self, fd: i32, reqs: &[Req]) -> Vec<std::io::Result<usize>> {
        match self {
            Engine::Pool(pool) => {
                use rayon::prelude::*;
                pool.install(|| reqs.par_iter().map(|&r| pread_full(fd, r)).collect())
            }
            Engine::Uring { ring, depth } => {
                let ops: Vec<io_uring::squeue::Entry> = reqs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        io_uring::opcode::Read::new(io_uring::types::Fd(fd), r.ptr as *mut u8, r.len as u32)
                            .offset(r.offset)
                            .build()
                            .user_data(i as u64)
                    })
                    .collect();
                let mut res = uring_run(ring, *depth, &ops);
                // A short read: finish it synchronously (it tells the end of the file from a partial transfer).
                for (r, out) in reqs.iter().zip(res.iter_mut()) {
                    if let Ok(n) = *out {
                        if n < r.len {
                            let rest = Req { offset: r.offset + n as u64, ptr: r.ptr + n, len: r.len - n };
                            *out = pread_full(fd, rest).map(|m| n + m);
                        }
                    }
                }
                res
            }
        }
    }

    /// Writes every run; per run the bytes written or the error.
    fn write(&mut self, fd: i32, runs: &[Run]) -> Vec<std::io::Result<usize>> {
        match self {
            Engine::Pool(pool) => {
                use rayon::prelude::*;
                pool.install(|| runs.par_iter().map(|r| pwritev_run(fd, r)).collect())
            }
            Engine::Uring { ring, depth } => {
                let ops: Vec<io_uring::squeue::Entry> = runs
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        io_uring::opcode::Writev::new(io_uring::types::Fd(fd), r.iov.as_ptr(), r.iov.len() as u32)
                            .offset(r.offset)
                            .build()
                            .user_data(i as u64)
                    })
                    .collect();
                let mut res = uring_run(ring, *depth, &ops);
                for (r, out) in runs.iter().zip(res.iter_mut()) {
                    if matches!(out, Ok(n) if *n < r.len) {
                        // A short write: let the kernel say why (ENOSPC) with a synchronous retry of the run.
                        *out = pwritev_run(fd, r);
                    }
                }
                res
            }
        }
    }
}

/// Submits `ops` (user data = index) with at most `depth` in flight; per op the result.
fn uring_run(ring: &mut io_uring::IoUring, depth: u32, ops: &[io_uring::squeue::Entry]) -> Vec<std::io::Result<usize>> {
    let mut res: Vec<std::io::Result<usize>> = (0..ops.len()).map(|_| Ok(0)).collect();
    let (mut next, mut inflight) = (0usize, 0usize);
    while next < ops.len() || inflight > 0 {
        {
            let mut sq = ring.submission();
            while next < ops.len() && inflight < depth as usize {
                // SAFETY: every buffer an entry names stays valid until its completion is reaped below.
                if unsafe { sq.push(&ops[next]) }.is_err() {
                    break;
                }
                next += 1;
                inflight += 1;
            }
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // The ring itself failed: every op not completed gets the error; wait for those in flight to drain.
            for r in res.iter_mut().skip(next - inflight) {
                *r = Err(std::io::Error::new(e.kind(), format!("io_uring submit: {e}")));
            }
            let _ = ring.submit_and_wait(inflight);
            ring.completion().for_each(drop); // nothing of this batch may be seen by the next one
            return res;
        }
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            let r = cqe.result();
            res[i] = if r < 0 { Err(std::io::Error::from_raw_os_error(-r)) } else { Ok(r as usize) };
            inflight -= 1;
        }
    }
    res
}

/// The RAM slots of the cache.
struct Slots<M: ExtentMemory> {
    mem: M,
    extents: Vec<Extent>,
    /// Base address of each extent (slots are disjoint ranges of them).
    bases: Vec<usize>,
    per_extent: usize,
    page_bytes: usize,
    /// Slots allowed.
    max: usize,
    /// Page held by each allocated slot (`NONE`: free).
    owner: Vec<u32>,
    refbit: Vec<bool>,
    /// In the read batch being filled.
    busy: Vec<bool>,
    free: Vec<u32>,
    hand: usize,
}

impl<M: ExtentMemory> Slots<M> {
    fn count(&self) -> usize {
        self.owner.len()
    }

    fn ptr(&self, s: u32) -> usize {
        let s = s as usize;
        self.bases[s / self.per_extent] + (s % self.per_extent) * self.page_bytes
    }

    fn bytes(&self, s: u32) -> &[u8] {
        // SAFETY: slot `s` is `page_bytes` inside its extent, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr(s) as *const u8, self.page_bytes) }
    }

    fn bytes_mut(&mut self, s: u32) -> &mut [u8] {
        // SAFETY: as `bytes`; `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(s) as *mut u8, self.page_bytes) }
    }

    /// Allocates another extent of slots (up to `max`); false when at `max`.
    fn grow(&mut self) -> Result<bool, KvError> {
        if self.count() >= self.max {
            return Ok(false);
        }
        // Every extent but the last holds `per_extent` slots (so that `ptr` stays arithmetic); the last one what is
        // left of `max`, so the cache never holds more than its limit.
        let n = self.per_extent.min(self.max - self.count());
        let bytes = n * self.page_bytes;
        let mut e = self
            .mem
            .alloc(bytes)
            .map_err(|e| KvError::Alloc(format!("K/V RAM cache: {bytes} bytes of {} memory: {e}", self.mem.name())))?;
        self.bases.push(e.as_mut_slice().as_mut_ptr() as usize);
        self.extents.push(e);
        let first = self.count();
        self.owner.extend(std::iter::repeat_n(NONE, n));
        self.refbit.extend(std::iter::repeat_n(false, n));
        self.busy.extend(std::iter::repeat_n(false, n));
        self.free.extend((first..first + n).rev().map(|s| s as u32));
        Ok(true)
    }
}

/// Writes position `i`'s row `row` of KV head `kv_head` into its group's block: `write(i, kv_head, row, block)`.
type RowWriter<'a> = dyn FnMut(usize, usize, usize, &mut [u8]) -> Result<(), KvError> + 'a;

/// The disk tier (see the module docs), generic over the memory of its RAM cache.
pub struct DiskStore<M: ExtentMemory> {
    layers: usize,
    kv_heads: usize,
    format: BlockFormat,
    page_bytes: usize,
    file: PageFile,
    engine: Engine,
    slots: Slots<M>,
    table: Vec<Page>,
    lens: Vec<usize>,
    dirty: Vec<u32>,
    /// Dirty pages that trigger a write batch.
    batch: usize,
    stats: KvStats,
    io: IoMode,
}

impl<M: ExtentMemory> DiskStore<M> {
    /// Creates the page file in `cfg.dir` and an empty RAM cache of `cfg.cache_bytes`.
    pub fn open(mem: M, layers: usize, kv_heads: usize, format: BlockFormat, cfg: DiskConfig) -> Result<Self, KvError> {
        if layers == 0 || kv_heads == 0 || format.head_dim == 0 {
            return Err(KvError::Usage(format!(
                "disk tier: layers ({layers}), kv_heads ({kv_heads}) and head_dim ({}) must be > 0",
                format.head_dim
            )));
        }
        let page_bytes = page_bytes(&format);
        let open_groups = layers * kv_heads;
        let max = (cfg.cache_bytes / page_bytes as u64).min(u32::MAX as u64 - 1) as usize;
        let min = open_groups + MIN_SPARE_SLOTS;
        if max < min {
            return Err(KvError::Usage(format!(
                "--host-kv-limit {} is too small for the disk tier of this model: it needs at least {} bytes ({min} \
                 pages of {page_bytes} bytes: the open group of each of {layers} layers x {kv_heads} KV heads, and \
                 {MIN_SPARE_SLOTS} more)",
                cfg.cache_bytes,
                min * page_bytes
            )));
        }
        let file = PageFile::create(&cfg.dir, cfg.direct)?;
        // Where io_uring is refused (old kernels, container seccomp profiles), the pread pool serves, said loudly.
        let (engine, io) = match Engine::new(cfg.io, cfg.threads, cfg.queue_depth) {
            Ok(e) => (e, cfg.io),
            Err(e) if cfg.io == IoMode::Uring => {
                eprintln!("warning: {e}; the K/V disk tier uses the pread pool instead");
                (Engine::new(IoMode::Pread, cfg.threads, cfg.queue_depth)?, IoMode::Pread)
            }
            Err(e) => return Err(e),
        };
        let slots = Slots {
            mem,
            extents: Vec::new(),
            bases: Vec::new(),
            per_extent: cfg.slots_per_extent.clamp(1, max),
            page_bytes,
            max,
            owner: Vec::new(),
            refbit: Vec::new(),
            busy: Vec::new(),
            free: Vec::new(),
            hand: 0,
        };
        Ok(DiskStore {
            layers,
            kv_heads,
            format,
            page_bytes,
            file,
            engine,
            slots,
            table: Vec::new(),
            lens: vec![0; layers],
            dirty: Vec::new(),
            batch: ((max - open_groups) / 2).max(1),
            stats: KvStats::default(),
            io,
        })
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    pub fn layers(&self) -> usize {
        self.layers
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Bytes of a page.
    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// Positions stored in `layer`.
    pub fn len(&self, layer: usize) -> usize {
        self.lens[layer]
    }

    pub fn is_empty(&self) -> bool {
        self.lens.iter().all(|&n| n == 0)
    }

    /// The page file.
    pub fn page_file(&self) -> &Path {
        &self.file.path
    }

    /// Whether the page file is opened with O_DIRECT (false where the file system refused it).
    pub fn is_direct(&self) -> bool {
        self.file.direct
    }

    /// The io mode in use (the pread pool where io_uring was asked for but is not available).
    pub fn io_mode(&self) -> IoMode {
        self.io
    }

    /// RAM cache slots allowed.
    pub fn cache_slots(&self) -> usize {
        self.slots.max
    }

    /// The byte offset of a page in the page file.
    pub fn page_offset(&self, layer: usize, kv_head: usize, group: usize) -> u64 {
        self.index(layer, kv_head, group) as u64 * self.page_bytes as u64
    }

    /// Whether a group is in RAM.
    pub fn is_resident(&self, layer: usize, kv_head: usize, group: usize) -> bool {
        self.table.get(self.index(layer, kv_head, group)).is_some_and(|p| p.slot != NONE)
    }

    /// The device address of a resident group's block when the RAM cache is mapped for the GPU (e.g. after
    /// [`Self::read_selection`] made a step's groups resident, for a gather from pinned memory); `None` if the group
    /// is not in RAM or the memory is not mapped.
    pub fn block_device_ptr(&self, layer: usize, kv_head: usize, group: usize) -> Option<u64> {
        let s = self.table.get(self.index(layer, kv_head, group))?.slot;
        if s == NONE {
            return None;
        }
        let s = s as usize;
        let e = &self.slots.extents[s / self.slots.per_extent];
        e.device_ptr().map(|d| d + ((s % self.slots.per_extent) * self.page_bytes) as u64)
    }

    pub fn stats(&self) -> KvStats {
        KvStats { resident_bytes: (self.slots.count() * self.page_bytes) as u64, ..self.stats }
    }

    fn index(&self, layer: usize, kv_head: usize, group: usize) -> usize {
        (group * self.layers + layer) * self.kv_heads + kv_head
    }

    /// `(layer, kv_head, group)` of page `p`.
    fn coords(&self, p: usize) -> (usize, usize, usize) {
        (p / self.kv_heads % self.layers, p % self.kv_heads, p / (self.kv_heads * self.layers))
    }

    /// A free slot: a never-used one, a new extent, or a clean page evicted by CLOCK (flushing dirty pages first
    /// when nothing else can go).
    fn alloc_slot(&mut self) -> Result<u32, KvError> {
        for attempt in 0..2 {
            if let Some(s) = self.slots.free.pop() {
                return Ok(s);
            }
            if self.slots.grow()? {
                continue;
            }
            let n = self.slots.count();
            for _ in 0..2 * n {
                let s = self.slots.hand;
                self.slots.hand = (s + 1) % n;
                let owner = self.slots.owner[s];
                if self.slots.busy[s] || owner == NONE || self.table[owner as usize].state != State::Clean {
                    continue;
                }
                if self.slots.refbit[s] {
                    self.slots.refbit[s] = false;
                    continue;
                }
                self.table[owner as usize].slot = NONE;
                self.slots.owner[s] = NONE;
                self.stats.evictions += 1;
                return Ok(s as u32);
            }
            if attempt == 0 && !self.dirty.is_empty() {
                self.flush()?;
            }
        }
        Err(KvError::Usage(format!(
            "the K/V RAM cache ({} pages of {} bytes, --host-kv-limit) is too small for this read: every page in it \
             is open, not yet written, or part of the same read batch",
            self.slots.max, self.page_bytes
        )))
    }

    /// Frees the slot of page `p` (if resident) and forgets the page.
    fn release(&mut self, p: usize) {
        let s = self.table[p].slot;
        if s != NONE {
            self.slots.owner[s as usize] = NONE;
            self.slots.refbit[s as usize] = false;
            self.slots.free.push(s);
        }
        self.table[p] = ABSENT;
    }

    /// The slot of page `p`, made the open group for a write at row `row`.
    fn open_for_write(&mut self, p: usize, row: usize) -> Result<u32, KvError> {
        let pg = self.table[p];
        if pg.slot != NONE {
            self.table[p].state = State::Open;
            return Ok(pg.slot);
        }
        let s = self.alloc_slot()?;
        if pg.state == State::Clean && row > 0 {
            // Re-opened after a rewind: the rows before `row` are on disk.
            self.slots.busy[s as usize] = true;
            let r = self.fetch(&[(p, s)]);
            self.slots.busy[s as usize] = false;
            if let Err(e) = r {
                self.slots.free.push(s);
                return Err(e);
            }
        } else {
            self.slots.bytes_mut(s).fill(0);
        }
        self.slots.owner[s as usize] = p as u32;
        self.slots.refbit[s as usize] = true;
        self.table[p].slot = s;
        self.table[p].state = State::Open;
        Ok(s)
    }

    /// Stores positions `pos0..pos0 + t` of `layer` (`k`, `v`: `[t, kv_heads * head_dim]`), each at its row of its
    /// group in RAM; groups that close become dirty and are written in batches. `pos0` must not be past the
    /// layer's length (a smaller one rewinds: later positions are dropped).
    pub fn append(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        let f = self.format;
        let heads = self.kv_heads;
        let t = check_rows(heads, &f, k, v)?;
        let d = f.head_dim;
        self.append_with(layer, pos0, t, &mut |i, h, r, blk| {
            let row = (i * heads + h) * d..(i * heads + h + 1) * d;
            f.encode_row(&k[row.clone()], &mut blk[f.k_row(r)])?;
            f.encode_row(&v[row], &mut blk[f.v_row(r)])
        })
    }

    /// [`Self::append`] of rows already in the block format's bytes (bf16 or f32 as the format says), laid out as a
    /// dense cache: row `i` of KV head `h` at byte `(h * head_rows + i) * row_bytes` of `k` and of `v`
    /// (`[kv_heads][head_rows][head_dim]`, `head_rows >= t`), e.g. a layer's K/V copied from the GPU. No conversion:
    /// the bytes are stored as given.
    pub fn append_raw(
        &mut self,
        layer: usize,
        pos0: usize,
        t: usize,
        head_rows: usize,
        k: &[u8],
        v: &[u8],
    ) -> Result<(), KvError> {
        let f = self.format;
        let rb = f.row_bytes();
        let need = self.kv_heads.saturating_sub(1) * head_rows * rb + t * rb;
        if head_rows < t || k.len() < need || v.len() < need {
            return Err(KvError::Usage(format!(
                "append_raw: {t} rows of {} KV heads with {head_rows} rows per head need {need} bytes of K and of V,                  got {} and {}",
                self.kv_heads,
                k.len(),
                v.len()
            )));
        }
        self.append_with(layer, pos0, t, &mut |i, h, r, blk| {
            let src = (h * head_rows + i) * rb..(h * head_rows + i + 1) * rb;
            blk[f.k_row(r)].copy_from_slice(&k[src.clone()]);
            blk[f.v_row(r)].copy_from_slice(&v[src]);
            Ok(())
        })
    }

    /// Makes position `pos` of `layer` writable by a device (the next token of a decode step, written through
    /// mapped memory by the append kernel) and returns, per KV head, the device address of its group's block in the
    /// RAM cache. `pos` is the layer's length (or less: a rewind). The group before it becomes dirty when `pos`
    /// opens a new one: the device wrote its last row in an earlier step, which the caller has waited for. So call
    /// it only while no device work that writes this store is in flight; a write batch may run here.
    pub fn append_device(&mut self, layer: usize, pos: usize) -> Result<Vec<u64>, KvError> {
        if layer >= self.layers || pos > self.lens[layer] {
            return Err(KvError::Usage(format!(
                "device append at layer {layer} position {pos}: the store has {} layers and {} positions there",
                self.layers,
                self.lens.get(layer).copied().unwrap_or(0)
            )));
        }
        self.truncate(layer, pos + 1);
        let (g, r) = (pos / GROUP, pos % GROUP);
        let mut out = Vec::with_capacity(self.kv_heads);
        for h in 0..self.kv_heads {
            if r == 0 && g > 0 {
                let prev = self.index(layer, h, g - 1);
                if self.table[prev].state == State::Open {
                    self.table[prev].state = State::Dirty;
                    self.dirty.push(prev as u32);
                }
            }
            let p = self.index(layer, h, g);
            self.open_for_write(p, r)?;
            out.push(self.block_device_ptr(layer, h, g).ok_or_else(|| {
                KvError::Usage("device append: the RAM cache is not mapped memory (no device address)".into())
            })?);
        }
        self.lens[layer] = pos + 1;
        if self.dirty.len() >= self.batch {
            self.flush()?;
        }
        Ok(out)
    }

    /// Drops the groups of `layer` past its new length `len` (a rewind) and grows the page table to hold `len`
    /// positions.
    fn truncate(&mut self, layer: usize, len: usize) {
        let old = self.lens[layer];
        for g in len.div_ceil(GROUP)..old.div_ceil(GROUP) {
            for h in 0..self.kv_heads {
                let p = self.index(layer, h, g);
                self.release(p);
            }
        }
        let need = len.div_ceil(GROUP) * self.layers * self.kv_heads;
        if self.table.len() < need {
            self.table.resize(need, ABSENT);
        }
    }

    /// Stores `t` positions from `pos0` of `layer`: `write(i, kv_head, row, block)` writes position `pos0 + i`'s
    /// row `row` into its group's block in RAM (see [`Self::append`]).
    fn append_with(&mut self, layer: usize, pos0: usize, t: usize, write: &mut RowWriter<'_>) -> Result<(), KvError> {
        let heads = self.kv_heads;
        if layer >= self.layers || pos0 > self.lens[layer] {
            return Err(KvError::Usage(format!(
                "append at layer {layer} position {pos0}: the store has {} layers and {} positions there",
                self.layers,
                self.lens.get(layer).copied().unwrap_or(0)
            )));
        }
        let new = pos0 + t;
        self.truncate(layer, new);
        for i in 0..t {
            let pos = pos0 + i;
            let (g, r) = (pos / GROUP, pos % GROUP);
            for h in 0..heads {
                let p = self.index(layer, h, g);
                let s = self.open_for_write(p, r)?;
                write(i, h, r, self.slots.bytes_mut(s))?;
                if r == GROUP - 1 {
                    self.table[p].state = State::Dirty;
                    self.dirty.push(p as u32);
                }
            }
        }
        self.lens[layer] = new;
        if self.dirty.len() >= self.batch {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes every dirty page: one batch, sorted and coalesced into runs of adjacent pages. Pages not written
    /// (an error) stay dirty in RAM; the first error is returned.
    pub fn flush(&mut self) -> Result<(), KvError> {
        let mut pages: Vec<u32> =
            self.dirty.drain(..).filter(|&p| self.table[p as usize].state == State::Dirty).collect();
        if pages.is_empty() {
            return Ok(());
        }
        pages.sort_unstable();
        pages.dedup();
        if let Err(e) = self.file.check() {
            self.dirty = pages;
            return Err(e);
        }
        let pb = self.page_bytes;
        let crcs: Vec<u32> =
            pages.iter().map(|&p| crc32c::crc32c(self.slots.bytes(self.table[p as usize].slot))).collect();
        // Runs of adjacent pages, at most 256 pages (iovecs) each.
        let mut runs: Vec<(usize, usize)> = Vec::new(); // (first index into `pages`, count)
        for (i, &p) in pages.iter().enumerate() {
            match runs.last_mut() {
                Some((f, n)) if pages[*f + *n - 1] + 1 == p && *n < 256 => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        let iov: Vec<Run> = runs
            .iter()
            .map(|&(f, n)| Run {
                offset: pages[f] as u64 * pb as u64,
                iov: pages[f..f + n]
                    .iter()
                    .map(|&p| libc::iovec {
                        iov_base: self.slots.ptr(self.table[p as usize].slot) as *mut libc::c_void,
                        iov_len: pb,
                    })
                    .collect(),
                len: n * pb,
            })
            .collect();
        let fd = self.file.file.as_raw_fd();
        let results = self.engine.write(fd, &iov);
        self.stats.write_batches += 1;
        let mut first_err = None;
        for ((&(f, n), run), res) in runs.iter().zip(&iov).zip(results) {
            let done = match &res {
                Ok(b) => (*b / pb).min(n),
                Err(_) => 0,
            };
            for i in f..f + done {
                let p = pages[i] as usize;
                self.table[p].state = State::Clean;
                self.table[p].crc = crcs[i];
            }
            self.stats.pages_written += done as u64;
            self.stats.bytes_written += (done * pb) as u64;
            if done < n {
                self.dirty.extend_from_slice(&pages[f + done..f + n]);
                if first_err.is_none() {
                    let offset = run.offset + (done * pb) as u64;
                    let len = (n - done) * pb;
                    let file = self.file.path.clone();
                    first_err = Some(match res {
                        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) => {
                            KvError::DiskFull { file, offset, len, msg: e.to_string() }
                        }
                        Err(e) => KvError::Write { file, offset, len, msg: e.to_string() },
                        Ok(b) => KvError::DiskFull {
                            file,
                            offset,
                            len,
                            msg: format!("the device accepted only {b} of {} bytes", run.len),
                        },
                    });
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads pages `(p, slot)` from disk into their slots and verifies them; a page that fails is not made
    /// resident by the caller.
    fn fetch(&mut self, batch: &[(usize, u32)]) -> Result<(), KvError> {
        self.file.check()?;
        let pb = self.page_bytes;
        let reqs: Vec<Req> =
            batch.iter().map(|&(p, s)| Req { offset: p as u64 * pb as u64, ptr: self.slots.ptr(s), len: pb }).collect();
        let res = self.engine.read(self.file.file.as_raw_fd(), &reqs);
        // The checksums of the batch in parallel (crc32c runs at ~8 GB/s per core: serial, it would be a tenth of
        // the time of the reads it checks).
        let found: Vec<u32> = {
            use rayon::prelude::*;
            let slots = &self.slots;
            batch.par_iter().map(|&(_, s)| page_checksum(slots.bytes(s))).collect()
        };
        for (((&(p, _), r), out), found) in batch.iter().zip(&reqs).zip(res).zip(found) {
            let file = || self.file.path.clone();
            match out {
                Err(e) => return Err(KvError::Read { file: file(), offset: r.offset, len: r.len, msg: e.to_string() }),
                Ok(n) if n < r.len => {
                    return Err(KvError::Truncated { file: file(), offset: r.offset, want: r.len, got: n });
                }
                Ok(_) => {}
            }
            let expected = self.table[p].crc;
            if found != expected {
                let (layer, kv_head, group) = self.coords(p);
                return Err(KvError::Corrupt {
                    file: file(),
                    offset: r.offset,
                    layer,
                    kv_head,
                    group,
                    found,
                    expected,
                });
            }
        }
        self.stats.bytes_read += (batch.len() * pb) as u64;
        Ok(())
    }

    /// Calls `f(group, block)` for each of `groups` (distinct) of (`layer`, `kv_head`): hits from RAM, then the
    /// misses read from disk in parallel batches (as many as the cache has free or evictable slots), verified.
    /// Returns (hits, misses).
    pub fn read_groups(
        &mut self,
        layer: usize,
        kv_head: usize,
        groups: &[usize],
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(u64, u64), KvError> {
        check_read(layer, kv_head, groups, self.layers, self.kv_heads, self.lens.get(layer).copied())?;
        let sel: Vec<(usize, usize, usize)> = groups.iter().map(|&g| (layer, kv_head, g)).collect();
        self.read_unchecked(&sel, &mut |_, _, g, b| f(g, b), None)
    }

    /// [`Self::read_groups`] over a whole selection `(layer, kv_head, group)` (distinct), e.g. a decode step's
    /// groups of every layer and KV head: its misses go to disk in as few batches as the cache allows.
    /// `f(layer, kv_head, group, block)`.
    pub fn read_selection(
        &mut self,
        sel: &[(usize, usize, usize)],
        f: &mut BlockSink<'_>,
    ) -> Result<(u64, u64), KvError> {
        for &(l, h, g) in sel {
            check_read(l, h, &[g], self.layers, self.kv_heads, self.lens.get(l).copied())?;
        }
        self.read_unchecked(sel, f, None)
    }

    /// Makes the groups of `sel` (distinct `(layer, kv_head, group)`) resident in the RAM cache, reading the
    /// misses from disk as [`Self::read_selection`] does, and returns the device address of each block in order
    /// (the RAM cache must be mapped memory): what a GPU gather then reads. Every page of `sel` is held while the
    /// others are read, so none evicts another; the addresses stay valid until the next call that allocates
    /// slots (an append, a read).
    pub fn device_blocks(&mut self, sel: &[(usize, usize, usize)]) -> Result<Vec<u64>, KvError> {
        for &(l, h, g) in sel {
            check_read(l, h, &[g], self.layers, self.kv_heads, self.lens.get(l).copied())?;
        }
        let mut held = Vec::new();
        let r = self.read_unchecked(sel, &mut |_, _, _, _| {}, Some(&mut held));
        for &s in &held {
            self.slots.busy[s as usize] = false;
        }
        r?;
        sel.iter()
            .map(|&(l, h, g)| {
                self.block_device_ptr(l, h, g).ok_or_else(|| {
                    KvError::Usage("device blocks: the RAM cache is not mapped memory (no device address)".into())
                })
            })
            .collect()
    }

    /// Reads `sel` through `f`. With `hold`, every slot of `sel` stays busy (not evictable) until the caller clears
    /// the slots pushed there, hits and fetched pages alike.
    fn read_unchecked(
        &mut self,
        sel: &[(usize, usize, usize)],
        f: &mut BlockSink<'_>,
        mut hold: Option<&mut Vec<u32>>,
    ) -> Result<(u64, u64), KvError> {
        let bb = self.format.block_bytes();
        let mut misses = Vec::new();
        for &(l, h, g) in sel {
            let p = self.index(l, h, g);
            let s = self.table[p].slot;
            if s != NONE {
                self.slots.refbit[s as usize] = true;
                if let Some(held) = hold.as_deref_mut() {
                    if !self.slots.busy[s as usize] {
                        self.slots.busy[s as usize] = true;
                        held.push(s);
                    }
                }
                f(l, h, g, &self.slots.bytes(s)[..bb]);
            } else {
                debug_assert_eq!(self.table[p].state, State::Clean);
                misses.push(p);
            }
        }
        let mut sorted = misses.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            let (l, h, g) = self.coords(w[0]);
            return Err(KvError::Usage(format!("read: group {g} of layer {l} KV head {h} is selected twice")));
        }
        let hits = (sel.len() - misses.len()) as u64;
        self.stats.hits += hits;
        let mut i = 0;
        while i < misses.len() {
            let mut round: Vec<(usize, u32)> = Vec::new();
            while i < misses.len() && round.len() < 4096 {
                match self.alloc_slot() {
                    Ok(s) => {
                        self.slots.busy[s as usize] = true;
                        round.push((misses[i], s));
                        i += 1;
                    }
                    Err(e) if round.is_empty() => return Err(e),
                    Err(_) => break,
                }
            }
            let r = self.fetch(&round);
            for &(p, s) in &round {
                match hold.as_deref_mut() {
                    Some(held) if r.is_ok() => held.push(s),
                    _ => self.slots.busy[s as usize] = false,
                }
                if r.is_ok() {
                    self.slots.owner[s as usize] = p as u32;
                    self.slots.refbit[s as usize] = true;
                    self.table[p].slot = s;
                } else {
                    self.slots.free.push(s);
                }
            }
            r?;
            self.stats.misses += round.len() as u64;
            for &(p, s) in &round {
                let (l, h, g) = self.coords(p);
                f(l, h, g, &self.slots.bytes(s)[..bb]);
            }
        }
        Ok((hits, misses.len() as u64))
    }

    /// The page table as bytes ([`PageTable`]): the pages on disk with their crc32c.
    pub fn page_table(&self) -> Vec<u8> {
        let entries: Vec<Option<u32>> = self.table.iter().map(|p| (p.state == State::Clean).then_some(p.crc)).collect();
        PageTable { layers: self.layers, kv_heads: self.kv_heads, format: self.format, entries }.encode()
    }
}

/// The anchor of `benches/kv`: raw O_DIRECT reads of `len` bytes at each of `offsets` of `path` (a fresh
/// descriptor, no cache, no checksum) through `io` with `threads` / `depth` as the disk tier uses them, all in one
/// batch; returns the seconds taken.
pub fn raw_reads(
    path: &Path,
    offsets: &[u64],
    len: usize,
    io: IoMode,
    threads: usize,
    depth: u32,
) -> Result<f64, KvError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|e| KvError::Io(format!("opening {} with O_DIRECT: {e}", path.display())))?;
    let mut engine = Engine::new(io, threads, depth).or_else(|_| Engine::new(IoMode::Pread, threads, depth))?;
    let mut buf =
        super::HeapMemory.alloc(offsets.len() * len).map_err(|e| KvError::Alloc(format!("bench buffers: {e}")))?;
    let base = buf.as_mut_slice().as_mut_ptr() as usize;
    let reqs: Vec<Req> =
        offsets.iter().enumerate().map(|(i, &o)| Req { offset: o, ptr: base + i * len, len }).collect();
    let t = std::time::Instant::now();
    let res = engine.read(file.as_raw_fd(), &reqs);
    let secs = t.elapsed().as_secs_f64();
    for (r, out) in reqs.iter().zip(res) {
        match out {
            Ok(n) if n == len => {}
            Ok(n) => return Err(KvError::Truncated { file: path.into(), offset: r.offset, want: len, got: n }),
            Err(e) => return Err(KvError::Read { file: path.into(), offset: r.offset, len, msg: e.to_string() }),
        }
    }
    Ok(secs)
}

/// A serialized page table: `HGAKVPT1`, then u32 little endian `layers`, `kv_heads`, `head_dim`, `elem` (0 bf16,
/// 1 f32), `page_bytes`, u64 `pages`, then per page u32 `written` (0 or 1) and u32 `crc32c`. Pages are in page-file
/// order (see the module docs), whole groups of every (layer, KV head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageTable {
    pub layers: usize,
    pub kv_heads: usize,
    pub format: BlockFormat,
    /// Per page: its crc32c if it is on disk.
    pub entries: Vec<Option<u32>>,
}

const TABLE_MAGIC: &[u8; 8] = b"HGAKVPT1";
const TABLE_HEADER: usize = 8 + 5 * 4 + 8;

impl PageTable {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(TABLE_HEADER + 8 * self.entries.len());
        b.extend_from_slice(TABLE_MAGIC);
        let elem = match self.format.elem {
            Elem::Bf16 => 0u32,
            Elem::F32 => 1,
        };
        for v in [self.layers as u32, self.kv_heads as u32, self.format.head_dim as u32, elem] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(page_bytes(&self.format) as u32).to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&u32::from(e.is_some()).to_le_bytes());
            b.extend_from_slice(&e.unwrap_or(0).to_le_bytes());
        }
        b
    }

    /// Decodes and validates a page table; every inconsistency is an error saying what is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, KvError> {
        let bad = |m: String| Err(KvError::Table(m));
        if b.len() < TABLE_HEADER {
            return bad(format!("{} bytes, shorter than the {TABLE_HEADER}-byte header", b.len()));
        }
        if &b[..8] != TABLE_MAGIC {
            return bad("bad magic (expected HGAKVPT1)".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
        let (layers, kv_heads, head_dim, elem, pb) = (u32_at(8), u32_at(12), u32_at(16), u32_at(20), u32_at(24));
        let pages = u64::from_le_bytes(b[28..36].try_into().unwrap_or_default());
        if !(1..=4096).contains(&layers) || !(1..=1024).contains(&kv_heads) || !(1..=4096).contains(&head_dim) {
            return bad(format!(
                "geometry out of range: layers {layers} (1..=4096), kv_heads {kv_heads} (1..=1024), head_dim \
                 {head_dim} (1..=4096)"
            ));
        }
        let elem = match elem {
            0 => Elem::Bf16,
            1 => Elem::F32,
            e => return bad(format!("unknown element type {e} (0 bf16, 1 f32)")),
        };
        let format = BlockFormat { head_dim, elem };
        if pb != page_bytes(&format) {
            return bad(format!(
                "page size {pb} does not match the format (head_dim {head_dim}, {elem:?}: {})",
                page_bytes(&format)
            ));
        }
        let body = b.len() - TABLE_HEADER;
        if !body.is_multiple_of(8) || pages != (body / 8) as u64 {
            return bad(format!("{pages} pages announced, {body} bytes of entries (8 per page) follow"));
        }
        if !(pages as usize).is_multiple_of(layers * kv_heads) {
            return bad(format!("{pages} pages is not whole groups of {layers} layers x {kv_heads} KV heads"));
        }
        if (pages as u128) * (pb as u128) > i64::MAX as u128 {
            return bad(format!("{pages} pages of {pb} bytes do not fit a file"));
        }
        let mut entries = Vec::with_capacity(pages as usize);
        for (i, e) in b[TABLE_HEADER..].chunks_exact(8).enumerate() {
            let (w, crc) = (u32_at(TABLE_HEADER + 8 * i), u32::from_le_bytes([e[4], e[5], e[6], e[7]]));
            entries.push(match w {
                0 => None,
                1 => Some(crc),
                w => return bad(format!("page {i}: written flag {w} (0 or 1)")),
            });
        }
        Ok(PageTable { layers, kv_heads, format, entries })
    }
}

/// Positional reads of a page file (a file, or bytes for the fuzz target).
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let o = offset.min(self.len() as u64) as usize;
        let n = buf.len().min(self.len() - o);
        buf[..n].copy_from_slice(&self[o..o + n]);
        Ok(n)
    }
}

/// Reads page `p` of `file` (named `name` in errors) and checks it against `table`: the block bytes, or the error.
pub fn read_page(table: &PageTable, name: &Path, file: &(impl ReadAt + ?Sized), p: usize) -> Result<Vec<u8>, KvError> {
    let pb = page_bytes(&table.format);
    let offset = p as u64 * pb as u64;
    let Some(Some(expected)) = table.entries.get(p).copied() else {
        return Err(KvError::Table(format!("page {p} is not on disk according to the page table")));
    };
    let mut buf = vec![0u8; pb];
    let mut got = 0;
    while got < pb {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(KvError::Read { file: name.into(), offset, len: pb, msg: e.to_string() }),
        }
    }
    if got < pb {
        return Err(KvError::Truncated { file: name.into(), offset, want: pb, got });
    }
    let found = crc32c::crc32c(&buf);
    if found != expected {
        let (lh, kv) = (table.layers * table.kv_heads, table.kv_heads);
        return Err(KvError::Corrupt {
            file: name.into(),
            offset,
            layer: p / kv % table.layers,
            kv_head: p % kv,
            group: p / lh,
            found,
            expected,
        });
    }
    buf.truncate(table.format.block_bytes());
    Ok(buf)
}

/// Verifies every page the table says is on disk; returns how many.
pub fn verify_page_file(table: &PageTable, name: &Path, file: &(impl ReadAt + ?Sized)) -> Result<usize, KvError> {
    let mut n = 0;
    for p in 0..table.entries.len() {
        if table.entries[p].is_some() {
            read_page(table, name, file, p)?;
            n += 1;
        }
    }
    Ok(n)
}

/// The fuzz target's entry: `data` = u32 little endian `n`, then `n` bytes of page table, then the page file's
/// bytes. Decodes the table and verifies the file; an error is the expected answer to garbage, a panic a bug.
pub fn fuzz_entry(data: &[u8]) -> Result<usize, KvError> {
    if data.len() < 4 {
        return Err(KvError::Table("fuzz input shorter than its 4-byte length prefix".into()));
    }
    let n = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize).min(data.len() - 4);
    let table = PageTable::decode(&data[4..4 + n])?;
    verify_page_file(&table, Path::new("fuzz.pages"), &data[4 + n..])
}

/// Valid inputs of [`fuzz_entry`]: small tables and files of both element types, one with an unwritten page.
pub fn fuzz_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (format, layers, heads, groups) in [
        (BlockFormat { head_dim: 8, elem: Elem::F32 }, 1, 1, 1),
        (BlockFormat { head_dim: 16, elem: Elem::Bf16 }, 2, 1, 2),
        (BlockFormat::STANDARD, 1, 2, 1),
    ] {
        let pb = page_bytes(&format);
        let n = layers * heads * groups;
        let mut file = vec![0u8; n * pb];
        let mut entries = Vec::new();
        for p in 0..n {
            let page = &mut file[p * pb..(p + 1) * pb];
            for (i, b) in page.iter_mut().enumerate().take(format.block_bytes()) {
                *b = (i * 31 + p * 7) as u8;
            }
            entries.push(if p == 1 { None } else { Some(crc32c::crc32c(page)) });
        }
        let t = PageTable { layers, kv_heads: heads, format, entries }.encode();
        let mut s = (t.len() as u32).to_le_bytes().to_vec();
        s.extend_from_slice(&t);
        s.extend_from_slice(&file);
        seeds.push(s);
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_verify_and_damage_is_named() {
        for s in fuzz_seeds() {
            assert!(fuzz_entry(&s).unwrap() >= 1);
            // Page 0 (always written) starts after the length prefix and the table.
            let page0 = 4 + u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize;
            let mut bad = s.clone();
            bad[page0 + 5] ^= 0x10;
            let e = fuzz_entry(&bad).unwrap_err().to_string();
            assert!(e.contains("checksum mismatch") && e.contains("fuzz.pages") && e.contains("at offset 0 "), "{e}");
            let e = fuzz_entry(&s[..page0 + 100]).unwrap_err().to_string();
            assert!(e.contains("is truncated"), "{e}");
        }
        assert!(fuzz_entry(b"\x04\0\0\0abcd").unwrap_err().to_string().contains("header"));
    }
}
