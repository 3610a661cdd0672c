//! HGA routing on the CPU reference model: an [`AttentionPolicy`] that, per layer and KV head, summarizes the
//! post-RoPE keys of each chunk and group, picks chunks (stage 1) and groups inside them (stage 2), and computes
//! EXACT softmax attention over sink + local window + selected groups (../shared/DESIGN.md, "HGA, version 1").
//!
//! This is the algorithm's oracle: the GPU HGA kernels will be checked against it. It is written for clarity
//! (f64 scores and softmax), parallel over (query block, KV head) with rayon.
//!
//! Geometry, for a query block whose first position is `b0` (prefill routes blocks of `query_block` queries
//! jointly; decode is a block of one):
//! - sink: positions `[0, sink_end)`, `sink_end = ceil(sink / chunk) * chunk` (so candidate chunks are whole);
//! - local: `[local_start, p]` for the query at `p`, `local_start = floor((b0 - local) / chunk) * chunk`, so the
//!   window covers at least `local` tokens before the block and the open chunk;
//! - candidates: the whole chunks in `[sink_end, local_start)`, each split into groups of `group` tokens;
//! - budget `B` tokens (absolute or a fraction of the context `b0 + block`): `n_g = (B - sink - local) / group`
//!   groups (the sink and window are always attended, so they count against the budget);
//! - stage 1 keeps the `ceil(shortlist * n_g * group / chunk)` best chunks, stage 2 the `n_g` best groups in them.
//!   With a budget that covers every candidate, the union is every position: exactly dense attention.
//!
//! Scores: [`SummaryMode::MinMax`] bounds `q . k` over a block by `sum_d max(q_d m_d, q_d M_d)` with the block's
//! elementwise min `m` and max `M` of the rotated keys (an upper bound for any query position: RoPE-aware without
//! approximation); [`SummaryMode::Mean`] uses the mean key. A block's score is aggregated over the block's queries
//! (max) and over the query heads of the KV head ([`GqaMode`]). The two ideal selectors of [`Selector`] replace
//! the scores by the true dense attention at the same budget, as yardsticks.
use std::sync::Mutex;

use rayon::prelude::*;

use crate::model::forward::ops::dot_f64;
use crate::model::forward::{AttentionPolicy, AttentionShape, LayerKv};

pub mod diag;
pub mod eval;
pub mod gpu_layer;
pub use diag::{Diagnostics, HeadStats};
pub use gpu_layer::{HgaLayer, HgaLayerConfig};

/// What summarizes a chunk or group of keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SummaryMode {
    /// Elementwise min and max of the rotated keys: an upper bound of every `q . k` in the block.
    MinMax,
    /// The mean rotated key: `q . mean` (the block's average score).
    Mean,
    /// The mean rotated key and the block's radius around it, `r = max_j |k_j - mean|`: `q . mean + |q| r`, an upper
    /// bound of every `q . k` in the block (Cauchy-Schwarz) from 129 numbers per block instead of min/max's 256.
    Ball,
}

/// How stage 2 scores the groups of the shortlisted chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GroupScore {
    /// The group summary of [`HgaParams::summary`] (as stage 1 does for chunks).
    Summary,
    /// An int4 sketch of every key (per token and KV head: 128 x 4 bits + one scale, 66 bytes; it lives in host RAM
    /// with the K/V, and only the shortlisted chunks' sketches are read): the group's score is the log-sum-exp of the
    /// estimated scaled scores `q . k_hat_j / sqrt(d)` of its tokens, an estimate of its attention mass.
    Sketch4,
}

/// How the query heads that share a KV head combine their block scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GqaMode {
    /// One selection per KV head; a block's score is the max over its query heads.
    Max,
    /// One selection per KV head; the mean over its query heads.
    Mean,
    /// One selection per query head (no sharing).
    PerHead,
}

/// Which tokens are selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Selector {
    /// The HGA two-stage routing by summaries.
    Hga,
    /// Ideal: the candidate tokens with the highest true dense attention (same token budget).
    OracleTokens,
    /// Ideal: the candidate groups with the highest true dense attention mass (same budget).
    OracleGroups,
}

