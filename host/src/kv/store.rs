//! The K/V store the forwards keep their history in: a tier ([`KvTier`]: `plain`, `host`, `disk`) chosen by the user
//! (`--kv-tier`, `--kv-dir`, `--host-kv-limit`, `--kv-io`), opened for one model shape as a [`KvStore`].
//!
//! - `plain`: no store; the CPU forward keeps `Vec<f32>` rows per layer (`model::forward::LayerKv`), as before.
//! - `host`: the [`Arena`]: every group block in RAM extents (`--host-kv-limit`, if given, caps its size: an error
//!   rather than swapping).
//! - `disk`: the [`DiskStore`]: a RAM cache of `--host-kv-limit` bytes over page files in `--kv-dir`.
//!
//! Bytes per token (Qwen3-30B-A3B, 48 layers x 4 KV heads x 128): `plain` keeps f32 rows (192 KB on the CPU);
//! `host` 96 KB of bf16 group blocks in RAM (f32 blocks, 192 KB, for the CPU forward's unrounded modes); `disk` the
//! same on disk, with `--host-kv-limit` of RAM and 12 bytes per page of page table. Measured numbers:
//! docs/perf-kv.md.
//!
//! Every tier stores what it is given bit for bit, so the logits of the CPU forward are bit-identical with every
//! tier (tests/kv_forward.rs). Reads name groups of one (layer, KV head); `hits + misses` counts them all.
use std::path::PathBuf;
use std::str::FromStr;

use super::arena::{check_read, Arena, BlockFormat, GROUP};
use super::disk::{DiskConfig, DiskStore};
use super::{ExtentMemory, HeapMemory};

/// Errors of the K/V tiers. Every I/O error names the file and the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Memory for an extent or the RAM cache could not be had.
    #[error("out of memory: {0}")]
    Alloc(String),
    /// A value the block format cannot store exactly, or rows of the wrong shape.
    #[error("K/V format: {0}")]
    Format(String),
    /// The K/V directory is missing, not a directory, read-only or not writable.
    #[error("K/V directory {dir}: {msg}")]
    Dir { dir: PathBuf, msg: String },
    /// A write failed because the device is full.
    #[error("disk full: writing K/V page file {file} at offset {offset} ({len} bytes): {msg}")]
    DiskFull { file: PathBuf, offset: u64, len: usize, msg: String },
    /// Another write error.
    #[error("writing K/V page file {file} at offset {offset} ({len} bytes): {msg}")]
    Write { file: PathBuf, offset: u64, len: usize, msg: String },
    /// A read error.
    #[error("reading K/V page file {file} at offset {offset} ({len} bytes): {msg}")]
    Read { file: PathBuf, offset: u64, len: usize, msg: String },
    /// The page file ends before a page the page table says was written.
    #[error(
        "K/V page file {file} is truncated: the page at offset {offset} needs {want} bytes, only {got} could be read"
    )]
    Truncated { file: PathBuf, offset: u64, want: usize, got: usize },
    /// A page's crc32c differs from the page table's.
    #[error(
        "K/V page file {file}: checksum mismatch in the page at offset {offset} (layer {layer}, KV head {kv_head}, \
         group {group}): crc32c {found:#010x}, the page table has {expected:#010x}"
    )]
    Corrupt { file: PathBuf, offset: u64, layer: usize, kv_head: usize, group: usize, found: u32, expected: u32 },
    /// The page file is no longer the file the store created.
    #[error("K/V page file {file} was deleted or replaced underneath the store ({msg})")]
    Deleted { file: PathBuf, msg: String },
    /// A serialized page table that does not decode.
    #[error("K/V page table: {0}")]
    Table(String),
    /// The io backend could not be set up.
    #[error("K/V io: {0}")]
    Io(String),
    /// A call that does not fit the store (shape, range, sizes).
    #[error("K/V store: {0}")]
    Usage(String),
}

/// Which tier holds the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TierKind {
    /// No store (the forward's own vectors).
    #[default]
    Plain,
    /// The host arena (RAM).
    Host,
    /// A RAM cache over page files.
    Disk,
}

