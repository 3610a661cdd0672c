//! `hga generate`: prefill a prompt on the GPU, then decode token by token (greedy), streaming the text; prints
//! time to first token, tokens/s and the GPU memory report.
//!
//! Two attention modes (`--attention`): `hga` (the default) keeps the K/V history in a mapped host arena (the host
//! tier), prefills the prompt exactly layer by layer and routes every decode step; `dense` keeps every layer's K/V
//! in GPU memory (the GPU tier) and attends exactly. What is built: dense with `--kv-tier gpu`, HGA with
//! `--kv-tier host`; the disk tier exists on the CPU forward only, and any other combination is refused naming
//! what is built. `--gpu-memory-limit` caps the GPU memory the model allocates (the accountant of
//! `hga::memory`), set before the load. `--replay-trace FILE` (HGA) replays a selection trace recorded on a trained
//! fixture (`hga trace record`) in place of the routing's selection, scaled to each prompt's context
//! (`GpuModel::set_selection_replay`): decode figures with a trained model's reuse at full size, where only random
//! weights run; the JSON line's `selection` says which (`"model"` or `"replayed trace FILE"`).
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hga::hga::{Budget, HgaParams};
use hga::kv::disk::DiskConfig;
use hga::kv::store::{IoMode, DEFAULT_DISK_CACHE_BYTES};
use hga::memory::human;
use hga::model::checkpoint::Checkpoint;
use hga::model::config::Qwen3MoeConfig;
use hga::model::gpu::{AttentionMode, GpuModel, GpuModelOptions, HgaOptions, HgaStats};
use hga::model::tokenizer::Tokenizer;
use hga::reference::kv::SelectionTrace;
use hga::runtime::Gpu;
use indicatif::{ProgressBar, ProgressStyle};

use super::eval::parse_budget;
use super::gpu::{attention_mode, budget_text, parse_size_arg, stats_line, stats_since};

/// How the GPU forward attends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Attention {
    /// Exact attention over every layer's K/V, held in GPU memory (the baseline).
    Dense,
    /// HGA: the K/V history in a mapped host arena, each decode step routed (chunk summaries, then groups) and
    /// attending to the sink, the local window and the routed groups (gathered into a GPU cache).
    Hga,
}

/// Where the K/V history lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KvTierArg {
    /// GPU memory (dense attention).
    Gpu,
    /// Mapped pinned host memory, read by the GPU over PCIe (HGA's arena; for dense, its whole K/V cache: the
    /// anchor of what dense costs when the K/V must leave the GPU).
    Host,
    /// A page file in --kv-dir behind a RAM cache of --host-kv-limit bytes (HGA): each decode step reads the
    /// routed groups that are neither in the GPU cache nor in RAM from disk.
    Disk,
}

/// Where HGA's routing sketches live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SketchTier {
    /// GPU memory while the memory cap holds them, else mapped host memory.
    Auto,
    Gpu,
    Host,
}

impl SketchTier {
    /// `HgaOptions::sketches_on_host`.
    pub fn on_host(self) -> Option<bool> {
        match self {
            SketchTier::Auto => None,
            SketchTier::Gpu => Some(false),
            SketchTier::Host => Some(true),
        }
    }
}

/// Bytes of K and V per position, layer and KV head in the host arena: 128 bf16 of each.
pub const ARENA_BYTES_PER_TOKEN_HEAD: u64 = 2 * 128 * 2;