/// The token budget.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub enum Budget {
    /// Tokens per query (sink and window included).
    Tokens(usize),
    /// A share of the context length.
    Fraction(f64),
}

/// HGA parameters. [`Default`] is what the measurements of docs/quality.md chose: DESIGN.md's version 1 geometry
/// (chunks of 64, groups of 16, sink 64, window 256, min/max chunk summaries, GQA max) with stage 2 scoring the
/// groups of an 8x chunk shortlist by int4 key sketches, scores normalized per (query, head). Version 1 itself is
/// [`HgaParams::version1`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct HgaParams {
    pub chunk: usize,
    pub group: usize,
    pub sink: usize,
    pub local: usize,
    pub budget: Budget,
    pub summary: SummaryMode,
    /// Stage 2's scores.
    pub group_score: GroupScore,
    /// Scores are taken relative to each (query, head)'s log-sum-exp over its sink and local window before the
    /// max over heads and queries, so that heads of different sharpness compare on one scale.
    pub normalize: bool,
    pub gqa: GqaMode,
    /// Stage 1 keeps `shortlist` times the chunks the selected groups could fill.
    pub shortlist: f64,
    /// Prefill routes this many consecutive queries jointly.
    pub query_block: usize,
    /// The first `dense_layers` layers use dense attention.
    pub dense_layers: usize,
    pub selector: Selector,
}

impl Default for HgaParams {
    fn default() -> Self {
        HgaParams {
            chunk: 64,
            group: 16,
            sink: 64,
            local: 256,
            budget: Budget::Fraction(0.03),
            summary: SummaryMode::MinMax,
            group_score: GroupScore::Sketch4,
            normalize: true,
            gqa: GqaMode::Max,
            shortlist: 8.0,
            query_block: 64,
            dense_layers: 0,
            selector: Selector::Hga,
        }
    }
}

impl HgaParams {
    /// Checks the parameters; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.group == 0 || self.chunk == 0 || !self.chunk.is_multiple_of(self.group) {
            return Err(format!("chunk ({}) must be a positive multiple of group ({})", self.chunk, self.group));
        }
        if self.query_block == 0 {
            return Err("query_block must be > 0".into());
        }
        if self.shortlist.is_nan() || self.shortlist < 1.0 {
            return Err(format!("shortlist must be >= 1, got {}", self.shortlist));
        }
        if let Budget::Fraction(f) = self.budget {
            if !(f > 0.0 && f <= 1.0) {
                return Err(format!("budget fraction must be in (0, 1], got {f}"));
            }
        }
        Ok(())
    }

    /// The scoring and geometry options that differ from [`Default`] (budget and selector aside), e.g.
    /// `summary no-norm s2` (DESIGN.md's version 1); `default` when none does.
    pub fn label(&self) -> String {
        let d = Self::default();
        let mut v = Vec::new();
        if (self.chunk, self.group) != (d.chunk, d.group) {
            v.push(format!("{}/{}", self.chunk, self.group));
        }
        if self.summary != d.summary {
            v.push(format!("{:?}", self.summary).to_lowercase());
        }
        if self.group_score != d.group_score {
            v.push(format!("{:?}", self.group_score).to_lowercase());
        }
        if self.normalize != d.normalize {
            v.push(if self.normalize { "norm" } else { "no-norm" }.into());
        }
        if self.gqa != d.gqa {
            v.push(format!("gqa-{:?}", self.gqa).to_lowercase());
        }
        if self.shortlist != d.shortlist {
            v.push(if self.shortlist.is_finite() { format!("s{}", self.shortlist) } else { "s-inf".into() });
        }
        if self.dense_layers != d.dense_layers {
            v.push(format!("dense{}", self.dense_layers));
        }
        if (self.sink, self.local, self.query_block) != (d.sink, d.local, d.query_block) {
            v.push(format!("sink{}-local{}-qb{}", self.sink, self.local, self.query_block));
        }
        if v.is_empty() {
            "default".into()
        } else {
            v.join(" ")
        }
    }

    /// DESIGN.md's version 1: min/max summaries for both stages, a 2x chunk shortlist, raw scores.
    pub fn version1() -> Self {
        HgaParams { group_score: GroupScore::Summary, normalize: false, shortlist: 2.0, ..Self::default() }
    }

    /// A budget that covers every position: HGA must then equal dense attention.
    pub fn exact() -> Self {
        HgaParams { budget: Budget::Fraction(1.0), shortlist: f64::MAX, ..Self::default() }
    }
}

