//! `hga logits`: run the forward over a token sequence and write its logits `[tokens, vocab]` (f32) to a
//! safetensors file, tensor `logits` (plus `tokens`, i64 `[tokens]`, and metadata saying how they were made).
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hga_host::model::checkpoint::Checkpoint;
use hga_host::model::forward::{f32_weight_bytes, ActivationMode, CpuModel};
use hga_host::model::tokenizer::Tokenizer;
use safetensors::tensor::{Dtype, TensorView};

/// Where the forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The CPU reference forward (f32 weights, f64 accumulation; the oracle).
    Cpu,
    /// The GPU forward (Rust kernels on CUDA device 0; FP8 activations, bf16 residual stream).
    Cuda,
}

/// How the inputs of the FP8-weight linears are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Activations {
    /// Unquantized f32 activations: what transformers computes on the dequantized weights.
    F32,
    /// Dynamic per-token, per-128-group e4m3 quantization of the input of each FP8 linear, as the FP8 kernels do.
    Fp8,
    /// `fp8`, with the activations also rounded to bf16 where the GPU forward stores them (the GPU's oracle).
    Fp8Bf16,
}

/// Run a forward pass over a token sequence and write the logits [tokens, vocab] (f32 safetensors).
#[derive(Args, Debug)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["tokens", "text"])),
    after_help = "Examples:\n  \
    hga checkpoint new --preset tiny --seed 1 --out /tmp/tiny\n  \
    hga logits --model /tmp/tiny --tokens 1,2,3 --out /tmp/tiny.logits.safetensors\n  \
    hga logits --model DIR --text 'Hello' --activations fp8 --out logits.safetensors\n\n\
    The file holds `logits` (F32 [tokens, vocab]) and `tokens` (I64 [tokens]), with metadata model, backend,\n\
    activations, incremental and tokens. tools/parity/parity.py compares it with Hugging Face transformers."
)]
pub struct LogitsArgs {
    /// Model directory: config.json + safetensors (single file or sharded with model.safetensors.index.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Input token ids, comma-separated (e.g. 1,2,3).
    #[arg(long, value_name = "IDS", value_delimiter = ',', num_args = 1..)]
    pub tokens: Option<Vec<u32>>,
    /// Input text, tokenized with DIR/tokenizer.json (no special tokens added). Needs that file.
    #[arg(long, value_name = "TEXT")]
    pub text: Option<String>,
    /// Where the forward runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub backend: Backend,
    /// Activation mode of the FP8-weight linears.
    #[arg(long, value_enum, default_value_t = Activations::F32)]
    pub activations: Activations,
    /// Run the tokens one at a time through the K/V cache (decode) instead of one prefill.
    #[arg(long)]
    pub incremental: bool,
    /// Output file (safetensors).
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
    /// Where the CPU forward keeps its K/V history (--backend cpu).
    #[command(flatten)]
    pub kv: super::eval::KvOpts,
}

