//! `hga trace`: selection traces (`hga::reference::kv::SelectionTrace`, files `*.hgakv`): `record` runs the CPU HGA
//! reference on a model directory (a trained fixture) over a text and writes every decode step's selected groups
//! per (layer, KV head); `info` summarizes a trace file. A trace is what `hga generate --replay-trace` replays at
//! full size in place of the routing's own selection (random weights select uncorrelated groups step to step).
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hga::reference::kv::{clock_hits, SelectionTrace};

/// Record or inspect selection traces.
#[derive(Subcommand, Debug)]
pub enum TraceCommand {
    /// Record a selection trace with the CPU HGA reference (CPU only): prefill the first --context tokens of
    /// --text (routed), decode --steps tokens greedily, write each step's selected groups per (layer, KV head).
    Record(RecordArgs),
    /// Print a trace file's shape and selection statistics.
    Info(InfoArgs),
}

#[derive(Args, Debug)]
#[command(after_help = "Example (the committed fixtures/traces/ trace, see its README.md):\n  \
hga trace record --model fixtures/qwen3-moe-bytes --text fixtures/qwen3-moe-bytes/eval/torch.txt --context 8192 \
--steps 64 --groups 16 --out fixtures/traces/torch-8k-64.hgakv")]
pub struct RecordArgs {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Text file; its first --context tokens are the prompt.
    #[arg(long, value_name = "FILE")]
    pub text: PathBuf,
    /// Prompt tokens (the position of the first recorded step).
    #[arg(long, value_name = "N")]
    pub context: usize,
    /// Decode steps to record.
    #[arg(long, value_name = "S")]
    pub steps: usize,
    /// Routed groups per step and (layer, KV head): the budget is 320 + 16 x G tokens (sink + window + G groups).
    #[arg(long, value_name = "G")]
    pub groups: usize,
    /// Output file (the trace's bytes, `SelectionTrace::to_bytes`).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
#[command(after_help = "Example (what hga generate --replay-trace replays at 64K with --budget 0.03: 123 groups per \
step, factor 8, a cache of twice the selection, CLOCK counts 2 / 1):\n  \
hga trace info fixtures/traces/torch-8k-64.hgakv --max-groups 123 --factor 8")]
pub struct InfoArgs {
    /// A trace file (`hga trace record`).
    pub file: PathBuf,
    /// Also scale the trace to this selection width (`SelectionTrace::scaled_to`, as `hga generate
    /// --replay-trace` does with the HGA layers' width) and print the hit rate of the GPU cache's exact CPU model
    /// (CLOCK, `reference::kv`) on it.
    #[arg(long, value_name = "N")]
    pub max_groups: Option<usize>,
    /// The context factor of that scaling (the model's context / the trace's first position, rounded down).
    #[arg(long, value_name = "F", default_value_t = 1)]
    pub factor: usize,
    /// Routed-group slots per KV head of the modelled cache (default: twice --max-groups, as the GPU model's).
    #[arg(long, value_name = "N")]
    pub cache_slots: Option<usize>,
    /// CLOCK reference counts on a hit and on a fill (the GPU model's defaults: 2 and 1).
    #[arg(long, default_value_t = 2)]
    pub ref_hit: u32,
    #[arg(long, default_value_t = 1)]
    pub ref_fill: u32,
}

pub fn run(c: TraceCommand) -> anyhow::Result<()> {
    match c {
        TraceCommand::Record(a) => record(a),
        TraceCommand::Info(a) => info(a),
    }
}

