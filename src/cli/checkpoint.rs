//! `hga checkpoint new|inspect`: generate a random Qwen3-MoE checkpoint in the Hugging Face FP8 layout, or validate
//! and summarise one.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, Subcommand};
use hga_host::model::checkpoint::{spec_for, Checkpoint, Dtype, TensorKind};
use hga_host::model::config::Qwen3MoeConfig;
use hga_host::model::generate::{planned_bytes, write_checkpoint, ScaleDtype, WriteOptions};
use serde_json::json;

/// Create or inspect a Qwen3-MoE checkpoint directory.
#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// Write a random, deterministic checkpoint (config.json, FP8 e4m3 weights with 128x128 block scales, shards and
    /// index when larger than one shard).
    ///
    /// Examples:
    ///
    /// - hga checkpoint new --preset tiny --seed 1 --out ckpt/tiny
    ///
    /// - hga checkpoint new --preset qwen3-30b-a3b --seed 1 --out /data/q30b   (about 31 GB)
    ///
    /// - hga checkpoint new --config my-shape.json --seed 3 --out ckpt/mine --scale-dtype bf16
    ///
    /// Weights: linear normal(0, 1/sqrt(in)) (residual-writing ones also / sqrt(2 layers)), norms near 1, router and
    /// lm_head with logits of std ~2. Memory stays at tens of MB whatever the size (streamed, shard by shard).
    New(NewArgs),
    /// Validate a checkpoint directory against its config.json and summarise it: config, tensor count, dtypes, bytes,
    /// files, warnings. Exits nonzero when a problem is found (the message names the tensor, file, expected, found).
    Inspect(InspectArgs),
}

