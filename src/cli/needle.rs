//! `hga needle`: retrieval of a key stated at depth d% of a long filler text and asked for at the end, under dense
//! attention and under HGA, on the CPU reference forward (greedy decoding).
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use hga::hga::HgaAttention;
use hga::model::checkpoint::Checkpoint;
use hga::model::forward::{ActivationMode, CpuModel, DenseAttention};
use hga::model::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

use super::eval::{selectors, HgaOpts, KvOpts, Policy};

/// Needle-in-a-haystack retrieval of dense attention and HGA at several depths and contexts.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  hga needle --model fixture --filler fixture/eval/a.txt --context 4096,8192 --depths 0,25,50,75,100 \
                        --budget 0.05\n\n\
The prompt is filler text (tokens of --filler, repeated as needed) with a line `[kv] <key> = <value>` (key: 6 of\n\
a-z, value: 8 of A-Z0-9: the format the fixture model is trained to retrieve, docs/fixture.md) inserted at each\n\
depth, ending with the line `[kv] <key> = `; retrieval succeeds when the greedy continuation is the value. Each\n\
(context, depth) is tried with --trials different keys."
)]
pub struct NeedleArgs {
    /// Model directory (with tokenizer.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Filler text file.
    #[arg(long, value_name = "FILE")]
    pub filler: PathBuf,
    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    pub context: Vec<usize>,
    /// Depths of the key, in percent of the prompt.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    pub depths: Vec<u32>,
    /// Numbers tried per (context, depth).
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// Policies (dense is always run).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "dense,hga")]
    pub attention: Vec<Policy>,
    /// Activation mode of the FP8-weight linears.
    #[arg(long, default_value = "f32")]
    pub activations: ActivationMode,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub hga: HgaOpts,
    #[command(flatten)]
    pub kv: KvOpts,
}

/// A deterministic key (6 of a-z) and value (8 of A-Z0-9) from a seed (SplitMix64).
fn key_value(seed: u64) -> (String, String) {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let key: String = (0..6).map(|_| (b'a' + (next() % 26) as u8) as char).collect();
    let value: String = (0..8).map(|_| ALNUM[(next() % 36) as usize] as char).collect();
    (key, value)
}

/// Greedy continuation of `prompt` for `n` tokens.
fn greedy(model: &CpuModel, prompt: &[u32], n: usize) -> anyhow::Result<Vec<u32>> {
    let mut cache = model.new_cache();
    let logits = model.prefill(prompt, &mut cache)?;
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b }) as u32;
    let mut out = vec![argmax(logits.row(prompt.len() - 1))];
    while out.len() < n {
        let r = model.decode(*out.last().unwrap_or(&0), &mut cache)?;
        out.push(argmax(&r));
    }
    Ok(out)
}

pub fn run(a: NeedleArgs) -> anyhow::Result<()> {
    let params = a.hga.params(&selectors(&a.attention))?;
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let tok = Tokenizer::from_model_dir(&a.model).context("hga needle needs tokenizer.json")?;
    let filler =
        tok.encode(&std::fs::read_to_string(&a.filler).with_context(|| format!("reading {}", a.filler.display()))?)?;
    if filler.is_empty() {
        bail!("{} has no tokens", a.filler.display());
    }
    let mut model = CpuModel::load(&ckpt, a.activations)?.with_kv_tier(a.kv.tier()?)?;
    if model.kv_tier().kind != hga::kv::store::TierKind::Plain {
        eprintln!("K/V tier: {}", model.kv_tier().describe());
    }
    let mut policies: Vec<(String, Option<hga::hga::HgaParams>)> = vec![("dense".into(), None)];
    policies.extend(params.into_iter().map(|p| (format!("{:?} {}@{:?}", p.selector, p.label(), p.budget), Some(p))));
    let total = a.context.len() * a.depths.len() * a.trials * policies.len();
    let pb = ProgressBar::new(total as u64);
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")?);
    // hits[policy][context][depth]
    let mut rows = Vec::new();
    for (name, p) in &policies {
        model = match p {
            None => model.with_attention_policy(Box::new(DenseAttention)),
            Some(p) => model.with_attention_policy(Box::new(HgaAttention::new(p.clone()).map_err(anyhow::Error::msg)?)),
        };
        for &ctx in &a.context {
            for &depth in &a.depths {
                let mut hits = 0;
                for trial in 0..a.trials {
                    let (key, value) =
                        key_value(ctx as u64 * 7919 + depth as u64 * 104_729 + trial as u64 * 15_485_863);
                    let needle = tok.encode(&format!("\n[kv] {key} = {value}\n"))?;
                    let question = tok.encode(&format!("\n[kv] {key} = "))?;
                    let answer = tok.encode(&value)?;
                    let room = ctx
                        .checked_sub(needle.len() + question.len())
                        .filter(|r| *r > 0)
                        .with_context(|| format!("context {ctx} is too short for the needle and the question"))?;
                    let hay: Vec<u32> = filler.iter().cycle().take(room).copied().collect();
                    let at = room * depth.min(100) as usize / 100;
                    let prompt: Vec<u32> =
                        hay[..at].iter().chain(&needle).chain(&hay[at..]).chain(&question).copied().collect();
                    let got = greedy(&model, &prompt, answer.len())?;
                    hits += usize::from(got == answer);
                    pb.set_message(format!("{name} ctx {ctx} depth {depth}%"));
                    pb.inc(1);
                }
                rows.push(serde_json::json!({
                    "policy": name, "context": ctx, "depth": depth, "hits": hits, "trials": a.trials,
                    "accuracy": hits as f64 / a.trials as f64,
                }));
            }
        }
    }
    pb.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{:<48} {:>8} {:>6} {:>9}", "policy", "context", "depth", "accuracy");
        for r in &rows {
            println!(
                "{:<48} {:>8} {:>5}% {:>5}/{}",
                r["policy"].as_str().unwrap_or("?"),
                r["context"].as_u64().unwrap_or(0),
                r["depth"].as_u64().unwrap_or(0),
                r["hits"].as_u64().unwrap_or(0),
                r["trials"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(())
}