/// Reads and parses a trace file; the error names the file.
pub fn read_trace(path: &Path) -> anyhow::Result<SelectionTrace> {
    let b = std::fs::read(path).with_context(|| format!("reading the selection trace {}", path.display()))?;
    SelectionTrace::from_bytes(&b).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// One line: shape, first position, steps, widths, distinct groups per stream.
pub fn summary(t: &SelectionTrace) -> String {
    let streams = t.layers * t.kv_heads;
    let selections: usize = t.steps.iter().flatten().map(|s| s.len()).sum();
    let distinct: usize = (0..t.layers)
        .flat_map(|l| (0..t.kv_heads).map(move |h| (l, h)))
        .map(|(l, h)| t.stream(l, h).into_iter().flatten().collect::<HashSet<_>>().len())
        .sum();
    format!(
        "{} layers x {} KV heads ({streams} streams), {} steps from position {}, groups per step and stream: mean \
         {:.1}, max {}; {selections} selections, {distinct} distinct (stream, group): at most {:.1}% can hit",
        t.layers,
        t.kv_heads,
        t.steps.len(),
        t.first_pos,
        t.mean_selected(),
        t.max_selected(),
        if selections == 0 { 0.0 } else { 100.0 * (selections - distinct) as f64 / selections as f64 }
    )
}

fn info(a: InfoArgs) -> anyhow::Result<()> {
    let t = read_trace(&a.file)?;
    println!("{}", summary(&t));
    let Some(mg) = a.max_groups else { return Ok(()) };
    if mg == 0 || a.factor == 0 {
        bail!("--max-groups and --factor must be positive");
    }
    let slots = a.cache_slots.unwrap_or(2 * mg);
    if slots < mg {
        bail!("--cache-slots {slots} is below --max-groups {mg} (the cache holds at least one selection)");
    }
    let s = t.scaled_to(t.layers, t.kv_heads, mg, a.factor);
    let (mut hits, mut misses) = (0u64, 0u64);
    for l in 0..s.layers {
        for h in 0..s.kv_heads {
            let (hi, mi) = clock_hits(&s.stream(l, h), slots, a.ref_hit, a.ref_fill);
            hits += hi;
            misses += mi;
        }
    }
    println!(
        "scaled to {mg} groups per step x{} (blocks of {}): groups per step and stream mean {:.1}, max {}; a CLOCK \
         cache of {slots} slots (ref_hit {}, ref_fill {}): {:.1}% hits ({hits} of {})",
        a.factor,
        t.scale_block(mg, a.factor),
        s.mean_selected(),
        s.max_selected(),
        a.ref_hit,
        a.ref_fill,
        100.0 * hits as f64 / (hits + misses).max(1) as f64,
        hits + misses
    );
    Ok(())
}

fn record(a: RecordArgs) -> anyhow::Result<()> {
    if a.context == 0 || a.steps == 0 || a.groups == 0 {
        bail!("--context, --steps and --groups must be positive");
    }
    if !a.model.join("config.json").exists() {
        bail!("{} is not a model directory (no config.json)", a.model.display());
    }
    let text = std::fs::read_to_string(&a.text).with_context(|| format!("reading {}", a.text.display()))?;
    let t0 = Instant::now();
    eprintln!(
        "recording: {} on the CPU HGA reference, prefill of {} tokens of {} (budget 320 + 16 x {} tokens), then {} \
         decode steps",
        a.model.display(),
        a.context,
        a.text.display(),
        a.groups,
        a.steps
    );
    let t = SelectionTrace::record_with_progress(&a.model, &text, a.context, a.steps, a.groups, |done, n| {
        if done == 0 {
            eprintln!("prefill done in {:.1}s", t0.elapsed().as_secs_f64());
        } else if done == n || done % 8 == 0 {
            eprintln!("decode step {done}/{n} ({:.1}s)", t0.elapsed().as_secs_f64());
        }
    })
    .map_err(|e| anyhow::anyhow!("recording a trace from {} over {}: {e}", a.model.display(), a.text.display()))?;
    let b = t.to_bytes();
    if SelectionTrace::from_bytes(&b).as_ref() != Ok(&t) {
        bail!("the trace does not survive its own encoding (a group delta above 65535?)");
    }
    std::fs::write(&a.out, &b).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {} ({} bytes) in {:.1}s: {}", a.out.display(), b.len(), t0.elapsed().as_secs_f64(), summary(&t));
    Ok(())
}
