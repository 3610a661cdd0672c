//! GPU-versus-reference checks of the routing kernels (`crate::reference::hga_route`): the summary kernel bit for
//! bit (min/max and sketches, prefill range and the decode "chunk just closed" form), and the two stages on random
//! keys: normalization, chunk and group scores within 1e-3 (f32 GPU arithmetic against f64), and the selections
//! checked as top-k sets (count, uniqueness, ascending order, range, padding, every chosen GPU score >= the k-th
//! GPU score) and against the reference (a different pick only where the reference scores of the two candidates
//! tie within the tolerance). NaN/Inf inputs: the selections must still be valid candidate sets. After every
//! launch the selects' first-level histograms (`RouteWorkspace::hist`) must be zero again; with stale histograms
//! (garbage left by a launch cut short) the results must be those of clean ones.
use super::Outcome;
use crate::hga::Budget;
use crate::kernels::hga_route::{
    hga_route, hga_route_summary, KeySource, RoutePos, RouteShape, RouteSummaries, RouteWorkspace, SummaryChunks,
};
use crate::reference::hga_route as r;
use crate::runtime::{Gpu, RuntimeError};
use gpu_kernels::params::ROUTE_HIST_BINS;
use half::bf16;
use rand::Rng;

/// Score tolerance (absolute, on scores of order 1-10).
const TOL: f64 = 2e-3;

/// Special values injected into the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    None,
    /// NaN in one query row.
    NanQ,
    /// NaN and +-Inf in some keys.
    NanInfK,
    /// Garbage in the workspace's select histograms before the launch (as a launch cut short would leave): the
    /// selects must fall back to full radix passes and give the clean results.
    StaleHist,
}

fn rand_keys(n: usize, rng: &mut impl Rng) -> Vec<bf16> {
    // Keys with a per-dimension offset (as real rotated keys have), so that chunk bounds differ.
    let off: Vec<f32> = (0..128).map(|_| rng.gen_range(-2.0..2.0)).collect();
    (0..n * 128).map(|i| bf16::from_f32(off[i % 128] + rng.gen_range(-1.5f32..1.5))).collect()
}

