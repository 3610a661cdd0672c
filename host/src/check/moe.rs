//! GPU-versus-reference checks of the MoE kernels: router (both forms: rows and batch), grouping, and the whole MoE layer on the
//! decode and the grouped (prefill) paths. Fresh random inputs per check, outputs poisoned before the launch.
//!
//! Router ids: the reference computes logits in f64, the GPU in f32 (bf16 products on tensor cores), so two
//! experts whose logits differ by less than the f32 error may come out in either order. A GPU choice is accepted
//! when it differs from the reference only among near-ties: every chosen expert's reference logit is >= the
//! reference's k-th logit - tol, the ids are distinct, and consecutive chosen experts are in non-increasing
//! reference-logit order up to tol. Exact ties (equal reference logits, made on purpose by duplicated router rows,
//! which the GPU also computes bit-identically) must follow the rule "lower expert index first" exactly. Weights
//! are compared with the reference weights of the GPU's own chosen set (abs 2e-4, f32 softmax with `ex2.approx`).
//! MoE output: the reference experts run on the GPU's routing (ids and weights read back), so a near-tie swap does
//! not show up as an expert-output error; the router is still checked as above. rel-L2 <= 1e-2.
use super::{rel_l2, Outcome};
use crate::kernels::moe::{self as km, MoeExpertWeights, MoeWorkspace, RouterForm};
use crate::reference::moe::{self as rm, MoeDims, MoeHostWeights};
use crate::runtime::{Gpu, RuntimeError};
use gpu_kernels::num::{f32_to_e4m3, FP8_GROUP};
use gpu_kernels::params::MOE_ROUTER_TILE;
use half::bf16;
use rand::Rng;

/// Which expert path to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MoePath {
    /// `moe_decode` (router `Auto`, decode expert kernels)
    Decode,
    /// `moe_grouped` (router `Auto`, grouping, grouped expert kernels)
    Grouped,
}

fn bf16_vec(n: usize, lo: f32, hi: f32, rng: &mut impl Rng) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.gen_range(lo..hi))).collect()
}

/// Random router weights; with `dups`, a few experts get an exact copy of their predecessor's row (exact ties).
pub fn random_router(d: &MoeDims, dups: bool, rng: &mut impl Rng) -> Vec<bf16> {
    let mut w = bf16_vec(d.experts * d.hidden, -0.05, 0.05, rng);
    if dups && d.experts > 1 {
        for _ in 0..(d.experts / 8).max(1) {
            let e = rng.gen_range(1..d.experts);
            let (a, b) = w.split_at_mut(e * d.hidden);
            b[..d.hidden].copy_from_slice(&a[(e - 1) * d.hidden..]);
        }
    }
    w
}

/// Random expert weights: e4m3 codes of uniform(-448, 448) values (as block quantization of a weight gives), scales
/// around 1e-3 (so |w| <~ 0.5).
pub fn random_experts(d: &MoeDims, rng: &mut impl Rng) -> MoeHostWeights {
    let table: Vec<u8> = (0..4096).map(|_| f32_to_e4m3(rng.gen_range(-448.0f32..448.0))).collect();
    let mut codes = |n: usize| -> Vec<u8> {
        let mut v = vec![0u8; n];
        let mut s: u64 = rng.gen::<u64>() | 1;
        for b in v.iter_mut() {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            *b = table[(s >> 52) as usize];
        }
        v
    };
    let (h, i, e) = (d.hidden, d.inter, d.experts);
    let (w_gate, w_up, w_down) = (codes(e * i * h), codes(e * i * h), codes(e * h * i));
    let ns = e * (h / FP8_GROUP) * (i / FP8_GROUP);
    let mut scales = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(0.5e-3f32..1.5e-3)).collect() };
    MoeHostWeights { w_gate, s_gate: scales(ns), w_up, s_up: scales(ns), w_down, s_down: scales(ns) }
}

