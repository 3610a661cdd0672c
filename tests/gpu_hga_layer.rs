//! GPU tests of the embeddable HGA layer (`hga::hga::gpu_layer::HgaLayer`): random post-RoPE-like K/V (a per-head
//! offset per dimension plus noise) of a prompt of T0 tokens (whole chunks, a partial chunk, a partial group) given
//! to `prefill_history`, then decode steps (append + attend, the position advanced on the device). At every step:
//! (a) the selected groups against the CPU reference routing (`reference::hga_route::route_head` on the same bf16
//! keys; differences allowed only for ties within 2e-3 of the reference scores, counted and printed), (b) the output
//! and LSE against an f64 softmax over exactly the sink + window + selected tokens of the original K/V, (c) with a
//! budget covering every candidate, the output against dense f64 attention over every token. After the steps: the
//! summaries (prefill and the chunks closed while decoding) bit for bit against the reference, and every arena row
//! against the K/V. One case replays the decode step as a recorded CUDA graph and matches host launches.
//! Without a CUDA device: one SKIP line per test.
mod common;
use common::gpu;
use std::io::Write;

use cudarc::driver::CudaSlice;
use half::bf16;
use hga::hga::gpu_layer::{advance_position, HgaLayer, HgaLayerConfig};
use hga::hga::Budget;
use hga::kv::{ArenaLayout, ArenaTable, Extent, ExtentMemory, PinnedMemory};
use hga::reference::hga_route::{geometry, route_head, summaries, HeadInputs};
use hga::runtime::Gpu;
use rand::{rngs::StdRng, Rng, SeedableRng};

const NH: usize = 16;
const NKV: usize = 2;
const D: usize = 128;
const E: usize = 64; // groups per extent: several extents, runs split at their ends

struct Data {
    t_end: usize,
    k: Vec<bf16>, // [t][NKV][D]
    v: Vec<bf16>,
    q: Vec<bf16>, // [steps][NH][D]
}

fn data(rng: &mut StdRng, t_end: usize, steps: usize) -> Data {
    let off: Vec<f32> = (0..NKV * D).map(|_| rng.gen_range(-2.0..2.0)).collect();
    let k = (0..t_end * NKV * D).map(|i| bf16::from_f32(off[i % (NKV * D)] + rng.gen_range(-1.5f32..1.5))).collect();
    let v = (0..t_end * NKV * D).map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0))).collect();
    let q = (0..steps * NH * D).map(|_| bf16::from_f32(rng.gen_range(-1.5f32..1.5))).collect();
    Data { t_end, k, v, q }
}

/// An arena of `layers` layers in mapped pinned memory reaching `max_ctx` tokens.
fn arena(g: &Gpu, layers: usize, max_ctx: usize) -> (ArenaTable, Vec<Extent>) {
    let layout = ArenaLayout { layers, kv_heads: NKV, groups_per_extent: E };
    let mem = PinnedMemory::new(g.context().clone());
    let n = max_ctx.div_ceil(16).div_ceil(E);
    let ext: Vec<Extent> = (0..n).map(|_| mem.alloc(layout.extent_bytes()).unwrap()).collect();
    (ArenaTable::new(g, layout, &ext, n).unwrap(), ext)
}

/// f64 softmax attention of query head `h` of `q` over the positions `pos` (scale 1/sqrt(128)): (out, lse).
fn attend_ref(dt: &Data, q: &[bf16], h: usize, pos: &[usize]) -> (Vec<f64>, f64) {
    let kvh = h / (NH / NKV);
    let qv: Vec<f64> = q[h * D..(h + 1) * D].iter().map(|x| x.to_f32() as f64).collect();
    let row = |t: usize| (t * NKV + kvh) * D;
    let s: Vec<f64> = pos
        .iter()
        .map(|&t| {
            let o = row(t);
            qv.iter().zip(&dt.k[o..o + D]).map(|(a, b)| a * b.to_f32() as f64).sum::<f64>() / (D as f64).sqrt()
        })
        .collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = w.iter().sum();
    let mut out = vec![0f64; D];
    for (wj, &t) in w.iter().zip(pos) {
        let o = row(t);
        for (od, vd) in out.iter_mut().zip(&dt.v[o..o + D]) {
            *od += wj * vd.to_f32() as f64;
        }
    }
    out.iter_mut().for_each(|x| *x /= z);
    (out, m + z.ln())
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den.max(1e-300)).sqrt()
}

