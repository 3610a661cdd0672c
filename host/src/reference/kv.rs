//! CPU model of the GPU working-set cache (`gpu-kernels/src/kv/`, formats `params/kv.rs`): the same page tables,
//! the same CLOCK replacement evaluated one slot at a time, the same entry list order and counters, so that the
//! GPU tests compare slot assignments, tables, entries and counters exactly. Also the yardsticks of the hit-rate
//! bench: LRU and Belady's optimum (evict the group whose next use is farthest) on a selection trace.
use std::collections::HashMap;

use gpu_kernels::params::{kv_local_start, KV_GROUP_BYTES, KV_SINK_SLOTS, KV_WINDOW_SLOTS};

/// `u32::MAX`: padding in a selection, an absent table entry, an empty slot.
pub const ABSENT: u32 = u32::MAX;

/// Geometry and policy of one layer's cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    pub n_kv: usize,
    pub cache_slots: usize,
    /// Page-table length per head (groups `>= table_groups` are never cached).
    pub table_groups: usize,
    /// Selected groups per head and step (padding included).
    pub max_groups: usize,
    /// Groups the arena holds (`n_extents * groups_per_extent`).
    pub arena_groups: usize,
    pub ref_hit: u32,
    pub ref_fill: u32,
}

impl CacheConfig {
    pub fn slots_per_head(&self) -> usize {
        KV_SINK_SLOTS + KV_WINDOW_SLOTS + self.cache_slots
    }
    pub fn max_entries(&self) -> usize {
        KV_SINK_SLOTS + KV_WINDOW_SLOTS + self.max_groups
    }
}

/// One KV head's cache state (as on the GPU).
#[derive(Clone, Debug)]
pub struct HeadState {
    pub table: Vec<u32>,
    pub slot_group: Vec<u32>,
    pub slot_ref: Vec<u32>,
    pub slot_used: Vec<u32>,
    pub hand: u32,
    /// hits, misses, bytes, steps.
    pub counters: [u64; 4],
}

/// What one lookup step produced for one head.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepOut {
    /// (absolute slot, first position), in the kernel's order: sink, window, hits, misses.
    pub entries: Vec<(u32, u32)>,
    /// (group, absolute slot) of the misses, in order.
    pub misses: Vec<(u32, u32)>,
    pub hits: u32,
}

/// The model of one layer's cache.
#[derive(Clone, Debug)]
pub struct CacheModel {
    pub cfg: CacheConfig,
    pub heads: Vec<HeadState>,
}

impl CacheModel {
    pub fn new(cfg: CacheConfig) -> Self {
        let head = HeadState {
            table: vec![ABSENT; cfg.table_groups],
            slot_group: vec![ABSENT; cfg.cache_slots],
            slot_ref: vec![0; cfg.cache_slots],
            slot_used: vec![0; cfg.cache_slots],
            hand: 0,
            counters: [0; 4],
        };
        CacheModel { cfg, heads: vec![head; cfg.n_kv] }
    }

    /// `hga_kv_lookup` at position `p` with `selected[h]` (each `max_groups` long, padding `ABSENT`).
    pub fn lookup(&mut self, p: u32, selected: &[Vec<u32>]) -> Vec<StepOut> {
        let cfg = self.cfg;
        (0..cfg.n_kv).map(|h| self.lookup_head(h, p, &selected[h])).collect()
    }

