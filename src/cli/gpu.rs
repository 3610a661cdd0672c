//! The GPU backend of `hga eval`, `hga needle` and `hga demo` (`--backend cuda`), and what `hga generate` shares
//! with it: the checks of the HGA parameters the GPU kernels implement, loading a [`GpuModel`] in either attention
//! mode with a progress bar, and the teacher-forced scoring of a window.
//!
//! How the GPU path attends: dense keeps every layer's K/V on the GPU and attends exactly; HGA keeps the K/V
//! history in a mapped host arena, prefills a prompt exactly (layer-major) and routes every token after it as one
//! decode step. So a window is scored the same way in both modes: its prefix is prefilled, then each scored
//! position is one teacher-forced decode step (dense decodes too, so that the gap measures the routing and not a
//! difference between the prefill and decode kernels). One checkpoint is opened once; the models are loaded one
//! after the other (one model's GPU memory at a time), dense first, its logits of the scored positions kept in host
//! memory (scored x vocab f32 per window) as the reference.
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hga::hga::eval::{policy_stats, score_row, EvalRow, Scored};
use hga::hga::{Budget, GqaMode, GroupScore, HgaParams, Selector, SummaryMode};
use hga::model::checkpoint::Checkpoint;
use hga::model::gpu::{AttentionMode, GpuModel, GpuModelOptions, HgaOptions, HgaStats};
use hga::runtime::Gpu;
use indicatif::{ProgressBar, ProgressStyle};

/// Where `hga eval` / `hga needle` run their forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum Backend {
    /// The CPU reference forward (every selector and K/V tier; slow beyond a few thousand tokens).
    #[default]
    Cpu,
    /// The GPU forward: dense (K/V on the GPU) and HGA (K/V history in a mapped host arena, routed decode steps),
    /// the hga selector only.
    Cuda,
}

/// Options of the GPU backend (`--backend cuda`).
#[derive(Args, Debug, Clone)]
pub struct GpuOpts {
    /// Where the forward runs: cpu (the reference forward) or cuda (the GPU forward; dense and HGA in one process,
    /// the checkpoint opened once).
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// CUDA device ordinal (--backend cuda).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Tokens per forward call of a prefill on the GPU (--backend cuda).
    #[arg(long, value_name = "N", default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Routed-group slots per KV head of each HGA layer's GPU cache (--backend cuda; 0: twice the selection).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub cache_slots: usize,
    /// Cap on the GPU memory the model allocates (--backend cuda), e.g. 32GiB or 34.4GB: an allocation past it
    /// fails with the accountant's message (what did not fit, what is held). Default: no cap.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub gpu_memory_limit: Option<u64>,
}

impl Default for GpuOpts {
    fn default() -> Self {
        GpuOpts { backend: Backend::Cpu, device: 0, prefill_chunk: 512, cache_slots: 0, gpu_memory_limit: None }
    }
}

impl GpuOpts {
    /// Refuses GPU-only options on the CPU backend (they would be ignored).
    pub fn check_cpu(&self) -> anyhow::Result<()> {
        if self.backend == Backend::Cpu && self.gpu_memory_limit.is_some() {
            bail!("--gpu-memory-limit applies to --backend cuda (the CPU forward allocates no GPU memory)");
        }
        Ok(())
    }

    /// Opens the GPU and sets the memory cap (before anything is allocated).
    pub fn open(&self) -> anyhow::Result<Gpu> {
        let gpu = open_gpu(self.device)?;
        gpu.set_memory_limit(self.gpu_memory_limit);
        Ok(gpu)
    }
}

/// `hga::memory::parse_size` as a clap value parser.
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    hga::memory::parse_size(s).map_err(|e| e.to_string())
}

/// Opens CUDA device `ordinal`; without one the error says "no CUDA device" and what to use instead.
pub fn open_gpu(ordinal: usize) -> anyhow::Result<Gpu> {
    hga::open_gpu(ordinal).map_err(|e| match e {
        hga::runtime::RuntimeError::NoDevice(_) => {
            anyhow::anyhow!("{e} (this command runs on the GPU; the CPU reference forward is `--backend cpu` of hga eval / hga needle)")
        }
        e => anyhow::Error::new(e).context(format!("opening CUDA device {ordinal}")),
    })
}

