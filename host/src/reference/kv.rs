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
        use crate::hga::{Budget, HgaAttention, HgaParams};
        use crate::model::checkpoint::Checkpoint;
        use crate::model::forward::{ActivationMode, CpuModel};
        let ckpt = Checkpoint::open(model_dir).map_err(|e| e.to_string())?;
        let model = CpuModel::load(&ckpt, ActivationMode::F32).map_err(|e| e.to_string())?;
        let (layers, kv_heads) = (model.config().num_hidden_layers, model.config().num_key_value_heads);
        let params = HgaParams { budget: Budget::Tokens(320 + 16 * groups), ..HgaParams::default() };
        let policy = std::sync::Arc::new(HgaAttention::new(params)?.with_selection_log());
        let model = model.with_attention_policy(Box::new(policy.clone()));
        let tok = crate::model::tokenizer::Tokenizer::from_model_dir(model_dir).map_err(|e| e.to_string())?;
        let tokens = tok.encode(text).map_err(|e| e.to_string())?;
        if tokens.len() < context {
            return Err(format!("the text has {} tokens, {context} wanted", tokens.len()));
        }
        let mut cache = model.new_cache();
        let logits = model.prefill(&tokens[..context], &mut cache).map_err(|e| e.to_string())?;
        policy.take_selection_log();
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
}