impl FromStr for TierKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Self::Plain),
            "host" => Ok(Self::Host),
            "disk" => Ok(Self::Disk),
            _ => Err(format!("unknown K/V tier `{s}` (expected plain, host or disk)")),
        }
    }
}

impl std::fmt::Display for TierKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Host => "host",
            Self::Disk => "disk",
        })
    }
}

/// How the disk tier reads its pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoMode {
    /// io_uring (the `io-uring` crate): one submission of every read of a batch, `queue_depth` in flight.
    #[default]
    Uring,
    /// A pool of threads calling `pread` (`threads` of them).
    Pread,
}

impl FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "uring" | "io-uring" => Ok(Self::Uring),
            "pread" => Ok(Self::Pread),
            _ => Err(format!("unknown K/V io mode `{s}` (expected uring or pread)")),
        }
    }
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Uring => "uring",
            Self::Pread => "pread",
        })
    }
}

/// A byte size: a number with an optional binary suffix (`K`, `M`, `G`, `T`, also `KiB`, `KB`, ...: powers of
/// 1024), e.g. `4096`, `64M`, `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("`{s}` is not a size (e.g. 4096, 64M, 1.5G)"))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        u => return Err(format!("unknown size unit `{u}` in `{s}` (K, M, G, T: powers of 1024)")),
    };
    let v = n * mult as f64;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("size `{s}` is out of range"));
    }
    Ok(v as u64)
}

/// The user's choice of tier (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvTier {
    pub kind: TierKind,
    /// The page files' directory (disk tier).
    pub dir: Option<PathBuf>,
    /// Host RAM for K/V in bytes: the RAM cache of the disk tier, a cap of the host tier.
    pub host_limit: Option<u64>,
    pub io: IoMode,
}

/// The disk tier's RAM cache when `--host-kv-limit` is not given.
pub const DEFAULT_DISK_CACHE_BYTES: u64 = 1 << 30;

impl KvTier {
    /// The plain tier (no store).
    pub fn plain() -> Self {
        KvTier::default()
    }

    /// The host arena, uncapped.
    pub fn host() -> Self {
        KvTier { kind: TierKind::Host, ..Self::default() }
    }

    /// The disk tier in `dir` with a RAM cache of `limit` bytes.
    pub fn disk(dir: impl Into<PathBuf>, limit: u64, io: IoMode) -> Self {
        KvTier { kind: TierKind::Disk, dir: Some(dir.into()), host_limit: Some(limit), io }
    }

    /// Checks that the options fit together (a disk tier needs a directory; `--kv-dir` only means something for it).
    pub fn validate(&self) -> Result<(), KvError> {
        match self.kind {
            TierKind::Disk if self.dir.is_none() => {
                Err(KvError::Usage("--kv-tier disk needs --kv-dir DIR (where the page files go)".into()))
            }
            TierKind::Plain | TierKind::Host if self.dir.is_some() => {
                Err(KvError::Usage(format!("--kv-dir is only used by --kv-tier disk (the tier is {})", self.kind)))
            }
            TierKind::Plain if self.host_limit.is_some() => {
                Err(KvError::Usage("--host-kv-limit needs --kv-tier host or disk".into()))
            }
            _ => Ok(()),
        }
    }

    /// One line for logs, e.g. `disk (dir kv-pages, RAM cache 64.0 MiB, io uring)`.
    pub fn describe(&self) -> String {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
        match self.kind {
            TierKind::Plain => "plain".into(),
            TierKind::Host => match self.host_limit {
                Some(l) => format!("host (limit {})", mib(l)),
                None => "host".into(),
            },
            TierKind::Disk => format!(
                "disk (dir {}, RAM cache {}, io {})",
                self.dir.as_deref().map(|d| d.display().to_string()).unwrap_or_default(),
                mib(self.host_limit.unwrap_or(DEFAULT_DISK_CACHE_BYTES)),
                self.io
            ),
        }
    }

    /// Opens a store of this tier in heap memory for `layers x kv_heads` of `format` (`None` for `plain`).
    pub fn open(
        &self,
        layers: usize,
        kv_heads: usize,
        format: BlockFormat,
    ) -> Result<Option<KvStore<HeapMemory>>, KvError> {
        self.open_in(HeapMemory, layers, kv_heads, format)
    }