/// Refuses HGA parameters the GPU kernels do not implement, naming each field and its value (the GPU routes with
/// the defaults of [`HgaParams`] but for the budget, the shortlist, `normalize` and the dense layers).
pub fn check_params(p: &HgaParams) -> anyhow::Result<()> {
    let d = HgaParams::default();
    let mut bad = Vec::new();
    if p.selector != Selector::Hga {
        bad.push(format!(
            "selector {} (the ideal selectors oracle-tokens / oracle-groups are CPU only: --backend cpu)",
            match p.selector {
                Selector::Hga => "hga",
                Selector::OracleTokens => "oracle-tokens",
                Selector::OracleGroups => "oracle-groups",
            }
        ));
    }
    if (p.chunk, p.group) != (d.chunk, d.group) {
        bad.push(format!("--chunk {} / --group {} (the kernels use {} / {})", p.chunk, p.group, d.chunk, d.group));
    }
    if p.summary != SummaryMode::MinMax {
        bad.push(format!("--summary {:?} (the kernels use minmax)", p.summary).to_lowercase());
    }
    if p.group_score != GroupScore::Sketch4 {
        bad.push(format!("--group-score {:?} (the kernels use sketch4)", p.group_score).to_lowercase());
    }
    if p.gqa != GqaMode::Max {
        bad.push(format!("--gqa {:?} (the kernels use max)", p.gqa).to_lowercase());
    }
    if (p.sink, p.local) != (d.sink, d.local) {
        bad.push(format!(
            "--sink {} / --local {} (the layer's slots hold a sink of {} and a window of {})",
            p.sink, p.local, d.sink, d.local
        ));
    }
    if !bad.is_empty() {
        bail!("the GPU path does not implement {}", bad.join("; "));
    }
    p.validate().map_err(|e| anyhow::anyhow!("HGA parameters: {e}"))
}

/// The attention mode of `params` (`None`: dense), with the HGA layers' cache slots and sketch placement (`None`:
/// decided under the GPU memory cap).
pub fn attention_mode(params: Option<&HgaParams>, cache_slots: usize, sketches_on_host: Option<bool>) -> AttentionMode {
    match params {
        None => AttentionMode::Dense,
        Some(p) => AttentionMode::Hga(HgaOptions {
            params: p.clone(),
            cache_slots,
            sketches_on_host,
            arena_at_load: true,
            ..Default::default()
        }),
    }
}

/// A short name of a policy: `dense`, or `hga <label> @ <budget>`.
pub fn policy_name(params: Option<&HgaParams>) -> String {
    match params {
        None => "dense".into(),
        Some(p) => format!("hga {} @ {}", p.label(), budget_text(p.budget)),
    }
}

/// `3.0%` or `2048`.
pub fn budget_text(b: Budget) -> String {
    match b {
        Budget::Fraction(f) => format!("{}%", 100.0 * f),
        Budget::Tokens(t) => format!("{t} tokens"),
    }
}

/// Loads the checkpoint onto the GPU in the attention mode of `params`, with a bar over the layers; an error (a
/// memory cap, say) names the mode and carries the accountant's message.
pub fn load<'g>(
    gpu: &'g Gpu,
    ckpt: &Checkpoint,
    capacity: usize,
    max_tokens: usize,
    params: Option<&HgaParams>,
    cache_slots: usize,
) -> anyhow::Result<GpuModel<'g>> {
    let pb = ProgressBar::new(ckpt.config.num_hidden_layers as u64);
    pb.set_style(ProgressStyle::with_template("loading {msg} {bar:30} {pos}/{len} layers {elapsed_precise}")?);
    pb.set_message(policy_name(params));
    let options = GpuModelOptions {
        capacity,
        max_tokens: max_tokens.max(1),
        attention: attention_mode(params, cache_slots, None),
        host_embedding: false,
        prefill_residual_on_host: None,
        dense_kv_on_host: false,
    };
    let model = GpuModel::load_with(gpu, ckpt, &options, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    model.with_context(|| format!("loading the model ({}, capacity {capacity} positions)", policy_name(params)))
}

/// Index of the largest logit.
pub fn argmax(r: &[f32]) -> u32 {
    r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b }) as u32
}

/// What a teacher-forced pass over a window gives.
pub struct Forced {
    /// The logits of the scored positions, [scored, vocab] row-major (row i predicts token `n - scored + i`).
    pub logits: Vec<f32>,
    /// Mean share of the available positions attended, over the decode steps and the layers (1 for dense).
    pub sparsity: f64,
    /// The HGA counters of the decode steps (after the prefill; `None` when dense).
    pub stats: Option<HgaStats>,
}

