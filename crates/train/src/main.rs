//! `tau-resnet`: train, probe and evaluate τ-ResNets.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tau_train::cmd;

/// Train, probe and evaluate deep ResNets whose residual branches are scaled by τ.
#[derive(Debug, Parser)]
#[command(name = "tau-resnet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model from a TOML run config.
    Train(cmd::train::TrainArgs),
    /// Forward/backward stability of a model at initialization.
    Probe(cmd::probe::ProbeArgs),
    /// Test loss and accuracy of a checkpoint.
    Eval(cmd::eval::EvalArgs),
    /// Training-step throughput of the CIFAR ResNets and the theory network.
    Bench(cmd::bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Probe(args) => cmd::probe::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Bench(args) => cmd::bench::run(args),
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