/// The reference inputs of one KV head: keys as f32 [t][128] and the reference summaries of all t_end tokens.
struct HeadRef {
    keys: Vec<f32>,
    kb: Vec<bf16>,
    mn: Vec<f32>,
    mx: Vec<f32>,
    mnb: Vec<bf16>,
    mxb: Vec<bf16>,
    sk: Vec<u8>,
    sc: Vec<u16>,
}

fn head_refs(dt: &Data) -> Vec<HeadRef> {
    (0..NKV)
        .map(|h| {
            let kb: Vec<bf16> = (0..dt.t_end).flat_map(|t| dt.k[(t * NKV + h) * D..][..D].to_vec()).collect();
            let (mnb, mxb, sk, sc) = summaries(&kb, dt.t_end);
            HeadRef {
                keys: kb.iter().map(|x| x.to_f32()).collect(),
                mn: mnb.iter().map(|x| x.to_f32()).collect(),
                mx: mxb.iter().map(|x| x.to_f32()).collect(),
                kb,
                mnb,
                mxb,
                sk,
                sc,
            }
        })
        .collect()
}

struct Case {
    t0: usize,
    steps: usize,
    budget: Budget,
    /// The budget covers every candidate: compare with dense attention too.
    exact: bool,
}

#[derive(Default)]
struct Tally {
    steps: usize,
    sel_diffs: usize,
    chunk_diffs: usize,
    groups: usize,
    worst_rel: f64,
    worst_lse: f64,
    worst_dense: f64,
}

/// Checks one step's selection, output and LSE (see the module docs).
#[allow(clippy::too_many_arguments)]
fn check_step(
    layer: &HgaLayer,
    dt: &Data,
    refs: &[HeadRef],
    p: usize,
    q: &[bf16],
    sel: &[u32],
    kept: &[u32],
    out: &[bf16],
    lse: &[f32],
    exact: bool,
    t: &mut Tally,
) {
    let shape = *layer.route_shape();
    let mg = shape.max_groups;
    let geo = geometry(&shape, p);
    let qf: Vec<f32> = q.iter().map(|x| x.to_f32()).collect();
    let mut want_out = vec![0f64; NH * D];
    let mut want_lse = vec![0f64; NH];
    let mut dense_out = vec![0f64; NH * D];
    for h in 0..NKV {
        let r = &refs[h];
        let rows = NH / NKV;
        let x = HeadInputs {
            q_rows: (0..rows).map(|i| &qf[(h * rows + i) * D..][..D]).collect(),
            keys: &r.keys,
            chunk_min: &r.mn,
            chunk_max: &r.mx,
            sketch: &r.sk,
            scale: &r.sc,
        };
        let want = route_head(&shape, p, &x);
        let got: Vec<usize> =
            sel[h * mg..(h + 1) * mg].iter().filter(|&&g| g != u32::MAX).map(|&g| g as usize).collect();
        assert_eq!(got.len(), want.selected.len(), "p {p} head {h}: n_g");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "p {p} head {h}: selection not ascending");
        t.groups += got.len();
        // Differences must be ties within 2e-3 of the reference's scores.
        let gs = |gi: usize| want.cand.iter().position(|&c| c == gi).map(|i| want.group_scores[i]);
        let lo = want.selected.iter().map(|&gi| gs(gi).unwrap()).fold(f64::INFINITY, f64::min);
        let cs = |c: usize| want.chunk_scores.get(c.wrapping_sub(geo.first_chunk)).copied();
        let clo = want.kept.iter().map(|&c| cs(c).unwrap_or(f64::NEG_INFINITY)).fold(f64::INFINITY, f64::min);
        // The kept chunks first: a chunk kept on the GPU only must tie the reference's lowest kept chunk.
        let mk = shape.max_kept;
        let gk: Vec<usize> =
            kept[h * mk..(h + 1) * mk].iter().filter(|&&c| c != u32::MAX).map(|&c| c as usize).collect();
        if shape.chunk_stage() && geo.n_groups > 0 {
            assert_eq!(gk.len(), want.kept.len(), "p {p} head {h}: n_c");
            for &c in gk.iter().filter(|c| !want.kept.contains(c)) {
                t.chunk_diffs += 1;
                let s = cs(c).unwrap_or(f64::NEG_INFINITY);
                assert!(clo - s <= 2e-3, "p {p} head {h}: chunk {c} scores {s}, the kept lowest {clo}");
            }
        }
        let same_kept = !shape.chunk_stage() || geo.n_groups == 0 || gk == want.kept;
        for &gi in got.iter().filter(|g| !want.selected.contains(g)) {
            t.sel_diffs += 1;
            assert!(gi >= geo.first_chunk * 4 && gi < geo.end_chunk * 4, "p {p} head {h}: group {gi} not a candidate");
            if shape.chunk_stage() {
                assert!(gk.contains(&(gi / 4)), "p {p} head {h}: group {gi} outside the GPU's kept chunks");
            }
            // With the same kept chunks, a group selected on the GPU only must tie the reference's lowest.
            if same_kept {
                let s = gs(gi).unwrap();
                assert!(lo - s <= 2e-3, "p {p} head {h}: group {gi} scores {s}, the selection's lowest {lo}");
            }
        }
        let pos = geo.positions(16, &got, p);
        let all: Vec<usize> = (0..=p).collect();
        for qh in h * rows..(h + 1) * rows {
            let (o, l) = attend_ref(dt, q, qh, &pos);
            want_out[qh * D..(qh + 1) * D].copy_from_slice(&o);
            want_lse[qh] = l;
            if exact {
                assert_eq!(pos, all, "p {p}: a covering budget must select every group");
                let (o, _) = attend_ref(dt, q, qh, &all);
                dense_out[qh * D..(qh + 1) * D].copy_from_slice(&o);
            }
        }
    }
    let of: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
    let e = rel_l2(&of, &want_out);
    assert!(e <= 1e-2, "p {p}: output rel L2 {e} against the routed f64 softmax");
    let el = lse.iter().zip(&want_lse).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, |m, x| m.max(x));
    assert!(el <= 2e-3 * (1.0 + want_lse.iter().fold(0f64, |m, x| m.max(x.abs()))), "p {p}: LSE error {el}");
    t.worst_rel = t.worst_rel.max(e);
    t.worst_lse = t.worst_lse.max(el);
    if exact {
        let e = rel_l2(&of, &dense_out);
        assert!(e <= 4e-3, "p {p}: output rel L2 {e} against dense attention");
        t.worst_dense = t.worst_dense.max(e);
    }
    t.steps += 1;
}