/// The scored positions of a window of `n` tokens: at most `n - 2` (the prefix keeps at least one token).
pub fn clamp_scored(scored: usize, n: usize) -> anyhow::Result<usize> {
    if n < 3 {
        bail!("a window needs at least 3 tokens on the GPU backend (a prefix and a scored position), got {n}");
    }
    Ok(scored.clamp(1, n - 2))
}

/// Prefills `tokens[..n - 1 - scored]`, then runs each of the next `scored` tokens as one decode step
/// (teacher-forced) and keeps its logits.
pub fn teacher_forced(model: &mut GpuModel, tokens: &[u32], scored: usize) -> anyhow::Result<Forced> {
    let n = tokens.len();
    let scored = clamp_scored(scored, n)?;
    let prefix = n - 1 - scored;
    let (v, layers) = (model.config().vocab_size, model.config().num_hidden_layers);
    model.reset();
    model.forward(&tokens[..prefix], false).context("prefill of the window's prefix")?;
    let base = model.hga_stats()?;
    let mut logits = Vec::with_capacity(scored * v);
    let mut share_sum = 0.0;
    for t in prefix..n - 1 {
        let r = model.forward(&tokens[t..t + 1], false).with_context(|| format!("decode step at position {t}"))?;
        logits.extend_from_slice(&r[r.len() - v..]);
        share_sum += match model.hga_stats()? {
            None => 1.0,
            Some(s) => {
                let ctx = (t + 1) as f64;
                let routed = s.routed_tokens_last_step.min(ctx) / ctx;
                (s.hga_layers as f64 * routed + (layers - s.hga_layers) as f64) / layers as f64
            }
        };
    }
    let stats = match (base, model.hga_stats()?) {
        (Some(b), Some(s)) => Some(stats_since(&b, &s)),
        _ => None,
    };
    Ok(Forced { logits, sparsity: share_sum / scored as f64, stats })
}

/// The counters of `now` less those of `base` (the same sequence, later), with the last step's routed tokens of
/// `now`.
pub fn stats_since(base: &HgaStats, now: &HgaStats) -> HgaStats {
    HgaStats {
        hga_layers: now.hga_layers,
        hits: now.hits.saturating_sub(base.hits),
        misses: now.misses.saturating_sub(base.misses),
        h2d_bytes: now.h2d_bytes.saturating_sub(base.h2d_bytes),
        steps: now.steps.saturating_sub(base.steps),
        routed_tokens_last_step: now.routed_tokens_last_step,
        arena_bytes: now.arena_bytes,
        sketch_host_layers: now.sketch_host_layers,
        prefill_history_s: now.prefill_history_s,
        prefill_residual_on_host: now.prefill_residual_on_host,
        arena_alloc_s: now.arena_alloc_s,
        cache_slots: now.cache_slots,
        max_groups: now.max_groups,
        disk_ram_hits: now.disk_ram_hits.saturating_sub(base.disk_ram_hits),
        disk_ram_misses: now.disk_ram_misses.saturating_sub(base.disk_ram_misses),
        disk_bytes_read: now.disk_bytes_read.saturating_sub(base.disk_bytes_read),
        disk_bytes_written: now.disk_bytes_written.saturating_sub(base.disk_bytes_written),
        disk_host_s: now.disk_host_s - base.disk_host_s,
    }
}

/// Per scored position: (nll of the next token, log-probabilities, argmax).
fn score(logits: &[f32], vocab: usize, next: &[u32]) -> Vec<Scored> {
    logits.chunks(vocab).zip(next).map(|(row, &nx)| score_row(row, nx)).collect()
}

/// One row of the eval table from the GPU's logits of the scored positions of `tokens` (`dense` is the dense
/// pass's, `None` for the dense row itself). The routing diagnostics (mass, recall, attention error) are not
/// measured on the GPU: NaN (null in JSON).
pub fn eval_row(
    text: &str,
    tokens: &[u32],
    vocab: usize,
    dense: &Forced,
    policy: Option<(&HgaParams, &Forced)>,
) -> anyhow::Result<EvalRow> {
    let n = tokens.len();
    let scored = dense.logits.len() / vocab;
    let next = &tokens[n - scored..];
    let ds = score(&dense.logits, vocab, next);
    let nll_dense = ds.iter().map(|x| x.0).sum::<f64>() / scored as f64;
    let Some((p, f)) = policy else {
        return Ok(EvalRow::dense(text, n, scored, nll_dense));
    };
    if f.logits.len() != dense.logits.len() {
        bail!("the HGA pass scored {} positions, dense {}", f.logits.len() / vocab, scored);
    }
    let hs = score(&f.logits, vocab, next);
    Ok(EvalRow::policy(text, n, "hga", p, scored, nll_dense, policy_stats(&ds, &hs), f.sparsity))
}

