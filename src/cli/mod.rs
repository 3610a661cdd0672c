//! Subcommands of the `hga` command-line tool.
pub mod checkpoint;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod logits;
pub mod needle;
pub mod plot;
pub mod selfcheck;
pub mod trace;
