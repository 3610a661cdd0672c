//! `hga eval`: quality of HGA against dense attention, in nats/token, on text files (teacher-forced), with the
//! routing diagnostics. The CPU reference backend, or the GPU forward (`--backend cuda`, [`super::gpu`]).
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hga::hga::eval::{eval_window, EvalRow};
use hga::hga::{Budget, GqaMode, GroupScore, HgaParams, Selector, SummaryMode};
use hga::kv::store::{parse_size, IoMode, TierKind};
use hga::kv::KvTier;
use hga::model::checkpoint::Checkpoint;
use hga::model::forward::{ActivationMode, CpuModel};
use hga::model::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

use super::gpu::{Backend, GpuOpts};

/// Where the CPU forward keeps its K/V history (hga_host::kv). Every tier gives bit-identical logits.
#[derive(Args, Clone, Debug, Default)]
pub struct KvOpts {
    /// K/V tier of the CPU forward: plain (vectors in RAM), host (the host arena of group blocks) or disk (a RAM
    /// cache of --host-kv-limit bytes over page files in --kv-dir).
    #[arg(long, value_name = "TIER", default_value = "plain")]
    pub kv_tier: TierKind,
    /// Directory of the disk tier's page files (each run creates its own file there and removes it).
    #[arg(long, value_name = "DIR")]
    pub kv_dir: Option<PathBuf>,
    /// Host RAM for K/V: the disk tier's RAM cache (default 1G) or a cap of the host tier, e.g. 64M, 2G.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub host_kv_limit: Option<u64>,
    /// How the disk tier reads its pages: uring (io_uring) or pread (a thread pool).
    #[arg(long, value_name = "IO", default_value = "uring")]
    pub kv_io: IoMode,
}

impl KvOpts {
    /// The tier, checked (a disk tier needs --kv-dir, ...).
    pub fn tier(&self) -> anyhow::Result<KvTier> {
        let t = KvTier { kind: self.kv_tier, dir: self.kv_dir.clone(), host_limit: self.host_kv_limit, io: self.kv_io };
        t.validate()?;
        Ok(t)
    }
}

/// Attention policies to compare with dense (dense is always run: it is the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// Dense attention (the reference; always included).
    Dense,
    /// HGA two-stage routing.
    Hga,
    /// Ideal selector: the tokens of highest true attention at the same budget.
    OracleTokens,
    /// Ideal selector: the groups of highest true attention mass at the same budget.
    OracleGroups,
}

/// Summary kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Summary {
    Minmax,
    Mean,
    /// The mean key and the block's radius around it: `q . mean + |q| r` (an upper bound, half min/max's numbers).
    Ball,
}

/// GQA aggregation of block scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Gqa {
    Max,
    Mean,
    PerHead,
}

/// Shared HGA options (also used by `hga needle` and `hga demo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GroupScoreArg {
    Summary,
    Sketch4,
}

/// HGA parameters. Options that take a comma-separated list are swept: every combination is evaluated (on the same
/// dense reference), and the table names each by the parameters that differ from the defaults.
#[derive(Args, Debug, Clone)]
pub struct HgaOpts {
    /// Token budgets per query (sink and window included): a share of the context (0.03) or a token count (2048)
    #[arg(long, value_delimiter = ',', default_value = "0.03")]
    pub budget: Vec<String>,
    /// Chunk sizes (tokens)
    #[arg(long, value_delimiter = ',', default_value = "64")]
    pub chunk: Vec<usize>,
    /// Group sizes (tokens); each divides the chunk size
    #[arg(long, value_delimiter = ',', default_value = "16")]
    pub group: Vec<usize>,
    /// Always-attended first tokens
    #[arg(long, default_value_t = 64)]
    pub sink: usize,
    /// Always-attended local window (tokens before the query block, rounded down to a chunk boundary)
    #[arg(long, default_value_t = 256)]
    pub local: usize,
    /// Summary of a chunk/group: min/max bound or mean key
    #[arg(long, value_enum, value_delimiter = ',', default_value = "minmax")]
    pub summary: Vec<Summary>,
    /// Stage 2's group scores: the group summary, or the log-sum-exp of int4 key sketches (host-RAM tier)
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sketch4")]
    pub group_score: Vec<GroupScoreArg>,
    /// Scores relative to each (query, head)'s log-sum-exp over its sink and window (true/false)
    #[arg(long, value_delimiter = ',', default_value = "true")]
    pub normalize: Vec<bool>,
    /// How the query heads of a KV head combine their scores
    #[arg(long, value_enum, value_delimiter = ',', default_value = "max")]
    pub gqa: Vec<Gqa>,
    /// Stage 1 keeps this many times the chunks the selected groups could fill ("inf": no chunk stage)
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub shortlist: Vec<f64>,
    /// The first N layers stay dense
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub dense_layers: Vec<usize>,
    /// Prefill routes this many consecutive queries jointly
    #[arg(long, default_value_t = 64)]
    pub query_block: usize,
}