/// One line of the HGA counters: cache hit rate, bytes gathered from the host arena per decode step, tokens
/// attended in the last step, arena size.
pub fn stats_line(s: &HgaStats) -> String {
    let disk = if s.disk_ram_hits + s.disk_ram_misses + s.disk_bytes_written > 0 {
        format!(
            "; disk tier: {} of {} groups from its RAM cache, {} read from disk, {} written, {:.2} s of host time",
            s.disk_ram_hits,
            s.disk_ram_hits + s.disk_ram_misses,
            hga::memory::human(s.disk_bytes_read),
            hga::memory::human(s.disk_bytes_written),
            s.disk_host_s
        )
    } else {
        String::new()
    };
    format!(
        "GPU cache hit rate {:.1}% ({} hits, {} misses; {} slots per KV head for a selection of {}), {} gathered from the host arena per decode step ({} steps), \
         {:.0} tokens attended per (layer, KV head) in the last step, arena {}; sketches in host memory in {} of {} \
         layers; prefill: hand-off to the tiers {:.2} s GPU, residual stream in {} memory; arena pinned in {:.2} s \
         so far{disk}",
        100.0 * s.hit_rate(),
        s.hits,
        s.misses,
        s.cache_slots,
        s.max_groups,
        hga::memory::human(s.h2d_bytes.checked_div(s.steps).unwrap_or(0)),
        s.steps,
        s.routed_tokens_last_step,
        hga::memory::human(s.arena_bytes as u64),
        s.sketch_host_layers,
        s.hga_layers,
        s.prefill_history_s,
        if s.prefill_residual_on_host { "host" } else { "GPU" },
        s.arena_alloc_s
    )
}

/// Sums the counters of several sequences (the last step's routed tokens and the arena of the latest).
pub fn add_stats(acc: &mut HgaStats, s: &HgaStats) {
    acc.hga_layers = s.hga_layers;
    acc.hits += s.hits;
    acc.misses += s.misses;
    acc.h2d_bytes += s.h2d_bytes;
    acc.steps += s.steps;
    acc.routed_tokens_last_step = s.routed_tokens_last_step;
    acc.arena_bytes = s.arena_bytes;
    acc.sketch_host_layers = s.sketch_host_layers;
    acc.prefill_history_s += s.prefill_history_s;
    acc.prefill_residual_on_host |= s.prefill_residual_on_host;
    acc.arena_alloc_s = s.arena_alloc_s;
    acc.cache_slots = s.cache_slots;
    acc.max_groups = s.max_groups;
    acc.disk_ram_hits += s.disk_ram_hits;
    acc.disk_ram_misses += s.disk_ram_misses;
    acc.disk_bytes_read += s.disk_bytes_read;
    acc.disk_bytes_written += s.disk_bytes_written;
    acc.disk_host_s += s.disk_host_s;
}

/// `hga eval --backend cuda`: dense, then each HGA parameter set, over every window; the rows of the CPU backend.
pub fn eval(
    ckpt: &Checkpoint,
    windows: &[(String, Vec<u32>)],
    scored: usize,
    params: &[HgaParams],
    g: &GpuOpts,
) -> anyhow::Result<Vec<EvalRow>> {
    for p in params {
        check_params(p)?;
    }
    for (name, ids) in windows {
        clamp_scored(scored, ids.len()).with_context(|| name.clone())?;
    }
    let gpu = g.open()?;
    let result = eval_on(&gpu, ckpt, windows, scored, params, g);
    eprintln!("{}", gpu.memory().report());
    result
}