/// Generate text with the GPU forward (greedy), under HGA (default) or dense attention.
#[derive(Args, Debug)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["prompt_file", "text", "tokens", "synthetic_prompt"])),
    after_help = "Defaults: --attention hga --budget 0.03 --kv-tier host (hga) / gpu (dense), no GPU memory limit.\n\
What is built: --attention hga --kv-tier host, --attention dense --kv-tier gpu|host. The disk tier is not built on the\n\
GPU path yet.\n\n\
Examples:\n  \
hga generate --model DIR --text 'def fibonacci(n):' --max-tokens 64\n  \
hga generate --model DIR --synthetic-prompt 65536 --max-tokens 32 --budget 2048 --gpu-memory-limit 32GiB --json\n  \
hga generate --model DIR --attention dense --synthetic-prompt 4096,16384 --max-tokens 64 --profile-step\n  \
hga generate --model DIR --synthetic-prompt 65536 --max-tokens 64 --replay-trace fixtures/traces/torch-8k-64.hgakv \
--json --stop-at-eos false"
)]
pub struct GenerateArgs {
    /// Model directory (FP8 checkpoint; tokenizer.json for text).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Prompt from a file.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Prompt text.
    #[arg(long)]
    pub text: Option<String>,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub tokens: Option<Vec<u32>>,
    /// Prompts of N pseudo-random token ids, one after the other with the model loaded once (for measuring long
    /// contexts without a text), e.g. 4096,16384,65536.
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    pub synthetic_prompt: Option<Vec<usize>>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Attention: hga (K/V history in the host arena, routed decode steps, exact layer-major prefill) or dense
    /// (every layer's K/V in GPU memory, exact).
    #[arg(long, value_enum, default_value_t = Attention::Hga)]
    pub attention: Attention,
    /// HGA's token budget per decode step, sink (64) and local window (256) included: a share of the context
    /// (a number with a decimal point, e.g. 0.03, in (0, 1]) or a token count (an integer, e.g. 2048).
    #[arg(long, value_name = "F|N", default_value = "0.03", value_parser = parse_budget)]
    pub budget: Budget,
    /// HGA: stage 1 keeps this many times the chunks the selected groups could fill.
    #[arg(long, default_value_t = 8.0)]
    pub shortlist: f64,
    /// HGA: the first N layers stay dense (their K/V in GPU memory).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub dense_layers: usize,
    /// HGA: routed-group slots per KV head of each layer's GPU cache (0: auto, twice the selection, and under
    /// --gpu-memory-limit whatever GPU memory the cap leaves once everything else is placed).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub cache_slots: usize,
    /// HGA: where the routing sketches live (66 bytes per position, layer and KV head: 3.3 GiB at 256K for
    /// Qwen3-30B-A3B): auto (GPU memory unless the --gpu-memory-limit cannot hold them beside everything else, then
    /// mapped host memory, layer by layer), gpu, or host (stage 2 then reads them over PCIe).
    #[arg(long, value_enum, value_name = "TIER", default_value_t = SketchTier::Auto)]
    pub sketch_tier: SketchTier,
    /// Where the K/V history lives: gpu (GPU memory; dense), host (mapped pinned host memory: HGA's arena, or the
    /// dense anchor's whole cache) or disk (HGA: a page file in --kv-dir behind a RAM cache of --host-kv-limit;
    /// its decode steps are launched from the host, not replayed from CUDA graphs). Default: host for hga, gpu for
    /// dense; other combinations are refused.
    #[arg(long, value_enum, value_name = "TIER")]
    pub kv_tier: Option<KvTierArg>,
    /// Directory of the disk tier's page file (--kv-tier disk; created there, removed at exit). It must exist and
    /// be writable; reads are O_DIRECT where the file system allows it.
    #[arg(long, value_name = "DIR")]
    pub kv_dir: Option<PathBuf>,
    /// Host memory the K/V may take, e.g. 64GiB. --kv-tier host: refused when below the arena the context needs
    /// (positions x layers x KV heads x 512 B); default no limit. --kv-tier disk: the RAM cache in front of the page
    /// file (default 1GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub host_kv_limit: Option<u64>,
    /// How the disk tier reads its pages: uring (io_uring) or pread (a thread pool).
    #[arg(long, value_name = "MODE", default_value = "uring")]
    pub kv_io: IoMode,
    /// Cap on the GPU memory the model allocates (weights, K/V, caches, workspaces), e.g. 32GiB or 34.4GB, set
    /// before the load: an allocation past it fails with the accountant's message (what did not fit, what is held,
    /// by how much) and a non-zero exit. Default: no cap.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub gpu_memory_limit: Option<u64>,
    /// K/V cache capacity (default: prompt + max-tokens).
    #[arg(long)]
    pub context: Option<usize>,
    /// Prefill chunk (tokens per forward call).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Stop at the end-of-sequence token of the config (`--stop-at-eos false`: always decode --max-tokens).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub stop_at_eos: bool,
    /// Launch every kernel of a decode step from the host instead of replaying the step from a CUDA graph (same
    /// results; for measuring what the graphs save).
    #[arg(long)]
    pub no_graphs: bool,
    /// Launch kernels without programmatic dependent launch (PDL). By default, on compute capability >= 9.0 with
    /// the sm_90 / sm_120 kernel images, each kernel may be launched while the previous one finishes (it waits in
    /// `griddepcontrol.wait` for the predecessor's results), hiding launch and ramp-up gaps between kernels; same
    /// results. For measuring what PDL saves (the environment variable HGA_PDL=0 does the same).
    #[arg(long)]
    pub no_pdl: bool,
    /// After decoding, profile one more decode step: GPU time per kind of work (sum of the parts), the bytes
    /// floor of the step (weights + K/V over the copy bandwidth measured in the same run) and the gap to it.
    #[arg(long)]
    pub profile_step: bool,
    /// Profile the prefill of each prompt (layer-major: HGA, or dense with --kv-tier host): GPU time per kind of
    /// work summed over layers and chunks (events between the parts keep PDL from overlapping them).
    #[arg(long)]
    pub profile_prefill: bool,
    /// Also print each prompt's figures (and the profile) as one JSON line on stdout: timings, attention, the GPU
    /// memory peak / device used at the peak / limit, and for hga the bytes gathered per token, the cache hit rate,
    /// the tokens routed in the last step and the arena's bytes (null for dense).
    #[arg(long)]
    pub json: bool,
    /// Bracket decode step N of each prompt (1 = the first; from the second on the step is a graph replay) with
    /// cuProfilerStart / cuProfilerStop, for a profiler whose capture starts off, e.g.
    /// `ncu --profile-from-start off --graph-profiling node --metrics gpu__time_duration.sum hga generate ...`:
    /// every kernel of that one step, nothing of the load or the prefill.
    #[arg(long, value_name = "N")]
    pub profiler_step: Option<usize>,
    /// HGA: replay this selection trace (`hga trace record` on a trained fixture, e.g. fixtures/traces/*.hgakv) in
    /// place of the routing's selection, scaled to the model and to each prompt's context (a benchmark switch:
    /// random weights at full size select uncorrelated groups step to step; the trace brings a trained model's
    /// reuse to the GPU caches). The routing still runs; the cache, the gather and the attention read the
    /// replayed groups, so the generated text is meaningless. The JSON line says `"selection": "replayed trace
    /// FILE"` (else `"model"`).
    #[arg(long, value_name = "FILE")]
    pub replay_trace: Option<PathBuf>,
}

