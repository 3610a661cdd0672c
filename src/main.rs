//! The `hga` command-line tool. `hga --help` lists the subcommands.
use clap::{Parser, Subcommand};

mod cli;

/// HGA: Hierarchical Global Attention for long-context Qwen3-MoE FP8 inference on one GPU.
///
/// Kernels are Rust compiled to PTX (sm_89 / sm_90 / sm_120); the host runs on cudarc.
#[derive(Parser, Debug)]
#[command(name = "hga", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the kernels on this machine's GPU against their CPU references (the default job).
    Selfcheck(cli::selfcheck::SelfcheckArgs),
    /// Create (`new`) or validate (`inspect`) a Qwen3-MoE checkpoint directory.
    #[command(subcommand)]
    Checkpoint(cli::checkpoint::CheckpointCommand),
    /// Run a forward pass over a token sequence and write the logits [tokens, vocab] (f32 safetensors).
    Logits(cli::logits::LogitsArgs),
    /// HGA against dense on the committed fixture model at a few thousand tokens (on the GPU when present, else CPU).
    Demo(cli::demo::DemoArgs),
    /// Measure HGA against dense attention in nats/token on text files (CPU reference or --backend cuda).
    Eval(cli::eval::EvalArgs),
    /// Generate text on the GPU (HGA or dense attention): streams tokens, prints time to first token, tokens/s and
    /// the GPU memory report.
    Generate(cli::generate::GenerateArgs),
    /// Needle-in-a-haystack retrieval of dense attention and HGA over depths and contexts (CPU or --backend cuda).
    Needle(cli::needle::NeedleArgs),
    /// Record (on the CPU HGA reference) or inspect selection traces, which `generate --replay-trace` replays.
    #[command(subcommand)]
    Trace(cli::trace::TraceCommand),
}

/// Runs the command; an error is printed with its chain of causes (no backtrace) and exits with status 1.
fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => cli::selfcheck::run(cli::selfcheck::SelfcheckArgs::default()),
        Some(Command::Selfcheck(a)) => cli::selfcheck::run(a),
        Some(Command::Checkpoint(c)) => cli::checkpoint::run(c),
        Some(Command::Logits(a)) => cli::logits::run(a),
        Some(Command::Eval(a)) => cli::eval::run(a),
        Some(Command::Demo(a)) => cli::demo::run(a),
        Some(Command::Generate(a)) => cli::generate::run(a),
        Some(Command::Needle(a)) => cli::needle::run(a),
        Some(Command::Trace(c)) => cli::trace::run(c),
    }
}
