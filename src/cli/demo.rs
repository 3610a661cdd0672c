//! `hga demo`: HGA against dense on the committed fixture model (a trained Qwen3-MoE-architecture byte-level LM, see
//! docs/fixture.md) at a few thousand tokens, on the CPU reference forward: the table of `hga eval`.
use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::eval::{EvalArgs, GroupScoreArg, HgaOpts, Policy, Summary};

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
    let mut texts: Vec<PathBuf> = std::fs::read_dir(&eval_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    texts.sort();
    texts.truncate(2);
    eprintln!("HGA vs dense on {} (CPU reference forward), {} tokens per window", a.model.display(), a.context);
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
            budget: vec!["0.125".into(), "0.06".into()],
            chunk: vec![64],
            group: vec![16],
            sink: 64,
            local: 256,
            summary: vec![Summary::Minmax],
            group_score: vec![GroupScoreArg::Summary],
            normalize: vec![false],
            gqa: vec![super::eval::Gqa::Max],
            shortlist: vec![2.0],
            dense_layers: vec![0],
            query_block: 64,
        },
    })
}