fn eval_on(
    gpu: &Gpu,
    ckpt: &Checkpoint,
    windows: &[(String, Vec<u32>)],
    scored: usize,
    params: &[HgaParams],
    g: &GpuOpts,
) -> anyhow::Result<Vec<EvalRow>> {
    let capacity = windows.iter().map(|w| w.1.len()).max().unwrap_or(0);
    let vocab = ckpt.config.vocab_size;
    eprintln!(
        "GPU backend on {} ({}): {} windows, {} positions scored each (prefix prefilled, then one teacher-forced \
         decode step per scored position), dense then {} HGA parameter set(s)",
        gpu.device_name(),
        gpu.image_name(),
        windows.len(),
        scored,
        params.len()
    );
    let pb = ProgressBar::new((windows.len() * (1 + params.len())) as u64);
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")?);
    let mut model = load(gpu, ckpt, capacity, g.prefill_chunk, None, g.cache_slots)?;
    let mut dense = Vec::with_capacity(windows.len());
    let mut rows = Vec::new();
    for (name, ids) in windows {
        pb.set_message(format!("{name} @ {} : dense", ids.len()));
        let f = teacher_forced(&mut model, ids, scored).with_context(|| format!("dense on {name}"))?;
        rows.push(eval_row(name, ids, vocab, &f, None)?);
        dense.push(f);
        pb.inc(1);
    }
    drop(model);
    for p in params {
        let mut model = load(gpu, ckpt, capacity, g.prefill_chunk, Some(p), g.cache_slots)?;
        let mut total = HgaStats::default();
        for ((name, ids), d) in windows.iter().zip(&dense) {
            pb.set_message(format!("{name} @ {} : {}", ids.len(), policy_name(Some(p))));
            let f = teacher_forced(&mut model, ids, scored)
                .with_context(|| format!("{} on {name}", policy_name(Some(p))))?;
            if let Some(s) = &f.stats {
                add_stats(&mut total, s);
            }
            rows.push(eval_row(name, ids, vocab, d, Some((p, &f)))?);
            pb.inc(1);
        }
        pb.suspend(|| eprintln!("{}: {}", policy_name(Some(p)), stats_line(&total)));
    }
    pb.finish_and_clear();
    Ok(rows)
}

/// Greedy continuation of `prompt` for `n` tokens on the GPU (a prefill, then decode steps).
pub fn greedy(model: &mut GpuModel, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
    model.reset();
    let logits = model.forward(prompt, false)?;
    let mut out = vec![argmax(&logits)];
    while out.len() < n {
        let r = model.forward(&[*out.last().unwrap_or(&0)], false)?;
        out.push(argmax(&r));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_pass_and_others_are_named() {
        check_params(&HgaParams::default()).unwrap();
        check_params(&HgaParams {
            budget: Budget::Tokens(2048),
            shortlist: 4.0,
            dense_layers: 2,
            ..Default::default()
        })
        .unwrap();
        let e = check_params(&HgaParams { selector: Selector::OracleGroups, ..Default::default() }).unwrap_err();
        assert!(e.to_string().contains("selector oracle-groups"), "{e}");
        let e = check_params(&HgaParams::version1()).unwrap_err().to_string();
        assert!(e.contains("--group-score summary"), "{e}");
        let e = check_params(&HgaParams { chunk: 128, ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("--chunk 128 / --group 16"), "{e}");
    }

    #[test]
    fn rows_score_like_the_cpu_backend() {
        // Vocab 3, window [0, 1, 2, 1], 2 scored positions predicting tokens 2 and 1.
        let tokens = [0u32, 1, 2, 1];
        let dense = Forced { logits: vec![0.0, 0.0, 5.0, 0.0, 5.0, 0.0], sparsity: 1.0, stats: None };
        let same = Forced { logits: dense.logits.clone(), sparsity: 0.5, stats: None };
        let worse = Forced { logits: vec![0.0, 0.0, 5.0, 5.0, 0.0, 0.0], sparsity: 0.5, stats: None };
        let p = HgaParams::default();
        let d = eval_row("t", &tokens, 3, &dense, None).unwrap();
        assert_eq!((d.scored, d.context, d.gap, d.kl), (2, 4, 0.0, 0.0));
        let lse = (2.0f64 + 5f64.exp()).ln();
        assert!((d.nll - (lse - 5.0)).abs() < 1e-9, "{}", d.nll);
        let s = eval_row("t", &tokens, 3, &dense, Some((&p, &same))).unwrap();
        assert!(s.gap.abs() < 1e-12 && s.kl.abs() < 1e-12 && s.top1_agree == 1.0 && s.sparsity == 0.5);
        let w = eval_row("t", &tokens, 3, &dense, Some((&p, &worse))).unwrap();
        assert!(w.gap > 2.0 && w.kl > 1.0 && w.top1_agree == 0.5 && w.mass.is_nan(), "{w:?}");
    }

    #[test]
    fn scored_positions_keep_a_prefix() {
        assert_eq!(clamp_scored(256, 100).unwrap(), 98);
        assert_eq!(clamp_scored(0, 100).unwrap(), 1);
        assert!(clamp_scored(1, 2).is_err());
    }
}
