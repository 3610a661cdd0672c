//! The K/V store on its own: a property test of random interleavings of appends, rewinds, flushes and reads of
//! random group selections against a plain copy, in the host arena and in the disk tier (both io modes) with RAM
//! caches small enough to evict to disk (what is read equals what was written, bit for bit; hits + misses =
//! selected); and the faults, each checked on its message, with what was written before still readable: a tmpfs
//! that fills up, a truncated page file, a flipped byte, a read-only directory, a deleted page file, a missing
//! directory.
use std::path::{Path, PathBuf};
use std::process::Command;

use hga::kv::arena::{BlockFormat, Elem, GROUP};
use hga::kv::disk::{page_bytes, verify_page_file, DiskConfig, DiskStore, PageTable};
use hga::kv::store::IoMode;
use hga::kv::{HeapMemory, KvStore, KvTier};
use proptest::prelude::*;

mod common;

fn tmpdir(tag: &str) -> PathBuf {
    common::tmpdir("hga-kvs", tag)
}

/// The plain copy: rows `[positions, kv_heads * head_dim]` of K and V per layer.
struct Model {
    heads: usize,
    d: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Model {
    fn len(&self, l: usize) -> usize {
        self.k[l].len() / (self.heads * self.d)
    }
}

/// Values the format stores exactly, from a seed (bf16: every finite bf16; f32: any finite bit pattern).
fn values(n: usize, seed: u64, elem: Elem) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let x = match elem {
                Elem::F32 => f32::from_bits(s as u32),
                Elem::Bf16 => half::bf16::from_bits((s >> 16) as u16).to_f32(),
            };
            if x.is_finite() {
                x
            } else {
                (s % 200) as f32 - 100.0
            }
        })
        .collect()
}

