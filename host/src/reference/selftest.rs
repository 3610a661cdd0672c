//! Inputs and expected outputs of the self-test kernels (`gpu-kernels/src/selftest/`): what each building block
//! must produce, computed independently on the CPU. [`input`] draws fresh random inputs; [`check`] compares a
//! kernel's output bytes with the expectation and explains the first mismatch.
use crate::kernels::SelfTest;
use gpu_kernels::num::{bf16_to_f32, e4m3_to_f32, f32_to_bf16, f32_to_e4m3};
use rand::Rng;

/// A valid `n` for test `t` drawn from `rng` (random within the kernel's limits, edge values included).
pub fn random_n(t: SelfTest, rng: &mut impl Rng) -> usize {
    match t {
        SelfTest::Smem => {
            *[1, 2, 31, 32, 33, 127, 1024].get(rng.gen_range(0..7)).unwrap_or(&1).max(&rng.gen_range(1..=1024))
        }
        SelfTest::Warp => 32 * rng.gen_range(1..=8),
        SelfTest::Math | SelfTest::Convert => rng.gen_range(1..=1000),
        SelfTest::Ldmatrix => 1,
        SelfTest::MmaBf16 | SelfTest::MmaE4m3 => rng.gen_range(1..=7),
        SelfTest::CpAsync => rng.gen_range(1..=128),
    }
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn read_f32(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())
}
fn read_u32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())
}

/// A random f32 of varied magnitude (about 1e-3 .. 1e3, either sign).
fn varied(rng: &mut impl Rng) -> f32 {
    let m = 10f32.powf(rng.gen_range(-3.0..3.0));
    if rng.gen() {
        m
    } else {
        -m
    }
}

/// Fresh random input bytes for test `t` with size parameter `n`.
pub fn input(t: SelfTest, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    match t {
        SelfTest::Smem | SelfTest::Warp => f32s(&(0..n).map(|_| rng.gen_range(-10.0..10.0)).collect::<Vec<_>>()),
        SelfTest::Math => f32s(&(0..n).map(|_| varied(rng) / 10.0).collect::<Vec<_>>()),
        SelfTest::Convert => {
            // Mostly varied magnitudes, some beyond e4m3's range (saturation), some exact halfway points.
            let v: Vec<f32> = (0..n)
                .map(|i| match i % 5 {
                    0 => rng.gen_range(-600.0..600.0),
                    1 => e4m3_to_f32(rng.gen_range(0..0x7Eu8)) * 1.0625,
                    _ => varied(rng),
                })
                .collect();
            f32s(&v)
        }
        SelfTest::Ldmatrix => (0..512).map(|_| rng.gen()).collect(),
        SelfTest::MmaBf16 => (0..n)
            .flat_map(|_| {
                let mut b: Vec<u8> =
                    (0..384).flat_map(|_| f32_to_bf16(rng.gen_range(-2.0..2.0)).to_le_bytes()).collect();
                b.extend(f32s(&(0..128).map(|_| rng.gen_range(-4.0..4.0)).collect::<Vec<_>>()));
                b
            })
            .collect(),
        SelfTest::MmaE4m3 => (0..n)
            .flat_map(|_| {
                let mut b: Vec<u8> = (0..768).map(|_| f32_to_e4m3(rng.gen_range(-16.0..16.0))).collect();
                b.extend(f32s(&(0..128).map(|_| rng.gen_range(-4.0..4.0)).collect::<Vec<_>>()));
                b
            })
            .collect(),
        SelfTest::CpAsync => (0..16 * n).map(|_| rng.gen()).collect(),
    }
}

/// Relative error bound check of `got` against `want` (f64 reference): |got - want| <= tol * scale.
fn close(what: &str, i: usize, got: f32, want: f64, tol: f64, scale: f64) -> Result<(), String> {
    if got.is_nan() || (got as f64 - want).abs() > tol * scale {
        return Err(format!("{what}[{i}]: got {got}, expected {want} (tolerance {})", tol * scale));
    }
    Ok(())
}

fn exact_u32(what: &str, i: usize, got: u32, want: u32) -> Result<(), String> {
    if got != want {
        return Err(format!("{what}[{i}]: got {got:#010x}, expected {want:#010x}"));
    }
    Ok(())
}

