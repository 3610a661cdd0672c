//! `hga selfcheck` (in progress).
use clap::Args;
/// Options of the kernel self-check.
#[derive(Args, Debug, Default)]
pub struct SelfcheckArgs {}
pub fn run(_a: SelfcheckArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