/// The summaries of every closed chunk and every arena row, after the run.
fn check_tiers(g: &Gpu, layer: &HgaLayer, dt: &Data, refs: &[HeadRef], ext: &[Extent], layout: ArenaLayout) {
    let s = g.stream();
    let sums = layer.summaries();
    let (mn, mx) = (s.clone_dtoh(&sums.chunk_min).unwrap(), s.clone_dtoh(&sums.chunk_max).unwrap());
    let (sk, sc) = (s.clone_dtoh(&sums.sketch).unwrap(), s.clone_dtoh(&sums.scale).unwrap());
    let (mc, mt) = (sums.max_chunks(), sums.max_tokens);
    let nc = dt.t_end / 64;
    for (h, r) in refs.iter().enumerate() {
        for c in 0..nc {
            let a = &mn[(h * mc + c) * D..][..D];
            let b = &mx[(h * mc + c) * D..][..D];
            assert!(a.iter().zip(&r.mnb[c * D..][..D]).all(|(x, y)| x.to_bits() == y.to_bits()), "min h{h} c{c}");
            assert!(b.iter().zip(&r.mxb[c * D..][..D]).all(|(x, y)| x.to_bits() == y.to_bits()), "max h{h} c{c}");
        }
        let n = nc * 64;
        assert_eq!(&sk[h * mt * 64..][..n * 64], &r.sk[..n * 64], "sketches h{h}");
        assert_eq!(&sc[h * mt..][..n], &r.sc[..n], "sketch scales h{h}");
        // Arena rows (K then V of each group block).
        for t in 0..dt.t_end {
            let (e, off) = layout.locate(layer.config().layer, h, t / 16);
            let blk = &ext[e].as_slice()[off..off + 8192];
            let row = (t % 16) * 256;
            let kr: &[u8] = bytemuck::cast_slice(&r.kb[t * D..(t + 1) * D]);
            assert_eq!(&blk[row..row + 256], kr, "arena K h{h} t{t}");
            let vo = (t * NKV + h) * D;
            let vr: &[u8] = bytemuck::cast_slice(&dt.v[vo..vo + D]);
            assert_eq!(&blk[4096 + row..4096 + row + 256], vr, "arena V h{h} t{t}");
        }
    }
}