/// Summaries of the complete blocks of `block` tokens among positions `[0, n)` of one KV head: `[blocks, d]` each.
#[derive(Clone, Debug, Default)]
pub struct Summaries {
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub mean: Vec<f32>,
    /// `[blocks]`: the largest distance of a key of the block to its mean.
    pub radius: Vec<f32>,
    pub d: usize,
}

impl Summaries {
    /// `keys` is `[positions, row_stride]`; the head's keys are at `offset..offset + d` of each row.
    pub fn build(keys: &[f32], row_stride: usize, offset: usize, d: usize, n: usize, block: usize) -> Self {
        let nb = n / block;
        let mut s = Summaries {
            min: vec![f32::INFINITY; nb * d],
            max: vec![f32::NEG_INFINITY; nb * d],
            mean: vec![0.0; nb * d],
            radius: vec![0.0; nb],
            d,
        };
        for b in 0..nb {
            let mut acc = vec![0f64; d];
            for j in b * block..(b + 1) * block {
                let k = &keys[j * row_stride + offset..j * row_stride + offset + d];
                for (i, &x) in k.iter().enumerate() {
                    s.min[b * d + i] = s.min[b * d + i].min(x);
                    s.max[b * d + i] = s.max[b * d + i].max(x);
                    acc[i] += x as f64;
                }
            }
            for (i, a) in acc.iter().enumerate() {
                s.mean[b * d + i] = (a / block as f64) as f32;
            }
            let mean = &s.mean[b * d..(b + 1) * d];
            let r2 = (b * block..(b + 1) * block)
                .map(|j| {
                    let k = &keys[j * row_stride + offset..j * row_stride + offset + d];
                    k.iter().zip(mean).map(|(&x, &m)| (x as f64 - m as f64).powi(2)).sum::<f64>()
                })
                .fold(0.0, f64::max);
            // Rounded up so that the bound holds for the f32 mean.
            s.radius[b] = (r2.sqrt() * (1.0 + 1e-6)) as f32;
        }
        s
    }

    /// Score of block `b` for query `q` (unscaled).
    pub fn score(&self, mode: SummaryMode, q: &[f32], b: usize) -> f64 {
        let r = b * self.d..(b + 1) * self.d;
        match mode {
            SummaryMode::MinMax => bound_score(q, &self.min[r.clone()], &self.max[r]),
            SummaryMode::Mean => dot_f64(q, &self.mean[r]),
            SummaryMode::Ball => dot_f64(q, &self.mean[r]) + dot_f64(q, q).sqrt() * self.radius[b] as f64,
        }
    }
}

/// `sum_d max(q_d m_d, q_d M_d)`: an upper bound of `q . k` for every `k` with `m <= k <= M` elementwise.
pub fn bound_score(q: &[f32], min: &[f32], max: &[f32]) -> f64 {
    q.iter().zip(min.iter().zip(max)).map(|(&q, (&m, &mx))| (q as f64 * m as f64).max(q as f64 * mx as f64)).sum()
}

