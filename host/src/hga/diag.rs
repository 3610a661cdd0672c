//! Diagnostics of a selection against dense attention, per layer and KV head: the share of the dense softmax mass on
//! the selected positions, the recall of the dense top-32 positions, the relative error of the attention output,
//! and the positions actually used (sparsity).
use std::collections::BTreeMap;

/// The measurements of one (query, head).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct HeadStats {
    /// Dense softmax mass on the selected positions.
    pub mass: f64,
    /// Share of the dense top-32 positions that were selected.
    pub recall32: f64,
    /// ||o_selected - o_dense|| / ||o_dense||.
    pub rel_err: f64,
    /// Positions attended.
    pub used: f64,
    /// Positions available (the context of the query).
    pub context: f64,
}

impl HeadStats {
    /// `dense`: the dense probabilities over positions (at least `context` long); `idx`: the selected positions.
    pub fn measure(dense: &[f64], idx: &[usize], o_sel: &[f32], o_dense: &[f32], context: usize) -> Self {
        let mass = idx.iter().map(|&j| dense[j]).sum();
        let mut order: Vec<usize> = (0..context).collect();
        order.sort_by(|&a, &b| dense[b].total_cmp(&dense[a]).then(a.cmp(&b)));
        let top = &order[..context.min(32)];
        let hit = top.iter().filter(|j| idx.binary_search(j).is_ok()).count();
        let num: f64 = o_sel.iter().zip(o_dense).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let den: f64 = o_dense.iter().map(|b| (*b as f64).powi(2)).sum();
        HeadStats {
            mass,
            recall32: hit as f64 / top.len().max(1) as f64,
            rel_err: if den > 0.0 { (num / den).sqrt() } else { num.sqrt() },
            used: idx.len() as f64,
            context: context as f64,
        }
    }
}

/// Sums of [`HeadStats`] per (layer, KV head).
#[derive(Clone, Debug, Default)]
pub struct Diagnostics {
    sums: BTreeMap<(usize, usize), (HeadStats, usize)>,
}

impl Diagnostics {
    pub fn add(&mut self, layer: usize, kv_head: usize, s: &HeadStats) {
        let e = self.sums.entry((layer, kv_head)).or_default();
        e.0.mass += s.mass;
        e.0.recall32 += s.recall32;
        e.0.rel_err += s.rel_err;
        e.0.used += s.used;
        e.0.context += s.context;
        e.1 += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }

    /// Means per (layer, KV head).
    pub fn per_head(&self) -> Vec<((usize, usize), HeadStats)> {
        self.sums.iter().map(|(&k, &(s, n))| (k, scale(s, n))).collect()
    }

    /// Means over everything; `used / context` is the sparsity actually used.
    pub fn overall(&self) -> HeadStats {
        let (mut t, mut n) = (HeadStats::default(), 0);
        for (s, c) in self.sums.values() {
            t.mass += s.mass;
            t.recall32 += s.recall32;
            t.rel_err += s.rel_err;
            t.used += s.used;
            t.context += s.context;
            n += c;
        }
        scale(t, n)
    }
}

fn scale(s: HeadStats, n: usize) -> HeadStats {
    let n = n.max(1) as f64;
    HeadStats {
        mass: s.mass / n,
        recall32: s.recall32 / n,
        rel_err: s.rel_err / n,
        used: s.used / n,
        context: s.context / n,
    }
}