/// Checks a read of `groups` of (l, h) against the model: each block's stored rows bit for bit.
fn check_read(s: &mut KvStore, m: &Model, l: usize, h: usize, groups: &[usize]) -> Result<(u64, u64), String> {
    let f = s.format();
    let (w, d) = (m.heads * m.d, m.d);
    let n = m.len(l);
    let mut seen = Vec::new();
    let mut bad = None;
    let (hits, misses) = s
        .read_groups(l, h, groups, &mut |g, blk| {
            seen.push(g);
            let mut row = vec![0f32; d];
            for r in 0..GROUP.min(n - g * GROUP) {
                let o = (g * GROUP + r) * w + h * d;
                for (half, src) in [(f.k_row(r), &m.k[l]), (f.v_row(r), &m.v[l])] {
                    f.decode_row(&blk[half], &mut row);
                    let want = &src[o..o + d];
                    if row.iter().zip(want).any(|(a, b)| a.to_bits() != b.to_bits()) && bad.is_none() {
                        bad = Some(format!("layer {l} head {h} group {g} row {r} differs"));
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;
    if let Some(b) = bad {
        return Err(b);
    }
    seen.sort_unstable();
    let mut want = groups.to_vec();
    want.sort_unstable();
    if seen != want {
        return Err(format!("read returned groups {seen:?}, asked {want:?}"));
    }
    if hits + misses != groups.len() as u64 {
        return Err(format!("hits {hits} + misses {misses} != selected {}", groups.len()));
    }
    Ok((hits, misses))
}

#[derive(Clone, Debug)]
enum Op {
    /// Append `n` tokens to layer `l` (at its end, or `back` positions before it: a rewind).
    Append {
        l: usize,
        n: usize,
        back: usize,
        seed: u64,
    },
    /// Read a selection of groups (`pick` chooses them) of (l, h).
    Read {
        l: usize,
        h: usize,
        pick: u64,
    },
    /// Read a selection over both layers and heads in one call (`pick` chooses the groups).
    ReadSel {
        pick: u64,
    },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 1..40usize, prop_oneof![6 => Just(0usize), 1 => 1..20usize], any::<u64>())
            .prop_map(|(l, n, back, seed)| Op::Append { l, n, back, seed }),
        5 => (0..2usize, 0..2usize, any::<u64>()).prop_map(|(l, h, pick)| Op::Read { l, h, pick }),
        2 => any::<u64>().prop_map(|pick| Op::ReadSel { pick }),
        1 => Just(Op::Flush),
    ]
}

fn run_ops(store: &mut KvStore, elem: Elem, ops: &[Op], is_disk: bool) -> Result<(u64, u64), String> {
    let (heads, d) = (2, store.format().head_dim);
    let mut m = Model { heads, d, k: vec![Vec::new(); 2], v: vec![Vec::new(); 2] };
    let (mut hits, mut misses) = (0, 0);
    for op in ops {
        match *op {
            Op::Append { l, n, back, seed } => {
                let pos0 = m.len(l).saturating_sub(back);
                let k = values(n * heads * d, seed, elem);
                let v = values(n * heads * d, seed ^ 0xABCD, elem);
                store.append(l, pos0, &k, &v).map_err(|e| e.to_string())?;
                m.k[l].truncate(pos0 * heads * d);
                m.v[l].truncate(pos0 * heads * d);
                m.k[l].extend_from_slice(&k);
                m.v[l].extend_from_slice(&v);
            }
            Op::Read { l, h, pick } => {
                let groups: Vec<usize> =
                    (0..m.len(l).div_ceil(GROUP)).filter(|g| (pick >> (g % 64)) & 1 == 1).collect();
                let (a, b) = check_read(store, &m, l, h, &groups)?;
                hits += a;
                misses += b;
            }
            Op::ReadSel { pick } => {
                let mut sel = Vec::new();
                for l in 0..2 {
                    for h in 0..heads {
                        let n = m.len(l).div_ceil(GROUP);
                        sel.extend(
                            (0..n).filter(|g| (pick >> ((g + 7 * l + 13 * h) % 64)) & 1 == 1).map(|g| (l, h, g)),
                        );
                    }
                }
                let mut got = Vec::new();
                let mut bad = None;
                let f = store.format();
                let (hi, mi) = store
                    .read_selection(&sel, &mut |l, h, g, blk| {
                        got.push((l, h, g));
                        let n = m.len(l);
                        let mut row = vec![0f32; d];
                        for r in 0..GROUP.min(n - g * GROUP) {
                            let o = (g * GROUP + r) * heads * d + h * d;
                            f.decode_row(&blk[f.v_row(r)], &mut row);
                            if row.iter().zip(&m.v[l][o..o + d]).any(|(a, b)| a.to_bits() != b.to_bits()) {
                                bad = Some(format!("selection: layer {l} head {h} group {g} row {r} differs"));
                            }
                            f.decode_row(&blk[f.k_row(r)], &mut row);
                            if row.iter().zip(&m.k[l][o..o + d]).any(|(a, b)| a.to_bits() != b.to_bits()) {
                                bad = Some(format!("selection: layer {l} head {h} group {g} row {r} differs"));
                            }
                        }
                    })
                    .map_err(|e| e.to_string())?;
                if let Some(b) = bad {
                    return Err(b);
                }
                got.sort_unstable();
                sel.sort_unstable();
                if got != sel || hi + mi != sel.len() as u64 {
                    return Err(format!("selection read {} blocks ({hi} + {mi}) of {}", got.len(), sel.len()));
                }
                hits += hi;
                misses += mi;
            }
            Op::Flush => store.flush().map_err(|e| e.to_string())?,
        }
        if store.len(0) != m.len(0) || store.len(1) != m.len(1) {
            return Err("lengths differ".into());
        }
    }
    // Everything, at the end.
    for l in 0..2 {
        for h in 0..heads {
            let all: Vec<usize> = (0..m.len(l).div_ceil(GROUP)).collect();
            let (a, b) = check_read(store, &m, l, h, &all)?;
            hits += a;
            misses += b;
        }
    }
    if !is_disk && misses != 0 {
        return Err(format!("the host arena reported {misses} misses"));
    }
    // More pages than the RAM cache holds: the final reads must have gone to disk.
    let pages: usize = (0..2).map(|l| m.len(l).div_ceil(GROUP) * heads).sum();
    let cache = (store.stats().resident_bytes / page_bytes(&store.format()) as u64) as usize;
    if is_disk && pages > cache && misses == 0 {
        return Err(format!("{pages} pages over a cache of {cache} and no miss"));
    }
    Ok((hits, misses))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn reads_return_what_was_written(
        ops in proptest::collection::vec(op(), 1..40),
        bf16 in any::<bool>(),
        cache_pages in 12usize..40,
        uring in any::<bool>(),
    ) {
        let elem = if bf16 { Elem::Bf16 } else { Elem::F32 };
        let f = BlockFormat { head_dim: if bf16 { 64 } else { 24 }, elem };
        let dir = tmpdir("prop");
        let io = if uring { IoMode::Uring } else { IoMode::Pread };
        let mut host = KvTier::host().open(2, 2, f).unwrap().unwrap();
        run_ops(&mut host, elem, &ops, false).map_err(TestCaseError::fail)?;
        // 2 layers x 2 heads: 4 open groups; 12..40 pages of cache, so long runs evict to disk.
        let tier = KvTier::disk(&dir, (cache_pages * page_bytes(&f)) as u64, io);
        let mut disk = tier.open(2, 2, f).unwrap().unwrap();
        let (hits, misses) = run_ops(&mut disk, elem, &ops, true).map_err(TestCaseError::fail)?;
        let st = disk.stats();
        prop_assert_eq!((st.hits, st.misses), (hits, misses));
        prop_assert!(st.resident_bytes <= (cache_pages * page_bytes(&f)) as u64);
    }
}

/// A store in `dir` (standard format, 2 layers x 2 KV heads) with `groups` groups of every (layer, head) appended,
/// flushed; and the plain copy.
fn filled(dir: &Path, cache_pages: usize, groups: usize, io: IoMode) -> (KvStore, Model) {
    let f = BlockFormat::STANDARD;
    let mut s = KvTier::disk(dir, (cache_pages * page_bytes(&f)) as u64, io).open(2, 2, f).unwrap().unwrap();
    let mut m = Model { heads: 2, d: 128, k: vec![Vec::new(); 2], v: vec![Vec::new(); 2] };
    for l in 0..2 {
        let n = groups * GROUP;
        let k = values(n * 256, l as u64 + 1, Elem::Bf16);
        let v = values(n * 256, l as u64 + 11, Elem::Bf16);
        s.append(l, 0, &k, &v).unwrap();
        m.k[l] = k;
        m.v[l] = v;
    }
    s.flush().unwrap();
    (s, m)
}

fn disk(s: &KvStore) -> &DiskStore<HeapMemory> {
    match s {
        KvStore::Disk(d) => d,
        _ => unreachable!(),
    }
}

/// Groups of (0, 0) not in RAM, and some that are.
fn evicted_and_resident(s: &KvStore, groups: usize) -> (Vec<usize>, Vec<usize>) {
    (0..groups).partition(|&g| !disk(s).is_resident(0, 0, g))
}

#[test]
fn a_truncated_page_file_is_an_error_naming_file_and_offset() {
    let dir = tmpdir("trunc");
    let (mut s, m) = filled(&dir, 16, 12, IoMode::Uring);
    let (out, _) = evicted_and_resident(&s, 12);
    let last = *out.iter().max().unwrap();
    let first = *out.iter().min().unwrap();
    assert!(last > first, "need two evicted groups");
    let path = disk(&s).page_file().to_path_buf();
    let cut = disk(&s).page_offset(0, 0, last) + 100;
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
    let e = check_read(&mut s, &m, 0, 0, &[last]).unwrap_err();
    let want = format!("K/V page file {} is truncated: the page at offset {}", path.display(), cut - 100);
    assert!(e.starts_with(&want) && e.contains("only 100 could be read"), "{e}");
    // Pages before the cut still read back right, and what is in RAM too.
    check_read(&mut s, &m, 0, 0, &[first]).unwrap();
    let (_, res) = evicted_and_resident(&s, 12);
    check_read(&mut s, &m, 0, 0, &res).unwrap();
}

#[test]
fn a_flipped_byte_is_a_checksum_error_naming_file_and_offset() {
    for io in [IoMode::Uring, IoMode::Pread] {
        let dir = tmpdir(&format!("flip-{io}"));
        let (mut s, m) = filled(&dir, 16, 12, io);
        let (out, _) = evicted_and_resident(&s, 12);
        let (bad, good) = (out[0], out[1]);
        let path = disk(&s).page_file().to_path_buf();
        let off = disk(&s).page_offset(0, 0, bad);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[off as usize + 4321] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap(); // same inode: rewritten in place
        let e = check_read(&mut s, &m, 0, 0, &[good, bad]).unwrap_err();
        let want = format!(
            "K/V page file {}: checksum mismatch in the page at offset {off} (layer 0, KV head 0, group {bad})",
            path.display()
        );
        assert!(e.starts_with(&want), "{io}: {e}");
        // The bad page did not become resident; the good one reads back right (again).
        assert!(!disk(&s).is_resident(0, 0, bad));
        check_read(&mut s, &m, 0, 0, &[good]).unwrap();
        assert!(check_read(&mut s, &m, 0, 0, &[bad]).is_err(), "a corrupt page must fail every time");
        // The serialized page table finds it too.
        let t = PageTable::decode(&disk(&s).page_table()).unwrap();
        let e = verify_page_file(&t, &path, &std::fs::File::open(&path).unwrap()).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch") && e.contains(&format!("offset {off}")), "{e}");
    }
}

#[test]
fn a_deleted_page_file_is_an_error_and_ram_stays_readable() {
    let dir = tmpdir("deleted");
    let (mut s, m) = filled(&dir, 16, 12, IoMode::Pread);
    let (out, res) = evicted_and_resident(&s, 12);
    let path = disk(&s).page_file().to_path_buf();
    std::fs::remove_file(&path).unwrap();
    let e = check_read(&mut s, &m, 0, 0, &out[..1]).unwrap_err();
    assert_eq!(
        e,
        format!(
            "K/V page file {} was deleted or replaced underneath the store (the path no longer exists)",
            path.display()
        )
    );
    check_read(&mut s, &m, 0, 0, &res).unwrap();
    // Writes stop with the same error.
    let e = s.append(0, 12 * GROUP, &[0.5; 16 * 256], &[0.25; 16 * 256]).and_then(|_| s.flush()).unwrap_err();
    assert!(e.to_string().contains("was deleted or replaced underneath"), "{e}");
}

#[test]
fn a_missing_or_plain_file_directory_is_an_error() {
    let dir = tmpdir("missing");
    let f = BlockFormat::STANDARD;
    let err = |d: &Path| KvTier::disk(d, 1 << 20, IoMode::Pread).open(2, 2, f).err().unwrap().to_string();
    let gone = dir.join("nope");
    assert_eq!(err(&gone), format!("K/V directory {}: does not exist", gone.display()));
    let file = dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert_eq!(err(&file), format!("K/V directory {}: is not a directory", file.display()));
    let e = KvTier::disk(&dir, 4096, IoMode::Pread).open(2, 2, f).err().unwrap().to_string();
    assert!(e.contains("--host-kv-limit 4096 is too small"), "{e}");
}

#[test]
fn a_full_disk_is_an_error_and_everything_before_stays_readable() {
    let Some(mnt) = common::tmpfs(&tmpdir("full"), "full", "4m") else { return };
    for io in [IoMode::Uring, IoMode::Pread] {
        let f = BlockFormat::STANDARD;
        // 1 MB of RAM cache (128 pages) over a 4 MB disk: 2 layers x 2 heads x 8 KB = 32 KB per group.
        let mut s = KvTier::disk(&mnt.0, 1 << 20, io).open(2, 2, f).unwrap().unwrap();
        let mut m = Model { heads: 2, d: 128, k: vec![Vec::new(); 2], v: vec![Vec::new(); 2] };
        let mut err = None;
        'fill: for g in 0..1000 {
            for l in 0..2 {
                let k = values(GROUP * 256, (g * 2 + l) as u64, Elem::Bf16);
                let v = values(GROUP * 256, (g * 2 + l) as u64 ^ 77, Elem::Bf16);
                // The rows are stored in RAM before the batch write that fails: they count as written.
                let r = s.append(l, g * GROUP, &k, &v);
                m.k[l].extend_from_slice(&k);
                m.v[l].extend_from_slice(&v);
                if let Err(e) = r {
                    err = Some(e);
                    break 'fill;
                }
            }
        }
        let e = err.expect("a 4 MB tmpfs fills up").to_string();
        let file = disk(&s).page_file().display().to_string();
        assert!(e.starts_with(&format!("disk full: writing K/V page file {file} at offset ")), "{io}: {e}");
        assert!(e.contains("No space left on device") || e.contains("accepted only"), "{io}: {e}");
        // Everything stored reads back right: what is on disk and what stayed dirty in RAM.
        for l in 0..2 {
            for h in 0..2 {
                let all: Vec<usize> = (0..m.len(l).div_ceil(GROUP)).collect();
                check_read(&mut s, &m, l, h, &all).unwrap_or_else(|e| panic!("{io}: after disk full: {e}"));
            }
        }
        // A later flush reports the same condition.
        assert!(s.flush().unwrap_err().to_string().starts_with("disk full"));
        drop(s);
        assert_eq!(std::fs::read_dir(&mnt.0).unwrap().count(), 0, "the page file is removed");
    }
}

#[test]
fn a_read_only_directory_is_an_error() {
    let f = BlockFormat::STANDARD;
    let dir;
    let _mount;
    // Root ignores permission bits: a read-only tmpfs then; otherwise a directory without write permission.
    if is_root() {
        let Some(m) = common::tmpfs(&tmpdir("ro"), "ro", "1m") else { return };
        let st = Command::new("mount").args(["-o", "remount,ro"]).arg(&m.0).status();
        if !st.is_ok_and(|s| s.success()) {
            eprintln!("SKIP read-only directory: cannot remount the tmpfs read-only");
            return;
        }
        dir = m.0.clone();
        _mount = Some(m);
    } else {
        use std::os::unix::fs::PermissionsExt;
        dir = tmpdir("ro");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        _mount = None;
    }
    let e = KvTier::disk(&dir, 1 << 20, IoMode::Uring).open(2, 2, f).err().unwrap().to_string();
    let prefix = format!("K/V directory {}: ", dir.display());
    assert!(e.starts_with(&prefix), "{e}");
    assert!(
        e.contains("is on a read-only file system: cannot create the page file")
            || e.contains("is not writable (permission denied): cannot create the page file"),
        "{e}"
    );
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

#[test]
fn reads_bigger_than_the_cache_go_in_rounds() {
    // 12 groups of each (layer, head) = 48 pages through a cache of 13 pages: reads of 12 evicted groups need
    // several rounds of at most the free slots.
    let dir = tmpdir("rounds");
    let (mut s, m) = filled(&dir, 13, 12, IoMode::Uring);
    let all: Vec<usize> = (0..12).collect();
    for l in 0..2 {
        for h in 0..2 {
            let (hits, misses) = check_read(&mut s, &m, l, h, &all).unwrap();
            assert_eq!(hits + misses, 12);
        }
    }
    assert!(s.stats().misses >= 24, "{:?}", s.stats());
    let (out, _) = evicted_and_resident(&s, 12);
    let e = s.read_selection(&[(0, 0, out[0]), (0, 0, out[0])], &mut |_, _, _, _| {}).unwrap_err().to_string();
    assert!(e.contains("is selected twice"), "{e}");
    let _ = DiskConfig::default();
}

/// Host memory whose "device address" is its host address: what mapped pinned memory is under unified addressing,
/// so that the device path of the disk tier (the GPU's appends and gathers through block addresses) runs here with
/// the host standing in for the kernels.
struct IdentityMapped;

impl hga::kv::ExtentMemory for IdentityMapped {
    fn name(&self) -> &'static str {
        "identity-mapped heap"
    }
    fn alloc(&self, bytes: usize) -> std::io::Result<hga::kv::Extent> {
        let layout = std::alloc::Layout::from_size_align(bytes.max(1), 4096).unwrap();
        // SAFETY: a non-zero layout; freed with the same layout.
        let p = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).expect("allocation");
        let free = Box::new(move |p: std::ptr::NonNull<u8>, _| unsafe { std::alloc::dealloc(p.as_ptr(), layout) });
        // SAFETY: `p` holds `bytes` bytes until `free` runs.
        Ok(unsafe { hga::kv::Extent::from_raw(p, bytes, p.as_ptr() as u64, free) })
    }
}

/// The disk tier's device path: a prompt stored as raw rows (`append_raw`, as the GPU prefill hands a layer's
/// K/V over), then decode steps whose rows are written through the block addresses `append_device` returns (as
/// the append kernel does), and random selections made resident by `device_blocks`, whose addresses must hold
/// exactly the rows written, bit for bit, while a RAM cache of a few pages evicts to disk and reads back.
#[test]
fn the_device_path_stores_and_serves_what_was_written() {
    let dir = tmpdir("device-path");
    let (layers, heads) = (2usize, 2usize);
    let f = BlockFormat::STANDARD;
    let cfg = DiskConfig { dir: dir.clone(), cache_bytes: 40 * 8192, slots_per_extent: 8, ..DiskConfig::default() };
    let mut s = DiskStore::open(IdentityMapped, layers, heads, f, cfg).unwrap();
    // model[l][h][pos] = (K row, V row) bytes.
    let mut model = vec![vec![Vec::<(Vec<u8>, Vec<u8>)>::new(); heads]; layers];
    let row = |l: usize, h: usize, p: usize, kv: u64| -> Vec<u8> {
        let vals = values(128, ((l * 7 + h) * 100_000 + p) as u64 * 2 + kv, Elem::Bf16);
        vals.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect()
    };
    let n0 = 100;
    for (l, heads_l) in model.iter_mut().enumerate() {
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for (h, rows) in heads_l.iter_mut().enumerate() {
            for p in 0..n0 {
                let (kr, vr) = (row(l, h, p, 0), row(l, h, p, 1));
                k.extend_from_slice(&kr);
                v.extend_from_slice(&vr);
                rows.push((kr, vr));
            }
        }
        s.append_raw(l, 0, n0, n0, &k, &v).unwrap();
    }
    let mut rng = 12345u64;
    let mut next = |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut served = 0;
    for pos in n0..n0 + 70 {
        for (l, heads_l) in model.iter_mut().enumerate() {
            let ptrs = s.append_device(l, pos).unwrap();
            for (h, &blk) in ptrs.iter().enumerate() {
                let (kr, vr) = (row(l, h, pos, 0), row(l, h, pos, 1));
                let r = pos % GROUP;
                // SAFETY: `blk` is the host address of a resident 8 KB block (identity mapping).
                let b = unsafe { std::slice::from_raw_parts_mut(blk as *mut u8, f.block_bytes()) };
                b[f.k_row(r)].copy_from_slice(&kr);
                b[f.v_row(r)].copy_from_slice(&vr);
                heads_l[h].push((kr, vr));
            }
        }
        // A step's selection: distinct closed groups of random (layer, head).
        let closed = pos / GROUP;
        let mut sel = Vec::new();
        for _ in 0..12 {
            let t = (next(layers), next(heads), next(closed));
            if !sel.contains(&t) {
                sel.push(t);
            }
        }
        let blocks = s.device_blocks(&sel).unwrap();
        for (&(l, h, g), &blk) in sel.iter().zip(&blocks) {
            // SAFETY: as above; valid until the next call that allocates slots.
            let b = unsafe { std::slice::from_raw_parts(blk as *const u8, f.block_bytes()) };
            for r in 0..GROUP {
                let (kr, vr) = &model[l][h][g * GROUP + r];
                assert!(&b[f.k_row(r)] == kr.as_slice(), "pos {pos}: K of layer {l} head {h} group {g} row {r}");
                assert!(&b[f.v_row(r)] == vr.as_slice(), "pos {pos}: V of layer {l} head {h} group {g} row {r}");
            }
            served += 1;
        }
    }
    let st = s.stats();
    assert!(st.evictions > 0 && st.bytes_read > 0 && st.bytes_written > 0, "the cache must evict and re-read: {st:?}");
    assert!(served > 500);
    // Too small a cache for one selection is an error naming the limit, not a wrong block.
    let all: Vec<(usize, usize, usize)> =
        (0..layers).flat_map(|l| (0..heads).flat_map(move |h| (0..10).map(move |g| (l, h, g)))).collect();
    let e = s.device_blocks(&all).unwrap_err().to_string();
    assert!(e.contains("--host-kv-limit"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