/// Indices of the `k` largest scores, best first; ties go to the lower index. NaN scores rank last.
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| if scores[i].is_nan() { f64::NEG_INFINITY } else { scores[i] };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Exact softmax attention of `q` over the positions `idx` (scaled by `scale`): the output and the log-sum-exp
/// (natural log) of the scaled scores, so partial results over disjoint sets merge exactly.
pub fn attend_selected(
    q: &[f32],
    kv: &LayerKv,
    row_stride: usize,
    offset: usize,
    idx: &[usize],
    scale: f64,
) -> (Vec<f32>, f64) {
    let d = q.len();
    let scores: Vec<f64> =
        idx.iter().map(|&j| dot_f64(q, &kv.k[j * row_stride + offset..j * row_stride + offset + d]) * scale).collect();
    let m = scores.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let p: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f64 = p.iter().sum();
    let mut acc = vec![0f64; d];
    for (&j, pj) in idx.iter().zip(&p) {
        for (a, &v) in acc.iter_mut().zip(&kv.v[j * row_stride + offset..j * row_stride + offset + d]) {
            *a += pj * v as f64;
        }
    }
    (acc.iter().map(|a| (a / z) as f32).collect(), m + z.ln())
}

/// The routing geometry of one query block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Always attended: `[0, sink_end)`.
    pub sink_end: usize,
    /// Always attended from here to the query (causal).
    pub local_start: usize,
    /// Candidate chunks: `first_chunk..end_chunk` (whole chunks in `[sink_end, local_start)`).
    pub first_chunk: usize,
    pub end_chunk: usize,
    /// Groups to select.
    pub n_groups: usize,
    /// Chunks kept by stage 1.
    pub n_chunks: usize,
    /// The first query position of the block.
    pub block_start: usize,
}

impl Geometry {
    /// For a block of queries at positions `b0..b0 + len`.
    pub fn new(p: &HgaParams, b0: usize, len: usize) -> Self {
        let c = p.chunk;
        let sink_end = p.sink.div_ceil(c) * c;
        let local_start = (b0.saturating_sub(p.local) / c * c).max(sink_end.min(b0));
        let (first_chunk, end_chunk) = (sink_end / c, (local_start / c).max(sink_end / c));
        let ctx = b0 + len;
        let budget = match p.budget {
            Budget::Tokens(t) => t,
            Budget::Fraction(f) => (f * ctx as f64).ceil() as usize,
        };
        let always = sink_end.min(ctx) + (ctx - local_start.min(ctx));
        let candidates = (end_chunk - first_chunk) * (c / p.group);
        let n_groups = (budget.saturating_sub(always) / p.group).min(candidates);
        let want = (p.shortlist * (n_groups * p.group) as f64 / c as f64).ceil();
        let n_chunks =
            if want.is_finite() { (want as usize).min(end_chunk - first_chunk) } else { end_chunk - first_chunk };
        Geometry { sink_end, local_start, first_chunk, end_chunk, n_groups, n_chunks, block_start: b0 }
    }

    /// The always-attended positions of the block's first query: the sink and the window up to the block start.
    pub fn always(&self) -> impl Iterator<Item = usize> + Clone {
        (0..self.sink_end.min(self.local_start)).chain(self.local_start.max(self.sink_end)..self.block_start)
    }

