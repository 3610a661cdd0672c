//! GPU checks of the routed-attention kernels against `reference::hga_attend` (f64 over the gathered tokens), and
//! in exactness mode (an entry list covering every group in position order) against the dense GPU decode kernel on
//! a dense K/V cache built from the same values.
//!
//! Each case draws fresh K/V per (KV head, position), an entry list per KV head (the sink group 0, the groups of
//! the query tokens, random other groups, in random order; or every group in order), scatters the listed groups
//! into random slots of a pool whose other slots are NaN, fills the list past `n_entries` with entries pointing
//! at NaN slots, and makes the rows of the open group past the last position NaN: a read of anything unlisted or
//! not visible shows. Outputs and split partials are poisoned. Pass: NaN exactly where the reference has NaN,
//! rel-L2 of the rest <= 1e-2 (bf16 inputs and output), |lse - ref| <= 1e-3 where the reference is finite (the LSE
//! of a row whose output is NaN is not specified); in
//! exactness mode also, with the same NaN pattern, rel-L2 <= 1e-3 against the dense decode when run with the dense
//! kernel's split (the same arithmetic in the same order: the bits are expected equal, and reported), and <= 4e-3
//! with the routed default split (other sums round to neighbouring bf16 values: about one bf16 ulp).
use super::{poison_bf16, Outcome};
use crate::kernels::attention::{
    decode_kernel_auto, decode_splits, hga_attention_decode_kernel, AttentionShape, DecodeWorkspace, MergeKernel,
    DECODE_MAX_SPLITS,
};
use crate::kernels::hga_attend::{hga_attend, RoutedCall, RoutedKernel, RoutedShape};
use crate::runtime::{Gpu, RuntimeError};
use cudarc::driver::CudaSlice;
use half::bf16;
use rand::seq::SliceRandom;
use rand::Rng;

const D: usize = 128;
const GROUP: usize = 16;

/// Which kernel a case checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoutedPath {
    /// `hga_attend_decode_s{2,3}` (both ring depths the device allows).
    Decode,
    /// `hga_attend_prefill`.
    Prefill,
}

/// A non-finite value put into the inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poison {
    None,
    /// NaN in one element of q.
    QNan,
    /// +Inf in one element of q.
    QInf,
    /// NaN in the K row of a listed token every query sees.
    KSeen,
    /// NaN in the K row of a token no query of the call sees: a position after the first query's (tokens > 1,
    /// seen by the later queries only) or, with one token, a group left out of the list.
    KUnseen,
}

/// One case.
#[derive(Clone, Copy, Debug)]
pub struct RoutedCase {
    pub path: RoutedPath,
    pub tokens: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Position of query token 0; the context is `pos + tokens` positions.
    pub pos: usize,
    /// None: every group in position order (exactness mode); Some(n): about n entries per KV head.
    pub entries: Option<usize>,
    /// Entries of each list past `n_entries` (`max_entries - n_entries` of the longest list).
    pub spare: usize,
    pub poison: Poison,
}

struct Inputs {
    q: Vec<bf16>,
    /// Dense K / V [n_kv][n_groups * 16][128] (positions past the context NaN).
    kd: Vec<bf16>,
    vd: Vec<bf16>,
    pool: Vec<bf16>,
    entry_slot: Vec<u32>,
    entry_pos: Vec<u32>,
    n_entries: Vec<u32>,
    shape: RoutedShape,
    /// A group left out of every list (for KUnseen with one token), if any.
    unlisted: Option<usize>,
}