/// The attention mode and K/V tier of the arguments, checked: dense runs with the GPU tier, HGA with the host
/// tier; anything else is refused with what is built. `None`: dense; else HGA's parameters.
pub fn plan(a: &GenerateArgs) -> anyhow::Result<Option<HgaParams>> {
    let tier = kv_tier(a);
    const BUILT: &str =
        "built on the GPU path: --attention hga --kv-tier host|disk, --attention dense --kv-tier gpu|host";
    match (a.attention, tier) {
        (Attention::Dense, KvTierArg::Disk) => bail!(
            "--attention dense --kv-tier disk: dense attention reads every position every step, so a disk tier \
             would read the whole K/V per token; the disk tier serves HGA's routed groups (--attention hga); for the \
             dense anchor off the GPU: --kv-tier host; {BUILT}"
        ),
        (Attention::Hga, KvTierArg::Disk) if a.kv_dir.is_none() => {
            bail!("--kv-tier disk needs --kv-dir DIR: the directory of its page file")
        }
        (Attention::Hga, KvTierArg::Gpu) => bail!(
            "--attention hga --kv-tier gpu: HGA keeps the K/V history in the host arena (--kv-tier host, its \
             default); an HGA tier in GPU memory is not built (for K/V in GPU memory: --attention dense); {BUILT}"
        ),
        _ => {}
    }
    if a.kv_dir.is_some() && tier != KvTierArg::Disk {
        bail!("--kv-dir is the disk tier's directory: it goes with --kv-tier disk");
    }
    if a.attention == Attention::Dense && (a.sketch_tier != SketchTier::Auto || a.cache_slots != 0) {
        bail!(
            "--sketch-tier and --cache-slots set where HGA keeps its routing sketches and its GPU cache \
             (--attention hga); dense attention has neither"
        );
    }
    if a.profile_prefill && a.attention == Attention::Dense && tier == KvTierArg::Gpu {
        bail!(
            "--profile-prefill profiles the layer-major prefill, which runs with --attention hga or --attention \
             dense --kv-tier host; the dense prefill with its K/V on the GPU is chunk-major"
        );
    }
    if tier == KvTierArg::Gpu && a.host_kv_limit.is_some() {
        bail!(
            "--host-kv-limit caps the host tier (--kv-tier host); --kv-tier gpu keeps the K/V in GPU memory: cap \
             that with --gpu-memory-limit"
        );
    }
    match a.attention {
        Attention::Dense => Ok(None),
        Attention::Hga => {
            let p = HgaParams {
                budget: a.budget,
                shortlist: a.shortlist,
                dense_layers: a.dense_layers,
                ..HgaParams::default()
            };
            super::gpu::check_params(&p)?;
            Ok(Some(p))
        }
    }
}

