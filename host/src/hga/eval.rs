//! Quality of HGA against dense attention, teacher-forced: for a window of tokens, the negative log-likelihood of
//! each next token over the last `scored` positions (nats/token) under dense attention and under each HGA policy,
//! the gap, KL(dense || policy), the sparsity actually used and the diagnostics of [`super::diag`].
use std::sync::Arc;

use serde::Serialize;

use super::{HgaAttention, HgaParams};
use crate::model::forward::{AttentionPolicy, AttentionShape, CpuModel, DenseAttention, ForwardError, LayerKv, Logits};

impl AttentionPolicy for Arc<HgaAttention> {
    fn name(&self) -> &str {
        self.as_ref().name()
    }
    fn attend(&self, layer: usize, s: &AttentionShape, start: usize, q: &[f32], kv: &LayerKv) -> Vec<f32> {
        self.as_ref().attend(layer, s, start, q, kv)
    }
}

/// Errors of an evaluation.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("HGA parameters: {0}")]
    Params(String),
    #[error("a window needs at least two tokens, got {0}")]
    TooShort(usize),
}

/// One policy's result on one window.
#[derive(Clone, Debug, Serialize)]
pub struct EvalRow {
    /// The window's source (file name).
    pub text: String,
    /// Window length in tokens.
    pub context: usize,
    /// `dense`, `hga`, `oracle-tokens`, `oracle-groups`.
    pub policy: String,
    /// The policy's parameters (none for dense).
    pub params: Option<HgaParams>,
    /// Positions scored (the last ones of the window).
    pub scored: usize,
    /// Mean negative log-likelihood, nats/token.
    pub nll: f64,
    /// The same under dense attention.
    pub nll_dense: f64,
    /// `nll - nll_dense`.
    pub gap: f64,
    /// Mean KL(dense || policy) of the next-token distributions, nats.
    pub kl: f64,
    /// Share of top-1 predictions equal to dense's.
    pub top1_agree: f64,
    /// Mean positions attended / positions available, over every (layer, query, head) (1 for dense).
    pub sparsity: f64,
    /// Mean dense softmax mass on the selected positions.
    pub mass: f64,
    /// Mean recall of the dense top-32 positions.
    pub recall32: f64,
    /// Mean relative error of the attention output.
    pub attn_rel_err: f64,
}

impl EvalRow {
    /// The dense row of a window: the reference every policy's row is measured against.
    pub fn dense(text: &str, context: usize, scored: usize, nll_dense: f64) -> Self {
        EvalRow {
            text: text.to_string(),
            context,
            policy: "dense".into(),
            params: None,
            scored,
            nll: nll_dense,
            nll_dense,
            gap: 0.0,
            kl: 0.0,
            top1_agree: 1.0,
            sparsity: 1.0,
            mass: 1.0,
            recall32: 1.0,
            attn_rel_err: 0.0,
        }
    }

    /// A policy's row of a window from its `(nll, kl, top1_agree)` against dense ([`policy_stats`]) and its
    /// sparsity; the routing diagnostics (mass, recall, attention error) are NaN until the caller sets them.
    #[allow(clippy::too_many_arguments)]
    pub fn policy(
        text: &str,
        context: usize,
        policy: &str,
        params: &HgaParams,
        scored: usize,
        nll_dense: f64,
        (nll, kl, top1_agree): (f64, f64, f64),
        sparsity: f64,
    ) -> Self {
        EvalRow {
            text: text.to_string(),
            context,
            policy: policy.to_string(),
            params: Some(params.clone()),
            scored,
            nll,
            nll_dense,
            gap: nll - nll_dense,
            kl,
            top1_agree,
            sparsity,
            mass: f64::NAN,
            recall32: f64::NAN,
            attn_rel_err: f64::NAN,
        }
    }
}

/// Log-softmax of one row.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
    let lz = m + z.ln();
    row.iter().map(|&v| v as f64 - lz).collect()
}

/// Index of the largest logit (the first of equals).
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0
}

/// One scored position: (nll of the next token, log-probabilities, argmax).
pub type Scored = (f64, Vec<f64>, usize);

/// Scores one row of logits against the token that follows.
pub fn score_row(row: &[f32], next: u32) -> Scored {
    let lp = log_softmax(row);
    (-lp[next as usize], lp, argmax(row))
}

/// A policy's scores against dense's at the same positions: (mean nll, mean KL(dense || policy), top-1 agreement).
pub fn policy_stats(dense: &[Scored], policy: &[Scored]) -> (f64, f64, f64) {
    let n = policy.len() as f64;
    let nll = policy.iter().map(|x| x.0).sum::<f64>() / n;
    let kl = dense
        .iter()
        .zip(policy)
        .map(|(d, h)| d.1.iter().zip(&h.1).map(|(a, b)| a.exp() * (a - b)).sum::<f64>())
        .sum::<f64>()
        / n;
    let agree = dense.iter().zip(policy).filter(|(d, h)| d.2 == h.2).count() as f64 / n;
    (nll, kl, agree)
}

/// Scores `logits` against the next tokens of `tokens` at the last `scored` positions.
fn score(logits: &Logits, tokens: &[u32], scored: usize) -> Vec<Scored> {
    let n = tokens.len();
    (n - 1 - scored..n - 1).map(|t| score_row(logits.row(t), tokens[t + 1])).collect()
}

/// Evaluates `policies` (besides dense, which is always run as the reference) on one window. `model` is moved in
/// and out to swap policies without reloading weights.
pub fn eval_window(
    model: CpuModel,
    text: &str,
    tokens: &[u32],
    scored: usize,
    policies: &[HgaParams],
    mut progress: impl FnMut(&str),
) -> Result<(CpuModel, Vec<EvalRow>), EvalError> {
    if tokens.len() < 2 {
        return Err(EvalError::TooShort(tokens.len()));
    }
    let scored = scored.clamp(1, tokens.len() - 1);
    progress("dense");
    let model = model.with_attention_policy(Box::new(DenseAttention));
    let dense = model.prefill(tokens, &mut model.new_cache())?;
    let ds = score(&dense, tokens, scored);
    let nll_dense = ds.iter().map(|x| x.0).sum::<f64>() / scored as f64;
    let mut rows = vec![EvalRow::dense(text, tokens.len(), scored, nll_dense)];
    let mut model = model;
    for p in policies {
        let policy = Arc::new(
            HgaAttention::new(p.clone()).map_err(EvalError::Params)?.with_diagnostics_from(tokens.len() - 1 - scored),
        );
        progress(policy.name());
        model = model.with_attention_policy(Box::new(policy.clone()));
        let logits = model.prefill(tokens, &mut model.new_cache())?;
        let hs = score(&logits, tokens, scored);
        let stats = policy_stats(&ds, &hs);
        let d = policy.take_diagnostics().overall();
        let sparsity = if d.context > 0.0 { d.used / d.context } else { 1.0 };
        rows.push(EvalRow {
            mass: d.mass,
            recall32: d.recall32,
            attn_rel_err: d.rel_err,
            ..EvalRow::policy(text, tokens.len(), policy.name(), p, scored, nll_dense, stats, sparsity)
        });
    }
    Ok((model.with_attention_policy(Box::new(DenseAttention)), rows))
}
