//! CPU references of the routing kernels (gpu-kernels/src/hga/route/), derived from the oracle `crate::hga`:
//! the same geometry (`hga::Geometry`), the same bound (`hga::bound_score`), the same log-sum-exp
//! (`hga::log_sum_exp`), normalization and GQA max (a NaN-ignoring max from -inf over the query rows), the same
//! top-k (`hga::top_k`: NaN as -inf, ties to the lower index), in f64. What differs from the oracle, on purpose, is
//! only what the GPU formats fix: keys are bf16 values, a sketch's estimate uses the stored f16 scale, and stage 2
//! enumerates the shortlisted groups in ascending group order (so exact ties go to the lower group, where the
//! oracle prefers the group of the better-ranked chunk).
use crate::hga::{bound_score, log_sum_exp, top_k, Budget, Geometry, HgaParams};
use crate::kernels::hga_route::RouteShape;
use half::{bf16, f16};

/// Chunk and group sizes of the GPU routing.
pub const CHUNK: usize = 64;
pub const GROUP: usize = 16;

/// host/src/hga's geometry of the block `b0 .. b0 + q_len` with the kernels' caps: n_g <= max_groups, n_c from the
/// capped n_g, <= max_kept (every chunk without a chunk stage).
pub fn geometry(s: &RouteShape, b0: usize) -> Geometry {
    let p = HgaParams {
        sink: s.sink,
        local: s.local,
        budget: s.budget,
        shortlist: if s.chunk_stage() { s.shortlist } else { f64::INFINITY },
        ..HgaParams::default()
    };
    let mut g = Geometry::new(&p, b0, s.q_len);
    let n_cand = g.end_chunk - g.first_chunk;
    if g.n_groups > s.max_groups {
        g.n_groups = s.max_groups;
        let want = (s.shortlist * (g.n_groups * GROUP) as f64 / CHUNK as f64).ceil();
        g.n_chunks = if want.is_finite() { (want as usize).min(n_cand) } else { n_cand };
    }
    if s.chunk_stage() {
        g.n_chunks = g.n_chunks.min(s.max_kept);
    } else {
        g.n_chunks = n_cand;
    }
    g
}

/// The summaries of one KV head's keys `[n][128]` (bf16) for the chunks `0 .. n / 64` and tokens `0 .. n`:
/// (min, max) bf16 [chunks][128] and (nibbles u8 [n][64], f16 scale bits [n]), bit for bit what
/// `hga_route_summary` writes (formats and rules in its doc header).
pub fn summaries(keys: &[bf16], n: usize) -> (Vec<bf16>, Vec<bf16>, Vec<u8>, Vec<u16>) {
    let d = 128;
    let nc = n / CHUNK;
    let mut mn = vec![bf16::ZERO; nc * d];
    let mut mx = vec![bf16::ZERO; nc * d];
    for c in 0..nc {
        for i in 0..d {
            let (mut a, mut b) = (f32::INFINITY, f32::NEG_INFINITY);
            for j in c * CHUNK..(c + 1) * CHUNK {
                let x = keys[j * d + i].to_f32();
                a = a.min(x);
                b = b.max(x);
            }
            mn[c * d + i] = bf16::from_f32(a);
            mx[c * d + i] = bf16::from_f32(b);
        }
    }
    let mut nib = vec![0u8; n * 64];
    let mut sc = vec![0u16; n];
    for j in 0..n {
        let (bytes, s) = sketch(&keys[j * d..(j + 1) * d]);
        nib[j * 64..(j + 1) * 64].copy_from_slice(&bytes);
        sc[j] = s;
    }
    (mn, mx, nib, sc)
}

/// The int4 sketch of one key (host/src/hga's `sketch4`: f32 scale max|k| / 7, f32 division, round half away from
/// zero, clamp to [-8, 7]): 64 bytes of nibbles and the f16 scale bits (NaN when the key has a NaN).
pub fn sketch(k: &[bf16]) -> ([u8; 64], u16) {
    let x: Vec<f32> = k.iter().map(|v| v.to_f32()).collect();
    let s = x.iter().fold(0f32, |m, v| m.max(v.abs())) / 7.0;
    let nan = x.iter().any(|v| v.is_nan());
    let mut out = [0u8; 64];
    for (i, v) in x.iter().enumerate() {
        let q = if s == 0.0 || (v / s).is_nan() { 0 } else { (v / s).round().clamp(-8.0, 7.0) as i32 };
        out[i / 2] |= ((q as u32 & 0xF) << (4 * (i % 2))) as u8;
    }
    (out, if nan { 0x7E00 } else { f16::from_f32(s).to_bits() })
}