/// The K/V tier of the arguments: --kv-tier, else host for hga and gpu for dense.
pub fn kv_tier(a: &GenerateArgs) -> KvTierArg {
    a.kv_tier.unwrap_or(match a.attention {
        Attention::Hga => KvTierArg::Host,
        Attention::Dense => KvTierArg::Gpu,
    })
}

/// Host bytes of the arena for `positions`: positions x layers x KV heads x [`ARENA_BYTES_PER_TOKEN_HEAD`].
pub fn arena_need(positions: usize, c: &Qwen3MoeConfig) -> u64 {
    positions as u64 * c.num_hidden_layers as u64 * c.num_key_value_heads as u64 * ARENA_BYTES_PER_TOKEN_HEAD
}

/// Refuses a `--host-kv-limit` below the arena a context of `positions` needs.
pub fn check_host_kv_limit(limit: u64, positions: usize, c: &Qwen3MoeConfig) -> anyhow::Result<()> {
    let need = arena_need(positions, c);
    if limit < need {
        bail!(
            "--host-kv-limit {} ({limit} bytes) is below the host arena this context needs: {positions} positions x \
             {} layers x {} KV heads x {ARENA_BYTES_PER_TOKEN_HEAD} B (K and V, 128 bf16 each) = {} ({need} \
             bytes). The disk tier would serve the rest and is not built on the GPU path yet: raise the limit, or \
             shorten the prompt / --max-tokens / --context",
            human(limit),
            c.num_hidden_layers,
            c.num_key_value_heads,
            human(need)
        );
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let hga = plan(&a)?;
    let replay = match &a.replay_trace {
        Some(f) if hga.is_none() => bail!(
            "--replay-trace {} replays HGA selections (--attention hga); dense attention selects nothing to replay",
            f.display()
        ),
        Some(f) => Some(super::trace::read_trace(f)?),
        None => None,
    };
    let tok = Tokenizer::try_from_model_dir(&a.model)?;
    let config = Qwen3MoeConfig::load(&a.model)?;
    let vocab = config.vocab_size as u64;
    let synthetic = |n: usize| -> Vec<u32> {
        (0..n as u64).map(|i| ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17) % vocab) as u32).collect()
    };
    let prompts: Vec<Vec<u32>> = match (&a.tokens, &a.text, &a.prompt_file) {
        _ if a.synthetic_prompt.is_some() => a.synthetic_prompt.iter().flatten().map(|&n| synthetic(n)).collect(),
        (Some(t), _, _) => vec![t.clone()],
        (None, Some(text), _) => {
            vec![tok.as_ref().context("--text needs tokenizer.json in the model directory")?.encode(text)?]
        }
        (None, None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            vec![tok.as_ref().context("--prompt-file needs tokenizer.json in the model directory")?.encode(&text)?]
        }
        _ => bail!("give --text, --prompt-file, --tokens or --synthetic-prompt"),
    };
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        bail!("the prompt has no tokens");
    }
    let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let capacity = a.context.unwrap_or(longest + a.max_tokens);
    if let Some(limit) = a.host_kv_limit.filter(|_| kv_tier(&a) == KvTierArg::Host) {
        check_host_kv_limit(limit, capacity, &config)?;
    }
    if let (KvTierArg::Disk, Some(dir)) = (kv_tier(&a), &a.kv_dir) {
        // The directory's faults (missing, not a directory, read-only) before the GPU and the load: a page file is
        // created there and removed, as the model's store will.
        let cfg = DiskConfig { dir: dir.clone(), cache_bytes: 1 << 20, ..DiskConfig::default() };
        hga::kv::disk::DiskStore::open(hga::kv::HeapMemory, 1, 1, hga::kv::arena::BlockFormat::STANDARD, cfg)
            .with_context(|| format!("--kv-dir {}", dir.display()))?;
    }
    let gpu = super::gpu::open_gpu(a.device)?;
    gpu.set_memory_limit(a.gpu_memory_limit);
    let result = generate(&gpu, &a, hga.as_ref(), replay.as_ref(), &tok, &prompts, capacity);
    // The report also after a failure: what was held when an allocation did not fit.
    eprintln!("{}", gpu.memory().report());
    eprintln!("{}", host_memory_line(&gpu));
    result
}