pub fn run(args: LogitsArgs) -> anyhow::Result<()> {
    let tier = args.kv.tier()?;
    if args.backend == Backend::Cuda && tier.kind != hga::kv::store::TierKind::Plain {
        bail!("--kv-tier applies to --backend cpu (the CUDA forward keeps its K/V on the GPU)");
    }
    if args.backend == Backend::Cuda && args.activations == Activations::F32 {
        bail!("--backend cuda computes FP8 activations (the FP8 kernels): pass --activations fp8 (or fp8-bf16)");
    }
    let tokenizer = match &args.text {
        Some(_) => Some(Tokenizer::from_model_dir(&args.model).context("--text needs a tokenizer")?),
        None => Tokenizer::try_from_model_dir(&args.model)?,
    };
    let tokens: Vec<u32> = match (&args.tokens, &args.text, &tokenizer) {
        (Some(t), _, _) => t.clone(),
        (None, Some(text), Some(tok)) => tok.encode(text)?,
        _ => bail!("give --tokens or --text"),
    };
    if tokens.is_empty() {
        bail!("the input has no tokens");
    }
    let mode = match args.activations {
        Activations::F32 => ActivationMode::F32,
        Activations::Fp8 => ActivationMode::Fp8,
        Activations::Fp8Bf16 => ActivationMode::Fp8Bf16,
    };
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&args.model).with_context(|| format!("opening checkpoint {}", args.model.display()))?;
    let vocab = ckpt.config.vocab_size;
    if args.backend == Backend::Cuda {
        let gpu = hga::open_gpu(0).context("opening the GPU")?;
        let mut model = hga::model::gpu::GpuModel::load(&gpu, &ckpt, tokens.len(), 256, |_, _| {})?;
        let t_load = t0.elapsed();
        let t1 = Instant::now();
        let data = if args.incremental {
            let mut d = Vec::with_capacity(tokens.len() * vocab);
            for &t in &tokens {
                d.extend(model.forward(&[t], false)?);
            }
            d
        } else {
            model.forward(&tokens, true)?
        };
        return write_logits(&args, &tokens, &tokenizer, vocab, data, mode, "cuda", t_load, t1.elapsed());
    }
    let need = f32_weight_bytes(&ckpt.config);
    if let Some(avail) = mem_available() {
        if need > avail {
            bail!(
                "the CPU reference forward holds the weights as f32: this model needs {:.1} GB, and only {:.1} GB \
                 of memory is available (it is meant for the tiny / small presets and test shapes)",
                need as f64 / 1e9,
                avail as f64 / 1e9
            );
        }
    }
    let model = CpuModel::load(&ckpt, mode)?.with_kv_tier(tier)?;
    drop(ckpt);
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let mut cache = model.new_cache();
    let data: Vec<f32> = if args.incremental {
        let mut d = Vec::with_capacity(tokens.len() * vocab);
        for &t in &tokens {
            d.extend(model.decode(t, &mut cache)?);
        }
        d
    } else {
        model.prefill(&tokens, &mut cache)?.data
    };
    let t_fwd = t1.elapsed();
    if let Some(r) = cache.kv_report() {
        eprintln!("{r}");
    }
    write_logits(&args, &tokens, &tokenizer, vocab, data, mode, "cpu", t_load, t_fwd)
}

/// Writes the logits file and prints the summary line.
#[allow(clippy::too_many_arguments)]
fn write_logits(
    args: &LogitsArgs,
    tokens: &[u32],
    tokenizer: &Option<Tokenizer>,
    vocab: usize,
    data: Vec<f32>,
    mode: ActivationMode,
    backend: &str,
    t_load: std::time::Duration,
    t_fwd: std::time::Duration,
) -> anyhow::Result<()> {
    let logit_bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let token_bytes: Vec<u8> = tokens.iter().flat_map(|&t| (t as i64).to_le_bytes()).collect();
    let views = vec![
        ("logits", TensorView::new(Dtype::F32, vec![tokens.len(), vocab], &logit_bytes)?),
        ("tokens", TensorView::new(Dtype::I64, vec![tokens.len()], &token_bytes)?),
    ];
    let ids: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let meta: HashMap<String, String> = [
        ("model", args.model.display().to_string()),
        ("backend", backend.to_string()),
        ("activations", mode.to_string()),
        ("incremental", args.incremental.to_string()),
        ("tokens", ids.join(",")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    safetensors::tensor::serialize_to_file(views, &Some(meta), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;

    let last = &data[(tokens.len() - 1) * vocab..];
    let top1 = last.iter().enumerate().fold(0, |b, (i, v)| if *v > last[b] { i } else { b });
    let shown = match tokenizer {
        Some(tok) => format!("{top1} ({:?})", tok.decode(&[top1 as u32]).unwrap_or_default()),
        None => top1.to_string(),
    };
    eprintln!(
        "{} tokens, vocab {vocab}, backend {backend}, activations {mode}: load {:.2}s, forward {:.2}s; next-token argmax {shown}; wrote {}",
        tokens.len(),
        t_load.as_secs_f64(),
        t_fwd.as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux), `None` elsewhere or if unreadable.
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
