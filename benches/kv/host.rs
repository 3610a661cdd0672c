//! Host and disk tier benchmark rows (CPU only; they run on any machine).
//!
//! 1. **Disk tier misses served from disk** vs the anchor, raw O_DIRECT random reads of the same page file at the
//!    same offsets (same bytes, same batches) in the same run, for both io modes. The shape is Qwen3-30B-A3B's (48
//!    layers x 4 KV heads, 8 KB group blocks); a history of `HGA_KV_BENCH_MB` (default 256) MB is written to a page
//!    file in `HGA_KV_BENCH_DIR` (default the temp dir), then each step selects 3% of the groups of every (layer,
//!    KV head) at random and reads them through a RAM cache of 16 MB (nearly all misses). Store and anchor runs
//!    alternate; medians of the steps.
//! 2. **Append throughput**: decode-style appends (one token over every layer) into the host arena and into the
//!    disk tier (closed groups written in batches), and prefill-style appends (1024 tokens per layer call).
use std::time::Instant;

use hga::kv::arena::{BlockFormat, GROUP};
use hga::kv::disk::{page_checksum, raw_reads, DiskConfig, DiskStore};
use hga::kv::store::IoMode;
use hga::kv::{HeapMemory, KvTier};

const LAYERS: usize = 48;
const HEADS: usize = 4;
const D: usize = 128;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// bf16-exact values (the store refuses to round).
fn rows(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            half::bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_f32()
        })
        .collect()
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

