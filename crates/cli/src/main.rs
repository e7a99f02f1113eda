//! `tau-resnet`: train, probe and evaluate τ-ResNets.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tau_records::exit_code;
mod cmd;
use tracing_indicatif::IndicatifLayer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Train, probe and evaluate deep ResNets whose residual branches are scaled by τ.
#[derive(Debug, Parser)]
#[command(
    name = "tau-resnet",
    version,
    about,
    long_about = None,
    after_help = "\
Examples:
  tau-resnet train --config configs/theory-gd.toml
  tau-resnet eval --checkpoint runs/mnist-resnet20-nobn --data mnist
  tau-resnet predict --checkpoint timm/resnet50.a1_in1k photo.jpg
  tau-resnet export runs/mnist-resnet20-nobn hub/mnist-resnet20-nobn
  tau-resnet import resnet20.pth --config resnet20.json --out checkpoints/resnet20

Logs go to stderr; RUST_LOG (e.g. RUST_LOG=debug) sets their level.
Exit status: 0 finished, 3 diverged (a result), 130 interrupted, 1 error, 2 usage."
)]
struct Cli {
    /// No progress bars and only warnings and errors in the log.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model from a TOML run config, or resume a run.
    Train(cmd::train::TrainArgs),
    /// Forward/backward stability of a model at initialization, or of a checkpoint.
    Probe(cmd::probe::ProbeArgs),
    /// Test loss and accuracy of a checkpoint.
    Eval(cmd::eval::EvalArgs),
    /// Classify image files (JPEG, PNG) with a checkpoint or hub model.
    Predict(cmd::predict::PredictArgs),
    /// Write a hub-ready folder (config, weights, model card) from a finished run.
    Export(cmd::export::ExportArgs),
    /// Turn a PyTorch .pth file (torch.save's zip format) into a checkpoint directory.
    Import(cmd::import::ImportArgs),
    /// Training-step throughput of the CIFAR ResNets and the theory network.
    Bench(cmd::bench::BenchArgs),
    /// Check sweep points' configs (a JSON request on stdin; used by `cargo xtask sweep`).
    #[command(name = "check-points", hide = true)]
    CheckPoints(cmd::check::CheckArgs),
}

fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let color = std::io::stderr().is_terminal();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    if quiet {
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(color)
                    .with_writer(std::io::stderr)
                    .with_filter(filter),
            )
            .try_init();
    } else {
        let bars = IndicatifLayer::new();
        let _ = tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(color)
                    .with_writer(bars.get_stderr_writer())
                    .with_filter(filter),
            )
            .with(bars)
            .try_init();
    }
}

fn main() -> ExitCode {
    // Keep freed memory in the process (MALLOC_* / GLIBC_TUNABLES, when set, win).
    tau_kernels::alloc::tune_allocator();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Bench(_)) && std::env::var_os("CANDLE_NUM_THREADS").is_none()
    {
        // candle runs its elementwise ops on a spinning thread pool of its own, which
        // fights rayon's (convolution, GEMM, fused ops) for the cores: keep it on the
        // calling thread unless the user says otherwise (`tau-resnet bench` has a flag).
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // candle attaches a backtrace to its errors whenever RUST_BACKTRACE is set, and an
        // error message is no place for one: keep backtraces for panics (RUST_BACKTRACE)
        // unless RUST_LIB_BACKTRACE=1 asks for them on errors too.
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    if let Command::Eval(args) = &cli.command
        && args.model.offline
    {
        // `eval --offline` keeps the data set off the network too: tau-data reads the
        // setting from the environment (HF_HUB_OFFLINE), as Python's huggingface_hub does.
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("HF_HUB_OFFLINE", "1") };
    }
    cmd::set_quiet(cli.quiet);
    init_logging(cli.quiet);
    // A bad TAU_KERNELS is a usage error, said once, before any work.
    if let Err(err) = tau_kernels::select::kernels_from_env() {
        eprintln!("error: {}: {err}", tau_kernels::select::KERNELS_ENV);
        return ExitCode::from(exit_code::USAGE);
    }
    let result = match cli.command {
        Command::Train(args) => cmd::train::run(args),
        Command::Probe(args) => cmd::probe::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Predict(args) => cmd::predict::run(args),
        Command::Export(args) => cmd::export::run(args),
        Command::Import(args) => cmd::import::run(args),
        Command::CheckPoints(args) => cmd::check::run(args),
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(err) => {
            eprintln!("error: {}", cmd::error_line(&err));
            ExitCode::from(exit_code::ERROR)
        }
    }
}