/// Checks the output of self-test `t` for `input`. `Err` explains the first mismatch.
pub fn check(t: SelfTest, n: usize, input: &[u8], out: &[u8]) -> Result<(), String> {
    match t {
        SelfTest::Smem => {
            for i in 0..n {
                exact_u32("reversed", i, read_u32(out, i), read_u32(input, n - 1 - i))?;
                exact_u32("scaled", i, read_u32(out, n + i), (3.0 * read_f32(input, (i + 1) % n)).to_bits())?;
            }
        }
        SelfTest::Warp => {
            for w in 0..n / 32 {
                let v: Vec<f32> = (0..32).map(|l| read_f32(input, 32 * w + l)).collect();
                let sum: f64 = v.iter().map(|&x| x as f64).sum();
                let abs: f64 = v.iter().map(|&x| (x as f64).abs()).sum();
                let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for l in 0..32 {
                    let i = 32 * w + l;
                    close("warp_sum", i, read_f32(out, 5 * i), sum, 1e-6, abs)?;
                    exact_u32("warp_max", i, read_u32(out, 5 * i + 1), max.to_bits())?;
                    exact_u32("shfl_xor 5", i, read_u32(out, 5 * i + 2), v[l ^ 5].to_bits())?;
                    let down = if l + 3 < 32 { v[l + 3] } else { v[l] };
                    exact_u32("shfl_down 3", i, read_u32(out, 5 * i + 3), down.to_bits())?;
                    exact_u32("shfl_idx 7", i, read_u32(out, 5 * i + 4), v[7].to_bits())?;
                }
            }
        }
        SelfTest::Math => {
            // PTX ISA bounds: ex2.approx max rel. error 2^-22 (we allow 2^-21), lg2.approx abs. error 2^-22 near 1,
            // rcp.approx / rsqrt.approx about 1-2 ulp.
            for i in 0..n {
                let x = read_f32(input, i) as f64;
                let e = 2f64.powf(-21.0);
                close("ex2", i, read_f32(out, 4 * i), x.exp2(), e, x.exp2())?;
                close("lg2", i, read_f32(out, 4 * i + 1), x.abs().log2(), e, x.abs().log2().abs().max(1.0))?;
                close("rcp", i, read_f32(out, 4 * i + 2), 1.0 / x, e, 1.0 / x.abs())?;
                close("rsqrt", i, read_f32(out, 4 * i + 3), 1.0 / x.abs().sqrt(), e, 1.0 / x.abs().sqrt())?;
            }
        }
        SelfTest::Convert => {
            for i in 0..n {
                let x = read_f32(input, i);
                exact_u32("bf16", i, read_u32(out, 5 * i), f32_to_bf16(x) as u32)?;
                let e = f32_to_e4m3(x) as u32 | (f32_to_e4m3(-x / 3.0) as u32) << 8;
                exact_u32("e4m3x2", i, read_u32(out, 5 * i + 1), e)?;
                for (w, code) in [(2, i & 0xff), (3, (i * 7 + 3) & 0xff)] {
                    let want = e4m3_to_f32(code as u8);
                    let got = read_f32(out, 5 * i + w);
                    if want.is_nan() {
                        if !got.is_nan() {
                            return Err(format!("e4m3 decode of {code:#x}: got {got}, expected NaN"));
                        }
                    } else {
                        exact_u32("e4m3 decode", code, got.to_bits(), want.to_bits())?;
                    }
                }
                let b = f32_to_bf16(x) as u32 | (f32_to_bf16(2.0 * x) as u32) << 16;
                exact_u32("bf16x2", i, read_u32(out, 5 * i + 4), b)?;
            }
        }
        SelfTest::Ldmatrix => {
            // m[i][r][c]: element (r, c) of 8x8 matrix i = row 8i + r of the [32, 8] input.
            let m = |i: usize, r: usize, c: usize| {
                u16::from_le_bytes([input[2 * (64 * i + 8 * r + c)], input[2 * (64 * i + 8 * r + c) + 1]]) as u32
            };
            for lane in 0..32 {
                let (r, c) = (lane / 4, 2 * (lane % 4));
                let plain = |i| m(i, r, c) | m(i, r, c + 1) << 16;
                let trans = |i| m(i, c, r) | m(i, c + 1, r) << 16;
                let want: Vec<u32> = [0]
                    .iter()
                    .chain(&[0, 1])
                    .chain(&[0, 1, 2, 3])
                    .map(|&i| plain(i))
                    .chain([0].iter().chain(&[0, 1]).chain(&[0, 1, 2, 3]).map(|&i| trans(i)))
                    .collect();
                for (k, w) in want.iter().enumerate() {
                    exact_u32(&format!("lane {lane} word"), k, read_u32(out, 14 * lane + k), *w)?;
                }
            }
        }
        SelfTest::MmaBf16 | SelfTest::MmaE4m3 => {
            let (stride, kk, esz) = if t == SelfTest::MmaBf16 { (1280, 16, 2) } else { (1280, 32, 1) };
            for p in 0..n {
                let b = &input[p * stride..];
                let el = |off: usize| -> f64 {
                    if esz == 2 {
                        bf16_to_f32(u16::from_le_bytes([b[off], b[off + 1]])) as f64
                    } else {
                        e4m3_to_f32(b[off]) as f64
                    }
                };
                let (a_off, b_off, c_off) = (0, 16 * kk * esz, 16 * kk * esz + 8 * kk * esz);
                for r in 0..16 {
                    for c in 0..8 {
                        let cin = read_f32(&b[c_off..], r * 8 + c) as f64;
                        let mut acc = cin;
                        let mut abs = cin.abs();
                        for k in 0..kk {
                            let prod = el(a_off + (r * kk + k) * esz) * el(b_off + (c * kk + k) * esz);
                            acc += prod;
                            abs += prod.abs();
                        }
                        close(
                            "mma",
                            p * 128 + r * 8 + c,
                            read_f32(out, p * 128 + r * 8 + c),
                            acc,
                            1e-6,
                            abs.max(1e-30),
                        )?;
                    }
                }
            }
        }
        SelfTest::CpAsync => {
            if out != input {
                let i = out.iter().zip(input).position(|(a, b)| a != b).unwrap_or(0);
                return Err(format!(
                    "cp.async copy differs at byte {i}: got {:#04x}, expected {:#04x}",
                    out[i], input[i]
                ));
            }
        }
    }
    Ok(())
}
