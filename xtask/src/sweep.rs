//! `cargo xtask sweep [configs/NAME.toml]`: expands a sweep into points, runs each as its
//! own `tau-resnet` process (bounded parallelism, resume, skip of finished points), then
//! writes `results.csv`, `report.md` and the figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use tau_records::exit_code;

use crate::records::{self, FAILURE_RECORD, SWEEP_COPY, Status, write_atomic};
use crate::report;
use crate::slurm::{self, SlurmArgs};
use crate::spec::SweepSpec;

use execute::{plan_jobs, print_summary, run_jobs};

/// The default sweep (`cargo xtask sweep` with no config): the theory network's stability
/// at initialization, depth × τ, on CPU in about a minute.
pub const DEFAULT_SWEEP: &str = include_str!("../../configs/sweep-stability.toml");

/// Arguments of `cargo xtask sweep`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  cargo xtask sweep                                  # the default stability sweep\n  cargo xtask sweep configs/sweep-gd-convergence.toml --jobs 2\n  cargo xtask report runs/stability                  # rebuild CSV, report, figures\n  cargo xtask sweep configs/sweep-cifar10-bn.toml --slurm --features cudnn --time 12:00:00 --gpus-per-task 1\n  cargo xtask sweep configs/sweep-cifar10-bn.toml --status  # per-point state, with Slurm's"
)]
pub struct SweepArgs {
    /// The sweep config (default: the stability sweep, configs/sweep-stability.toml).
    pub config: Option<PathBuf>,
    /// Processes run at once (default: the number of CPU cores). Each gets
    /// cores / jobs compute threads (RAYON_NUM_THREADS).
    #[arg(long, short, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub jobs: Option<usize>,
    /// Redo every point, even finished ones (earlier outputs are moved aside, not deleted).
    #[arg(long)]
    pub force: bool,
    /// Where sweeps write their folders (default: runs/ at the workspace root).
    #[arg(long)]
    pub runs_dir: Option<PathBuf>,
    /// The tau-resnet binary to run (default: build it with cargo in release mode and use
    /// the one next to this xtask). Also read from TAU_RESNET_BIN.
    #[arg(long, env = "TAU_RESNET_BIN")]
    pub bin: Option<PathBuf>,
    /// Do not run `cargo build` for tau-resnet first.
    #[arg(long)]
    pub no_build: bool,
    /// Cargo features for the tau-resnet build xtask runs first (passed to
    /// `cargo build --features`), e.g. --features cuda for a sweep on GPUs.
    #[arg(long, value_name = "FEATURES", conflicts_with_all = ["bin", "no_build"])]
    pub features: Option<String>,
    /// List the points and what would run, and stop. With --slurm: write the job script
    /// and index under runs/<sweep>/slurm/ but do not submit.
    #[arg(long)]
    pub dry_run: bool,
    /// Submit the points without a result as one Slurm job array (sbatch) instead of
    /// running them here; see docs/sweeps.md.
    #[arg(long, conflicts_with = "jobs")]
    pub slurm: bool,
    /// Show each point's state (from its records, and from squeue/sacct for a sweep
    /// submitted to Slurm) and stop.
    #[arg(long, conflicts_with_all = ["slurm", "force", "dry_run"])]
    pub status: bool,
    /// Slurm job settings.
    #[command(flatten)]
    pub slurm_opts: SlurmArgs,
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `cargo xtask sweep`.
///
/// # Errors
/// A bad sweep config, a missing binary, I/O errors; and, after everything is written,
/// points that failed or a sweep stopped by Ctrl-C.
pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let spec = match &args.config {
        Some(path) => SweepSpec::from_file(path)?,
        None => SweepSpec::from_str_in(DEFAULT_SWEEP, &workspace_root().join("configs"))
            .context("the default sweep config")?,
    };
    let runs_dir = args
        .runs_dir
        .clone()
        .unwrap_or_else(|| workspace_root().join("runs"));
    if args.status {
        slurm::print_status(&spec, &runs_dir.join(&spec.name))?;
        return Ok(());
    }
    if args.slurm {
        let root = std::path::absolute(runs_dir.join(&spec.name))
            .with_context(|| format!("resolving {}", runs_dir.display()))?;
        let stored = slurm::read_stored_settings(&root.join("slurm"))?;
        let (settings, reused) =
            slurm::effective_settings(&spec.slurm, stored.as_ref(), &args.slurm_opts)?;
        if !reused.is_empty() {
            println!(
                "settings of the last submission reused ({}): {}; options on the command line replace them",
                root.join("slurm").join(slurm::SETTINGS_FILE).display(),
                reused.join(", ")
            );
        }
        // Check the settings and the build before building anything.
        settings.sbatch_options()?;
        check_cuda_build(&spec, &args)?;
        let bin = find_binary(&args)?;
        let bin =
            std::path::absolute(&bin).with_context(|| format!("resolving {}", bin.display()))?;
        std::fs::create_dir_all(&runs_dir)
            .with_context(|| format!("creating {}", runs_dir.display()))?;
        let states = records::read_sweep(&spec, &root)?;
        check_same_base(&spec, &root, &states, args.force)?;
        let fresh = fresh_points(&spec, &states, args.force);
        if let Some(why) = check::check_points(&spec, &fresh, &bin)? {
            warn_unchecked(&why);
        }
        let sub = slurm::submit(&spec, &settings, &root, &bin, args.force, args.dry_run)?;
        if let Some(job) = sub.job_id {
            println!(
                "submitted job array {job} ({} points, running {}); follow it with `cargo xtask sweep {} --status`",
                sub.ids.len(),
                sub.bin.display(),
                args.config
                    .as_deref()
                    .map_or_else(|| "CONFIG".to_string(), |p| p.display().to_string())
            );
        }
        return Ok(());
    }
    if !args.dry_run {
        check_cuda_build(&spec, &args)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = Arc::clone(&stop);
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("\nsecond Ctrl-C: exiting now; running points are left to finish");
                std::process::exit(i32::from(exit_code::INTERRUPTED));
            }
            eprintln!("\nCtrl-C: no new points start; waiting for running ones (Ctrl-C again to leave now)");
        })
        .context("installing the Ctrl-C handler")?;
    }
    let bin = if args.dry_run {
        args.bin
            .clone()
            .unwrap_or_else(|| PathBuf::from("tau-resnet"))
    } else {
        find_binary(&args)?
    };
    let outcome = run_sweep(&spec, &runs_dir, &bin, &args, &stop)?;
    outcome.into_result()
}