/// The estimated key of a sketch: `n_d * f16 scale`.
pub fn sketch_key(nib: &[u8], scale: u16) -> Vec<f32> {
    let s = f16::from_bits(scale).to_f32();
    (0..128)
        .map(|i| {
            let q = ((nib[i / 2] >> (4 * (i % 2))) & 0xF) as i32;
            let q = if q >= 8 { q - 16 } else { q };
            q as f32 * s
        })
        .collect()
}

/// One KV head's inputs: its query rows (query-major), its bf16 keys `[n][128]` as f32 and its summaries.
pub struct HeadInputs<'a> {
    pub q_rows: Vec<&'a [f32]>,
    pub keys: &'a [f32],
    pub chunk_min: &'a [f32],
    pub chunk_max: &'a [f32],
    pub sketch: &'a [u8],
    pub scale: &'a [u16],
}

/// What the reference routing of one KV head gives.
#[derive(Clone, Debug, Default)]
pub struct HeadRoute {
    pub base: Vec<f64>,
    /// Chunk candidates `first_chunk ..`: scores.
    pub chunk_scores: Vec<f64>,
    /// Kept chunks (absolute, ascending).
    pub kept: Vec<usize>,
    /// Stage-2 candidates (absolute groups, ascending) and their scores.
    pub cand: Vec<usize>,
    pub group_scores: Vec<f64>,
    /// Selected groups (absolute, ascending).
    pub selected: Vec<usize>,
}