impl HgaOpts {
    /// Every combination of the swept options, per budget and selector.
    pub fn params(&self, selectors: &[Selector]) -> anyhow::Result<Vec<HgaParams>> {
        let mut out = Vec::new();
        for b in &self.budget {
            let budget = parse_budget(b).map_err(|e| anyhow::anyhow!("--{e}"))?;
            for &selector in selectors {
                for &chunk in &self.chunk {
                    for &group in &self.group {
                        for &summary in &self.summary {
                            for &gs in &self.group_score {
                                for &normalize in &self.normalize {
                                    for &gqa in &self.gqa {
                                        for &shortlist in &self.shortlist {
                                            for &dense_layers in &self.dense_layers {
                                                let p = HgaParams {
                                                    chunk,
                                                    group,
                                                    sink: self.sink,
                                                    local: self.local,
                                                    budget,
                                                    summary: match summary {
                                                        Summary::Minmax => SummaryMode::MinMax,
                                                        Summary::Mean => SummaryMode::Mean,
                                                        Summary::Ball => SummaryMode::Ball,
                                                    },
                                                    group_score: match gs {
                                                        GroupScoreArg::Summary => GroupScore::Summary,
                                                        GroupScoreArg::Sketch4 => GroupScore::Sketch4,
                                                    },
                                                    normalize,
                                                    gqa: match gqa {
                                                        Gqa::Max => GqaMode::Max,
                                                        Gqa::Mean => GqaMode::Mean,
                                                        Gqa::PerHead => GqaMode::PerHead,
                                                    },
                                                    shortlist,
                                                    query_block: self.query_block,
                                                    dense_layers,
                                                    selector,
                                                };
                                                p.validate().map_err(|e| anyhow::anyhow!("HGA parameters: {e}"))?;
                                                // The ideal selectors ignore the scoring options: one of each.
                                                if selector == Selector::Hga
                                                    || !out.iter().any(|q: &HgaParams| {
                                                        q.selector == selector
                                                            && q.budget == budget
                                                            && q.chunk == chunk
                                                            && q.group == group
                                                            && q.dense_layers == dense_layers
                                                    })
                                                {
                                                    out.push(p);
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// A token budget per query, sink and window included: a share of the context when it has a decimal point or an
/// exponent (`0.03`, `1e-2`; in (0, 1]), else a token count (`2048`; at least 1). The one parser of `--budget` for
/// `hga eval`, `hga needle`, `hga demo` and `hga generate`.
pub fn parse_budget(s: &str) -> Result<Budget, String> {
    let t = s.trim();
    let what = "a share of the context such as 0.03, or a token count such as 2048";
    if t.contains(['.', 'e', 'E']) {
        let f: f64 = t.parse().map_err(|_| format!("budget `{s}` is not a number ({what})"))?;
        if !(f > 0.0 && f <= 1.0) {
            return Err(format!(
                "budget `{s}`: a share of the context must be in (0, 1] (for a token count write an integer, e.g. 2048)"
            ));
        }
        Ok(Budget::Fraction(f))
    } else {
        let n: usize = t.parse().map_err(|_| format!("budget `{s}` is not a number ({what})"))?;
        if n == 0 {
            return Err(format!("budget `{s}`: at least one token ({what})"));
        }
        Ok(Budget::Tokens(n))
    }
}

#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  hga eval --model fixture --text fixture/eval/a.txt --context 4096,8192 --budget 0.03,0.06 \
                        --attention hga,oracle-groups\n\n\
Each window is the first CONTEXT tokens of a file; the last --scored positions are scored. Reported per policy:\n\
nats/token, the gap to dense, KL(dense||policy), top-1 agreement, the sparsity used, and the routing diagnostics\n\
(dense softmax mass on the selected tokens, recall of the dense top-32, relative error of the attention output).\n\n\
--backend cuda: the GPU forward, dense and HGA in one process (the checkpoint opened once, the models loaded one\n\
after the other). The GPU's HGA prefills a prompt exactly and routes decode steps, so each window's prefix is\n\
prefilled and every scored position is one teacher-forced decode step, under dense too. The hga selector only,\n\
with the kernels' geometry (chunk 64, group 16, sink 64, local 256, minmax, sketch4, gqa max; the budget,\n\
--shortlist, --normalize and --dense-layers may vary); sparsity comes from the tokens each step attended; mass,\n\
rec@32 and attn err are not measured there (NaN; null in JSON). Example:\n  \
hga eval --backend cuda --model fixtures/qwen3-moe-bytes --text fixtures/qwen3-moe-bytes/eval/torch.txt \\\n    \
--context 4096 --budget 0.03,0.125"
)]
pub struct EvalArgs {
    /// Model directory (with tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text files to evaluate on.
    #[arg(long, value_name = "FILE", num_args = 1.., required = true)]
    pub text: Vec<PathBuf>,
    /// Window lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "4096,8192,16384")]
    pub context: Vec<usize>,
    /// Policies to compare with dense.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "dense,hga")]
    pub attention: Vec<Policy>,
    /// Positions scored at the end of each window.
    #[arg(long, default_value_t = 256)]
    pub scored: usize,
    /// Activation mode of the FP8-weight linears of the CPU forward (default f32; --backend cuda computes FP8
    /// activations with a bf16 residual stream, what fp8-bf16 emulates, and refuses this option).
    #[arg(long)]
    pub activations: Option<ActivationMode>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the gap to dense against the context and against the budget (.png or .svg).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub hga: HgaOpts,
    #[command(flatten)]
    pub kv: KvOpts,
    #[command(flatten)]
    pub gpu: GpuOpts,
}

/// Refuses the CPU-only options on `--backend cuda`, and the GPU-only ones on `--backend cpu`.
pub fn check_backend(
    gpu: &GpuOpts,
    kv: &KvOpts,
    activations: Option<ActivationMode>,
    policies: &[Policy],
) -> anyhow::Result<()> {
    if gpu.backend == Backend::Cpu {
        return gpu.check_cpu();
    }
    if kv.kv_tier != TierKind::Plain || kv.kv_dir.is_some() || kv.host_kv_limit.is_some() {
        bail!(
            "--kv-tier / --kv-dir / --host-kv-limit choose the CPU forward's K/V tier: on --backend cuda dense keeps \
             its K/V on the GPU and HGA its history in the host arena (a disk tier is not built on the GPU path yet)"
        );
    }
    if activations.is_some() {
        bail!(
            "--activations is for --backend cpu: the GPU forward computes FP8 activations with a bf16 \
             residual stream (what --activations fp8-bf16 emulates on the CPU)"
        );
    }
    let oracles: Vec<&str> = policies
        .iter()
        .filter_map(|p| match p {
            Policy::OracleTokens => Some("oracle-tokens"),
            Policy::OracleGroups => Some("oracle-groups"),
            _ => None,
        })
        .collect();
    if !oracles.is_empty() {
        bail!(
            "--attention {}: the GPU path implements the hga selector only (dense and hga); the ideal selectors \
             run on --backend cpu",
            oracles.join(",")
        );
    }
    Ok(())
}

pub fn selectors(p: &[Policy]) -> Vec<Selector> {
    p.iter()
        .filter_map(|p| match p {
            Policy::Dense => None,
            Policy::Hga => Some(Selector::Hga),
            Policy::OracleTokens => Some(Selector::OracleTokens),
            Policy::OracleGroups => Some(Selector::OracleGroups),
        })
        .collect()
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    check_backend(&a.gpu, &a.kv, a.activations, &a.attention)?;
    let params = a.hga.params(&selectors(&a.attention))?;
    if a.gpu.backend == Backend::Cuda {
        for p in &params {
            super::gpu::check_params(p)?;
        }
    }
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let tok = Tokenizer::from_model_dir(&a.model).context("hga eval reads text: the model needs tokenizer.json")?;
    let mut windows = Vec::new();
    for f in &a.text {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let ids = tok.encode(&text)?;
        for &c in &a.context {
            if ids.len() < c {
                eprintln!("skip {} at context {c}: the file has only {} tokens", f.display(), ids.len());
                continue;
            }
            windows.push((f.display().to_string(), ids[..c].to_vec()));
        }
    }
    if windows.is_empty() {
        bail!("no window to evaluate: every file is shorter than every --context");
    }
    let rows = match a.gpu.backend {
        Backend::Cuda => super::gpu::eval(&ckpt, &windows, a.scored, &params, &a.gpu)?,
        Backend::Cpu => {
            eval_cpu(&ckpt, &windows, a.scored, &params, a.activations.unwrap_or(ActivationMode::F32), &a.kv)?
        }
    };
    print_rows(&rows, a.json)?;
    if let Some(p) = &a.plot {
        super::plot::plot_gap(&rows, p)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// The CPU reference backend: every window under dense and each parameter set.
fn eval_cpu(
    ckpt: &Checkpoint,
    windows: &[(String, Vec<u32>)],
    scored: usize,
    params: &[HgaParams],
    activations: ActivationMode,
    kv: &KvOpts,
) -> anyhow::Result<Vec<EvalRow>> {
    let mut model = CpuModel::load(ckpt, activations)?.with_kv_tier(kv.tier()?)?;
    if model.kv_tier().kind != TierKind::Plain {
        eprintln!("K/V tier: {}", model.kv_tier().describe());
    }
    let pb = ProgressBar::new((windows.len() * (1 + params.len())) as u64);
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")?);
    let mut rows: Vec<EvalRow> = Vec::new();
    for (name, ids) in windows {
        let (m, r) = eval_window(model, name, ids, scored, params, |p| {
            pb.set_message(format!("{name} @ {} : {p}", ids.len()));
            pb.inc(1);
        })?;
        model = m;
        rows.extend(r);
    }
    pb.finish_and_clear();
    Ok(rows)
}

/// The eval table (or JSON).
pub fn print_rows(rows: &[EvalRow], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>7} {:<14} {:<24} {:>8} {:>8} {:>8} {:>9} {:>8} {:>6} {:>8} {:>6} {:>7} {:>8}",
        "text",
        "context",
        "policy",
        "variant",
        "budget",
        "dense",
        "nats",
        "gap",
        "KL",
        "top1",
        "sparsity",
        "mass",
        "rec@32",
        "attn err"
    );
    for r in rows {
        let budget = match r.params.as_ref().map(|p| p.budget) {
            None => "-".to_string(),
            Some(hga::hga::Budget::Fraction(f)) => format!("{:.1}%", 100.0 * f),
            Some(hga::hga::Budget::Tokens(t)) => format!("{t}"),
        };
        let name: String = r.text.chars().rev().take(24).collect::<Vec<_>>().into_iter().rev().collect();
        println!(
            "{:<24} {:>7} {:<14} {:<24} {:>8} {:>8.4} {:>8.4} {:>+9.4} {:>8.4} {:>6.3} {:>7.2}% {:>6.3} {:>7.3} {:>8.3}",
            name,
            r.context,
            r.policy,
            r.params.as_ref().map(|p| p.label()).unwrap_or_else(|| "-".into()),
            budget,
            r.nll_dense,
            r.nll,
            r.gap,
            r.kl,
            r.top1_agree,
            100.0 * r.sparsity,
            r.mass,
            r.recall32,
            r.attn_rel_err
        );
    }
    Ok(())
}