    /// The positions attended by the query at `pos` given the selected groups (sorted, unique).
    pub fn positions(&self, group: usize, groups: &[usize], pos: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..self.sink_end.min(pos + 1)).collect();
        for &g in groups {
            v.extend((g * group..(g + 1) * group).filter(|&j| j <= pos));
        }
        v.extend(self.local_start.max(self.sink_end)..=pos);
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// HGA's two-stage routing of one routing unit (Selector::Hga): the chunks stage 1 keeps (absolute chunk indices,
/// sorted) and the groups stage 2 selects (absolute group indices, sorted). `g.n_groups` must be > 0.
fn route_hga(
    p: &HgaParams,
    g: &Geometry,
    sums: (&Summaries, &Summaries),
    qs: &[&[f32]],
    unit_heads: usize,
    keys: KeyView<'_>,
    scale: f64,
) -> (Vec<usize>, Vec<usize>) {
    let gpc = p.chunk / p.group;
    let agg = |vals: &mut dyn Iterator<Item = f64>, n_heads: usize| -> f64 {
        match p.gqa {
            GqaMode::Mean => vals.sum::<f64>() / n_heads as f64,
            _ => vals.fold(f64::NEG_INFINITY, f64::max),
        }
    };
    let (chunks, groups) = sums;
    // Per (query, head): the log-sum-exp of its sink and window scores, subtracted when normalizing.
    // Summary scores are unscaled `q . k` bounds or estimates, so they are scaled first.
    let base: Vec<f64> =
        if p.normalize { qs.iter().map(|q| keys.lse(q, g.always(), scale)).collect() } else { vec![0.0; qs.len()] };
    // `qs` is query-major ([q0h0, q0h1, .., q1h0, ..]): per head, the max over the block's queries;
    // then the GQA aggregation over the unit's heads.
    let combine = |f: &dyn Fn(usize) -> f64| -> f64 {
        let per_head = |h: usize| -> f64 {
            (h..qs.len()).step_by(unit_heads).map(|i| f(i) - base[i]).fold(f64::NEG_INFINITY, f64::max)
        };
        agg(&mut (0..unit_heads).map(per_head), unit_heads)
    };
    let score = |sm: &Summaries, b: usize| combine(&|i| sm.score(p.summary, qs[i], b) * scale);
    let chunk_scores: Vec<f64> = (g.first_chunk..g.end_chunk).map(|c| score(chunks, c)).collect();
    let kept = top_k(&chunk_scores, g.n_chunks);
    let cand: Vec<usize> =
        kept.iter().flat_map(|&c| (g.first_chunk + c) * gpc..(g.first_chunk + c + 1) * gpc).collect();
    let group_scores: Vec<f64> = match p.group_score {
        GroupScore::Summary => cand.iter().map(|&gi| score(groups, gi)).collect(),
        GroupScore::Sketch4 => cand
            .iter()
            .map(|&gi| {
                let sk: Vec<Vec<f32>> = (gi * p.group..(gi + 1) * p.group).map(|j| keys.sketch4(j)).collect();
                combine(&|i| {
                    let s: Vec<f64> = sk.iter().map(|k| dot_f64(qs[i], k) * scale).collect();
                    log_sum_exp(&s)
                })
            })
            .collect(),
    };
    let mut sel: Vec<usize> = top_k(&group_scores, g.n_groups).into_iter().map(|i| cand[i]).collect();
    sel.sort_unstable();
    let mut kept_abs: Vec<usize> = kept.iter().map(|&c| g.first_chunk + c).collect();
    kept_abs.sort_unstable();
    (kept_abs, sel)
}

/// [`HgaAttention`]'s choice for one routing unit at the query block `b0 .. b0 + len`: (kept chunks, selected
/// groups), both absolute and sorted (empty when the geometry selects no group). `keys` is `[positions, stride]`
/// with the KV head's rotated keys at `off .. off + d` (at least the block's positions); `qs` the block's query rows
/// query-major (`[q0h0, q0h1, .., q1h0, ..]`) for the `unit_heads` query heads of the unit. Exposed so that the GPU
/// routing can be compared with the oracle on the same keys.
#[allow(clippy::too_many_arguments)]
pub fn route_unit(
    p: &HgaParams,
    b0: usize,
    len: usize,
    keys: &[f32],
    stride: usize,
    off: usize,
    d: usize,
    qs: &[&[f32]],
    unit_heads: usize,
    scale: f64,
) -> (Vec<usize>, Vec<usize>) {
    let g = Geometry::new(p, b0, len);
    if g.n_groups == 0 {
        return (Vec::new(), Vec::new());
    }
    let chunks = Summaries::build(keys, stride, off, d, g.end_chunk * p.chunk, p.chunk);
    let grp = Summaries::build(keys, stride, off, d, g.end_chunk * p.chunk, p.group);
    route_hga(p, &g, (&chunks, &grp), qs, unit_heads, KeyView { keys, stride, off, d }, scale)
}

/// The HGA attention policy (with optional diagnostics, see [`diag`]).
pub struct HgaAttention {
    pub params: HgaParams,
    diagnostics: Option<Mutex<Diagnostics>>,
    /// Queries at positions below this are not diagnosed.
    diagnose_from: usize,
    /// When set, every routed block's selection `(layer, KV head, first position, groups)` (see
    /// [`Self::with_selection_log`]).
    selection_log: Option<Mutex<Vec<SelectionRecord>>>,
}

/// One routed block's selection: (layer, KV head, first position of the block, sorted groups).
pub type SelectionRecord = (usize, usize, usize, Vec<usize>);

impl HgaAttention {
    pub fn new(params: HgaParams) -> Result<Self, String> {
        params.validate()?;
        Ok(HgaAttention { params, diagnostics: None, diagnose_from: 0, selection_log: None })
    }