/// Compares GPU router output with the reference (see the module docs). Returns the first problem.
pub fn compare_router(ids: &[u32], weights: &[f32], r: &rm::RouterRef, d: &MoeDims) -> Option<String> {
    let (ne, k) = (d.experts, d.top_k);
    for tok in 0..d.tokens {
        let l = &r.logits[tok * ne..(tok + 1) * ne];
        let gi = &ids[tok * k..(tok + 1) * k];
        let gw = &weights[tok * k..(tok + 1) * k];
        let ri = &r.ids[tok * k..(tok + 1) * k];
        let lmax = l.iter().fold(0f64, |m, v| m.max(v.abs()));
        let tol = 1e-5 * lmax.max(1e-3);
        let kth = l[ri[k - 1] as usize];
        for (s, &e) in gi.iter().enumerate() {
            if e as usize >= ne || gi[..s].contains(&e) {
                return Some(format!("token {tok}: ids {gi:?} out of range or repeated (reference {ri:?})"));
            }
            let le = l[e as usize];
            if le < kth - tol {
                return Some(format!(
                    "token {tok}: chose expert {e} (logit {le:.6e}) below the k-th logit {kth:.6e}; got {gi:?}, \
                     reference {ri:?}"
                ));
            }
            if s > 0 {
                let (prev, lp) = (gi[s - 1], l[gi[s - 1] as usize]);
                if le > lp + tol || (le == lp && e < prev) {
                    return Some(format!("token {tok}: order {gi:?} breaks the ranking (reference {ri:?})"));
                }
            }
        }
        // An exact tie at the boundary: the lower index must be in.
        for &e in ri {
            let le = l[e as usize];
            if !gi.contains(&e) && gi.iter().any(|&c| l[c as usize] == le && c > e) {
                return Some(format!("token {tok}: tie rule broken: {gi:?} vs reference {ri:?}"));
            }
        }
        let want = rm::weights_of(l, gi, d.norm_topk);
        for (s, (&g, &w)) in gw.iter().zip(&want).enumerate() {
            if g.is_nan() || (g as f64 - w).abs() > 2e-4 {
                return Some(format!("token {tok} slot {s}: weight {g}, expected {w:.7} (ids {gi:?})"));
            }
        }
    }
    None
}

/// The router on `d.tokens` tokens in the given form.
pub fn router(gpu: &Gpu, d: &MoeDims, form: RouterForm, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let (t, k) = (d.tokens, d.top_k);
    let x = bf16_vec(t * d.hidden, -2.0, 2.0, rng);
    let dups = rng.gen_bool(0.5);
    let w = random_router(d, dups, rng);
    let (dx, dw) = (s.clone_htod(&x)?, s.clone_htod(&w)?);
    let mut logits = s.alloc_zeros::<f32>(t * d.experts)?;
    let mut counter = s.alloc_zeros::<u32>(t.div_ceil(MOE_ROUTER_TILE))?;
    let mut dids = s.clone_htod(&vec![u32::MAX; t * k])?;
    let mut dwt = s.clone_htod(&vec![f32::NAN; t * k])?;
    km::hga_moe_router(gpu, &dx, &dw, &mut logits, &mut counter, &mut dids, &mut dwt, d, form)?;
    // Twice: the rows form must have left its counters at zero for the next launch.
    let mut dids2 = s.clone_htod(&vec![u32::MAX; t * k])?;
    let mut dwt2 = s.clone_htod(&vec![f32::NAN; t * k])?;
    km::hga_moe_router(gpu, &dx, &dw, &mut logits, &mut counter, &mut dids2, &mut dwt2, d, form)?;
    let (ids, wt, ids2, wt2, ctr) = (
        s.clone_dtoh(&dids)?,
        s.clone_dtoh(&dwt)?,
        s.clone_dtoh(&dids2)?,
        s.clone_dtoh(&dwt2)?,
        s.clone_dtoh(&counter)?,
    );
    gpu.synchronize()?;
    let r = rm::hga_moe_router(&x, &w, d);
    let mut bad = compare_router(&ids, &wt, &r, d);
    if bad.is_none() && (ids != ids2 || wt.iter().zip(&wt2).any(|(a, b)| a.to_bits() != b.to_bits())) {
        bad = Some("second launch gave a different result".into());
    }
    if bad.is_none() && ctr.iter().any(|&c| c != 0) {
        bad = Some(format!("router counters not reset: {ctr:?}"));
    }
    let exact = ids.iter().zip(&r.ids).filter(|(a, b)| a == b).count();
    let rel = rel_l2(&wt, &r.weights);
    Ok(Outcome::new(
        "hga_moe_router",
        format!(
            "{form:?} T={t} H={} E={} k={k} norm={} dups={dups} ({exact}/{} ids as reference)",
            d.hidden,
            d.experts,
            d.norm_topk,
            t * k
        ),
        rel,
        bad,
    ))
}

