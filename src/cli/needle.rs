//! `hga needle`: retrieval of a key stated at depth d% of a long filler text and asked for at the end, under dense
//! attention and under HGA (greedy decoding), on the CPU reference forward or the GPU forward (`--backend cuda`:
//! the prompt prefilled exactly, the answer decoded with routed steps under HGA).
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use hga::hga::HgaAttention;
use hga::model::checkpoint::Checkpoint;
use hga::model::forward::{ActivationMode, CpuModel, DenseAttention};
use hga::model::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

use super::eval::{check_backend, selectors, HgaOpts, KvOpts, Policy};
use super::gpu::{Backend, GpuOpts};

/// Needle-in-a-haystack retrieval of dense attention and HGA at several depths and contexts.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  hga needle --model fixture --filler fixture/eval/a.txt --context 4096,8192 --depths 0,25,50,75,100 \
                        --budget 0.05\n\n\
The prompt is filler text (tokens of --filler, repeated as needed) with a line `[kv] <key> = <value>` (key: 6 of\n\
a-z, value: 8 of A-Z0-9: the format the fixture model is trained to retrieve, docs/fixture.md) inserted at each\n\
depth, ending with the line `[kv] <key> = `; retrieval succeeds when the greedy continuation is the value. Each\n\
(context, depth) is tried with --trials different keys.\n\n\
--backend cuda: the GPU forward, the checkpoint opened once and one model per policy loaded after the other\n\
(dense, then each HGA parameter set). Its HGA prefills the prompt exactly and routes each decode step, so a\n\
retrieval under HGA is the routed decoding of the answer. The hga selector only, with the kernels' geometry\n\
(see hga eval --help). Example:\n  \
hga needle --backend cuda --model fixtures/qwen3-moe-bytes --filler fixtures/qwen3-moe-bytes/eval/torch.txt \\\n    \
--context 4096,8192 --budget 0.03"
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
    /// Activation mode of the FP8-weight linears of the CPU forward (default f32; refused on --backend cuda, which
    /// computes FP8 activations).
    #[arg(long)]
    pub activations: Option<ActivationMode>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub hga: HgaOpts,
    #[command(flatten)]
    pub kv: KvOpts,
    #[command(flatten)]
    pub gpu: GpuOpts,
}

/// One prompt: the needle at `depth`% of a `context`-token prompt, and the answer's tokens.
struct Case {
    context: usize,
    depth: u32,
    prompt: Vec<u32>,
    answer: Vec<u32>,
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
    check_backend(&a.gpu, &a.kv, a.activations, &a.attention)?;
    let params = a.hga.params(&selectors(&a.attention))?;
    if a.gpu.backend == Backend::Cuda {
        for p in &params {
            super::gpu::check_params(p)?;
        }
    }
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let tok = Tokenizer::from_model_dir(&a.model).context("hga needle needs tokenizer.json")?;
    let filler =
        tok.encode(&std::fs::read_to_string(&a.filler).with_context(|| format!("reading {}", a.filler.display()))?)?;
    if filler.is_empty() {
        bail!("{} has no tokens", a.filler.display());
    }
    // The prompts, the same for every policy: (context, depth) x trials.
    let mut cases = Vec::new();
    for &ctx in &a.context {
        for &depth in &a.depths {
            for trial in 0..a.trials {
                let (key, value) = key_value(ctx as u64 * 7919 + depth as u64 * 104_729 + trial as u64 * 15_485_863);
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
                cases.push(Case { context: ctx, depth, prompt, answer });
            }
        }
    }
    let mut policies: Vec<(String, Option<hga::hga::HgaParams>)> = vec![("dense".into(), None)];
    policies.extend(params.into_iter().map(|p| (format!("{:?} {}@{:?}", p.selector, p.label(), p.budget), Some(p))));
    let pb = ProgressBar::new((cases.len() * policies.len()) as u64);
    pb.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed_precise} eta {eta} {msg}")?);
    // hits[policy][case]
    let mut hits: Vec<Vec<bool>> = Vec::new();
    match a.gpu.backend {
        Backend::Cpu => {
            let mut model =
                CpuModel::load(&ckpt, a.activations.unwrap_or(ActivationMode::F32))?.with_kv_tier(a.kv.tier()?)?;
            if model.kv_tier().kind != hga::kv::store::TierKind::Plain {
                eprintln!("K/V tier: {}", model.kv_tier().describe());
            }
            for (name, p) in &policies {
                model = match p {
                    None => model.with_attention_policy(Box::new(DenseAttention)),
                    Some(p) => {
                        model.with_attention_policy(Box::new(HgaAttention::new(p.clone()).map_err(anyhow::Error::msg)?))
                    }
                };
                let mut h = Vec::with_capacity(cases.len());
                for c in &cases {
                    pb.set_message(format!("{name} ctx {} depth {}%", c.context, c.depth));
                    h.push(greedy(&model, &c.prompt, c.answer.len())? == c.answer);
                    pb.inc(1);
                }
                hits.push(h);
            }
        }
        Backend::Cuda => {
            let gpu = a.gpu.open()?;
            let capacity = cases.iter().map(|c| c.prompt.len() + c.answer.len()).max().unwrap_or(1);
            let result = (|| -> anyhow::Result<()> {
                pb.suspend(|| {
                    eprintln!(
                        "GPU backend on {} ({}): {} prompts per policy, one model per policy loaded in turn",
                        gpu.device_name(),
                        gpu.image_name(),
                        cases.len()
                    )
                });
                for (name, p) in &policies {
                    let mut model =
                        super::gpu::load(&gpu, &ckpt, capacity, a.gpu.prefill_chunk, p.as_ref(), a.gpu.cache_slots)?;
                    let mut h = Vec::with_capacity(cases.len());
                    for c in &cases {
                        pb.set_message(format!("{name} ctx {} depth {}%", c.context, c.depth));
                        let got = super::gpu::greedy(&mut model, &c.prompt, c.answer.len())
                            .with_context(|| format!("{name} at context {} depth {}%", c.context, c.depth))?;
                        h.push(got == c.answer);
                        pb.inc(1);
                    }
                    hits.push(h);
                }
                Ok(())
            })();
            pb.suspend(|| eprintln!("{}", gpu.memory().report()));
            result?;
        }
    }
    pb.finish_and_clear();
    let mut rows = Vec::new();
    for ((name, _), h) in policies.iter().zip(&hits) {
        for &ctx in &a.context {
            for &depth in &a.depths {
                let got: Vec<bool> = cases
                    .iter()
                    .zip(h)
                    .filter(|(c, _)| c.context == ctx && c.depth == depth)
                    .map(|(_, &ok)| ok)
                    .collect();
                let n = got.iter().filter(|&&ok| ok).count();
                rows.push(serde_json::json!({
                    "policy": name, "context": ctx, "depth": depth, "hits": n, "trials": got.len(),
                    "accuracy": n as f64 / got.len().max(1) as f64,
                    "backend": match a.gpu.backend { Backend::Cpu => "cpu", Backend::Cuda => "cuda" },
                }));
            }
        }
    }
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
