//! `cargo xtask`: depth × τ sweeps, their reports and figures, benchmarks, and the GPU
//! scripts.
//!
//! xtask never computes a gradient: it launches `tau-resnet` processes and aggregates
//! their run records.

mod aggregate;
mod analysis;
#[cfg(test)]
mod architecture;
mod bench;
#[cfg(test)]
mod build_sharing;
mod figures;
mod pool;
mod records;
mod report;
mod scripts;
#[cfg(test)]
mod shipped_configs;
mod slurm;
mod spec;
mod sweep;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sweeps, reports and benchmarks for tau-resnet.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a sweep (the default stability sweep when no config is given).
    Sweep(Box<sweep::SweepArgs>),
    /// Regenerate results.csv, report.md and the figures of a sweep from its run records.
    Report(report::ReportArgs),
    /// Training-step throughput (images/s) of the CIFAR ResNets and the theory network.
    Bench(bench::BenchArgs),
    /// The CUDA toolkit and cuDNN from NVIDIA's PyPI wheels, and with --build the CUDA
    /// binary (scripts/cuda-toolkit.sh).
    CudaToolkit(scripts::ScriptArgs),
    /// The prepared GPU check: `prepare` here, `run` on a GPU machine
    /// (scripts/gpu-check.sh).
    GpuCheck(scripts::ScriptArgs),
}

/// Restores the default action of SIGPIPE (Rust ignores it, so that `println!` panics
/// on a closed pipe): `cargo xtask … | head` then ends xtask quietly, like other tools.
#[cfg(unix)]
fn reset_sigpipe() {
    unsafe extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    // SAFETY: signal(2) with SIGPIPE (13 on Linux and macOS) and SIG_DFL (0), before any
    // other thread exists.
    unsafe { signal(13, 0) };
}

fn main() -> ExitCode {
    #[cfg(unix)]
    reset_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Sweep(args) => sweep::run(*args),
        Command::Report(args) => report::run(args),
        Command::Bench(args) => bench::run(args),
        Command::CudaToolkit(args) => scripts::run("cuda-toolkit.sh", &args),
        Command::GpuCheck(args) => scripts::run("gpu-check.sh", &args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