/// Random ids [tokens, top_k]: distinct per token; `skew` sends most tokens to a few experts.
pub fn random_ids(d: &MoeDims, skew: bool, rng: &mut impl Rng) -> Vec<u32> {
    let mut ids = Vec::with_capacity(d.tokens * d.top_k);
    for _ in 0..d.tokens {
        let mut chosen: Vec<u32> = Vec::with_capacity(d.top_k);
        while chosen.len() < d.top_k {
            let e = if skew && rng.gen_bool(0.7) {
                rng.gen_range(0..d.top_k.min(d.experts)) as u32
            } else {
                rng.gen_range(0..d.experts) as u32
            };
            if !chosen.contains(&e) {
                chosen.push(e);
            }
        }
        ids.extend(chosen);
    }
    ids
}

/// Grouping of random ids: exact against the reference, plus the invariants.
pub fn group(gpu: &Gpu, d: &MoeDims, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let n = d.tokens * d.top_k;
    let skew = rng.gen_bool(0.5);
    let ids = random_ids(d, skew, rng);
    let dids = s.clone_htod(&ids)?;
    let e = d.experts;
    let mut counts = s.clone_htod(&vec![u32::MAX; e])?;
    let mut offsets = s.clone_htod(&vec![u32::MAX; e + 1])?;
    let mut tiles = s.clone_htod(&vec![u32::MAX; e + 1])?;
    let mut perm = s.clone_htod(&vec![u32::MAX; n])?;
    km::hga_moe_group(gpu, &dids, &mut counts, &mut offsets, &mut tiles, &mut perm, d.tokens, e, d.top_k)?;
    let (c, o, ti, p) = (s.clone_dtoh(&counts)?, s.clone_dtoh(&offsets)?, s.clone_dtoh(&tiles)?, s.clone_dtoh(&perm)?);
    gpu.synchronize()?;
    let (wc, wo, wt, wp) = rm::hga_moe_group(&ids, e);
    let mut bad = None;
    let total: u64 = c.iter().map(|&v| v as u64).sum();
    let mut seen = vec![false; n];
    for &v in &p {
        if (v as usize) < n {
            seen[v as usize] = true;
        }
    }
    if total != n as u64 {
        bad = Some(format!("counts sum to {total}, expected {n}"));
    } else if let Some(i) = seen.iter().position(|s| !s) {
        bad = Some(format!("entry {i} (token {}, slot {}) missing from perm", i / d.top_k, i % d.top_k));
    } else if c != wc {
        bad = Some(format!("counts {c:?} != {wc:?}"));
    } else if o != wo {
        bad = Some(format!("offsets {o:?} != {wo:?}"));
    } else if ti != wt {
        bad = Some(format!("tile_start {ti:?} != {wt:?}"));
    } else if let Some(i) = p.iter().zip(&wp).position(|(a, b)| a != b) {
        bad = Some(format!("perm[{i}] = {}, expected {} (order within an expert)", p[i], wp[i]));
    }
    Ok(Outcome::new("hga_moe_group", format!("T={} E={e} k={} skew={skew}", d.tokens, d.top_k), 0.0, bad))
}

/// Inputs of one MoE layer check (kept so that the bench and tests can reuse them).
pub struct MoeInputs {
    pub x: Vec<bf16>,
    pub router_w: Vec<bf16>,
    pub experts: MoeHostWeights,
}

/// Random layer inputs.
pub fn random_inputs(d: &MoeDims, rng: &mut impl Rng) -> MoeInputs {
    MoeInputs {
        x: bf16_vec(d.tokens * d.hidden, -2.0, 2.0, rng),
        router_w: random_router(d, false, rng),
        experts: random_experts(d, rng),
    }
}

/// The whole MoE layer on `path` against the reference (see the module docs).
pub fn moe(gpu: &Gpu, d: &MoeDims, path: MoePath, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let inp = random_inputs(d, rng);
    moe_with(gpu, d, path, &inp)
}