pub fn run() {
    let dir = std::env::var("HGA_KV_BENCH_DIR").map(Into::into).unwrap_or_else(|_| std::env::temp_dir());
    let mb: usize = std::env::var("HGA_KV_BENCH_MB").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let f = BlockFormat::STANDARD;
    let w = HEADS * D;
    println!(
        "kv host/disk tiers: {LAYERS} layers x {HEADS} KV heads x head_dim {D} (bf16 group blocks of 8 KB), dir {}",
        dir.display()
    );

    // ---- append throughput ----
    let tokens = 2048;
    let k1 = rows(w, 1);
    let v1 = rows(w, 2);
    let token_bytes = (LAYERS * 2 * w * 2) as f64;
    let mut append_rows = Vec::new();
    for (name, tier) in [
        ("host arena", KvTier::host()),
        ("disk tier (uring)", KvTier::disk(&dir, 64 << 20, IoMode::Uring)),
        ("disk tier (pread)", KvTier::disk(&dir, 64 << 20, IoMode::Pread)),
    ] {
        let mut s = tier.open(LAYERS, HEADS, f).unwrap().unwrap();
        let t = Instant::now();
        for p in 0..tokens {
            for l in 0..LAYERS {
                s.append(l, p, &k1, &v1).unwrap();
            }
        }
        s.flush().unwrap();
        let dt = t.elapsed().as_secs_f64();
        let st = s.stats();
        append_rows.push((
            name,
            "decode (1 token x 48 layers)",
            tokens as f64 / dt,
            token_bytes * tokens as f64 / dt / 1e9,
            st.bytes_written,
        ));
        if tier.kind == hga::kv::store::TierKind::Host {
            // Again over the same (now touched) extents: the cost without first-touch page faults.
            let t = Instant::now();
            for p in 0..tokens {
                for l in 0..LAYERS {
                    s.append(l, p, &k1, &v1).unwrap();
                }
            }
            let dt = t.elapsed().as_secs_f64();
            append_rows.push((
                name,
                "decode, extents already touched",
                tokens as f64 / dt,
                token_bytes * tokens as f64 / dt / 1e9,
                0,
            ));
        }
        drop(s);
        let mut s = tier.open(LAYERS, HEADS, f).unwrap().unwrap();
        let kb = rows(1024 * w, 3);
        let vb = rows(1024 * w, 4);
        let t = Instant::now();
        for c in 0..tokens / 1024 {
            for l in 0..LAYERS {
                s.append(l, c * 1024, &kb, &vb).unwrap();
            }
        }
        s.flush().unwrap();
        let dt = t.elapsed().as_secs_f64();
        append_rows.push((
            name,
            "prefill (1024 tokens per layer call)",
            tokens as f64 / dt,
            token_bytes * tokens as f64 / dt / 1e9,
            s.stats().bytes_written,
        ));
    }
    println!("\nappend throughput ({tokens} tokens, {:.1} KB of K/V per token):", token_bytes / 1024.0);
    println!("| tier | appends | tokens/s | GB/s of K/V | bytes written to disk |");
    println!("|---|---|---|---|---|");
    for (n, how, tps, gbs, wr) in &append_rows {
        println!("| {n} | {how} | {tps:.0} | {gbs:.2} | {:.1} MB |", *wr as f64 / 1e6);
    }

    // ---- the page checksum ----
    let buf = rows(64 << 18, 9); // 64 MiB of f32
    let bytes: &[u8] = bytemuck::cast_slice(&buf);
    let mut t_crc = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let mut x = 0u32;
        for page in bytes.chunks_exact(f.block_bytes()) {
            x ^= page_checksum(page);
        }
        std::hint::black_box(x);
        t_crc.push(bytes.len() as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    println!(
        "
page checksum (crc32c of 8 KB pages, 64 MiB, median of 5): {:.1} GB/s",
        median(t_crc)
    );

    // ---- disk tier misses vs raw O_DIRECT reads ----
    let groups = (mb << 20) / (LAYERS * HEADS * f.block_bytes());
    let n_tok = groups * GROUP;
    let cfg = |io| DiskConfig { dir: dir.clone(), cache_bytes: 16 << 20, io, ..DiskConfig::default() };
    let mut stores: Vec<(IoMode, DiskStore<HeapMemory>)> = Vec::new();
    let t = Instant::now();
    let mut first = DiskStore::open(HeapMemory, LAYERS, HEADS, f, cfg(IoMode::Uring)).unwrap();
    for l in 0..LAYERS {
        for c in (0..n_tok).step_by(1024) {
            let n = 1024.min(n_tok - c);
            first.append(l, c, &rows(n * w, (l * 7 + c) as u64), &rows(n * w, (l * 11 + c) as u64)).unwrap();
        }
    }
    first.flush().unwrap();
    let write_s = t.elapsed().as_secs_f64();
    println!(
        "\ndisk tier reads: history of {n_tok} tokens ({} MB of pages) written in {write_s:.1} s ({:.2} GB/s), O_DIRECT: {}",
        first.stats().bytes_written / 1_000_000,
        first.stats().bytes_written as f64 / write_s / 1e9,
        first.is_direct()
    );
    // The pread store reads the same page file: a second store over it is not possible (each store owns its file),
    // so the pread measurement uses a second store with the same history.
    let mut second = DiskStore::open(HeapMemory, LAYERS, HEADS, f, cfg(IoMode::Pread)).unwrap();
    for l in 0..LAYERS {
        for c in (0..n_tok).step_by(1024) {
            let n = 1024.min(n_tok - c);
            second.append(l, c, &rows(n * w, (l * 7 + c) as u64), &rows(n * w, (l * 11 + c) as u64)).unwrap();
        }
    }
    second.flush().unwrap();
    stores.push((IoMode::Uring, first));
    stores.push((IoMode::Pread, second));

    let per_head = (groups * 3).div_ceil(100).max(1);
    let steps = 12;
    let mut rng = Rng(0x5EED_1234);
    let mut sels: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    for _ in 0..steps + 2 {
        let mut sel = Vec::new();
        for l in 0..LAYERS {
            for h in 0..HEADS {
                let mut gs: Vec<usize> = Vec::new();
                while gs.len() < per_head {
                    let g = rng.below(groups);
                    if !gs.contains(&g) {
                        gs.push(g);
                    }
                }
                sel.extend(gs.into_iter().map(|g| (l, h, g)));
            }
        }
        sels.push(sel);
    }
    let pb = f.block_bytes();
    println!(
        "each step: {per_head} of {groups} groups per (layer, KV head) = {} pages ({:.1} MB), RAM cache 16 MB; {steps} steps after 2 warm-up",
        sels[0].len(),
        (sels[0].len() * pb) as f64 / 1e6
    );
    println!(
        "| io | store: misses per step | store GB/s (misses from disk) | raw O_DIRECT GB/s, same offsets | ratio |"
    );
    println!("|---|---|---|---|---|");
    let mut best_raw = 0f64;
    let mut results = Vec::new();
    for (io, store) in stores.iter_mut() {
        let path = store.page_file().to_path_buf();
        if store.io_mode() != *io {
            println!("  ({io} is not available here: the store runs {}, so the row is not {io})", store.io_mode());
        }
        let (mut st_gbs, mut raw_gbs, mut miss) = (Vec::new(), Vec::new(), Vec::new());
        for (i, sel) in sels.iter().enumerate() {
            // The misses of this step (the anchor reads exactly these pages).
            let offsets: Vec<u64> = sel
                .iter()
                .filter(|&&(l, h, g)| !store.is_resident(l, h, g))
                .map(|&(l, h, g)| store.page_offset(l, h, g))
                .collect();
            // Alternate which goes first, so neither gains from the other warming the device.
            let raw_first = i % 2 == 1;
            let raw = if raw_first { raw_reads(&path, &offsets, pb, *io, 16, 64).unwrap() } else { 0.0 };
            let before = store.stats();
            let t = Instant::now();
            let mut sum = 0u64;
            store.read_selection(sel, &mut |_, _, _, b| sum = sum.wrapping_add(b[17] as u64)).unwrap();
            let dt = t.elapsed().as_secs_f64();
            std::hint::black_box(sum);
            let m = store.stats().misses - before.misses;
            assert_eq!(m as usize, offsets.len());
            let raw = if raw_first { raw } else { raw_reads(&path, &offsets, pb, *io, 16, 64).unwrap() };
            if i >= 2 {
                st_gbs.push((m as usize * pb) as f64 / dt / 1e9);
                raw_gbs.push((offsets.len() * pb) as f64 / raw / 1e9);
                miss.push(m as f64);
            }
        }
        let (s, r) = (median(st_gbs), median(raw_gbs));
        best_raw = best_raw.max(r);
        results.push((*io, median(miss), s, r));
    }
    for (io, m, s, r) in &results {
        println!("| {io} | {m:.0} | {s:.3} | {r:.3} | {:.2}x (vs best raw {:.2}x) |", s / r, s / best_raw);
    }
}