/// The points that start from the base config, so that [`check::check_points`] reads
/// theirs: those without a result (every one with `force`) except, in a training sweep,
/// started ones, which resume with the config they started with (as [`plan_jobs`] runs
/// them).
fn fresh_points<'a>(
    spec: &SweepSpec,
    states: &'a [records::PointState],
    force: bool,
) -> Vec<&'a crate::spec::Point> {
    let started = |s: &records::PointState| {
        spec.command == crate::spec::RunCommand::Train
            && s.dir.join(tau_records::CONFIG_FILE).exists()
    };
    states
        .iter()
        .filter(|s| force || !(s.status.is_done() || started(s)))
        .map(|s| &s.point)
        .collect()
}

/// Says that the points' configs could not be checked before the sweep started, and why.
fn warn_unchecked(why: &str) {
    eprintln!(
        "warning: the points' configs were not checked before starting ({why}); a point \
         with a bad config fails when it runs"
    );
}

/// What a sweep run ended with.
#[derive(Debug)]
pub struct SweepOutcome {
    /// The sweep's folder.
    pub root: PathBuf,
    /// Points that ended failed.
    pub failed: usize,
    /// Points without a result because the sweep was stopped.
    pub unfinished: usize,
    /// Whether Ctrl-C stopped it.
    pub interrupted: bool,
}

impl SweepOutcome {
    fn into_result(self) -> anyhow::Result<()> {
        if self.interrupted {
            bail!(
                "sweep stopped by Ctrl-C with {} points left; run the same command again to resume",
                self.unfinished
            );
        }
        if self.failed > 0 {
            bail!(
                "{} point(s) failed; causes in {}",
                self.failed,
                self.root.join("report.md").display()
            );
        }
        Ok(())
    }
}

/// Builds the release `tau-resnet` binary with the cargo running xtask.
pub(crate) fn build_tau_resnet() -> anyhow::Result<()> {
    build_tau_resnet_with(None)
}

/// The arguments of the `cargo build` of `tau-resnet`, with `features` if given.
fn build_args(features: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = [
        "build",
        "--release",
        "-p",
        "tau-resnet",
        "--bin",
        "tau-resnet",
    ]
    .map(String::from)
    .to_vec();
    if let Some(f) = features {
        a.extend(["--features".to_string(), f.to_string()]);
    }
    a
}

/// Refuses a sweep (here or `--slurm`) whose base config runs on CUDA when xtask is about
/// to build `tau-resnet` without the `cuda` or `cudnn` feature (every point would fail
/// opening the GPU).
fn check_cuda_build(spec: &SweepSpec, args: &SweepArgs) -> anyhow::Result<()> {
    let on_cuda = spec
        .base
        .get("device")
        .and_then(|d| d.as_str())
        .is_some_and(|d| d.starts_with("cuda"));
    let cuda_feature = args.features.as_deref().is_some_and(|f| {
        f.split([',', ' ']).any(|f| {
            matches!(
                f.trim(),
                "cuda" | "cudnn" | "tau-resnet/cuda" | "tau-resnet/cudnn"
            )
        })
    });
    if on_cuda && args.bin.is_none() && !args.no_build && !cuda_feature {
        bail!(
            "the sweep runs on device = \"cuda\", but without --features cudnn (or cuda) xtask \
             would build a CPU-only tau-resnet for the tasks: pass --features cudnn (cuDNN \
             convolutions and BatchNorm), --features cuda, or --bin a CUDA build"
        );
    }
    Ok(())
}