fn run_case(g: &Gpu, c: &Case, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let t_end = c.t0 + c.steps;
    let dt = data(&mut rng, t_end, c.steps);
    let refs = head_refs(&dt);
    let max_ctx = t_end + 40;
    let (arena, ext) = arena(g, 1, max_ctx);
    let cfg = HgaLayerConfig::new(0, NH, NKV, max_ctx, c.budget);
    let mut layer = HgaLayer::new(g, &cfg, &arena).unwrap();
    let s = g.stream();
    let (kd, vd, qd) = (s.clone_htod(&dt.k).unwrap(), s.clone_htod(&dt.v).unwrap(), s.clone_htod(&dt.q).unwrap());
    // Poison the pool with large keys: a row the attention reads that no copy or append wrote dominates the
    // softmax (finite, as the rows past the position in the open group are read and masked).
    s.memcpy_htod(&vec![bf16::from_f32(100.0); layer.cache.slots.len()], &mut layer.cache.slots).unwrap();
    layer.prefill_history(g, &kd, &vd, c.t0, &arena).unwrap();
    let mut dpos = s.clone_htod(&[c.t0 as u32]).unwrap();
    let mut out: CudaSlice<bf16> = s.alloc_zeros(NH * D).unwrap();
    let mut lse: CudaSlice<f32> = s.alloc_zeros(NH).unwrap();
    let n = NKV * D;
    let mut t = Tally::default();
    for i in 0..c.steps {
        let p = c.t0 + i;
        s.memcpy_htod(&vec![bf16::NAN; NH * D], &mut out).unwrap();
        layer.append(g, &dpos, &kd.slice(p * n..(p + 1) * n), &vd.slice(p * n..(p + 1) * n), &arena).unwrap();
        let q = qd.slice(i * NH * D..(i + 1) * NH * D);
        layer.attend(g, &dpos, &q, None, &mut out, &mut lse, &arena).unwrap();
        advance_position(g, &mut dpos).unwrap();
        let (sel, o, l) =
            (s.clone_dtoh(&layer.selected).unwrap(), s.clone_dtoh(&out).unwrap(), s.clone_dtoh(&lse).unwrap());
        let kept = s.clone_dtoh(&layer.route_workspace().kept).unwrap();
        check_step(&layer, &dt, &refs, p, &dt.q[i * NH * D..(i + 1) * NH * D], &sel, &kept, &o, &l, c.exact, &mut t);
    }
    assert_eq!(s.clone_dtoh(&dpos).unwrap()[0] as usize, t_end);
    check_tiers(g, &layer, &dt, &refs, &ext, arena.layout);
    let tot = layer.cache_totals();
    let _ = writeln!(
        std::io::stderr(),
        "ok hga_layer T0={} steps={} budget={:?}: {} steps, {} groups selected, {} groups and {} chunks differ from the reference (ties), \
         rel L2 <= {:.2e}, |dLSE| <= {:.2e}{}, cache hits {} misses {}",
        c.t0,
        c.steps,
        c.budget,
        t.steps,
        t.groups,
        t.sel_diffs,
        t.chunk_diffs,
        t.worst_rel,
        t.worst_lse,
        if c.exact { format!(", vs dense rel L2 <= {:.2e}", t.worst_dense) } else { String::new() },
        tot.hits,
        tot.misses
    );
}

#[test]
fn gpu_hga_layer_routed_decode_matches_references() {
    let Some(g) = gpu("gpu_hga_layer routed decode") else { return };
    let _serial = common::serial();
    // 1000: a partial chunk, and 300 steps so that chunks closed while decoding become candidates (from p = 1280)
    // and their summaries are routed on; 2077: partial chunk and group; 3000: partial chunk, a fraction budget.
    for (i, c) in [
        Case { t0: 1000, steps: 300, budget: Budget::Tokens(768), exact: false },
        Case { t0: 2077, steps: 40, budget: Budget::Tokens(1024), exact: false },
        Case { t0: 3000, steps: 20, budget: Budget::Fraction(0.3), exact: false },
    ]
    .iter()
    .enumerate()
    {
        run_case(g, c, 0x4c41 + i as u64);
    }
}

#[test]
fn gpu_hga_layer_covering_budget_is_dense() {
    let Some(g) = gpu("gpu_hga_layer covering budget") else { return };
    let _serial = common::serial();
    for (i, t0) in [1000usize, 2077].into_iter().enumerate() {
        run_case(g, &Case { t0, steps: 24, budget: Budget::Fraction(1.0), exact: true }, 0x4c50 + i as u64);
    }
}