    fn lookup_head(&mut self, h: usize, p: u32, sel: &[u32]) -> StepOut {
        let cfg = self.cfg;
        let st = &mut self.heads[h];
        let now = p + 1;
        let pg = p / 16;
        let w0 = (kv_local_start(p) / 16).max(KV_SINK_SLOTS as u32);
        let head0 = (h * cfg.slots_per_head()) as u32;
        let cache0 = head0 + (KV_SINK_SLOTS + KV_WINDOW_SLOTS) as u32;
        let mut out = StepOut::default();
        for g in 0..=pg.min(KV_SINK_SLOTS as u32 - 1) {
            out.entries.push((head0 + g, g * 16));
        }
        for g in w0..=pg {
            out.entries.push((head0 + KV_SINK_SLOTS as u32 + g % KV_WINDOW_SLOTS as u32, g * 16));
        }
        let mut taken = std::collections::HashSet::new();
        let mut miss_groups = Vec::new();
        for &g in sel.iter().take(cfg.max_groups) {
            let ok = g != ABSENT
                && g >= KV_SINK_SLOTS as u32
                && g < w0
                && (g as usize) < cfg.table_groups
                && (g as usize) < cfg.arena_groups;
            if !ok || !taken.insert(g) {
                continue;
            }
            let s = st.table[g as usize];
            if s != ABSENT {
                st.slot_used[s as usize] = now;
                st.slot_ref[s as usize] = cfg.ref_hit;
                out.entries.push((cache0 + s, g * 16));
                out.hits += 1;
            } else {
                miss_groups.push(g);
            }
        }
        let n = cfg.cache_slots as u32;
        for &g in &miss_groups {
            loop {
                let c = st.hand as usize;
                st.hand = if st.hand + 1 == n { 0 } else { st.hand + 1 };
                if st.slot_used[c] == now {
                    continue;
                }
                if st.slot_ref[c] > 0 {
                    st.slot_ref[c] -= 1;
                    continue;
                }
                let old = st.slot_group[c];
                if old != ABSENT {
                    st.table[old as usize] = ABSENT;
                }
                st.table[g as usize] = c as u32;
                st.slot_group[c] = g;
                st.slot_ref[c] = cfg.ref_fill;
                st.slot_used[c] = now;
                out.misses.push((g, cache0 + c as u32));
                break;
            }
        }
        for &(g, s) in &out.misses {
            out.entries.push((s, g * 16));
        }
        let nm = out.misses.len() as u64;
        st.counters[0] += out.hits as u64;
        st.counters[1] += nm;
        st.counters[2] += nm * KV_GROUP_BYTES as u64;
        st.counters[3] += 1;
        out
    }
}

/// Hits of a CLOCK cache of `slots` slots (the model above, one head) on a trace of selections, one `Vec` of
/// distinct groups per step.
pub fn clock_hits(trace: &[Vec<u32>], slots: usize, ref_hit: u32, ref_fill: u32) -> (u64, u64) {
    let max_groups = trace.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
    let groups = trace.iter().flatten().copied().max().map_or(1, |g| g as usize + 1);
    let cfg = CacheConfig {
        n_kv: 1,
        cache_slots: slots.max(max_groups),
        table_groups: groups,
        max_groups,
        arena_groups: groups,
        ref_hit,
        ref_fill,
    };
    let mut m = CacheModel::new(cfg);
    // Positions far enough that no selected group is in the window.
    let p = (groups as u32 + KV_WINDOW_SLOTS as u32 + 40) * 16;
    for (i, s) in trace.iter().enumerate() {
        m.lookup(p + i as u32, std::slice::from_ref(s));
    }
    (m.heads[0].counters[0], m.heads[0].counters[1])
}

/// Hits of an LRU cache of `slots` groups on a trace (misses = selected - hits).
pub fn lru_hits(trace: &[Vec<u32>], slots: usize) -> u64 {
    let mut last: HashMap<u32, usize> = HashMap::new();
    let mut hits = 0;
    for (t, s) in trace.iter().enumerate() {
        for &g in s {
            if last.contains_key(&g) {
                hits += 1;
            }
            last.insert(g, t);
        }
        while last.len() > slots {
            let (&g, _) = last.iter().filter(|(g, _)| !s.contains(g)).min_by_key(|(g, &u)| (u, **g)).unwrap();
            last.remove(&g);
        }
    }
    hits
}

/// Hits of Belady's optimum with `slots` slots (demand paging: every selected group must be resident at its
/// step; on a miss the resident group whose next use is farthest is evicted).
pub fn belady_hits(trace: &[Vec<u32>], slots: usize) -> u64 {
    // next[t][i]: the next step after t at which trace[t][i] is selected.
    let mut next_use: HashMap<u32, usize> = HashMap::new();
    let mut next: Vec<Vec<usize>> = vec![Vec::new(); trace.len()];
    for t in (0..trace.len()).rev() {
        next[t] = trace[t].iter().map(|g| *next_use.get(g).unwrap_or(&usize::MAX)).collect();
        for &g in &trace[t] {
            next_use.insert(g, t);
        }
    }
    let mut resident: HashMap<u32, usize> = HashMap::new(); // group -> next use
    let mut by_next: std::collections::BTreeSet<(usize, u32)> = Default::default();
    let mut hits = 0;
    for (t, s) in trace.iter().enumerate() {
        for (i, &g) in s.iter().enumerate() {
            if let Some(n) = resident.remove(&g) {
                by_next.remove(&(n, g));
                hits += 1;
            }
            resident.insert(g, next[t][i]);
            by_next.insert((next[t][i], g));
        }
        while resident.len() > slots {
            // Farthest next use among the groups not selected now (those now selected have next uses > t too,
            // but must stay: evict the farthest of the others).
            let &(n, g) = by_next.iter().rev().find(|(_, g)| !s.contains(g)).unwrap();
            by_next.remove(&(n, g));
            resident.remove(&g);
        }
    }
    hits
}