fn build(c: &RoutedCase, rng: &mut impl Rng) -> Inputs {
    let ctx = c.pos + c.tokens;
    let n_groups = ctx.div_ceil(GROUP);
    let a = rng.gen_range(0.3f32..2.5);
    let q = super::bf16_vec(c.tokens * c.n_heads * D, -a, a, rng);
    let len = c.n_kv_heads * n_groups * GROUP * D;
    let (mut kd, mut vd) = (poison_bf16(len), poison_bf16(len));
    for h in 0..c.n_kv_heads {
        for j in 0..ctx {
            let o = (h * n_groups * GROUP + j) * D;
            for d in 0..D {
                kd[o + d] = bf16::from_f32(rng.gen_range(-a..a));
                vd[o + d] = bf16::from_f32(rng.gen_range(-1.0f32..1.0));
            }
        }
    }
    // The lists: group indices per KV head.
    let first_q = c.pos / GROUP;
    let mut lists: Vec<Vec<usize>> = Vec::new();
    let mut unlisted = None;
    for _ in 0..c.n_kv_heads {
        match c.entries {
            None => lists.push((0..n_groups).collect()),
            Some(n) => {
                let mut need: Vec<usize> = vec![0];
                need.extend((first_q.max(1))..n_groups);
                let mut rest: Vec<usize> = (1..first_q.max(1)).collect();
                rest.shuffle(rng);
                let extra = n.saturating_sub(need.len()).min(rest.len());
                // Keep one group out of the list when possible (for KUnseen).
                let extra = if extra == rest.len() && !rest.is_empty() { extra - 1 } else { extra };
                if extra < rest.len() {
                    unlisted = Some(rest[extra]);
                }
                let mut l: Vec<usize> = need.into_iter().chain(rest[..extra].iter().copied()).collect();
                l.shuffle(rng);
                lists.push(l);
            }
        }
    }
    let longest = lists.iter().map(|l| l.len()).max().unwrap_or(1);
    let max_entries = longest + c.spare;
    let used: usize = lists.iter().map(|l| l.len()).sum();
    let n_slots = used + rng.gen_range(1..6);
    let mut slots: Vec<usize> = (0..n_slots).collect();
    slots.shuffle(rng);
    let mut pool = poison_bf16(n_slots * 2 * GROUP * D);
    let mut entry_slot = vec![0u32; c.n_kv_heads * max_entries];
    let mut entry_pos = vec![0u32; c.n_kv_heads * max_entries];
    let mut n_entries = vec![0u32; c.n_kv_heads];
    let mut next = 0;
    for (h, l) in lists.iter().enumerate() {
        for (e, &grp) in l.iter().enumerate() {
            let slot = slots[next];
            next += 1;
            entry_slot[h * max_entries + e] = slot as u32;
            entry_pos[h * max_entries + e] = (grp * GROUP) as u32;
            for r in 0..GROUP {
                let src = (h * n_groups * GROUP + grp * GROUP + r) * D;
                let k = (slot * 2 * GROUP + r) * D;
                pool[k..k + D].copy_from_slice(&kd[src..src + D]);
                pool[k + GROUP * D..k + GROUP * D + D].copy_from_slice(&vd[src..src + D]);
            }
        }
        n_entries[h] = l.len() as u32;
        // Past n_entries: entries that point at a NaN slot (never read) at a visible position.
        for e in l.len()..max_entries {
            entry_slot[h * max_entries + e] = slots[n_slots - 1] as u32;
            entry_pos[h * max_entries + e] = 0;
        }
    }
    let shape = RoutedShape { tokens: c.tokens, n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, n_slots, max_entries };
    Inputs { q, kd, vd, pool, entry_slot, entry_pos, n_entries, shape, unlisted }
}

/// Puts the case's non-finite value into the inputs (q, or the K row of one position in the pool and the dense K).
fn poison(c: &RoutedCase, inp: &mut Inputs, rng: &mut impl Rng) -> String {
    let n_groups = (c.pos + c.tokens).div_ceil(GROUP);
    let nan = bf16::from_f32(f32::NAN);
    let d = rng.gen_range(0..D);
    let k_at = |inp: &mut Inputs, h: usize, j: usize| {
        inp.kd[(h * n_groups * GROUP + j) * D + d] = nan;
        let me = inp.shape.max_entries;
        for e in 0..inp.n_entries[h] as usize {
            let first = inp.entry_pos[h * me + e] as usize;
            if (first..first + GROUP).contains(&j) {
                let slot = inp.entry_slot[h * me + e] as usize;
                inp.pool[(slot * 2 * GROUP + j - first) * D + d] = nan;
            }
        }
        format!(" K-NaN(head {h}, pos {j})")
    };
    match c.poison {
        Poison::None => String::new(),
        Poison::QNan | Poison::QInf => {
            let i = rng.gen_range(0..inp.q.len());
            inp.q[i] = bf16::from_f32(if c.poison == Poison::QNan { f32::NAN } else { f32::INFINITY });
            format!(" q[{i}]={:?}", inp.q[i].to_f32())
        }
        Poison::KSeen => {
            let h = rng.gen_range(0..c.n_kv_heads);
            let me = inp.shape.max_entries;
            let e = rng.gen_range(0..inp.n_entries[h] as usize);
            let first = inp.entry_pos[h * me + e] as usize;
            let j = (first + rng.gen_range(0..GROUP)).min(c.pos);
            k_at(inp, h, j)
        }
        Poison::KUnseen => {
            let h = rng.gen_range(0..c.n_kv_heads);
            if c.tokens > 1 {
                let j = rng.gen_range(c.pos + 1..c.pos + c.tokens);
                k_at(inp, h, j)
            } else if let Some(grp) = inp.unlisted {
                k_at(inp, h, grp * GROUP + rng.gen_range(0..GROUP))
            } else {
                String::new()
            }
        }
    }
}

