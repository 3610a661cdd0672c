//! `hga checkpoint new|inspect` (in progress).
use clap::Subcommand;
/// Create or inspect a Qwen3-MoE checkpoint directory.
#[derive(Subcommand, Debug)]
pub enum CheckpointCommand {
    /// (in progress)
    Inspect,
}
pub fn run(_c: CheckpointCommand) -> anyhow::Result<()> {
    anyhow::bail!("`hga checkpoint` is not implemented yet")
}