/// Two layers of one arena with the same history: layer 0 decodes with host launches, layer 1 replays one
/// recorded step (append + attend + advance) as a CUDA graph; selections, outputs and LSEs are equal.
#[test]
fn gpu_hga_layer_graph_replay_equals_host_launches() {
    let Some(g) = gpu("gpu_hga_layer graph replay") else { return };
    let _serial = common::serial();
    let mut rng = StdRng::seed_from_u64(0x4c60);
    let (t0, steps) = (1500usize, 12usize);
    let dt = data(&mut rng, t0 + steps, steps);
    let refs = head_refs(&dt);
    let max_ctx = t0 + steps + 40;
    let (arena, ext) = arena(g, 2, max_ctx);
    let budget = Budget::Tokens(640);
    let mut la = HgaLayer::new(g, &HgaLayerConfig::new(0, NH, NKV, max_ctx, budget), &arena).unwrap();
    let mut lb = HgaLayer::new(g, &HgaLayerConfig::new(1, NH, NKV, max_ctx, budget), &arena).unwrap();
    let s = g.stream();
    let (kd, vd) = (s.clone_htod(&dt.k).unwrap(), s.clone_htod(&dt.v).unwrap());
    la.prefill_history(g, &kd, &vd, t0, &arena).unwrap();
    lb.prefill_history(g, &kd, &vd, t0, &arena).unwrap();
    let n = NKV * D;
    let (mut kn, mut vn, mut qn) =
        (s.alloc_zeros::<bf16>(n).unwrap(), s.alloc_zeros::<bf16>(n).unwrap(), s.alloc_zeros::<bf16>(NH * D).unwrap());
    let mut pa = s.clone_htod(&[t0 as u32]).unwrap();
    let mut pb = s.clone_htod(&[t0 as u32]).unwrap();
    let (mut oa, mut ob) = (s.alloc_zeros::<bf16>(NH * D).unwrap(), s.alloc_zeros::<bf16>(NH * D).unwrap());
    let (mut ea, mut eb) = (s.alloc_zeros::<f32>(NH).unwrap(), s.alloc_zeros::<f32>(NH).unwrap());
    let mut graph = None;
    let mut t = Tally::default();
    for i in 0..steps {
        let p = t0 + i;
        s.memcpy_htod(&dt.k[p * n..(p + 1) * n], &mut kn).unwrap();
        s.memcpy_htod(&dt.v[p * n..(p + 1) * n], &mut vn).unwrap();
        s.memcpy_htod(&dt.q[i * NH * D..(i + 1) * NH * D], &mut qn).unwrap();
        la.append(g, &pa, &kn, &vn, &arena).unwrap();
        la.attend(g, &pa, &qn, None, &mut oa, &mut ea, &arena).unwrap();
        advance_position(g, &mut pa).unwrap();
        g.synchronize().unwrap();
        if graph.is_none() {
            graph = Some(
                g.capture(|| {
                    lb.append(g, &pb, &kn, &vn, &arena)?;
                    lb.attend(g, &pb, &qn, None, &mut ob, &mut eb, &arena)?;
                    advance_position(g, &mut pb)
                })
                .unwrap(),
            );
        }
        graph.as_ref().unwrap().launch().unwrap();
        g.synchronize().unwrap();
        let (sa, sb) = (s.clone_dtoh(&la.selected).unwrap(), s.clone_dtoh(&lb.selected).unwrap());
        assert_eq!(sa, sb, "p {p}: selections");
        let (a, b) = (s.clone_dtoh(&oa).unwrap(), s.clone_dtoh(&ob).unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "p {p}: outputs differ");
        let (la_, lb_) = (s.clone_dtoh(&ea).unwrap(), s.clone_dtoh(&eb).unwrap());
        assert!(la_.iter().zip(&lb_).all(|(x, y)| x.to_bits() == y.to_bits()), "p {p}: LSEs differ");
        let kept = s.clone_dtoh(&lb.route_workspace().kept).unwrap();
        check_step(&lb, &dt, &refs, p, &dt.q[i * NH * D..(i + 1) * NH * D], &sb, &kept, &b, &lb_, false, &mut t);
    }
    assert_eq!(s.clone_dtoh(&pb).unwrap()[0] as usize, t0 + steps);
    check_tiers(g, &lb, &dt, &refs, &ext, arena.layout);
    check_tiers(g, &la, &dt, &refs, &ext, arena.layout);
    let _ = writeln!(
        std::io::stderr(),
        "ok hga_layer graph replay: {steps} steps equal to host launches, {} groups, {} reference ties",
        t.groups,
        t.sel_diffs
    );
}