    /// [`Self::open`] with the extents in `mem`.
    pub fn open_in<M: ExtentMemory>(
        &self,
        mem: M,
        layers: usize,
        kv_heads: usize,
        format: BlockFormat,
    ) -> Result<Option<KvStore<M>>, KvError> {
        self.validate()?;
        Ok(match self.kind {
            TierKind::Plain => None,
            TierKind::Host => {
                let gpe = Arena::<M>::groups_per_extent_for(layers, kv_heads, format, HOST_EXTENT_BYTES);
                let arena = Arena::new(mem, layers, kv_heads, format, gpe)?;
                Some(KvStore::Host { arena, limit: self.host_limit })
            }
            TierKind::Disk => {
                let cfg = DiskConfig {
                    dir: self.dir.clone().unwrap_or_default(),
                    cache_bytes: self.host_limit.unwrap_or(DEFAULT_DISK_CACHE_BYTES),
                    io: self.io,
                    ..DiskConfig::default()
                };
                Some(KvStore::Disk(Box::new(DiskStore::open(mem, layers, kv_heads, format, cfg)?)))
            }
        })
    }
}

/// Target size of a host arena extent.
pub const HOST_EXTENT_BYTES: usize = 16 << 20;

/// What a selection read hands each block to: `f(layer, kv_head, group, block)`.
pub type BlockSink<'a> = dyn FnMut(usize, usize, usize, &[u8]) + 'a;

/// Counters of a store (cumulative).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Groups read that were in RAM.
    pub hits: u64,
    /// Groups read that came from disk.
    pub misses: u64,
    /// Bytes read from the page files.
    pub bytes_read: u64,
    /// Pages written (and their bytes).
    pub pages_written: u64,
    pub bytes_written: u64,
    /// Write batches.
    pub write_batches: u64,
    /// Groups dropped from the RAM cache.
    pub evictions: u64,
    /// Host RAM the store holds now.
    pub resident_bytes: u64,
}

/// An open store (see the module docs).
pub enum KvStore<M: ExtentMemory = HeapMemory> {
    Host { arena: Arena<M>, limit: Option<u64> },
    Disk(Box<DiskStore<M>>),
}

