//! `hga generate`: prefill a prompt on the GPU, then decode token by token, streaming the text; prints tokens/s.
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use hga::model::checkpoint::Checkpoint;
use hga::model::gpu::GpuModel;
use hga::model::tokenizer::Tokenizer;
use indicatif::{ProgressBar, ProgressStyle};

/// Generate text with the GPU forward (dense attention, greedy or sampled).
#[derive(Args, Debug)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["prompt_file", "text", "tokens", "synthetic_prompt"])),
    after_help = "Example:\n  hga generate --model DIR --text 'def fibonacci(n):' --max-tokens 64"
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
    /// K/V cache capacity (default: prompt + max-tokens).
    #[arg(long)]
    pub context: Option<usize>,
    /// Prefill chunk (tokens per forward call).
    #[arg(long, default_value_t = 512)]
    pub chunk: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Stop at the end-of-sequence token of the config.
    #[arg(long, default_value_t = true)]
    pub stop_at_eos: bool,
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let tok = Tokenizer::try_from_model_dir(&a.model)?;
    let vocab = hga::model::config::Qwen3MoeConfig::load(&a.model)?.vocab_size as u64;
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
    let ckpt = Checkpoint::open(&a.model).with_context(|| format!("opening {}", a.model.display()))?;
    let gpu = hga::open_gpu(a.device).context("opening the GPU")?;
    let capacity = a.context.unwrap_or(longest + a.max_tokens);
    let t0 = Instant::now();
    let pb = ProgressBar::new(ckpt.config.num_hidden_layers as u64);
    pb.set_style(ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed_precise}")?);
    let mut model = GpuModel::load(&gpu, &ckpt, capacity, a.chunk.max(1), |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    drop(ckpt);
    let (free, total) = gpu.context().mem_get_info()?;
    eprintln!(
        "{} on {} ({}): loaded in {:.1}s; GPU memory used {:.2} GB of {:.2} GB",
        a.model.display(),
        gpu.device_name(),
        gpu.image_name(),
        t0.elapsed().as_secs_f64(),
        (total - free) as f64 / 1e9,
        total as f64 / 1e9
    );
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b }) as u32;
    for prompt in &prompts {
        model.reset();
        let t1 = Instant::now();
        let logits = model.forward(prompt, false)?;
        let ttft = t1.elapsed();
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
            let r = model.forward(&[next], false)?;
            next = argmax(&r);
            generated.push(next);
        }
        let dt = t2.elapsed();
        writeln!(out)?;
        let (free, total) = gpu.context().mem_get_info()?;
        eprintln!(
            "prompt {} tokens: time to first token {:.3}s ({:.0} tokens/s prefill); decode {} tokens in {:.3}s: {:.1} \
         tokens/s; GPU memory in use at the end {:.2} GB",
            prompt.len(),
            ttft.as_secs_f64(),
            prompt.len() as f64 / ttft.as_secs_f64(),
            generated.len().saturating_sub(1),
            dt.as_secs_f64(),
            generated.len().saturating_sub(1) as f64 / dt.as_secs_f64().max(1e-9),
            (total - free) as f64 / 1e9
        );
    }
    Ok(())
}