/// A selection trace: the groups routed at consecutive decode steps, per (layer, KV head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectionTrace {
    pub layers: usize,
    pub kv_heads: usize,
    /// Position of the first step.
    pub first_pos: usize,
    /// `steps[t][layer * kv_heads + h]`: the sorted distinct groups of step `t`.
    pub steps: Vec<Vec<Vec<u32>>>,
}

const TRACE_MAGIC: &[u8; 8] = b"HGAKVTR1";

impl SelectionTrace {
    /// Step `t`'s selection of `layer` as the lookup kernel takes it: `u32 [kv_heads][max_sel]`, each head's
    /// groups followed by `u32::MAX` padding (truncated to `max_sel`).
    pub fn padded_step(&self, t: usize, layer: usize, max_sel: usize) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.kv_heads * max_sel);
        for h in 0..self.kv_heads {
            let mut x = self.steps[t][layer * self.kv_heads + h].clone();
            x.resize(max_sel, ABSENT);
            v.extend(x);
        }
        v
    }

    /// The trace of one (layer, KV head).
    pub fn stream(&self, layer: usize, h: usize) -> Vec<Vec<u32>> {
        self.steps.iter().map(|s| s[layer * self.kv_heads + h].clone()).collect()
    }

    /// Most groups selected in one step by one (layer, KV head).
    pub fn max_selected(&self) -> usize {
        self.steps.iter().flatten().map(|s| s.len()).max().unwrap_or(0)
    }

    /// Compact bytes: magic, then u32 layers, kv_heads, first_pos, steps, then per step and stream a u16 count and
    /// u16 deltas of the sorted groups.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = TRACE_MAGIC.to_vec();
        for v in [self.layers, self.kv_heads, self.first_pos, self.steps.len()] {
            b.extend_from_slice(&(v as u32).to_le_bytes());
        }
        for st in &self.steps {
            for s in st {
                b.extend_from_slice(&(s.len() as u16).to_le_bytes());
                let mut prev = 0u32;
                for &g in s {
                    b.extend_from_slice(&((g - prev) as u16).to_le_bytes());
                    prev = g;
                }
            }
        }
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, String> {
        let bad = || "not a selection trace (or truncated)".to_string();
        if b.len() < 24 || &b[..8] != TRACE_MAGIC {
            return Err(bad());
        }
        let mut at = 8;
        let u32_ = |at: &mut usize| -> Result<usize, String> {
            let v = b.get(*at..*at + 4).ok_or_else(bad)?;
            *at += 4;
            Ok(u32::from_le_bytes(v.try_into().unwrap()) as usize)
        };
        let (layers, kv_heads, first_pos, n) = (u32_(&mut at)?, u32_(&mut at)?, u32_(&mut at)?, u32_(&mut at)?);
        let u16_ = |at: &mut usize| -> Result<u32, String> {
            let v = b.get(*at..*at + 2).ok_or_else(bad)?;
            *at += 2;
            Ok(u16::from_le_bytes(v.try_into().unwrap()) as u32)
        };
        let mut steps = Vec::with_capacity(n);
        for _ in 0..n {
            let mut st = Vec::with_capacity(layers * kv_heads);
            for _ in 0..layers * kv_heads {
                let k = u16_(&mut at)?;
                let mut prev = 0;
                let mut s = Vec::with_capacity(k as usize);
                for _ in 0..k {
                    prev += u16_(&mut at)?;
                    s.push(prev);
                }
                st.push(s);
            }
            steps.push(st);
        }
        Ok(SelectionTrace { layers, kv_heads, first_pos, steps })
    }

    /// Mean groups per (step, stream) over the non-empty selections (0 when every selection is empty).
    pub fn mean_selected(&self) -> f64 {
        let (mut n, mut sum) = (0usize, 0usize);
        for s in self.steps.iter().flatten().filter(|s| !s.is_empty()) {
            n += 1;
            sum += s.len();
        }
        if n == 0 {
            0.0
        } else {
            sum as f64 / n as f64
        }
    }

    /// The block width [`Self::scaled_to`] gives each trace group at `max_groups` per step and `factor`: the
    /// mean selection times the width is about `max_groups` (`max_groups / mean`, rounded), within `1..=factor`.
    pub fn scale_block(&self, max_groups: usize, factor: usize) -> usize {
        let mean = self.mean_selected();
        let k = if mean > 0.0 { (max_groups as f64 / mean).round() as usize } else { 1 };
        k.clamp(1, factor.max(1))
    }

    /// The trace mapped onto a model of `layers` x `kv_heads` streams selecting up to `max_groups` groups per step
    /// and head, at a context `factor` times longer (`first_pos * factor`):
    /// - stream `(l, h)` replays trace stream `(l * kv_heads + h) % (trace streams)`;
    /// - a trace group `g` stands for the `factor` groups `g * factor ..` of the long context and becomes the block
    ///   `g * factor .. g * factor + k` with `k` = [`Self::scale_block`] (the same `k` for every group and step, so a
    ///   group that the trace reuses is reused block for block, and a cache of `k` times the slots sees the trace's
    ///   hit rate);
    /// - a step whose blocks would pass `max_groups` (`n * k > max_groups` for `n` trace groups) takes a prefix of
    ///   each block: `max_groups / n` groups, one more for the first `max_groups % n` trace groups (with
    ///   `n > max_groups`, the first `max_groups` trace groups one each). A prefix of a reused block is still
    ///   reused, and the width is `min(n * k, max_groups)`.
    ///
    /// Blocks of distinct ascending trace groups are disjoint and ascending (`k <= factor`), so every scaled
    /// selection is ascending and distinct, as the routing writes them. A trace group at the trace's window edge
    /// maps to groups below `(first_pos + t) * factor / 16`; the GPU cache's lookup skips any selected group that
    /// is already in the sink or the window, or past the arena.
    pub fn scaled_to(&self, layers: usize, kv_heads: usize, max_groups: usize, factor: usize) -> SelectionTrace {
        let factor = factor.max(1);
        let k = self.scale_block(max_groups, factor);
        let streams = (self.layers * self.kv_heads).max(1);
        let scale = |s: &[u32]| -> Vec<u32> {
            let n = s.len();
            if n == 0 || max_groups == 0 {
                return Vec::new();
            }
            let (base, extra) = if n * k <= max_groups { (k, 0) } else { (max_groups / n, max_groups % n) };
            let mut out = Vec::with_capacity((n * k).min(max_groups));
            for (i, &g) in s.iter().enumerate() {
                let w = base + usize::from(i < extra);
                let g0 = g as u64 * factor as u64;
                out.extend((0..w as u64).map(|j| (g0 + j).min(ABSENT as u64 - 1) as u32));
            }
            out.dedup();
            out
        };
        let steps = self
            .steps
            .iter()
            .map(|st| (0..layers * kv_heads).map(|i| st.get(i % streams).map_or_else(Vec::new, |s| scale(s))).collect())
            .collect();
        SelectionTrace { layers, kv_heads, first_pos: self.first_pos * factor, steps }
    }

    /// Records a trace from the CPU HGA reference: the model of `model_dir` reads the first `context` bytes of
    /// `text` (prefill, routed), then decodes `steps` tokens greedily; each decode step's selection is recorded.
    /// The budget is `320 + 16 * groups` tokens (sink + window + `groups` routed groups per (layer, KV head)).
    pub fn record(
        model_dir: &std::path::Path,
        text: &str,
        context: usize,
        steps: usize,
        groups: usize,
    ) -> Result<Self, String> {
        Self::record_with_progress(model_dir, text, context, steps, groups, |_, _| {})
    }

    /// [`Self::record`], calling `progress(decode steps done, steps)` once the prompt is prefilled (0 done) and
    /// after each decode step.
    pub fn record_with_progress(
        model_dir: &std::path::Path,
        text: &str,
        context: usize,
        steps: usize,
        groups: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, String> {
        use crate::hga::{Budget, HgaAttention, HgaParams};
        use crate::model::checkpoint::Checkpoint;
        use crate::model::forward::{ActivationMode, CpuModel};
        // The text first: a text too short is refused before the model loads.
        let tok = crate::model::tokenizer::Tokenizer::from_model_dir(model_dir).map_err(|e| e.to_string())?;
        let tokens = tok.encode(text).map_err(|e| e.to_string())?;
        if tokens.len() < context || context == 0 {
            return Err(format!("the text has {} tokens, {context} wanted (at least 1)", tokens.len()));
        }
        let ckpt = Checkpoint::open(model_dir).map_err(|e| e.to_string())?;
        let model = CpuModel::load(&ckpt, ActivationMode::F32).map_err(|e| e.to_string())?;
        let (layers, kv_heads) = (model.config().num_hidden_layers, model.config().num_key_value_heads);
        let params = HgaParams { budget: Budget::Tokens(320 + 16 * groups), ..HgaParams::default() };
        let policy = std::sync::Arc::new(HgaAttention::new(params)?.with_selection_log());
        let model = model.with_attention_policy(Box::new(policy.clone()));
        let mut cache = model.new_cache();
        let logits = model.prefill(&tokens[..context], &mut cache).map_err(|e| e.to_string())?;
        policy.take_selection_log();
        progress(0, steps);
        let argmax =
            |v: &[f32]| v.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
        let mut next = argmax(logits.row(context - 1)) as u32;
        let mut out = Vec::with_capacity(steps);
        for t in 0..steps {
            let l = model.decode(next, &mut cache).map_err(|e| e.to_string())?;
            next = argmax(&l) as u32;
            let mut st = vec![Vec::new(); layers * kv_heads];
            for (layer, h, pos, g) in policy.take_selection_log() {
                debug_assert_eq!(pos, context + t);
                st[layer * kv_heads + h] = g.into_iter().map(|g| g as u32).collect();
            }
            out.push(st);
            progress(t + 1, steps);
        }
        Ok(SelectionTrace { layers, kv_heads, first_pos: context, steps: out })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(slots: usize, max_groups: usize) -> CacheConfig {
        CacheConfig {
            n_kv: 1,
            cache_slots: slots,
            table_groups: 256,
            max_groups,
            arena_groups: 256,
            ref_hit: 1,
            ref_fill: 0,
        }
    }

    #[test]
    fn hits_plus_misses_is_selected_and_tables_stay_consistent() {
        let mut m = CacheModel::new(cfg(8, 4));
        let p = 100 * 16;
        let steps = [vec![4, 5, 6, 7], vec![5, 6, 8, 9], vec![4, 4, ABSENT, 10], vec![11, 12, 13, 14]];
        let mut taken = 0;
        for (i, s) in steps.iter().enumerate() {
            let o = &m.lookup(p + i as u32, std::slice::from_ref(s))[0];
            let distinct = s.iter().filter(|&&g| g != ABSENT).collect::<std::collections::HashSet<_>>().len();
            assert_eq!(o.hits as usize + o.misses.len(), distinct);
            taken += distinct as u64;
            let st = &m.heads[0];
            for (slot, &g) in st.slot_group.iter().enumerate() {
                if g != ABSENT {
                    assert_eq!(st.table[g as usize], slot as u32);
                }
            }
            assert_eq!(
                st.table.iter().filter(|&&s| s != ABSENT).count(),
                st.slot_group.iter().filter(|&&g| g != ABSENT).count()
            );
        }
        let c = m.heads[0].counters;
        assert_eq!(c[0] + c[1], taken);
        assert_eq!(c[2], c[1] * KV_GROUP_BYTES as u64);
        // Step 2 selected 4 (resident since step 0, not evicted: 8 slots) and duplicates: one hit for 4.
        assert_eq!(c[3], 4);
    }

    #[test]
    fn sink_and_window_entries_and_never_evicting_a_selected_group() {
        let mut m = CacheModel::new(cfg(4, 4));
        // p = 40: sink groups 0..2, no window beyond the sink, nothing selectable.
        let o = &m.lookup(40, &[vec![1, 2, 3, 9]])[0];
        assert_eq!(o.entries, vec![(0, 0), (1, 16), (2, 32)]);
        // p = 700: local_start = 384 (group 24), window groups 24..=43 (20: the whole ring).
        let o = &m.lookup(700, &[vec![4, 5, 6, 7]])[0];
        assert_eq!(o.entries.len(), 4 + 20 + 4);
        assert_eq!(o.entries[4], (4 + 24 % 20, 24 * 16));
        let o = &m.lookup(701, &[vec![8, 5, 30, ABSENT]])[0];
        assert_eq!(o.hits, 1);
        assert_eq!(o.misses.len(), 1, "group 30 is in the window: not selectable");
        // The victim of 8 is not 5's slot.
        let slot5 = m.heads[0].table[5];
        assert_ne!(o.misses[0].1 - 24, slot5);
    }

    #[test]
    fn belady_is_at_least_lru_and_clock() {
        let mut rng = 12345u64;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) as u32
        };
        let trace: Vec<Vec<u32>> = (0..200)
            .map(|_| {
                let mut s: Vec<u32> = (0..10).map(|_| next() % 60).collect();
                s.sort_unstable();
                s.dedup();
                s
            })
            .collect();
        for slots in [12, 20, 40] {
            let b = belady_hits(&trace, slots);
            assert!(b >= lru_hits(&trace, slots));
            assert!(b >= clock_hits(&trace, slots, 1, 0).0);
        }
    }

    #[test]
    fn trace_bytes_round_trip() {
        let t = SelectionTrace {
            layers: 2,
            kv_heads: 1,
            first_pos: 900,
            steps: vec![vec![vec![4, 9, 300], vec![]], vec![vec![5], vec![7, 8]]],
        };
        let b = t.to_bytes();
        assert_eq!(SelectionTrace::from_bytes(&b).unwrap(), t);
        assert!(SelectionTrace::from_bytes(&b[..b.len() - 1]).is_err());
        assert_eq!(t.stream(1, 0), vec![vec![], vec![7, 8]]);
    }

    /// A trace of `layers` x `kv_heads` streams over `steps` steps with groups in `4..limit`, each step keeping
    /// about half of the previous step's groups (reuse) and drawing the rest.
    fn random_trace(
        seed: u64,
        layers: usize,
        kv_heads: usize,
        steps: usize,
        width: usize,
        limit: u32,
    ) -> SelectionTrace {
        let mut rng = seed;
        let mut next = || {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (rng >> 33) as u32
        };
        let mut prev: Vec<Vec<u32>> = vec![Vec::new(); layers * kv_heads];
        let mut out = Vec::new();
        for _ in 0..steps {
            let st: Vec<Vec<u32>> = prev
                .iter()
                .map(|p| {
                    let mut s: Vec<u32> = p.iter().copied().filter(|_| next() % 2 == 0).collect();
                    let w = width - (next() as usize % (width / 2 + 1));
                    while s.len() < w {
                        s.push(4 + next() % (limit - 4));
                    }
                    s.sort_unstable();
                    s.dedup();
                    s
                })
                .collect();
            prev = st.clone();
            out.push(st);
        }
        SelectionTrace { layers, kv_heads, first_pos: limit as usize * 16 + 320, steps: out }
    }

    #[test]
    fn scaled_trace_keeps_reuse_widths_and_order() {
        let t = random_trace(7, 6, 2, 40, 16, 500);
        let (factor, mg) = (8usize, 100usize);
        let k = t.scale_block(mg, factor);
        let mean = t.mean_selected();
        assert_eq!(k, ((mg as f64 / mean).round() as usize).clamp(1, factor), "mean {mean}");
        assert!(k > 1, "k {k}: the test wants blocks");
        let s = t.scaled_to(48, 4, mg, factor);
        assert_eq!((s.layers, s.kv_heads, s.first_pos, s.steps.len()), (48, 4, t.first_pos * factor, 40));
        let streams = t.layers * t.kv_heads;
        for (step, (ts, ss)) in t.steps.iter().zip(&s.steps).enumerate() {
            assert_eq!(ss.len(), 48 * 4);
            for (i, sel) in ss.iter().enumerate() {
                let src = &ts[i % streams];
                assert_eq!(sel.len(), (src.len() * k).min(mg), "step {step} stream {i}: width");
                assert!(sel.windows(2).all(|w| w[0] < w[1]), "step {step} stream {i}: not ascending: {sel:?}");
                // Every scaled group lies in the block of a trace group, and every trace group keeps its first.
                for &g in sel {
                    let tg = g / factor as u32;
                    assert!(src.contains(&tg) && (g % factor as u32) < k as u32, "step {step}: {g} from {src:?}");
                }
                if src.len() <= mg {
                    for &g in src {
                        assert!(sel.contains(&(g * factor as u32)), "step {step}: trace group {g} lost");
                    }
                }
            }
        }
        // Reuse: a trace group selected at steps t and t' has its block's first group selected at both.
        let (mut reused, mut kept) = (0, 0);
        for i in 0..streams {
            let (ts, ss) = (t.stream(i / t.kv_heads, i % t.kv_heads), s.stream(i / 4, i % 4));
            for w in 1..ts.len() {
                for &g in ts[w].iter().filter(|g| ts[w - 1].contains(g)) {
                    reused += 1;
                    let b = g * factor as u32;
                    kept += usize::from(ss[w].contains(&b) && ss[w - 1].contains(&b));
                }
            }
        }
        assert!(reused > 0, "the test trace reuses groups");
        assert_eq!(kept, reused, "every reuse of the trace is a reuse of the scaled trace");
    }

    #[test]
    fn scaled_trace_caps_and_maps_streams() {
        // 2 streams (2 layers x 1 head); the big model has 3 layers x 2 heads: streams 0, 1, 0, 1, 0, 1.
        let t = SelectionTrace {
            layers: 2,
            kv_heads: 1,
            first_pos: 1000,
            steps: vec![vec![vec![10, 20], vec![5, 6, 7, 8]], vec![vec![10, 30], vec![]]],
        };
        // Mean width (2 + 4 + 2) / 3 = 2.67: k = round(6 / 2.67) = 2.
        assert_eq!(t.scale_block(6, 4), 2);
        let s = t.scaled_to(3, 2, 6, 4);
        assert_eq!(s.first_pos, 4000);
        for l in 0..3 {
            assert_eq!(s.steps[0][l * 2], vec![40, 41, 80, 81]);
            // 4 groups x 2 > 6: prefixes of 2, 2, 1, 1.
            assert_eq!(s.steps[0][l * 2 + 1], vec![20, 21, 24, 25, 28, 32]);
            assert_eq!(s.steps[1][l * 2], vec![40, 41, 120, 121]);
            assert!(s.steps[1][l * 2 + 1].is_empty());
        }
        // A trace wider than max_groups keeps its first max_groups groups' first elements.
        assert_eq!(t.scaled_to(2, 1, 3, 4).steps[0][1], vec![20, 24, 28]);
        // factor 1 (or a block of 1): the trace itself.
        let same = t.scaled_to(2, 1, 64, 1);
        assert_eq!(same, SelectionTrace { first_pos: 1000, ..t.clone() });
        // The block never exceeds the factor: at factor 1 the width stays the trace's.
        assert_eq!(t.scale_block(1000, 1), 1);
        // The scaled trace pads for the lookup like any trace.
        let p = s.padded_step(0, 0, 8);
        assert_eq!(&p[..8], &[40, 41, 80, 81, ABSENT, ABSENT, ABSENT, ABSENT]);
        assert_eq!(&p[8..14], &[20, 21, 24, 25, 28, 32]);
    }

    #[test]
    fn scaled_trace_hit_rate_follows_the_trace() {
        // Each trace group becomes a block of k that is selected together: an LRU cache of k x the slots hits on
        // the scaled trace exactly k x the trace's hits (no step is capped here).
        let t = random_trace(11, 1, 1, 200, 10, 120);
        let (factor, mg) = (3usize, 40usize);
        let k = t.scale_block(mg, factor);
        assert!(k > 1);
        assert!(t.max_selected() * k <= mg, "no step capped: k {k}, widest {}", t.max_selected());
        let s = t.scaled_to(1, 1, mg, factor);
        for slots in [12usize, 20, 40] {
            assert_eq!(lru_hits(&s.stream(0, 0), slots * k), k as u64 * lru_hits(&t.stream(0, 0), slots));
        }
    }
}