/// (rel-L2 over the finite reference values, first problem): NaN in `out` exactly where `want` has NaN; lse
/// within 1e-3 where the reference's is finite and its output row is not NaN.
fn judge(out: &[bf16], lse: &[f32], want: &(Vec<f64>, Vec<f64>), n_heads: usize, tol: f64) -> (f64, Option<String>) {
    let (wo, wl) = want;
    let (mut num, mut den) = (0f64, 0f64);
    let mut bad = None;
    for (i, (g, w)) in out.iter().zip(wo).enumerate() {
        let g = g.to_f32() as f64;
        let at = || format!("out[{i}] (token {}, head {}, dim {})", i / D / n_heads, i / D % n_heads, i % D);
        if w.is_nan() != g.is_nan() || g.is_infinite() {
            bad.get_or_insert(format!("{} = {g}, reference {w}", at()));
            continue;
        }
        if w.is_finite() {
            num += (g - w).powi(2);
            den += w * w;
        }
    }
    let rel = (num / den.max(1e-300)).sqrt();
    if bad.is_none() && rel > tol {
        bad = Some(format!("relative L2 error of out {rel:.3e} > {tol:e}"));
    }
    if bad.is_none() {
        for (i, (g, w)) in lse.iter().zip(wl).enumerate() {
            // A row whose output is NaN has no meaningful LSE (a split with a NaN score weighs 0 in the merge, so
            // the merged LSE depends on the split): compared only where the expected output row is not NaN.
            if wo[i * D].is_nan() {
                continue;
            }
            if w.is_finite() && (g.is_nan() || (*g as f64 - w).abs() > 1e-3) {
                bad = Some(format!("lse[{i}] (token {}, head {}): got {g}, expected {w:.6}", i / n_heads, i % n_heads));
                break;
            }
        }
    }
    (if bad.is_some() { f64::INFINITY } else { rel }, bad)
}

/// Device copies of the inputs: q, pool, entry slots, entry positions, entry counts and the position.
#[allow(clippy::type_complexity)]
fn upload(
    gpu: &Gpu,
    inp: &Inputs,
    pos: u32,
) -> Result<
    (CudaSlice<bf16>, CudaSlice<bf16>, CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u32>, CudaSlice<u32>),
    RuntimeError,
> {
    let st = gpu.stream();
    Ok((
        st.clone_htod(&inp.q)?,
        st.clone_htod(&inp.pool)?,
        st.clone_htod(&inp.entry_slot)?,
        st.clone_htod(&inp.entry_pos)?,
        st.clone_htod(&inp.n_entries)?,
        st.clone_htod(&[pos])?,
    ))
}

/// Runs the routed kernel `call` on the inputs into fresh poisoned outputs and partials: (out, lse, n_splits).
fn run_routed(
    gpu: &Gpu,
    call: RoutedCall,
    inp: &Inputs,
    pos: u32,
) -> Result<(Vec<bf16>, Vec<f32>, usize), RuntimeError> {
    let st = gpu.stream();
    let s = &inp.shape;
    let rows = s.tokens * s.n_heads;
    let (dq, dp, ds, de, dn, dpos) = upload(gpu, inp, pos)?;
    let mut ws = DecodeWorkspace::new(gpu, s.tokens, s.n_heads, DECODE_MAX_SPLITS)?;
    st.memcpy_htod(&vec![f32::NAN; ws.lens().0], ws.part_o_mut())?;
    let mut out = st.clone_htod(&poison_bf16(rows * D))?;
    let mut lse = st.clone_htod(&vec![f32::NAN; rows])?;
    let n = hga_attend(gpu, call, &dq, &dp, &ds, &de, &dn, &dpos, &mut ws, &mut out, &mut lse, s)?;
    let o = st.clone_dtoh(&out)?;
    let l = st.clone_dtoh(&lse)?;
    gpu.synchronize()?;
    Ok((o, l, n))
}

