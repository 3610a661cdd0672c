//! Subcommands of the `hga` command-line tool.
pub mod checkpoint;
pub mod logits;
pub mod selfcheck;
