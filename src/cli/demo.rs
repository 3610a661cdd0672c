//! `hga demo`: HGA against dense on the committed fixture model (a trained Qwen3-MoE-architecture byte-level LM, see
//! docs/fixture.md) at a few thousand tokens, on the CPU reference forward: the table of `hga eval`.
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::eval::{EvalArgs, GroupScoreArg, HgaOpts, KvOpts, Policy, Summary};

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
    eprintln!(
        "HGA vs dense on {} (CPU reference forward), {} tokens, budget 12.5%: dense, HGA (defaults) and the ideal \
         group selector at the same budget",
        a.model.display(),
        a.context
    );
    super::eval::run(EvalArgs {
        model: a.model,
        text: texts,
        context: vec![a.context],
        attention: vec![Policy::Dense, Policy::Hga, Policy::OracleGroups],
        scored: 256,
        activations: hga::model::forward::ActivationMode::F32,
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
    })
}
