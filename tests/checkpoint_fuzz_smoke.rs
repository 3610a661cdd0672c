//! Fuzz smoke without cargo-fuzz: the seeds of `fuzz/` must validate, and thousands of mutated inputs must go through
//! `checkpoint::fuzz_entry` (config + index + safetensors header parsing and tensor validation) without a panic.
//! `HGA_FUZZ_ITERS` sets the number of mutated inputs (default 3000); `HGA_FUZZ_WRITE_SEEDS=DIR` also writes the seeds
//! there (scripts/fuzz-smoke uses it to seed the cargo-fuzz corpus).
use hga::model::checkpoint::{fuzz_entry, fuzz_seeds};

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

const TOKENS: &[&[u8]] = &[
    b"0",
    b"1",
    b"-1",
    b"128",
    b"4294967296",
    b"18446744073709551615",
    b"1e308",
    b"-0.0",
    b"NaN",
    b"null",
    b"true",
    b"\"\"",
    b"{}",
    b"[]",
    b"[0,0]",
    b"\"F8_E4M3\"",
    b"\"BF16\"",
    b"\"I64\"",
    b",",
    b":",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"..",
    b"/",
    b"_scale_inv",
    b"model.layers.0.",
    b"experts.2.",
    b"\xff",
];

fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len().max(1);
        match rng.below(8) {
            0 => {
                let i = rng.below(len);
                if i < v.len() {
                    v[i] ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(len);
                v.insert(i.min(v.len()), rng.next() as u8);
            }
            2 => {
                let i = rng.below(len);
                let n = rng.below(16).min(v.len().saturating_sub(i));
                v.drain(i..i + n);
            }
            3 => {
                // Replace a digit by another digit (shapes, offsets, sizes).
                let digits: Vec<usize> =
                    v.iter().enumerate().filter(|(_, b)| b.is_ascii_digit()).map(|(i, _)| i).collect();
                if !digits.is_empty() {
                    let i = digits[rng.below(digits.len())];
                    v[i] = b'0' + rng.below(10) as u8;
                }
            }
            4 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let i = rng.below(len).min(v.len());
                v.splice(i..i, t.iter().copied());
            }
            5 => {
                // Splice a piece of another seed.
                let s = &seeds[rng.below(seeds.len())];
                let a = rng.below(s.len());
                let b = (a + rng.below(64)).min(s.len());
                let i = rng.below(len).min(v.len());
                v.splice(i..i, s[a..b].iter().copied());
            }
            6 => {
                // Duplicate a range.
                let a = rng.below(len).min(v.len());
                let b = (a + rng.below(32)).min(v.len());
                let piece = v[a..b].to_vec();
                let i = rng.below(len).min(v.len());
                v.splice(i..i, piece);
            }
            _ => {
                v.truncate(rng.below(len));
            }
        }
    }
    v
}

#[test]
fn fuzz_smoke() {
    let seeds = fuzz_seeds();
    for (i, s) in seeds.iter().enumerate() {
        assert!(fuzz_entry(s), "seed {i} must be a valid checkpoint");
    }
    if let Ok(dir) = std::env::var("HGA_FUZZ_WRITE_SEEDS") {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(std::path::Path::new(&dir).join(format!("seed-{i}")), s).unwrap();
        }
    }
    let iters: usize = std::env::var("HGA_FUZZ_ITERS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let mut rng = Rng(0x5EED);
    let mut valid = 0;
    let t = std::time::Instant::now();
    for k in 0..iters {
        let base = &seeds[k % seeds.len()];
        let input = mutate(&mut rng, base, &seeds);
        if fuzz_entry(&input) {
            valid += 1;
        }
    }
    println!(
        "fuzz smoke: {} seeds valid; {iters} mutated inputs through checkpoint::fuzz_entry in {:.1} s, {valid} still valid, no panic",
        seeds.len(),
        t.elapsed().as_secs_f64()
    );
}