/// Builds the release `tau-resnet` binary with the cargo running xtask, with the given
/// cargo features.
pub(crate) fn build_tau_resnet_with(features: Option<&str>) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let args = build_args(features);
    eprintln!("building tau-resnet (cargo {})", args.join(" "));
    let status = std::process::Command::new(cargo)
        .args(&args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo build for tau-resnet")?;
    if !status.success() {
        bail!("cargo build of tau-resnet failed ({status})");
    }
    Ok(())
}

fn find_binary(args: &SweepArgs) -> anyhow::Result<PathBuf> {
    if let Some(bin) = &args.bin {
        if !bin.exists() {
            bail!("tau-resnet binary {} does not exist", bin.display());
        }
        return Ok(bin.clone());
    }
    let exe_name = format!("tau-resnet{}", std::env::consts::EXE_SUFFIX);
    if !args.no_build {
        build_tau_resnet_with(args.features.as_deref())?;
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(&exe_name));
        // Under target/<profile>/deps (tests) or target/debug: the release build beside it.
        if let Some(target) = dir
            .ancestors()
            .find(|d| d.file_name().is_some_and(|n| n == "target"))
        {
            candidates.push(target.join("release").join(&exe_name));
        }
    }
    candidates.push(workspace_root().join("target/release").join(&exe_name));
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .with_context(|| {
            format!(
                "no tau-resnet binary found (looked at {}); build it with `cargo build --release -p tau-resnet` or pass --bin",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )
        })
}

/// The TOML text of a resolved sweep (base merged in, no `base_config`), stored as
/// `runs/<sweep>/sweep.toml` so the report needs nothing else.
fn resolved_sweep_toml(spec: &SweepSpec) -> anyhow::Result<String> {
    let mut t = toml::Table::new();
    t.insert("name".into(), spec.name.clone().into());
    t.insert("command".into(), spec.command.as_str().into());
    if let Some(d) = &spec.description {
        t.insert("description".into(), d.clone().into());
    }
    t.insert("base".into(), toml::Value::Table(spec.base.clone()));
    let mut grid = toml::Table::new();
    for a in &spec.axes {
        grid.insert(a.key.clone(), toml::Value::Array(a.values.clone()));
    }
    t.insert("grid".into(), toml::Value::Table(grid));
    let report = toml::Table::try_from(&spec.report).context("serializing [report]")?;
    if !report.is_empty() {
        t.insert("report".into(), toml::Value::Table(report));
    }
    let slurm = toml::Table::try_from(&spec.slurm).context("serializing [slurm]")?;
    if !slurm.is_empty() {
        t.insert("slurm".into(), toml::Value::Table(slurm));
    }
    Ok(format!(
        "# The resolved sweep config, written by `cargo xtask sweep`; `cargo xtask report` reads it.\n{}",
        toml::to_string(&t).context("serializing the sweep config")?
    ))
}