/// `hga_attend_decode_quant` against `hga_attend_decode` followed by `hga_fp8_quant`: a description of the first
/// difference, if any.
fn fused_quant_mismatch(gpu: &Gpu, inp: &Inputs, pos: u32) -> Result<Option<String>, RuntimeError> {
    let st = gpu.stream();
    let s = &inp.shape;
    let rows = s.tokens * s.n_heads;
    let (o, l, _) = run_routed(gpu, RoutedCall::DECODE, inp, pos)?;
    let (dq, dp, ds, de, dn, dpos) = upload(gpu, inp, pos)?;
    let mut ws = DecodeWorkspace::new(gpu, s.tokens, s.n_heads, DECODE_MAX_SPLITS)?;
    let mut out = st.clone_htod(&poison_bf16(rows * D))?;
    let mut lse = st.clone_htod(&vec![f32::NAN; rows])?;
    let mut q8 = st.clone_htod(&vec![0xAAu8; rows * D])?;
    let mut sc = st.clone_htod(&vec![f32::NAN; rows])?;
    crate::kernels::hga_attend::hga_attend_decode_quant(
        gpu, &dq, &dp, &ds, &de, &dn, &dpos, &mut ws, &mut out, &mut lse, &mut q8, &mut sc, s,
    )?;
    let (fo, fl, fq, fs) = (st.clone_dtoh(&out)?, st.clone_dtoh(&lse)?, st.clone_dtoh(&q8)?, st.clone_dtoh(&sc)?);
    let plain = st.clone_htod(&o)?;
    let mut pq = st.clone_htod(&vec![0x55u8; rows * D])?;
    let mut ps = st.clone_htod(&vec![f32::NAN; rows])?;
    crate::kernels::hga_fp8_quant(gpu, &plain, &mut pq, &mut ps, rows, D)?;
    let (wq, ws_) = (st.clone_dtoh(&pq)?, st.clone_dtoh(&ps)?);
    gpu.synchronize()?;
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let fbits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    Ok(if bits(&fo) != bits(&o) {
        Some("fused quant: out differs from the plain call".into())
    } else if fbits(&fl) != fbits(&l) {
        Some("fused quant: lse differs from the plain call".into())
    } else if fq != wq || fbits(&fs) != fbits(&ws_) {
        Some("fused quant: the FP8 bytes or scales differ from hga_fp8_quant of the same out".into())
    } else {
        None
    })
}