/// One line on the mapped pinned host memory held for the GPU (`Gpu::host_memory`): live, peak, per label at the
/// peak.
fn host_memory_line(gpu: &Gpu) -> String {
    let r = gpu.host_memory().report();
    let labels: Vec<String> =
        r.labels.iter().filter(|l| l.at_peak > 0).map(|l| format!("{} {}", l.label, human(l.at_peak))).collect();
    format!(
        "host memory (mapped pinned, for the GPU): live {}, peak {}{}",
        human(r.live),
        human(r.peak),
        if labels.is_empty() { String::new() } else { format!(" ({})", labels.join(", ")) }
    )
}

/// Loads the model and runs every prompt (replaying `replay` after each prompt's prefill when given).
fn generate(
    gpu: &Gpu,
    a: &GenerateArgs,
    hga: Option<&HgaParams>,
    replay: Option<&SelectionTrace>,
    tok: &Option<Tokenizer>,
    prompts: &[Vec<u32>],
    capacity: usize,
) -> anyhow::Result<()> {
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    if a.no_pdl {
        gpu.set_pdl(false);
    }
    let t0 = Instant::now();
    let pb = ProgressBar::new(ckpt.config.num_hidden_layers as u64);
    pb.set_style(ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed_precise}")?);
    let options = GpuModelOptions {
        capacity,
        max_tokens: a.chunk.max(1),
        attention: match attention_mode(hga, a.cache_slots, a.sketch_tier.on_host()) {
            AttentionMode::Hga(o) if kv_tier(a) == KvTierArg::Disk => AttentionMode::Hga(HgaOptions {
                disk: Some(DiskConfig {
                    dir: a.kv_dir.clone().expect("plan() checked --kv-dir"),
                    cache_bytes: a.host_kv_limit.unwrap_or(DEFAULT_DISK_CACHE_BYTES),
                    io: a.kv_io,
                    // 64 MiB pinned extents: a RAM cache of GBs in a few allocations.
                    slots_per_extent: 8192,
                    ..DiskConfig::default()
                }),
                ..o
            }),
            AttentionMode::Hga(o) => AttentionMode::Hga(HgaOptions { host_kv_limit: a.host_kv_limit, ..o }),
            dense => dense,
        },
        host_embedding: false,
        prefill_residual_on_host: None,
        dense_kv_on_host: kv_tier(a) == KvTierArg::Host,
    };
    let model = GpuModel::load_with(gpu, &ckpt, &options, |d, _| pb.set_position(d as u64));
    pb.finish_and_clear();
    let mut model = model.with_context(|| {
        format!(
            "loading {} ({} attention, capacity {capacity} positions{})",
            a.model.display(),
            if hga.is_some() { "hga" } else { "dense" },
            match gpu.memory().limit() {
                Some(l) => format!(", GPU memory limit {}", human(l)),
                None => String::new(),
            }
        )
    })?;
    drop(ckpt);
    model.set_decode_graphs(!a.no_graphs);
    model.set_profile_prefill(a.profile_prefill);
    let (free, total) = gpu.context().mem_get_info()?;
    eprintln!(
        "{} on {} ({}, PDL {}): loaded in {:.1}s; GPU memory used {:.2} GB of {:.2} GB",
        a.model.display(),
        gpu.device_name(),
        gpu.image_name(),
        gpu.pdl_state(),
        t0.elapsed().as_secs_f64(),
        (total - free) as f64 / 1e9,
        total as f64 / 1e9
    );
    match hga {
        None => eprintln!("attention: dense, K/V in GPU memory (capacity {capacity} positions)"),
        Some(p) => eprintln!(
            "attention: hga, K/V history in the host arena; budget {} per step (sink {} + window {} included), \
             shortlist {}, {} dense layer(s), capacity {capacity} positions",
            budget_text(p.budget),
            p.sink,
            p.local,
            p.shortlist,
            p.dense_layers
        ),
    }
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b }) as u32;
    for (i, prompt) in prompts.iter().enumerate() {
        model.reset();
        if i > 0 {
            // Each prompt's peak: what stays loaded plus what this prompt takes.
            gpu.memory().reset_peak();
            gpu.host_memory().reset_peak();
        }
        let t1 = Instant::now();
        // A progress bar for prefills of more than one chunk (hidden when stderr is not a terminal).
        let pb = ProgressBar::new(prompt.len() as u64);
        // HGA's prefill is layer-major: it reports tokens-equivalent per layer (layers done x tokens / layers).
        if prompt.len() > a.chunk {
            pb.set_style(ProgressStyle::with_template(if hga.is_some() {
                "prefill (layer-major) {bar:30} {pos}/{len} tokens {elapsed_precise} ({per_sec})"
            } else {
                "prefill {bar:30} {pos}/{len} tokens {elapsed_precise} ({per_sec})"
            })?);
        } else {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let logits = model.forward_with_progress(prompt, false, |done, _| pb.set_position(done as u64))?;
        pb.finish_and_clear();
        let ttft = t1.elapsed();
        let prefill_parts = model.prefill_profile().to_vec();
        if a.profile_prefill {
            let total: f64 = prefill_parts.iter().map(|p| p.2).sum();
            eprintln!(
                "prefill profile ({} tokens; GPU time per kind of work, summed over layers and chunks):",
                prompt.len()
            );
            for (what, n, ms) in &prefill_parts {
                eprintln!("  {what:<48} {n:>7} x  {:>10.1} ms  {:>5.1}%", ms, 100.0 * ms / total.max(1e-9));
            }
            eprintln!("  {:<48} {:>7}    {:>10.1} ms", "sum", "", total);
        }
        if let Some(trace) = replay {
            // Scaled to this prompt's context; the decode steps from here replay it.
            model.set_selection_replay(Some(trace.clone()))?;
            let r = model.selection_replay().expect("just set");
            eprintln!(
                "selection: replayed trace {} ({} layers x {} KV heads, {} steps from position {}), scaled x{} with \
                 blocks of {} groups (up to {} per step and KV head); the generated text is not the model's",
                a.replay_trace.as_ref().map_or(String::new(), |f| f.display().to_string()),
                r.source.layers,
                r.source.kv_heads,
                r.source.steps.len(),
                r.source.first_pos,
                r.factor,
                r.block,
                r.max_groups
            );
        }
        // The HGA counters start over with each sequence; from here they count the decode steps.
        let base = model.hga_stats()?;
        let mut next = argmax(&logits);
        let eos = model.config().eos_token_id;
        let mut out = std::io::stdout().lock();
        let mut generated = vec![next];
        let t2 = Instant::now();
        let show = |ids: &[u32]| match &tok {
            Some(t) => t.decode(ids).unwrap_or_default(),
            None => format!("{} ", ids.last().copied().unwrap_or(0)),
        };
        let mut shown = String::new();
        let mut first_step = None;
        while generated.len() < a.max_tokens && !(a.stop_at_eos && Some(next) == eos) && model.len() < model.capacity()
        {
            let text = show(&generated);
            if tok.is_some() {
                write!(out, "{}", text.get(shown.len()..).unwrap_or(""))?;
                shown = text;
            } else {
                write!(out, "{text}")?;
            }
            out.flush()?;
            let ts = Instant::now();
            let r = if a.profiler_step == Some(generated.len()) {
                gpu.profiler_range(|| model.forward(&[next], false))??
            } else {
                model.forward(&[next], false)?
            };
            first_step.get_or_insert(ts.elapsed());
            next = argmax(&r);
            generated.push(next);
        }
        let dt = t2.elapsed();
        writeln!(out)?;
        drop(out);
        let stats: Option<HgaStats> = match (&base, model.hga_stats()?) {
            (Some(b), Some(s)) => Some(stats_since(b, &s)),
            _ => None,
        };
        if let Some(s) = &stats {
            eprintln!("hga: {}", stats_line(s));
        }
        let arena = model.arena_bytes() as u64;
        if let Some(limit) = a.host_kv_limit.filter(|&l| arena > l) {
            eprintln!(
                "note: the arena grew to {} (whole extents of positions), above --host-kv-limit {}",
                human(arena),
                human(limit)
            );
        }
        let mem = gpu.memory().report();
        let (free, total) = gpu.context().mem_get_info()?;
        let steps = generated.len().saturating_sub(1);
        // The first step of a context bound records its CUDA graph: report it apart from the steady rate.
        let first = first_step.map_or(0.0, |d| d.as_secs_f64());
        let steady = if steps > 1 { (steps - 1) as f64 / (dt.as_secs_f64() - first).max(1e-9) } else { f64::NAN };
        eprintln!(
            "prompt {} tokens: time to first token {:.3}s ({:.0} tokens/s prefill); decode {} tokens in {:.3}s: {:.1} \
             tokens/s after the first step ({:.1} ms, {}; PDL {}); GPU memory in use at the end {:.2} GB",
            prompt.len(),
            ttft.as_secs_f64(),
            prompt.len() as f64 / ttft.as_secs_f64(),
            steps,
            dt.as_secs_f64(),
            steady,
            first * 1e3,
            if a.no_graphs { "graphs off" } else { "includes recording its graph" },
            gpu.pdl_state(),
            (total - free) as f64 / 1e9
        );
        let mut report = serde_json::json!({
            "prompt_tokens": prompt.len(),
            "ttft_s": ttft.as_secs_f64(),
            "decode_tokens": steps,
            "decode_s": dt.as_secs_f64(),
            "decode_tokens_per_s_after_first": steady,
            "first_step_ms": first * 1e3,
            "graphs": !a.no_graphs,
            "pdl": gpu.pdl_enabled(),
            "gpu_memory_gb": (total - free) as f64 / 1e9,
            "device": gpu.device_name(),
            "attention": model.attention_name(),
            "kv_tier": match kv_tier(a) {
                KvTierArg::Gpu => "gpu",
                KvTierArg::Host => "host",
                KvTierArg::Disk => "disk",
            },
            "budget": hga.map(|p| p.budget),
            "capacity": model.capacity(),
            "gpu_memory_peak_bytes": mem.peak,
            "gpu_device_used_at_peak_bytes": mem.device_used_at_peak,
            "gpu_memory_limit_bytes": mem.limit,
            "host_memory_peak_bytes": gpu.host_memory().peak(),
            "h2d_bytes_per_token": stats.as_ref().filter(|s| s.steps > 0).map(|s| s.h2d_bytes as f64 / s.steps as f64),
            "cache_hit_rate": stats.as_ref().map(|s| s.hit_rate()),
            "cache_slots_per_kv_head": stats.as_ref().map(|s| s.cache_slots),
            "disk": (kv_tier(a) == KvTierArg::Disk).then(|| stats.as_ref().map(|s| serde_json::json!({
                "ram_hits": s.disk_ram_hits,
                "ram_misses": s.disk_ram_misses,
                "bytes_read_per_token": s.disk_bytes_read as f64 / s.steps.max(1) as f64,
                "bytes_written": s.disk_bytes_written,
                "decode_host_s": s.disk_host_s,
                "read_gbps_in_host_time": s.disk_bytes_read as f64 / s.disk_host_s.max(1e-9) / 1e9,
                "prefill_host_s": base.as_ref().map(|b| b.disk_host_s),
                "prefill_bytes_written": base.as_ref().map(|b| b.disk_bytes_written),
            }))),
            "max_groups": stats.as_ref().map(|s| s.max_groups),
            "routed_tokens": stats.as_ref().map(|s| s.routed_tokens_last_step),
            "arena_bytes": arena,
            "sketch_host_layers": stats.as_ref().map(|s| s.sketch_host_layers),
            "prefill_history_s": stats.as_ref().map(|s| s.prefill_history_s),
            "prefill_residual_on_host": stats.as_ref().map(|s| s.prefill_residual_on_host),
            "arena_alloc_s": stats.as_ref().map(|s| s.arena_alloc_s),
            "prefill_profile_ms": prefill_parts.iter().map(|p| (p.0, p.2)).collect::<Vec<_>>(),
            "selection": match &a.replay_trace {
                Some(f) => format!("replayed trace {}", f.display()),
                None => "model".to_string(),
            },
            "replay": model.selection_replay().map(|r| serde_json::json!({
                "trace_first_pos": r.source.first_pos,
                "trace_steps": r.source.steps.len(),
                "factor": r.factor,
                "block": r.block,
                "max_groups": r.max_groups,
                "steps_replayed": r.steps_replayed(),
            })),
        });
        if a.profile_step && model.len() < model.capacity() {
            let (p, _) = model.profile_decode_step(next)?;
            let floor_bytes = model.decode_bytes_floor(p.context);
            let floor_ms = floor_bytes as f64 / (p.copy_gbps * 1e9) * 1e3;
            eprintln!(
                "decode step profile at context {} (GPU time per kind of work, summed over the layers; PDL {}, which \
                 cannot overlap kernels across the events between the parts):",
                p.context,
                gpu.pdl_state()
            );
            for (what, n, ms) in &p.parts {
                eprintln!("  {what:<34} {n:>4} x  {:>9.1} us  {:>5.1}%", ms * 1e3, 100.0 * ms / p.total_ms);
            }
            eprintln!(
                "  sum of the parts {:.3} ms; bytes floor {:.2} GB / {:.0} GB/s (copy, same run) = {:.3} ms: {:.2}x \
                 the floor{}",
                p.total_ms,
                floor_bytes as f64 / 1e9,
                p.copy_gbps,
                floor_ms,
                p.total_ms / floor_ms,
                if p.gpu_waited { " (the GPU waited for the host: parts include idle time)" } else { "" }
            );
            report["profile"] = serde_json::json!({
                "context": p.context,
                "parts": p.parts.iter().map(|(w, n, ms)| serde_json::json!({"what": w, "marks": n, "ms": ms})).collect::<Vec<_>>(),
                "sum_of_parts_ms": p.total_ms,
                "floor_bytes": floor_bytes,
                "copy_gbps": p.copy_gbps,
                "floor_ms": floor_ms,
                "gpu_waited": p.gpu_waited,
            });
        }
        if a.json {
            println!("{report}");
        }
    }
    Ok(())
}