    /// Also records the selected groups of every routed block (decode: every step) per (layer, KV head): the
    /// selection traces that the GPU working-set cache is measured on (`hga::kv::gpu_cache`).
    pub fn with_selection_log(mut self) -> Self {
        self.selection_log = Some(Mutex::new(Vec::new()));
        self
    }

    /// The selections recorded so far: `(layer, KV head, first position of the block, sorted groups)`.
    pub fn take_selection_log(&self) -> Vec<SelectionRecord> {
        self.selection_log
            .as_ref()
            .map(|l| std::mem::take(&mut *l.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    /// Also records, per layer and KV head, how the selection compares with dense attention (costs a dense pass).
    pub fn with_diagnostics(self) -> Self {
        self.with_diagnostics_from(0)
    }

    /// [`Self::with_diagnostics`] for the queries at positions `>= from` only (e.g. the scored end of an evaluation
    /// window), which spares the dense pass over the others.
    pub fn with_diagnostics_from(mut self, from: usize) -> Self {
        self.diagnostics = Some(Mutex::new(Diagnostics::default()));
        self.diagnose_from = from;
        self
    }

    /// The diagnostics gathered so far (empty without [`Self::with_diagnostics`]).
    pub fn take_diagnostics(&self) -> Diagnostics {
        self.diagnostics
            .as_ref()
            .map(|d| std::mem::take(&mut *d.lock().unwrap_or_else(|e| e.into_inner())))
            .unwrap_or_default()
    }

    /// Selected groups (absolute group indices, sorted) for one query block and one set of query heads.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        g: &Geometry,
        sums: (&Summaries, &Summaries),
        qs: &[&[f32]],
        unit_heads: usize,
        dense_probs: Option<&[Vec<f64>]>,
        keys: KeyView<'_>,
        scale: f64,
    ) -> Vec<usize> {
        let p = &self.params;
        if g.n_groups == 0 {
            return Vec::new();
        }
        let gpc = p.chunk / p.group;
        let group_range = g.first_chunk * gpc..g.end_chunk * gpc;
        match (p.selector, dense_probs) {
            (Selector::Hga, _) | (_, None) => route_hga(p, g, sums, qs, unit_heads, keys, scale).1,
            (Selector::OracleGroups, Some(probs)) => {
                // Mass of each candidate group, max over (query, head).
                let mass: Vec<f64> = group_range
                    .clone()
                    .map(|gi| {
                        probs
                            .iter()
                            .map(|pr| pr[gi * p.group..(gi + 1) * p.group].iter().sum::<f64>())
                            .fold(0.0, f64::max)
                    })
                    .collect();
                let mut sel: Vec<usize> = top_k(&mass, g.n_groups).into_iter().map(|i| group_range.start + i).collect();
                sel.sort_unstable();
                sel
            }
            (Selector::OracleTokens, Some(_)) => Vec::new(), // tokens are chosen in `attend` (not group-aligned)
        }
    }
}

impl AttentionPolicy for HgaAttention {
    fn name(&self) -> &str {
        match self.params.selector {
            Selector::Hga => "hga",
            Selector::OracleTokens => "oracle-tokens",
            Selector::OracleGroups => "oracle-groups",
        }
    }

    fn attend(&self, layer: usize, s: &AttentionShape, start: usize, q: &[f32], kv: &LayerKv) -> Vec<f32> {
        let p = &self.params;
        let d = s.head_dim;
        let qdim = s.num_heads * d;
        let kv_dim = s.num_kv_heads * d;
        let per_kv = s.num_heads / s.num_kv_heads;
        let tokens = q.len() / qdim;
        let n = start + tokens;
        let dense_layer = layer < p.dense_layers;
        // Routing units: a KV head with its query heads, or a single query head.
        let unit_heads = if p.gqa == GqaMode::PerHead { 1 } else { per_kv };
        let units = s.num_heads / unit_heads;
        let blocks: Vec<(usize, usize)> =
            (0..tokens).step_by(p.query_block).map(|t0| (t0, (t0 + p.query_block).min(tokens))).collect();
        let work: Vec<(usize, usize)> = (0..blocks.len()).flat_map(|b| (0..units).map(move |u| (b, u))).collect();
        let want_diag = self.diagnostics.is_some();
        let results: Vec<UnitResult> = work
            .par_iter()
            .map(|&(bi, u)| {
                let (t0, t1) = blocks[bi];
                let kvh = u * unit_heads / per_kv;
                let off = kvh * d;
                let heads: Vec<usize> = (u * unit_heads..(u + 1) * unit_heads).collect();
                let geo = if dense_layer {
                    Geometry::new(&HgaParams::exact(), start + t0, t1 - t0)
                } else {
                    Geometry::new(p, start + t0, t1 - t0)
                };
                let qrow = |t: usize, h: usize| &q[t * qdim + h * d..t * qdim + (h + 1) * d];
                // Dense probabilities over [0, n) per (query, head), when an oracle or the diagnostics need them.
                let diag_block = want_diag && start + t1 > self.diagnose_from;
                let need_dense = diag_block || p.selector != Selector::Hga;
                let dense: Vec<Vec<f64>> = if need_dense {
                    (t0..t1)
                        .flat_map(|t| heads.iter().map(move |&h| (t, h)))
                        .map(|(t, h)| dense_probs(qrow(t, h), kv, kv_dim, off, start + t + 1, n, s.scale))
                        .collect()
                } else {
                    Vec::new()
                };
                let qs: Vec<&[f32]> = (t0..t1).flat_map(|t| heads.iter().map(move |&h| qrow(t, h))).collect();
                let groups = if dense_layer || geo.n_groups == 0 {
                    Vec::new()
                } else {
                    let chunks = Summaries::build(&kv.k, kv_dim, off, d, geo.end_chunk * p.chunk, p.chunk);
                    let grp = Summaries::build(&kv.k, kv_dim, off, d, geo.end_chunk * p.chunk, p.group);
                    let keys = KeyView { keys: &kv.k, stride: kv_dim, off, d };
                    self.route(&geo, (&chunks, &grp), &qs, unit_heads, need_dense.then_some(&dense[..]), keys, s.scale)
                };
                if let (Some(log), false) = (&self.selection_log, dense_layer) {
                    log.lock().unwrap_or_else(|e| e.into_inner()).push((layer, kvh, start + t0, groups.clone()));
                }
                let geo_groups = if dense_layer {
                    (geo.first_chunk * p.chunk / p.group..geo.end_chunk * p.chunk / p.group).collect()
                } else {
                    groups
                };
                let mut outs = Vec::new();
                let mut stats = Vec::new();
                for (i, (t, h)) in (t0..t1).flat_map(|t| heads.iter().map(move |&h| (t, h))).enumerate() {
                    let pos = start + t;
                    let idx = if p.selector == Selector::OracleTokens && !dense_layer {
                        oracle_tokens(&geo, p, &dense, pos)
                    } else {
                        geo.positions(p.group, &geo_groups, pos)
                    };
                    let (o, _lse) = attend_selected(qrow(t, h), kv, kv_dim, off, &idx, s.scale);
                    if diag_block && pos >= self.diagnose_from {
                        let (od, _) =
                            attend_selected(qrow(t, h), kv, kv_dim, off, &(0..=pos).collect::<Vec<_>>(), s.scale);
                        stats.push(HeadStats::measure(&dense[i], &idx, &o, &od, pos + 1));
                    }
                    outs.push((t, h, o));
                }
                (bi, kvh, outs, stats)
            })
            .collect();
        let mut out = vec![0f32; tokens * qdim];
        for (_, kvh, outs, stats) in results {
            for (t, h, o) in outs {
                out[t * qdim + h * d..t * qdim + (h + 1) * d].copy_from_slice(&o);
            }
            if let Some(dg) = &self.diagnostics {
                let mut dg = dg.lock().unwrap_or_else(|e| e.into_inner());
                for st in stats {
                    dg.add(layer, kvh, &st);
                }
            }
        }
        out
    }
}

/// What one (query block, routing unit) produces: its KV head, the outputs `(token, head, values)` and the
/// diagnostics of each (query, head).
type UnitResult = (usize, usize, Vec<(usize, usize, Vec<f32>)>, Vec<HeadStats>);

/// Softmax probabilities of `q` over positions `[0, upto)` (zeros beyond, up to `n`).
fn dense_probs(q: &[f32], kv: &LayerKv, stride: usize, off: usize, upto: usize, n: usize, scale: f64) -> Vec<f64> {
    let d = q.len();
    let s: Vec<f64> = (0..upto).map(|j| dot_f64(q, &kv.k[j * stride + off..j * stride + off + d]) * scale).collect();
    let m = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let mut p: Vec<f64> = e.iter().map(|v| v / z).collect();
    p.resize(n, 0.0);
    p
}

/// The ideal token selector: sink + window + the `n_groups * group` candidate tokens of highest dense attention
/// (max over the routing unit's queries and heads), at the same budget as the group selection.
fn oracle_tokens(g: &Geometry, p: &HgaParams, dense: &[Vec<f64>], pos: usize) -> Vec<usize> {
    let lo = g.first_chunk * p.chunk;
    let hi = g.end_chunk * p.chunk;
    let score: Vec<f64> = (lo..hi).map(|j| dense.iter().map(|pr| pr[j]).fold(0.0, f64::max)).collect();
    let picked: Vec<usize> =
        top_k(&score, g.n_groups * p.group).into_iter().map(|i| lo + i).filter(|&j| j <= pos).collect();
    let mut v: Vec<usize> = (0..g.sink_end.min(pos + 1)).collect();
    v.extend(picked);
    v.extend(g.local_start.max(g.sink_end)..=pos);
    v.sort_unstable();
    v.dedup();
    v
}

/// The keys of one KV head: `keys[j * stride + off..][..d]` is position `j`'s rotated key.
#[derive(Clone, Copy)]
struct KeyView<'a> {
    keys: &'a [f32],
    stride: usize,
    off: usize,
    d: usize,
}

impl KeyView<'_> {
    fn key(&self, j: usize) -> &[f32] {
        &self.keys[j * self.stride + self.off..j * self.stride + self.off + self.d]
    }

    /// Log-sum-exp of `q . k_j * scale` over `positions` (-inf when empty).
    fn lse(&self, q: &[f32], positions: impl Iterator<Item = usize>, scale: f64) -> f64 {
        let s: Vec<f64> = positions.map(|j| dot_f64(q, self.key(j)) * scale).collect();
        log_sum_exp(&s)
    }

    /// Position `j`'s key through its int4 sketch: `round(k / s)` clamped to [-8, 7] with `s = max |k| / 7`,
    /// dequantized.
    fn sketch4(&self, j: usize) -> Vec<f32> {
        let k = self.key(j);
        let s = k.iter().fold(0f32, |m, v| m.max(v.abs())) / 7.0;
        if s == 0.0 {
            return vec![0.0; k.len()];
        }
        k.iter().map(|v| (v / s).round().clamp(-8.0, 7.0) * s).collect()
    }
}

/// `ln sum exp(s_i)`, -inf for an empty slice (NaN if any `s_i` is NaN or the max is +inf).
pub fn log_sum_exp(s: &[f64]) -> f64 {
    let m = s.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln()
}