/// The summary kernel on `n` random tokens of `n_kv` KV heads, keys in the prefill layout [n][n_kv][128], chunks
/// `0 .. n / 64` in one launch, then (decode form) the chunk closed at a random multiple of 64.
pub fn summary(
    gpu: &Gpu,
    n_kv: usize,
    n: usize,
    special: Special,
    rng: &mut impl Rng,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let mut keys = rand_keys(n * n_kv, rng);
    if special == Special::NanInfK && n > 0 {
        for _ in 0..3 {
            let i = rng.gen_range(0..keys.len());
            keys[i] = bf16::from_f32([f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.gen_range(0..3)]);
        }
        keys[0..128].iter_mut().for_each(|v| *v = bf16::ZERO); // an all-zero key
    }
    let dk = s.clone_htod(&keys)?;
    let mut sums = RouteSummaries::new(gpu, n_kv, n.max(64))?;
    let poison = |len: usize| vec![bf16::from_bits(0xFFFF); len];
    s.memcpy_htod(&poison(sums.chunk_min.len()), &mut sums.chunk_min)?;
    s.memcpy_htod(&poison(sums.chunk_max.len()), &mut sums.chunk_max)?;
    s.memcpy_htod(&vec![0xAAu8; sums.sketch.len()], &mut sums.sketch)?;
    s.memcpy_htod(&vec![0xFFFFu16; sums.scale.len()], &mut sums.scale)?;
    let src = KeySource::dense(gpu, &dk, 128, n_kv * 128);
    let nc = n / 64;
    hga_route_summary(gpu, &src, &mut sums, SummaryChunks::Range { first: 0, count: nc })?;
    let (mn, mx) = (s.clone_dtoh(&sums.chunk_min)?, s.clone_dtoh(&sums.chunk_max)?);
    let (sk, sc) = (s.clone_dtoh(&sums.sketch)?, s.clone_dtoh(&sums.scale)?);
    let mc = sums.max_chunks();
    let mt = sums.max_tokens;
    let mut bad = None;
    for h in 0..n_kv {
        let hk: Vec<bf16> =
            (0..n).flat_map(|j| keys[(j * n_kv + h) * 128..(j * n_kv + h + 1) * 128].to_vec()).collect();
        let (wmn, wmx, wsk, wsc) = r::summaries(&hk, nc * 64);
        for i in 0..nc * 128 {
            let o = h * mc * 128 + i;
            if mn[o].to_bits() != wmn[i].to_bits() || mx[o].to_bits() != wmx[i].to_bits() {
                bad.get_or_insert(format!("head {h} chunk {} dim {}: min/max differ", i / 128, i % 128));
            }
        }
        for j in 0..nc * 64 {
            if sk[(h * mt + j) * 64..(h * mt + j + 1) * 64] != wsk[j * 64..(j + 1) * 64] || sc[h * mt + j] != wsc[j] {
                bad.get_or_insert(format!(
                    "head {h} token {j}: sketch differs (scale {:#x} vs {:#x})",
                    sc[h * mt + j],
                    wsc[j]
                ));
            }
        }
        // Tokens past the whole chunks stay poisoned.
        for j in nc * 64..mt {
            if sc[h * mt + j] != 0xFFFF {
                bad.get_or_insert(format!("head {h} token {j} past the chunks was written"));
            }
        }
    }
    // Decode form: only the chunk closed by `t` keys is written (t a multiple of 64), nothing for other t; given as
    // the count (`Closed`) or as the position of the last key, t - 1 (`ClosedAt`).
    for at in [false, true] {
        if nc == 0 {
            break;
        }
        let c = rng.gen_range(0..nc);
        s.memcpy_htod(&vec![0xFFFFu16; sums.scale.len()], &mut sums.scale)?;
        for t in [(c + 1) * 64 + 1, (c + 1) * 64] {
            if at {
                let dpos = s.clone_htod(&[t as u32 - 1])?;
                hga_route_summary(gpu, &src, &mut sums, SummaryChunks::ClosedAt(&dpos))?;
            } else {
                let dpos = s.clone_htod(&[t as u32])?;
                hga_route_summary(gpu, &src, &mut sums, SummaryChunks::Closed(&dpos))?;
            }
        }
        let sc = s.clone_dtoh(&sums.scale)?;
        for h in 0..n_kv {
            for j in 0..mt {
                let want_written = j / 64 == c && j < nc * 64;
                if (sc[h * mt + j] != 0xFFFF) != want_written {
                    bad.get_or_insert(format!(
                        "decode form ({}): head {h} token {j} written={}",
                        if at { "position" } else { "count" },
                        sc[h * mt + j] != 0xFFFF
                    ));
                }
            }
        }
    }
    Ok(Outcome::new("hga_route_summary", format!("n_kv={n_kv} tokens={n} {special:?}"), 0.0, bad))
}

/// Whether `sel` is a valid top-k of `scores` over candidate ids `cand` (ascending, unique, every chosen score >=
/// the k-th best, NaN as -inf).
fn topk_valid(sel: &[usize], cand: &[usize], scores: &[f64], k: usize) -> Result<(), String> {
    if sel.len() != k.min(cand.len()) {
        return Err(format!("{} selected, expected {}", sel.len(), k.min(cand.len())));
    }
    if sel.windows(2).any(|w| w[0] >= w[1]) {
        return Err("selection not strictly ascending".into());
    }
    let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    let mut sorted: Vec<f64> = scores.iter().map(|&v| key(v)).collect();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let kth = if k == 0 || sorted.is_empty() { f64::NEG_INFINITY } else { sorted[k.min(sorted.len()) - 1] };
    for &x in sel {
        let Some(i) = cand.iter().position(|&c| c == x) else { return Err(format!("{x} is not a candidate")) };
        if key(scores[i]) < kth {
            return Err(format!("candidate {x} scored {} below the k-th {kth}", scores[i]));
        }
    }
    Ok(())
}