/// As [`moe`], on given inputs.
pub fn moe_with(gpu: &Gpu, d: &MoeDims, path: MoePath, inp: &MoeInputs) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let (t, k) = (d.tokens, d.top_k);
    let w = MoeExpertWeights::upload(gpu, &inp.experts)?;
    let (dx, drw) = (s.clone_htod(&inp.x)?, s.clone_htod(&inp.router_w)?);
    let mut ws = MoeWorkspace::new(gpu, d, t, path == MoePath::Grouped)?;
    // Poison the intermediate buffers and the outputs.
    s.memcpy_htod(&vec![bf16::from_bits(0xFFFF); ws.inter.len()], &mut ws.inter)?;
    s.memcpy_htod(&vec![f32::NAN; ws.ys.len()], &mut ws.ys)?;
    let mut out = s.clone_htod(&vec![bf16::from_bits(0xFFFF); t * d.hidden])?;
    match path {
        MoePath::Decode => km::moe_decode(gpu, &dx, &drw, &w, &mut ws, &mut out, d, RouterForm::Auto)?,
        MoePath::Grouped => km::moe_grouped(gpu, &dx, &drw, &w, &mut ws, &mut out, d, RouterForm::Auto)?,
    }
    let got: Vec<f32> = s.clone_dtoh(&out)?.iter().map(|v| v.to_f32()).collect();
    let ids = s.clone_dtoh(&ws.ids)?[..t * k].to_vec();
    let wt = s.clone_dtoh(&ws.weights)?[..t * k].to_vec();
    gpu.synchronize()?;
    let r = rm::hga_moe_router(&inp.x, &inp.router_w, d);
    let mut bad = compare_router(&ids, &wt, &r, d).map(|m| format!("router: {m}"));
    let want = rm::hga_moe_experts(&inp.x, &ids, &wt, &inp.experts, d);
    let rel = rel_l2(&got, &want);
    if bad.is_none() {
        if let Some(i) = got.iter().position(|v| !v.is_finite()) {
            bad = Some(format!("out[{i}] (token {}, n {}) = {}", i / d.hidden, i % d.hidden, got[i]));
        } else if rel > 1e-2 {
            let i = got
                .iter()
                .zip(&want)
                .enumerate()
                .max_by(|a, b| (a.1 .0 - a.1 .1).abs().total_cmp(&(b.1 .0 - b.1 .1).abs()))
                .map(|(i, _)| i)
                .unwrap_or(0);
            bad = Some(format!(
                "relative L2 error {rel:.3e} > 1e-2; worst out[{i}] (token {}, n {}): got {}, expected {}",
                i / d.hidden,
                i % d.hidden,
                got[i],
                want[i]
            ));
        }
    }
    Ok(Outcome::new(
        "hga_moe",
        format!("{path:?} T={t} H={} I={} E={} k={k} norm={}", d.hidden, d.inter, d.experts, d.norm_topk),
        rel,
        bad,
    ))
}