/// Arguments of `hga checkpoint new`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("shape").required(true).args(["preset", "config"])))]
pub struct NewArgs {
    /// Built-in shape: `tiny` (CPU forward in milliseconds), `small` (~300 MB, head_dim 128, GQA 8/2, layer 0 dense),
    /// `qwen3-30b-a3b` (the real model's shapes, ~31 GB).
    #[arg(long, value_parser = ["tiny", "small", "qwen3-30b-a3b"])]
    pub preset: Option<String>,
    /// A Hugging Face config.json (qwen3_moe) for any other shape; without quantization_config the weights are bf16.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Seed of the weight values (the same seed and shape give the same bytes).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (created; must not already hold a checkpoint).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Largest shard: bytes, or with a K/M/G suffix (powers of 1000). One shard is written as model.safetensors.
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub shard_size: u64,
    /// Dtype of the weight_scale_inv tensors.
    #[arg(long, default_value = "f32", value_parser = ["bf16", "f16", "f32"])]
    pub scale_dtype: String,
    /// Write an unquantized bf16 checkpoint (drop quantization_config).
    #[arg(long)]
    pub bf16: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Arguments of `hga checkpoint inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The checkpoint directory (config.json + model.safetensors or model.safetensors.index.json and shards).
    pub dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also read every value: non-finite floats and e4m3 NaN bytes are problems (reads the whole checkpoint).
    #[arg(long)]
    pub deep: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (
            &s[..i],
            match c.to_ascii_uppercase() {
                'K' => 1_000u64,
                'M' => 1_000_000,
                'G' => 1_000_000_000,
                'T' => 1_000_000_000_000,
                _ => return Err(format!("unknown size suffix `{c}` (use K, M, G or T)")),
            },
        ),
        _ => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size (e.g. 4G, 500M, 1048576)"))?;
    if !(n >= 1.0 && n.is_finite()) {
        return Err(format!("`{s}`: the size must be at least 1 byte"));
    }
    Ok((n * mul as f64) as u64)
}

/// Runs `hga checkpoint <sub>`.
pub fn run(c: CheckpointCommand) -> anyhow::Result<()> {
    match c {
        CheckpointCommand::New(a) => new(a),
        CheckpointCommand::Inspect(a) => inspect(a),
    }
}

fn new(a: NewArgs) -> anyhow::Result<()> {
    let mut cfg = match (&a.preset, &a.config) {
        (Some(p), _) => Qwen3MoeConfig::preset(p)?,
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            Qwen3MoeConfig::from_json_str(&text).with_context(|| format!("in {}", f.display()))?
        }
        (None, None) => bail!("give --preset or --config"),
    };
    if a.bf16 {
        cfg.quantization = None;
    }
    let scale_dtype = ScaleDtype::parse(&a.scale_dtype).unwrap_or_default();
    let bytes = planned_bytes(&cfg, scale_dtype);
    let opts = WriteOptions { shard_size: a.shard_size, scale_dtype, progress: !a.quiet && bytes > 32_000_000 };
    let t = Instant::now();
    write_checkpoint(&a.out, &cfg, a.seed, &opts)?;
    eprintln!(
        "wrote {} ({:.2} GB of tensors, {} layers, {} experts, {}) in {:.1} s",
        a.out.display(),
        bytes as f64 / 1e9,
        cfg.num_hidden_layers,
        cfg.num_experts,
        if cfg.quantization.is_some() { "FP8 e4m3 block-scaled" } else { "bf16" },
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Counts non-finite values (floats) or NaN bytes (e4m3) of every tensor.
fn deep_scan(ck: &Checkpoint) -> Vec<String> {
    let mut problems = Vec::new();
    for name in ck.tensor_names() {
        let Ok(r) = ck.raw(name) else { continue };
        let bad = match r.dtype {
            Dtype::F8_E4M3 => r.data.iter().filter(|&&b| b & 0x7F == 0x7F).count(),
            d if d.is_float() => {
                hga_host::model::checkpoint::to_f32(d, r.data).iter().filter(|v| !v.is_finite()).count()
            }
            _ => 0,
        };
        if bad > 0 {
            problems.push(format!("{}: tensor `{name}`: {bad} non-finite values", r.file));
        }
    }
    problems
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let ck = match Checkpoint::open(&a.dir) {
        Ok(ck) => ck,
        Err(e) => {
            if a.json {
                println!("{}", json!({"ok": false, "dir": a.dir, "problems": [e.to_string()]}));
            }
            bail!("{}: invalid checkpoint: {e}", a.dir.display());
        }
    };
    let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for n in ck.tensor_names() {
        if let Ok(r) = ck.raw(n) {
            let d = dtypes.entry(r.dtype.to_string()).or_default();
            d.0 += 1;
            d.1 += r.data.len() as u64;
        }
    }
    // How each kind of tensor is stored (the header decides: see docs/checkpoint.md, "Which dtypes").
    let mut kinds: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for n in ck.tensor_names() {
        let kind = match spec_for(&ck.config, n).map(|s| s.kind) {
            Some(TensorKind::Fp8Weight { .. }) => "FP8 linears",
            Some(TensorKind::Router { .. }) => "routers",
            Some(TensorKind::Fp8Scale { .. }) => "block scales",
            Some(TensorKind::Float) => "other weights",
            None => "ignored",
        };
        if let Ok(d) = ck.dtype(n) {
            *kinds.entry(kind).or_default().entry(d.to_string()).or_default() += 1;
        }
    }
    let problems = if a.deep { deep_scan(&ck) } else { Vec::new() };
    let c = &ck.config;
    let moe_layers = (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)).count();
    if a.json {
        let dt: serde_json::Map<String, serde_json::Value> =
            dtypes.iter().map(|(k, (n, b))| (k.clone(), json!({"count": n, "bytes": b}))).collect();
        let v = json!({
            "ok": problems.is_empty(),
            "dir": a.dir,
            "config": c,
            "moe_layers": moe_layers,
            "files": ck.files(),
            "tensors": ck.len(),
            "dtypes": dt,
            "storage": kinds,
            "total_bytes": ck.total_bytes(),
            "warnings": ck.warnings(),
            "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{}: valid Qwen3-MoE checkpoint", a.dir.display());
        println!(
            "  vocab {}  hidden {}  layers {} ({} MoE, {} dense)  heads {} q / {} kv x {}",
            c.vocab_size,
            c.hidden_size,
            c.num_hidden_layers,
            moe_layers,
            c.num_hidden_layers - moe_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        );
        println!(
            "  experts {} (top {}, norm_topk_prob {})  moe_intermediate {}  intermediate {}",
            c.num_experts, c.num_experts_per_tok, c.norm_topk_prob, c.moe_intermediate_size, c.intermediate_size
        );
        println!(
            "  rope_theta {}  rms_norm_eps {}  max_position {}  tied embeddings {}",
            c.rope_theta, c.rms_norm_eps, c.max_position_embeddings, c.tie_word_embeddings
        );
        match &c.quantization {
            Some(q) => println!(
                "  quantization: fp8 e4m3, blocks {:?}, activations {}, {} modules not converted",
                q.weight_block_size,
                q.activation_scheme,
                q.modules_to_not_convert.len()
            ),
            None => println!("  quantization: none (bf16 checkpoint)"),
        }
        let files = ck.files();
        println!("  files: {} ({}{})", files.len(), files[0], if files.len() > 1 { ", ..." } else { "" });
        println!("  tensors: {}  total {:.3} GB", ck.len(), ck.total_bytes() as f64 / 1e9);
        for (d, (n, b)) in &dtypes {
            println!("    {d:8} {n:7} tensors {:>12.3} MB", *b as f64 / 1e6);
        }
        for (k, d) in &kinds {
            let list: Vec<String> = d.iter().map(|(dt, n)| format!("{n} {dt}")).collect();
            println!("    {k}: {}", list.join(", "));
        }
        for w in ck.warnings() {
            println!("  warning: {w}");
        }
        for p in &problems {
            println!("  problem: {p}");
        }
    }
    if !problems.is_empty() {
        bail!("{}: {} problem(s) found", a.dir.display(), problems.len());
    }
    Ok(())
}