/// Picks of `got` missing from `want` whose reference scores are not within TOL of the threshold: a real miss.
fn real_misses(got: &[usize], want: &[usize], cand: &[usize], ref_scores: &[f64]) -> Vec<(usize, f64)> {
    let sc = |x: usize| cand.iter().position(|&c| c == x).map(|i| ref_scores[i]).unwrap_or(f64::NAN);
    let lo_want = want.iter().map(|&x| sc(x)).fold(f64::INFINITY, f64::min);
    got.iter()
        .filter(|x| !want.contains(x))
        .map(|&x| (x, lo_want - sc(x)))
        .filter(|&(_, gap)| (gap > TOL || gap.is_nan()) && lo_want.is_finite())
        .collect()
}

/// Stage 1 + stage 2 for one block `b0 .. b0 + shape.q_len` on random keys: see the module docs.
pub fn route(
    gpu: &Gpu,
    shape: &RouteShape,
    b0: usize,
    device_pos: bool,
    special: Special,
    rng: &mut impl Rng,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let (kv, cap) = (shape.n_kv_heads, shape.max_ctx.max(64));
    // Cache layout [n_kv][cap][128].
    let mut keys = rand_keys(kv * cap, rng);
    let mut q: Vec<f32> = (0..shape.q_len * shape.n_heads * 128).map(|_| rng.gen_range(-1.0f32..1.0) * 1.5).collect();
    match special {
        Special::NanQ => {
            let i = rng.gen_range(0..q.len());
            q[i] = f32::NAN;
        }
        Special::NanInfK => {
            for _ in 0..4 {
                let i = rng.gen_range(0..keys.len());
                keys[i] = bf16::from_f32([f32::NAN, f32::INFINITY, f32::NEG_INFINITY][rng.gen_range(0..3)]);
            }
        }
        Special::None | Special::StaleHist => {}
    }
    let dk = s.clone_htod(&keys)?;
    let dq = s.clone_htod(&q)?;
    let mut sums = RouteSummaries::new(gpu, kv, cap)?;
    let src = KeySource::dense(gpu, &dk, cap * 128, 128);
    let nchunks = (b0 + shape.q_len) / 64;
    let count = nchunks.min(sums.max_chunks());
    hga_route_summary(gpu, &src, &mut sums, SummaryChunks::Range { first: 0, count })?;
    let mut ws = RouteWorkspace::new(gpu, shape)?;
    if special == Special::StaleHist {
        let junk: Vec<u32> = (0..ws.hist.len()).map(|_| rng.gen_range(0..1000)).collect();
        s.memcpy_htod(&junk, &mut ws.hist)?;
    }
    let mut sel = s.clone_htod(&vec![0xDEADBEEFu32; kv * shape.max_groups])?;
    s.memcpy_htod(&vec![f32::NAN; ws.group_scores.len()], &mut ws.group_scores)?;
    let dpos = s.clone_htod(&[b0 as u32])?;
    let pos = if device_pos { RoutePos::Device(&dpos) } else { RoutePos::Host(b0) };
    hga_route(gpu, shape, &src, &sums, &dq, pos, &mut ws, &mut sel)?;
    let got_sel = s.clone_dtoh(&sel)?;
    let base = s.clone_dtoh(&ws.base)?;
    let cs = s.clone_dtoh(&ws.chunk_scores)?;
    let kept = s.clone_dtoh(&ws.kept)?;
    let gs = s.clone_dtoh(&ws.group_scores)?;
    let stats = s.clone_dtoh(&ws.stats)?;
    let hist = s.clone_dtoh(&ws.hist)?;
    let (mn, mx) = (s.clone_dtoh(&sums.chunk_min)?, s.clone_dtoh(&sums.chunk_max)?);
    let (sk, sc) = (s.clone_dtoh(&sums.sketch)?, s.clone_dtoh(&sums.scale)?);
    let g = r::geometry(shape, b0);
    let per_kv = shape.n_heads / kv;
    let rows = shape.rows();
    let (mc, mt) = (sums.max_chunks(), sums.max_tokens);
    let mcc = shape.max_cand_chunks().max(1);
    let mcg = shape.max_stage2().max(1);
    let strict = matches!(special, Special::None | Special::StaleHist);
    let mut bad: Option<String> = None;
    // The select that ran resets its histogram; one that did not run (no chunk stage: stage 1's) was never counted
    // into, except by the stale garbage of this check.
    let stale_unused = special == Special::StaleHist && !shape.chunk_stage();
    for (i, &v) in hist.iter().enumerate() {
        let unused = stale_unused && (i / ROUTE_HIST_BINS).is_multiple_of(2);
        if v != 0 && !unused {
            bad.get_or_insert(format!(
                "select histogram {} of head {} not reset: bin {} holds {v}",
                (i / ROUTE_HIST_BINS) % 2 + 1,
                i / (2 * ROUTE_HIST_BINS),
                i % ROUTE_HIST_BINS
            ));
            break;
        }
    }
    let mut err = 0f64;
    let mut diffs = 0usize;
    for h in 0..kv {
        let kf: Vec<f32> = keys[h * cap * 128..(h + 1) * cap * 128].iter().map(|v| v.to_f32()).collect();
        let mnf: Vec<f32> = mn[h * mc * 128..(h + 1) * mc * 128].iter().map(|v| v.to_f32()).collect();
        let mxf: Vec<f32> = mx[h * mc * 128..(h + 1) * mc * 128].iter().map(|v| v.to_f32()).collect();
        let q_rows: Vec<&[f32]> = (0..rows)
            .map(|rw| {
                let o = ((rw / per_kv) * shape.n_heads + h * per_kv + rw % per_kv) * 128;
                &q[o..o + 128]
            })
            .collect();
        let x = r::HeadInputs {
            q_rows,
            keys: &kf,
            chunk_min: &mnf,
            chunk_max: &mxf,
            sketch: &sk[h * mt * 64..(h + 1) * mt * 64],
            scale: &sc[h * mt..(h + 1) * mt],
        };
        let want = r::route_head(shape, b0, &x);
        let mut fail = |m: String| {
            bad.get_or_insert(format!("head {h}: {m}"));
        };
        let close = |a: f64, b: f64| (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= TOL * (1.0 + b.abs());
        if strict {
            for rw in 0..rows {
                let gb = base[h * rows + rw] as f64;
                err = err.max((gb - want.base[rw]).abs());
                if !close(gb, want.base[rw]) {
                    fail(format!("base row {rw}: {gb} vs {}", want.base[rw]));
                }
            }
        }
        let n_g = g.n_groups;
        let st = &stats[h * 4..h * 4 + 4];
        let cand_chunks: Vec<usize> = (g.first_chunk..g.end_chunk).collect();
        if shape.chunk_stage() && n_g > 0 {
            let gcs: Vec<f64> = (0..cand_chunks.len()).map(|i| cs[h * mcc + i] as f64).collect();
            if strict {
                for (i, (&a, &b)) in gcs.iter().zip(&want.chunk_scores).enumerate() {
                    err = err.max((a - b).abs());
                    if !close(a, b) {
                        fail(format!("chunk {} score {a} vs {b}", g.first_chunk + i));
                    }
                }
            }
            let gk: Vec<usize> = kept[h * shape.max_kept..(h + 1) * shape.max_kept]
                .iter()
                .take_while(|&&v| v != u32::MAX)
                .map(|&v| v as usize)
                .collect();
            if let Err(e) = topk_valid(&gk, &cand_chunks, &gcs, g.n_chunks) {
                fail(format!("kept chunks: {e}"));
            }
            if st[0] as usize != g.n_chunks.min(cand_chunks.len()) {
                fail(format!("stats n_c {} vs {}", st[0], g.n_chunks));
            }
            if strict {
                let m = real_misses(&gk, &want.kept, &cand_chunks, &want.chunk_scores);
                if !m.is_empty() {
                    fail(format!("kept chunks differ beyond ties: {m:?}"));
                }
                diffs += gk.iter().filter(|c| !want.kept.contains(c)).count();
            }
        }
        // Stage 2 candidates: what the GPU enumerated (its kept chunks).
        let gcand: Vec<usize> = if n_g == 0 {
            Vec::new()
        } else if shape.chunk_stage() {
            kept[h * shape.max_kept..h * shape.max_kept + g.n_chunks]
                .iter()
                .flat_map(|&c| (c as usize * 4)..(c as usize * 4 + 4))
                .collect()
        } else {
            (g.first_chunk * 4..g.end_chunk * 4).collect()
        };
        let ggs: Vec<f64> = (0..gcand.len()).map(|i| gs[h * mcg + i] as f64).collect();
        let gsel_all = &got_sel[h * shape.max_groups..(h + 1) * shape.max_groups];
        let gsel: Vec<usize> = gsel_all.iter().take_while(|&&v| v != u32::MAX).map(|&v| v as usize).collect();
        if gsel_all[gsel.len()..].iter().any(|&v| v != u32::MAX) {
            fail("padding after the selection is not u32::MAX".into());
        }
        if let Err(e) = topk_valid(&gsel, &gcand, &ggs, n_g) {
            fail(format!("selected groups: {e}"));
        }
        if st[1] as usize != n_g.min(gcand.len()) {
            fail(format!("stats n_g {} vs {}", st[1], n_g));
        }
        if strict && gcand == want.cand {
            for (i, (&a, &b)) in ggs.iter().zip(&want.group_scores).enumerate() {
                err = err.max((a - b).abs());
                if !close(a, b) {
                    fail(format!("group {} score {a} vs {b}", gcand[i]));
                }
            }
            let m = real_misses(&gsel, &want.selected, &want.cand, &want.group_scores);
            if !m.is_empty() {
                fail(format!("selected groups differ beyond ties: {m:?}"));
            }
            diffs += gsel.iter().filter(|c| !want.selected.contains(c)).count();
        }
        // A budget covering every candidate selects every candidate group.
        if n_g == (g.end_chunk - g.first_chunk) * 4 && gsel != (g.first_chunk * 4..g.end_chunk * 4).collect::<Vec<_>>()
        {
            fail("a budget covering everything did not select every group".into());
        }
    }
    let shape_s = format!(
        "heads={}/{} q_len={} b0={b0} budget={:?} shortlist={:.3e} n_c={} n_g={} {}{special:?} tie-diffs={diffs}",
        shape.n_heads,
        kv,
        shape.q_len,
        shape.budget,
        shape.shortlist,
        g.n_chunks,
        g.n_groups,
        if device_pos { "devpos " } else { "" }
    );
    Ok(Outcome::new("hga_route", shape_s, err, bad))
}

/// The fixed shapes of `hga selfcheck`.
pub fn selfcheck_rows(gpu: &Gpu, rng: &mut impl Rng) -> Result<Vec<Outcome>, RuntimeError> {
    let mut v = vec![summary(gpu, 4, 64 * 37, Special::None, rng)?, summary(gpu, 2, 1000, Special::NanInfK, rng)?];
    for (b0, budget, shortlist, dev) in [
        (4096usize, Budget::Fraction(0.2), 8.0, true),
        (65535, Budget::Fraction(0.03), 8.0, true),
        (8191, Budget::Fraction(0.03), f64::INFINITY, false),
        (2000, Budget::Fraction(1.0), f64::MAX, true),
    ] {
        let mut sh = RouteShape::default_for(32, 4, 1, b0 + 1, budget);
        sh.shortlist = shortlist;
        if shortlist.is_infinite() {
            sh.max_kept = 1;
        }
        v.push(route(gpu, &sh, b0, dev, Special::None, rng)?);
    }
    Ok(v)
}