/// `moe_decode_residual` (the post-attention norm inside the router for one token) against `hga_rmsnorm` followed
/// by [`km::moe_decode`] on the same inputs: the residual, the normalized row, the ids, the routing weights and
/// the MoE output must be identical bit for bit. The fused call runs `reps` times, twice as a replayed CUDA graph,
/// with its outputs poisoned (NaN) before each run, so block 0's writes of the residual and the normalized row are
/// seen each time. `d.tokens` > 1 (or a wide hidden) checks that the fallback (the same two launches) is taken.
pub fn norm_in_router_matches_separate(
    gpu: &Gpu,
    d: &MoeDims,
    inp: &MoeInputs,
    rng: &mut impl Rng,
    reps: usize,
) -> Result<Outcome, RuntimeError> {
    let s = gpu.stream();
    let (t, k, h) = (d.tokens, d.top_k, d.hidden);
    let eps = 1e-6f32;
    let w = MoeExpertWeights::upload(gpu, &inp.experts)?;
    let drw = s.clone_htod(&inp.router_w)?;
    // inp.x is the attention block's output; a residual stream of a larger scale, a norm weight around 1.
    let res = s.clone_htod(&bf16_vec(t * h, -8.0, 8.0, rng))?;
    let nw = s.clone_htod(&bf16_vec(h, 0.5, 1.5, rng))?;
    // Separate: hga_rmsnorm, then moe_decode.
    let sub = s.clone_htod(&inp.x)?;
    let (mut ro, mut xn, mut out) =
        (s.alloc_zeros::<bf16>(t * h)?, s.alloc_zeros::<bf16>(t * h)?, s.alloc_zeros(t * h)?);
    let mut ws = MoeWorkspace::new(gpu, d, t, false)?;
    crate::kernels::hga_rmsnorm(gpu, &sub, Some((&res, &mut ro)), &nw, &mut xn, t, h, eps)?;
    km::moe_decode(gpu, &xn, &drw, &w, &mut ws, &mut out, d, RouterForm::Auto)?;
    let want = (s.clone_dtoh(&ro)?, s.clone_dtoh(&xn)?, s.clone_dtoh(&out)?);
    let want_ids = s.clone_dtoh(&ws.ids)?[..t * k].to_vec();
    let want_w = s.clone_dtoh(&ws.weights)?[..t * k].to_vec();
    // Fused: io starts as the attention output.
    let nan = vec![bf16::from_bits(0xFFFF); t * h];
    let mut ws2 = MoeWorkspace::new(gpu, d, t, false)?;
    let mut io = s.clone_htod(&inp.x)?;
    let mut fused = false;
    let mut bad = None;
    for r in 0..reps {
        s.memcpy_htod(&inp.x, &mut io)?;
        s.memcpy_htod(&nan, &mut ro)?;
        s.memcpy_htod(&nan, &mut xn)?;
        s.memcpy_htod(&vec![u32::MAX; ws2.ids.len()], &mut ws2.ids)?;
        let mut run = || km::moe_decode_residual(gpu, &mut io, &res, &mut ro, &nw, eps, &mut xn, &drw, &w, &mut ws2, d);
        if r + 2 >= reps {
            // The last two runs replay a captured graph of the call.
            let graph = gpu.capture(|| run().map(|f| fused = f))?;
            graph.launch()?;
        } else {
            fused = run()?;
        }
        let (gro, gxn, gout) = (s.clone_dtoh(&ro)?, s.clone_dtoh(&xn)?, s.clone_dtoh(&io)?);
        let ids = s.clone_dtoh(&ws2.ids)?[..t * k].to_vec();
        let wt = s.clone_dtoh(&ws2.weights)?[..t * k].to_vec();
        let what = if r + 2 >= reps { format!("run {r} (graph)") } else { format!("run {r}") };
        bad = bad
            .or(first_bit_difference(&gro, &want.0)
                .map(|i| format!("{what}: residual[{i}] = {}, separate {}", gro[i], want.0[i])))
            .or(first_bit_difference(&gxn, &want.1)
                .map(|i| format!("{what}: normalized[{i}] = {}, separate {}", gxn[i], want.1[i])))
            .or(layer_mismatch(&what, "separate", h, (&ids, &want_ids), (&wt, &want_w), (&gout, &want.2)));
    }
    let should = t == 1 && h <= gpu_kernels::params::MOE_ROUTER_ROWS_NORM_MAX_HIDDEN;
    if fused != should {
        bad = bad.or(Some(format!("fused = {fused}, expected {should}")));
    }
    gpu.synchronize()?;
    Ok(Outcome::new(
        "moe_decode_residual",
        format!(
            "norm in the router ({}) == rmsnorm + moe_decode, {reps} runs, T={t} H={h} I={} E={} k={k}",
            if fused { "fused" } else { "fallback" },
            d.inter,
            d.experts
        ),
        0.0,
        bad,
    ))
}

/// The first index where two bf16 vectors differ bit for bit.
fn first_bit_difference(a: &[bf16], b: &[bf16]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits())
}

/// The first bit-level difference of a decode layer's routing and output from a run of `against`: the ids, then
/// the routing weights, then the output [tokens, h].
fn layer_mismatch(
    what: &str,
    against: &str,
    h: usize,
    (ids, want_ids): (&[u32], &[u32]),
    (wt, want_w): (&[f32], &[f32]),
    (out, want): (&[bf16], &[bf16]),
) -> Option<String> {
    if ids != want_ids {
        return Some(format!("{what}: ids {ids:?}, {against} {want_ids:?}"));
    }
    if let Some(i) = wt.iter().zip(want_w).position(|(a, b)| a.to_bits() != b.to_bits()) {
        return Some(format!("{what}: weight {i} = {}, {against} {}", wt[i], want_w[i]));
    }
    first_bit_difference(out, want)
        .map(|i| format!("{what}: out[{i}] (token {}, n {}) = {}, {against} {}", i / h, i % h, out[i], want[i]))
}