/// Runs a parsed sweep into `runs_dir/<name>` with `bin` as the tau-resnet binary.
///
/// # Errors
/// I/O errors, or a base config that differs from the one the finished points ran with.
pub fn run_sweep(
    spec: &SweepSpec,
    runs_dir: &Path,
    bin: &Path,
    args: &SweepArgs,
    stop: &AtomicBool,
) -> anyhow::Result<SweepOutcome> {
    let points = spec.points()?;
    let root = runs_dir.join(&spec.name);
    let states = records::read_sweep(spec, &root)?;
    check_same_base(spec, &root, &states, args.force)?;
    let jobs_n = args.jobs.unwrap_or_else(cores).max(1);
    let threads = (cores() / jobs_n).max(1);
    let (jobs, skipped) = plan_jobs(spec, &points, &states, &root, args.force);
    println!(
        "sweep `{}`: {} points ({} already done{}), {} to run with {} parallel `tau-resnet {}` processes × {} threads",
        spec.name,
        points.len(),
        if args.force {
            states.iter().filter(|s| s.status.is_done()).count()
        } else {
            skipped
        },
        if args.force {
            ", redone with --force"
        } else {
            ", skipped"
        },
        jobs.len(),
        jobs_n.min(jobs.len().max(1)),
        spec.command,
        threads
    );
    let fresh = fresh_points(spec, &states, args.force);
    if args.dry_run {
        // A dry run builds nothing: the points are checked when a binary is at hand.
        if bin.is_file() {
            check::check_points(spec, &fresh, bin)?;
        }
        for j in &jobs {
            println!("  {} {}", bin.display(), j.args.join(" "));
        }
        return Ok(SweepOutcome {
            root,
            failed: 0,
            unfinished: jobs.len(),
            interrupted: false,
        });
    }
    if let Some(why) = check::check_points(spec, &fresh, bin)? {
        warn_unchecked(&why);
    }
    write_sweep_files(spec, &root)?;
    for j in &jobs {
        prepare_point(spec, &points[j.index], &j.dir, args.force)?;
    }

    let start = Instant::now();
    let (rows, ran) = run_jobs(spec, &points, &jobs, bin, (jobs_n, threads), skipped, stop);
    let interrupted = stop.load(Ordering::SeqCst);
    let generated = report::generate(&root)?;
    let unfinished = generated
        .states
        .iter()
        .filter(|s| !s.status.is_done())
        .count();
    print_summary(&rows, ran, start.elapsed());
    println!("{}: {}", spec.name, generated.summary_line);
    println!("results: {}", root.join("results.csv").display());
    println!("report:  {}", root.join("report.md").display());
    println!(
        "figures: {} ({} charts, PNG and SVG)",
        root.join("figures").display(),
        generated.n_figures
    );
    let failed_total = generated
        .states
        .iter()
        .filter(|s| s.status == Status::Failed)
        .count();
    Ok(SweepOutcome {
        root,
        failed: failed_total,
        unfinished,
        interrupted,
    })
}

/// The base run config every point starts from, under `runs/<sweep>/`.
pub const BASE_FILE: &str = "base.toml";

/// Refuses to add to a sweep folder whose finished points ran with another base config
/// or command (unless `force`).
fn check_same_base(
    spec: &SweepSpec,
    root: &Path,
    states: &[records::PointState],
    force: bool,
) -> anyhow::Result<()> {
    let n_done = states.iter().filter(|s| s.status.is_done()).count();
    // Training points started but not done resume with the config they started with.
    let n_started = states
        .iter()
        .filter(|s| !s.status.is_done() && s.dir.join(tau_records::CONFIG_FILE).is_file())
        .count();
    if let Ok(old) = std::fs::read_to_string(root.join(SWEEP_COPY))
        && let Ok(old) = SweepSpec::from_str_in(&old, root)
        && (old.base != spec.base || old.command != spec.command)
        && n_done + n_started > 0
        && !force
    {
        bail!(
            "{} holds {n_done} finished and {n_started} started points run with a different \
             base config or command (started ones would resume with their old config); use \
             --force to redo them, or give the sweep another name",
            root.display()
        );
    }
    Ok(())
}

/// Creates the sweep folder and writes the resolved sweep config and the base run
/// config into it.
pub(crate) fn write_sweep_files(spec: &SweepSpec, root: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    write_atomic(
        &root.join(SWEEP_COPY),
        resolved_sweep_toml(spec)?.as_bytes(),
    )?;
    let base_text = toml::to_string(&spec.base).context("serializing the base config")?;
    write_atomic(&root.join(BASE_FILE), base_text.as_bytes())
}

/// Clears xtask's own stale records of a point about to run (and with `--force`, moves
/// the earlier outputs aside under `.replaced/`, returning where), then writes `point.json`.
pub(crate) fn prepare_point(
    spec: &SweepSpec,
    point: &crate::spec::Point,
    dir: &Path,
    force: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let mut moved = None;
    if force && dir.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let replaced = dir.parent().unwrap_or(Path::new(".")).join(".replaced");
        std::fs::create_dir_all(&replaced)?;
        // A second --force in the same second gets the next free name.
        let aside = (0..)
            .map(|k| match k {
                0 => replaced.join(format!("{}-{stamp}", point.name)),
                k => replaced.join(format!("{}-{stamp}-{k}", point.name)),
            })
            .find(|p| !p.exists())
            .unwrap_or_else(|| replaced.join(&point.name));
        std::fs::rename(dir, &aside)
            .with_context(|| format!("moving {} aside to {}", dir.display(), aside.display()))?;
        moved = Some(aside);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let failure = dir.join(FAILURE_RECORD);
    if failure.exists() {
        std::fs::remove_file(&failure)
            .with_context(|| format!("removing {}", failure.display()))?;
    }
    let values: serde_json::Map<String, serde_json::Value> = point
        .values
        .iter()
        .map(|(k, v)| {
            let json = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
            (k.clone(), json)
        })
        .collect();
    let json = serde_json::json!({
        "sweep": spec.name,
        "point": point.name,
        "command": spec.command.as_str(),
        "values": values,
    });
    write_atomic(
        &dir.join("point.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    Ok(moved)
}

mod check;
mod execute;
#[cfg(all(test, unix))]
mod tests;