/// One check of a case on fresh random inputs.
pub fn routed(gpu: &Gpu, c: RoutedCase, rng: &mut impl Rng) -> Result<Outcome, RuntimeError> {
    let mut inp = build(&c, rng);
    let what = poison(&c, &mut inp, rng);
    let s = inp.shape;
    let want = crate::reference::hga_attend::hga_attend(
        &inp.q,
        &inp.pool,
        &inp.entry_slot,
        &inp.entry_pos,
        &inp.n_entries,
        c.pos as u32,
        &s,
    );
    let calls: Vec<(String, RoutedCall)> = match c.path {
        RoutedPath::Prefill => vec![("prefill".into(), RoutedCall::PREFILL)],
        RoutedPath::Decode => {
            let mut v = vec![("decode".to_string(), RoutedCall::DECODE)];
            let other = RoutedCall { kernel: RoutedKernel::Decode(2), ..RoutedCall::DECODE };
            v.push(("decode_s2".into(), other));
            // A split of one tile (the most splits) as well.
            v.push(("decode 1 tile/split".into(), RoutedCall { tiles_per_split: Some(1), ..RoutedCall::DECODE }));
            v
        }
    };
    let mut rel = 0f64;
    let mut bad = None;
    let mut splits = Vec::new();
    let mut first = None;
    for (label, call) in &calls {
        let (o, l, n) = run_routed(gpu, *call, &inp, c.pos as u32)?;
        splits.push(n);
        let (r, b) = judge(&o, &l, &want, s.n_heads, 1e-2);
        rel = rel.max(r);
        if bad.is_none() {
            bad = b.map(|b| format!("{label}: {b}"));
        }
        first.get_or_insert((o, l));
    }
    if c.path == RoutedPath::Decode && bad.is_none() {
        // The merge's fused FP8 quantization: the same out and lse as the plain call, and the bytes and scales
        // hga_fp8_quant writes from that out, bit for bit.
        bad = fused_quant_mismatch(gpu, &inp, c.pos as u32)?;
    }
    let mut extra = String::new();
    if c.entries.is_none() && c.path == RoutedPath::Decode {
        // Exactness: the dense decode on a dense cache built from the same values (capacity = the context).
        let st = gpu.stream();
        let ctx = c.pos + c.tokens;
        let n_groups = ctx.div_ceil(GROUP);
        let mut kc = Vec::with_capacity(c.n_kv_heads * ctx * D);
        let mut vc = Vec::with_capacity(c.n_kv_heads * ctx * D);
        for h in 0..c.n_kv_heads {
            let o = h * n_groups * GROUP * D;
            kc.extend_from_slice(&inp.kd[o..o + ctx * D]);
            vc.extend_from_slice(&inp.vd[o..o + ctx * D]);
        }
        let ds = AttentionShape {
            tokens: c.tokens,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            capacity: ctx,
            start: c.pos,
        };
        let dq = st.clone_htod(&inp.q)?;
        let dk = st.clone_htod(&kc)?;
        let dv = st.clone_htod(&vc)?;
        let mut ws = DecodeWorkspace::new(gpu, c.tokens, c.n_heads, DECODE_MAX_SPLITS)?;
        let mut out = st.clone_htod(&poison_bf16(c.tokens * c.n_heads * D))?;
        let mut lse = st.clone_htod(&vec![f32::NAN; c.tokens * c.n_heads])?;
        let kernel = decode_kernel_auto(gpu)?;
        hga_attention_decode_kernel(
            gpu,
            kernel,
            MergeKernel::V2,
            &dq,
            &dk,
            &dv,
            &mut ws,
            &mut out,
            &mut lse,
            &ds,
            None,
        )?;
        let dense_o = st.clone_dtoh(&out)?;
        let dense_l = st.clone_dtoh(&lse)?;
        gpu.synchronize()?;
        let dense = (
            dense_o.iter().map(|x| x.to_f32() as f64).collect::<Vec<_>>(),
            dense_l.iter().map(|&x| x as f64).collect::<Vec<_>>(),
        );
        // The routed decode with the dense kernel's split: tiles of 4 entries = the dense kernel's 64-key tiles.
        let (_, tps) = decode_splits(gpu.sm_count(), &ds, DECODE_MAX_SPLITS, kernel.tiles_in_flight());
        let aligned = RoutedCall { tiles_per_split: Some(tps), ..RoutedCall::DECODE };
        let (ao, al, _) = run_routed(gpu, aligned, &inp, c.pos as u32)?;
        let (fo, fl) = first.as_ref().expect("one routed call");
        // With the dense kernel's split the routed decode does the same arithmetic in the same order (tiles of 4
        // entries in position order are the dense 64-key tiles): rel-L2 <= 1e-3, and the bits are expected equal.
        // With its own split the sums are grouped differently and the f32 results may round to neighbouring bf16
        // values (rel-L2 ~1-2e-3 from that rounding alone): at most 4e-3 (about one bf16 ulp), LSE within 1e-3.
        for (label, o, l, tol) in [("dense split", &ao, &al, 1e-3), ("default split", fo, fl, 4e-3)] {
            let (_, b) = judge(o, l, &dense, c.n_heads, tol);
            if bad.is_none() {
                bad = b.map(|b| format!("against the dense decode ({label}): {b}"));
            }
        }
        let same = ao.iter().zip(&dense_o).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
        let (dr, _) = judge(&ao, &al, &dense, c.n_heads, 1e-3);
        let (ar, _) = judge(&ao, &al, &want, s.n_heads, 1e-2);
        rel = rel.max(ar);
        extra = format!(" vs-dense(dense split: rel {dr:.1e}, bits {})", if same { "equal" } else { "differ" });
    }
    let name = match c.path {
        RoutedPath::Decode => "hga_attend_decode+merge",
        RoutedPath::Prefill => "hga_attend_prefill+merge",
    };
    let shape = format!(
        "tokens={} heads={}/{} pos={} entries={} max_entries={} splits={splits:?}{what}{extra}",
        c.tokens,
        c.n_heads,
        c.n_kv_heads,
        c.pos,
        match c.entries {
            None => "all".to_string(),
            Some(_) => format!("{:?}", inp.n_entries),
        },
        s.max_entries,
    );
    Ok(Outcome::new(name, shape, rel, bad))
}

/// The fixed cases of `hga selfcheck`: decode and prefill over routed lists, and exactness against dense decode.
pub fn selfcheck_rows(gpu: &Gpu, rng: &mut impl Rng) -> Result<Vec<Outcome>, RuntimeError> {
    let base = RoutedCase {
        path: RoutedPath::Decode,
        tokens: 1,
        n_heads: 32,
        n_kv_heads: 4,
        pos: 2047,
        entries: Some(37),
        spare: 3,
        poison: Poison::None,
    };
    let cases = [
        base,
        RoutedCase { entries: None, spare: 0, pos: 1500, ..base },
        RoutedCase { entries: None, poison: Poison::KSeen, pos: 700, ..base },
        RoutedCase { path: RoutedPath::Prefill, tokens: 64, pos: 1024, entries: Some(29), ..base },
        RoutedCase {
            path: RoutedPath::Prefill,
            tokens: 17,
            pos: 333,
            entries: Some(7),
            poison: Poison::KUnseen,
            ..base
        },
    ];
    cases.iter().map(|&c| routed(gpu, c, rng)).collect()
}
