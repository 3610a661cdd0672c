//! `hga demo`: HGA against dense on the committed fixture model (a trained Qwen3-MoE-architecture byte-level LM, see
//! docs/fixture.md) at a few thousand tokens: the table of `hga eval`. On the GPU forward when a CUDA device is
//! present (dense and HGA: the GPU implements the hga selector), else on the CPU reference forward (dense, HGA and
//! the ideal group selector); it says which. `--backend` picks one.
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::eval::{EvalArgs, GroupScoreArg, HgaOpts, KvOpts, Policy, Summary};
use super::gpu::{Backend, GpuOpts};

/// Where the trained fixture is committed.
pub const FIXTURE_DIR: &str = "fixtures/qwen3-moe-bytes";

/// Options of the demo.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// The model (default: the committed fixture).
    #[arg(long, value_name = "DIR", default_value = FIXTURE_DIR)]
    pub model: PathBuf,
    /// Window length in tokens.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
    /// Where to run: cuda (the GPU forward) or cpu (the reference forward). Default: cuda when a CUDA device is
    /// present, else cpu.
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    #[command(flatten)]
    pub kv: KvOpts,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let eval_dir = a.model.join("eval");
    if !a.model.join("config.json").exists() || !eval_dir.is_dir() {
        bail!(
            "no trained fixture at {} (config.json and eval/ texts): it is made by tools/train/train.py on a GPU \
             machine and committed there (docs/fixture.md). Random-weight checkpoints have no attention structure, \
             so the demo does not fall back to one",
            a.model.display()
        );
    }
    // One held-out text long enough for the window (torch.txt when present: the one docs/quality.md reports).
    let mut texts: Vec<PathBuf> = std::fs::read_dir(&eval_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() as usize >= a.context))
        .collect();
    texts.sort_by_key(|p| (p.file_name() != Some(std::ffi::OsStr::new("torch.txt")), p.clone()));
    texts.truncate(1);
    if texts.is_empty() {
        bail!("no text of at least {} bytes under {}", a.context, eval_dir.display());
    }
    let devices = hga::runtime::device_count();
    let backend = a.backend.unwrap_or(if devices > 0 { Backend::Cuda } else { Backend::Cpu });
    let attention = match backend {
        Backend::Cuda => {
            eprintln!(
                "HGA vs dense on {} on the GPU ({}), {} tokens, budget 12.5%: dense and HGA (defaults; the ideal \
                 selectors are CPU only: --backend cpu)",
                a.model.display(),
                match (a.backend.is_some(), devices) {
                    (false, n) => format!("{n} CUDA device(s) present; --backend cpu for the CPU forward"),
                    (true, 0) => "--backend cuda; no CUDA device found".into(),
                    (true, n) => format!("--backend cuda; {n} CUDA device(s) present"),
                },
                a.context
            );
            vec![Policy::Dense, Policy::Hga]
        }
        Backend::Cpu => {
            eprintln!(
                "HGA vs dense on {} on the CPU reference forward ({}), {} tokens, budget 12.5%: dense, HGA \
                 (defaults) and the ideal group selector at the same budget",
                a.model.display(),
                if a.backend.is_some() { "--backend cpu" } else { "no CUDA device found" },
                a.context
            );
            vec![Policy::Dense, Policy::Hga, Policy::OracleGroups]
        }
    };
    super::eval::run(EvalArgs {
        model: a.model,
        text: texts,
        context: vec![a.context],
        attention,
        scored: 256,
        activations: None,
        json: false,
        plot: None,
        hga: HgaOpts {
            budget: vec!["0.125".into()],
            chunk: vec![64],
            group: vec![16],
            sink: 64,
            local: 256,
            summary: vec![Summary::Minmax],
            group_score: vec![GroupScoreArg::Sketch4],
            normalize: vec![true],
            gqa: vec![super::eval::Gqa::Max],
            shortlist: vec![8.0],
            dense_layers: vec![0],
            query_block: 64,
        },
        kv: a.kv,
        gpu: GpuOpts { backend, ..GpuOpts::default() },
    })
}