/// Stage 1 and stage 2 of one KV head as the kernels compute them (see the module docs).
pub fn route_head(s: &RouteShape, b0: usize, x: &HeadInputs) -> HeadRoute {
    let g = geometry(s, b0);
    let scale = 1.0 / (128f64).sqrt();
    let key = |j: usize| &x.keys[j * 128..(j + 1) * 128];
    let base: Vec<f64> = x
        .q_rows
        .iter()
        .map(|q| {
            if s.normalize {
                let v: Vec<f64> = g.always().map(|j| dot(q, key(j)) * scale).collect();
                log_sum_exp(&v)
            } else {
                0.0
            }
        })
        .collect();
    let combine = |f: &dyn Fn(usize) -> f64| -> f64 {
        (0..x.q_rows.len()).map(|r| f(r) - base[r]).fold(f64::NEG_INFINITY, f64::max)
    };
    let mut out = HeadRoute { base: base.clone(), ..Default::default() };
    if g.n_groups == 0 {
        return out;
    }
    let gpc = CHUNK / GROUP;
    if s.chunk_stage() {
        out.chunk_scores = (g.first_chunk..g.end_chunk)
            .map(|c| {
                let (mn, mx) = (&x.chunk_min[c * 128..(c + 1) * 128], &x.chunk_max[c * 128..(c + 1) * 128]);
                combine(&|r| bound_score(x.q_rows[r], mn, mx) * scale)
            })
            .collect();
        out.kept = top_k(&out.chunk_scores, g.n_chunks).into_iter().map(|i| g.first_chunk + i).collect();
        out.kept.sort_unstable();
        out.cand = out.kept.iter().flat_map(|&c| c * gpc..(c + 1) * gpc).collect();
    } else {
        out.cand = (g.first_chunk * gpc..g.end_chunk * gpc).collect();
    }
    out.group_scores = out
        .cand
        .iter()
        .map(|&gi| {
            let ks: Vec<Vec<f32>> = (gi * GROUP..(gi + 1) * GROUP)
                .map(|j| sketch_key(&x.sketch[j * 64..(j + 1) * 64], x.scale[j]))
                .collect();
            combine(&|r| {
                let v: Vec<f64> = ks.iter().map(|k| dot(x.q_rows[r], k) * scale).collect();
                log_sum_exp(&v)
            })
        })
        .collect();
    out.selected = top_k(&out.group_scores, g.n_groups).into_iter().map(|i| out.cand[i]).collect();
    out.selected.sort_unstable();
    out
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// A default-routing shape (host/src/hga's default) with the budget given.
pub fn default_shape(n_heads: usize, n_kv: usize, q_len: usize, max_ctx: usize, budget: Budget) -> RouteShape {
    RouteShape::default_for(n_heads, n_kv, q_len, max_ctx, budget)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The reference picks what the oracle (`hga::route_unit`) picks on the same bf16 keys, up to ties within
    /// 2e-3 of the reference scores (f16 sketch scales against the oracle's f32 ones), and its sketches decode
    /// to what the oracle's f32-scale sketch gives up to the f16 rounding of the scale.
    #[test]
    fn reference_agrees_with_oracle() {
        let mut rng = StdRng::seed_from_u64(5);
        let (rows, n) = (8usize, 3001usize);
        for budget in [Budget::Fraction(0.2), Budget::Fraction(0.4)] {
            let off: Vec<f32> = (0..128).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let kb: Vec<bf16> =
                (0..n * 128).map(|i| bf16::from_f32(off[i % 128] + rng.gen_range(-1.5f32..1.5))).collect();
            let kf: Vec<f32> = kb.iter().map(|v| v.to_f32()).collect();
            let q: Vec<f32> = (0..rows * 128).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
            let (mn, mx, sk, sc) = summaries(&kb, n);
            let (mnf, mxf): (Vec<f32>, Vec<f32>) =
                (mn.iter().map(|v| v.to_f32()).collect(), mx.iter().map(|v| v.to_f32()).collect());
            let q_rows: Vec<&[f32]> = (0..rows).map(|r| &q[r * 128..(r + 1) * 128]).collect();
            let shape = default_shape(rows, 1, 1, n, budget);
            let b0 = n - 1;
            let x = HeadInputs {
                q_rows: q_rows.clone(),
                keys: &kf,
                chunk_min: &mnf,
                chunk_max: &mxf,
                sketch: &sk,
                scale: &sc,
            };
            let want = route_head(&shape, b0, &x);
            let p = HgaParams { budget, ..HgaParams::default() };
            let (kept, sel) = crate::hga::route_unit(&p, b0, 1, &kf, 128, 0, 128, &q_rows, rows, 1.0 / 128f64.sqrt());
            assert!(!sel.is_empty());
            assert_eq!(kept.len(), want.kept.len());
            assert_eq!(sel.len(), want.selected.len());
            let g = geometry(&shape, b0);
            let cs = |c: usize| want.chunk_scores[c - g.first_chunk];
            let lo = want.kept.iter().map(|&c| cs(c)).fold(f64::INFINITY, f64::min);
            for &c in kept.iter().filter(|c| !want.kept.contains(c)) {
                assert!(lo - cs(c) <= 2e-3, "chunk {c}: gap {}", lo - cs(c));
            }
            if kept == want.kept {
                let gs = |gi: usize| want.group_scores[want.cand.iter().position(|&x| x == gi).unwrap()];
                let lo = want.selected.iter().map(|&gi| gs(gi)).fold(f64::INFINITY, f64::min);
                for &gi in sel.iter().filter(|g| !want.selected.contains(g)) {
                    assert!(lo - gs(gi) <= 2e-3, "group {gi}: gap {}", lo - gs(gi));
                }
            }
        }
    }

    #[test]
    fn sketch_rules() {
        // Round half away from zero, clamp, f32 division; all-zero key; NaN scale for a NaN key.
        let mut k = [bf16::ZERO; 128];
        k[0] = bf16::from_f32(7.0);
        k[1] = bf16::from_f32(-7.0);
        k[2] = bf16::from_f32(0.5);
        k[3] = bf16::from_f32(-0.5);
        k[4] = bf16::from_f32(1.5);
        let (b, s) = sketch(&k);
        assert_eq!(f16::from_bits(s).to_f32(), 1.0);
        assert_eq!(b[0], 0x7 | 0x9 << 4); // 7, -7
        assert_eq!(b[1], 0x1 | 0xF << 4); // 0.5 -> 1, -0.5 -> -1
        assert_eq!(b[2], 0x2); // 1.5 -> 2
        assert_eq!(sketch_key(&b, s)[1], -7.0);
        assert_eq!(sketch(&[bf16::ZERO; 128]), ([0u8; 64], 0));
        k[5] = bf16::from_f32(f32::NAN);
        assert!(f16::from_bits(sketch(&k).1).is_nan());
    }
}
