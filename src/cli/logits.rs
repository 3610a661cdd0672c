//! `hga logits` (in progress).
use clap::Args;
/// Run a forward pass and write the logits.
#[derive(Args, Debug)]
pub struct LogitsArgs {}
pub fn run(_args: LogitsArgs) -> anyhow::Result<()> {
    anyhow::bail!("`hga logits` is not implemented yet")
}