impl<M: ExtentMemory> KvStore<M> {
    pub fn format(&self) -> BlockFormat {
        match self {
            KvStore::Host { arena, .. } => arena.format(),
            KvStore::Disk(d) => d.format(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        match self {
            KvStore::Host { arena, .. } => arena.layout().kv_heads,
            KvStore::Disk(d) => d.kv_heads(),
        }
    }

    pub fn layers(&self) -> usize {
        match self {
            KvStore::Host { arena, .. } => arena.layout().layers,
            KvStore::Disk(d) => d.layers(),
        }
    }

    /// Positions stored in `layer`.
    pub fn len(&self, layer: usize) -> usize {
        match self {
            KvStore::Host { arena, .. } => arena.len(layer),
            KvStore::Disk(d) => d.len(layer),
        }
    }

    pub fn is_empty(&self) -> bool {
        (0..self.layers()).all(|l| self.len(l) == 0)
    }

    /// Stores positions `pos0..pos0 + t` of `layer` (`k`, `v`: `[t, kv_heads * head_dim]`), see
    /// [`Arena::append`].
    pub fn append(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        match self {
            KvStore::Host { arena, limit } => {
                if let Some(limit) = *limit {
                    let w = arena.layout().kv_heads * arena.format().head_dim;
                    let groups = (pos0 + k.len() / w.max(1)).div_ceil(GROUP);
                    let need = groups.div_ceil(arena.layout().groups_per_extent) * arena.extent_bytes();
                    if need as u64 > limit {
                        return Err(KvError::Alloc(format!(
                            "the host K/V arena needs {need} bytes for {} positions, above --host-kv-limit {limit} \
                             (use --kv-tier disk to go beyond RAM)",
                            pos0 + k.len() / w.max(1)
                        )));
                    }
                }
                arena.append(layer, pos0, k, v)
            }
            KvStore::Disk(d) => d.append(layer, pos0, k, v),
        }
    }

    /// Calls `f(group, block)` for each of `groups` (distinct) of (`layer`, `kv_head`); returns (hits, misses).
    pub fn read_groups(
        &mut self,
        layer: usize,
        kv_head: usize,
        groups: &[usize],
        f: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<(u64, u64), KvError> {
        match self {
            KvStore::Host { arena, .. } => {
                arena.read_groups(layer, kv_head, groups, f)?;
                Ok((groups.len() as u64, 0))
            }
            KvStore::Disk(d) => d.read_groups(layer, kv_head, groups, f),
        }
    }

    /// [`Self::read_groups`] over a selection `(layer, kv_head, group)` of several layers and heads (distinct):
    /// the disk tier reads its misses in as few batches as its cache allows. `f(layer, kv_head, group, block)`.
    pub fn read_selection(
        &mut self,
        sel: &[(usize, usize, usize)],
        f: &mut BlockSink<'_>,
    ) -> Result<(u64, u64), KvError> {
        match self {
            KvStore::Host { arena, .. } => {
                for &(l, h, g) in sel {
                    arena.read_groups(l, h, &[g], &mut |g, b| f(l, h, g, b))?;
                }
                Ok((sel.len() as u64, 0))
            }
            KvStore::Disk(d) => d.read_selection(sel, f),
        }
    }

    /// Positions `0..n` of `layer` as rows `[n, kv_heads * head_dim]` (K, V), every group read through the store.
    pub fn read_layer(&mut self, layer: usize, n: usize) -> Result<(Vec<f32>, Vec<f32>), KvError> {
        let f = self.format();
        let heads = self.kv_heads();
        let d = f.head_dim;
        let w = heads * d;
        if n > self.len(layer) {
            check_read(layer, 0, &[n.div_ceil(GROUP)], self.layers(), heads, Some(self.len(layer)))?;
        }
        let (mut k, mut v) = (vec![0f32; n * w], vec![0f32; n * w]);
        // One selection over every KV head: the disk tier reads the layer's misses in one batch.
        let sel: Vec<(usize, usize, usize)> =
            (0..heads).flat_map(|h| (0..n.div_ceil(GROUP)).map(move |g| (layer, h, g))).collect();
        self.read_selection(&sel, &mut |_, h, g, blk| {
            for r in 0..GROUP.min(n - g * GROUP) {
                let o = (g * GROUP + r) * w + h * d;
                f.decode_row(&blk[f.k_row(r)], &mut k[o..o + d]);
                f.decode_row(&blk[f.v_row(r)], &mut v[o..o + d]);
            }
        })?;
        Ok((k, v))
    }

    /// Writes every closed group not yet on disk (disk tier; a no-op for the host tier).
    pub fn flush(&mut self) -> Result<(), KvError> {
        match self {
            KvStore::Host { .. } => Ok(()),
            KvStore::Disk(d) => d.flush(),
        }
    }

    pub fn stats(&self) -> KvStats {
        match self {
            KvStore::Host { arena, .. } => {
                KvStats { resident_bytes: arena.allocated_bytes() as u64, ..KvStats::default() }
            }
            KvStore::Disk(d) => d.stats(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_tiers_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert!(parse_size("12Q").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("M").is_err());
        assert_eq!("disk".parse::<TierKind>().unwrap(), TierKind::Disk);
        assert!("ssd".parse::<TierKind>().is_err());
        assert_eq!("pread".parse::<IoMode>().unwrap(), IoMode::Pread);
        let t = KvTier { kind: TierKind::Disk, ..KvTier::default() };
        assert!(t.validate().unwrap_err().to_string().contains("needs --kv-dir"));
        let t = KvTier { dir: Some("/x".into()), ..KvTier::host() };
        assert!(t.validate().unwrap_err().to_string().contains("only used by --kv-tier disk"));
    }

    #[test]
    fn host_limit_is_an_error_not_a_swap() {
        let f = BlockFormat { head_dim: 8, elem: super::super::arena::Elem::F32 };
        let t = KvTier { host_limit: Some(1000), ..KvTier::host() };
        let mut s = t.open(1, 1, f).unwrap().unwrap();
        let e = s.append(0, 0, &[0.0; 8], &[0.0; 8]).unwrap_err().to_string();
        assert!(e.contains("above --host-kv-limit"), "{e}");
    }
}
