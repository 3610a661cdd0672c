//! Fuzz smoke of the disk tier's reader without cargo-fuzz: the seeds of `hga_host::kv::disk::fuzz_seeds` (a page
//! table and its page file) verify, and thousands of mutated inputs go through `disk::fuzz_entry` without a panic,
//! every refusal being a K/V error that says what is wrong (and, for a page, names the file and the offset).
//! `HGA_FUZZ_ITERS` sets the number of mutated inputs (default 3000); `HGA_KV_FUZZ_WRITE_SEEDS=DIR` also writes the
//! seeds there (scripts/fuzz-smoke uses it to seed the cargo-fuzz corpus of fuzz/fuzz_targets/kv.rs).
use hga::kv::disk::{fuzz_entry, fuzz_seeds};
use hga::kv::KvError;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The length of the table part of an input (its 4-byte prefix).
fn table_len(v: &[u8]) -> usize {
    if v.len() < 4 {
        return 0;
    }
    (u32::from_le_bytes([v[0], v[1], v[2], v[3]]) as usize).min(v.len() - 4)
}

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(3) {
        let len = v.len().max(1);
        let tl = table_len(&v);
        match rng.below(9) {
            // A bit anywhere (mostly in the pages: a checksum must catch it).
            0 | 1 => {
                let i = rng.below(len);
                if i < v.len() {
                    v[i] ^= 1 << rng.below(8);
                }
            }
            // A byte of the table (header fields, flags, crcs).
            2 | 3 => {
                if tl > 0 {
                    let i = 4 + rng.below(tl);
                    v[i] = match rng.below(4) {
                        0 => 0,
                        1 => 0xFF,
                        2 => v[i].wrapping_add(1),
                        _ => rng.next() as u8,
                    };
                }
            }
            // A header field set to an edge value.
            4 => {
                if tl >= 36 {
                    let field = 4 + 8 + 4 * rng.below(6);
                    let val: u32 = [0, 1, 2, 4096, 4097, u32::MAX][rng.below(6)];
                    v[field..field + 4].copy_from_slice(&val.to_le_bytes());
                }
            }
            // The length prefix.
            5 => {
                let n = [0u32, 3, tl as u32 + 1, tl.saturating_sub(8) as u32, u32::MAX][rng.below(5)];
                if v.len() >= 4 {
                    v[..4].copy_from_slice(&n.to_le_bytes());
                }
            }
            // Truncate (the page file, or into the table).
            6 => v.truncate(rng.below(len)),
            // Insert or delete bytes.
            7 => {
                let i = rng.below(len).min(v.len());
                v.splice(i..i, (0..1 + rng.below(16)).map(|_| rng.next() as u8));
            }
            _ => {
                let i = rng.below(len);
                let n = rng.below(4096).min(v.len().saturating_sub(i));
                v.drain(i..i + n);
            }
        }
    }
    v
}

#[test]
fn kv_fuzz_smoke() {
    let seeds = fuzz_seeds();
    for (i, s) in seeds.iter().enumerate() {
        assert!(fuzz_entry(s).is_ok_and(|n| n > 0), "seed {i} must verify");
    }
    if let Ok(dir) = std::env::var("HGA_KV_FUZZ_WRITE_SEEDS") {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(std::path::Path::new(&dir).join(format!("seed-{i}")), s).unwrap();
        }
    }
    let iters: usize = std::env::var("HGA_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let mut rng = Rng(0x4B56);
    let (mut valid, mut corrupt, mut truncated, mut table) = (0, 0, 0, 0);
    let t = std::time::Instant::now();
    for k in 0..iters {
        let input = mutate(&mut rng, &seeds[k % seeds.len()]);
        match fuzz_entry(&input) {
            Ok(_) => valid += 1,
            Err(e) => {
                let msg = e.to_string();
                match e {
                    KvError::Corrupt { .. } => corrupt += 1,
                    KvError::Truncated { .. } => truncated += 1,
                    KvError::Table(_) => table += 1,
                    other => panic!("unexpected error kind {other:?}"),
                }
                if msg.contains("page file") {
                    assert!(msg.contains("fuzz.pages") && msg.contains("offset"), "{msg}");
                }
                assert!(msg.len() > 20, "an error too terse to be clear: {msg:?}");
            }
        }
    }
    println!(
        "kv fuzz smoke: {} seeds valid; {iters} mutated inputs through kv::disk::fuzz_entry in {:.1} s: {valid} \
         still valid, {corrupt} checksum errors, {truncated} truncations, {table} page-table errors, no panic",
        seeds.len(),
        t.elapsed().as_secs_f64()
    );
    assert!(corrupt > 0 && truncated > 0 && table > 0, "the mutations must reach every check");
}
