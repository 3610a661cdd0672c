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
    /// Also print each prompt's figures (and the profile) as one JSON line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Bracket decode step N of each prompt (1 = the first; from the second on the step is a graph replay) with
    /// cuProfilerStart / cuProfilerStop, for a profiler whose capture starts off, e.g.
    /// `ncu --profile-from-start off --graph-profiling node --metrics gpu__time_duration.sum hga generate ...`:
    /// every kernel of that one step, nothing of the load or the prefill.
    #[arg(long, value_name = "N")]
    pub profiler_step: Option<usize>,
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
    if a.no_pdl {
        gpu.set_pdl(false);
    }
    let capacity = a.context.unwrap_or(longest + a.max_tokens);
    let t0 = Instant::now();
    let pb = ProgressBar::new(ckpt.config.num_hidden_layers as u64);
    pb.set_style(ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed_precise}")?);
    let mut model = GpuModel::load(&gpu, &ckpt, capacity, a.chunk.max(1), |d, _| pb.set_position(d as u64))?;
    pb.finish_and_clear();
    drop(ckpt);
    model.set_decode_graphs(!a.no_graphs);
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
    let argmax = |r: &[f32]| r.iter().enumerate().fold(0, |b, (i, v)| if *v > r[b] { i } else { b }) as u32;
    for prompt in &prompts {
        model.reset();
        let t1 = Instant::now();
        // A progress bar for prefills of more than one chunk (hidden when stderr is not a terminal).
        let pb = ProgressBar::new(prompt.len() as u64);
        if prompt.len() > a.chunk {
            pb.set_style(ProgressStyle::with_template(
                "prefill {bar:30} {pos}/{len} tokens {elapsed_precise} ({per_sec})",
            )?);
        } else {
            pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let logits = model.forward_with_progress(prompt, false, |done, _| pb.set_position(done as u64))?;
        pb.finish_and_clear();
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
