//! `cargo xtask sweep [configs/NAME.toml]`: expands a sweep into points, runs each as its
//! own `tau-resnet` process (bounded parallelism, resume, skip of finished points), then
//! writes `results.csv`, `report.md` and the figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tau_records::{CONFIG_FILE, PROBE_FILE, RunStatus, SUMMARY_FILE, exit_code};

use crate::pool::{self, Job, JobResult};
use crate::records::{self, FAILURE_RECORD, FailureRecord, SWEEP_COPY, Status, write_atomic};
use crate::report;
use crate::slurm::{self, SlurmArgs};
use crate::spec::{RunCommand, SweepSpec};

/// The default sweep (`cargo xtask sweep` with no config): the theory network's stability
/// at initialization, depth × τ, on CPU in about a minute.
pub const DEFAULT_SWEEP: &str = include_str!("../../configs/sweep-stability.toml");

/// Arguments of `cargo xtask sweep`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  cargo xtask sweep                                  # the default stability sweep\n  cargo xtask sweep configs/sweep-gd-convergence.toml --jobs 2\n  cargo xtask report runs/stability                  # rebuild CSV, report, figures\n  cargo xtask sweep configs/sweep-cifar10-bn.toml --slurm --time 12:00:00 --gpus-per-task 1\n  cargo xtask sweep configs/sweep-cifar10-bn.toml --status  # per-point state, with Slurm's"
)]
pub struct SweepArgs {
    /// The sweep config (default: the stability sweep, configs/sweep-stability.toml).
    pub config: Option<PathBuf>,
    /// Processes run at once (default: the number of CPU cores). Each gets
    /// cores / jobs compute threads (RAYON_NUM_THREADS).
    #[arg(long, short)]
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
        "tau-train",
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

/// Refuses a `--slurm` sweep whose base config runs on CUDA when xtask is about to build
/// `tau-resnet` without the `cuda` feature (the tasks would all fail opening the GPU).
fn check_cuda_build(spec: &SweepSpec, args: &SweepArgs) -> anyhow::Result<()> {
    let on_cuda = spec
        .base
        .get("device")
        .and_then(|d| d.as_str())
        .is_some_and(|d| d.starts_with("cuda"));
    let cuda_feature = args
        .features
        .as_deref()
        .is_some_and(|f| f.split([',', ' ']).any(|f| f.trim() == "cuda"));
    if on_cuda && args.bin.is_none() && !args.no_build && !cuda_feature {
        bail!(
            "the sweep runs on device = \"cuda\", but without --features cuda xtask would build \
             a CPU-only tau-resnet for the tasks: pass --features cuda (or --bin a CUDA build)"
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
                "no tau-resnet binary found (looked at {}); build it with `cargo build --release -p tau-train` or pass --bin",
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
    let base_path = root.join(BASE_FILE);
    let states = records::read_sweep(spec, &root)?;
    check_same_base(spec, &root, &states, args.force)?;
    let jobs_n = args.jobs.unwrap_or_else(cores).max(1);
    let threads = (cores() / jobs_n).max(1);
    let mut jobs = Vec::new();
    let mut skipped = 0;
    for (i, (p, s)) in points.iter().zip(&states).enumerate() {
        if s.status.is_done() && !args.force {
            skipped += 1;
            continue;
        }
        let dir = root.join(&p.name);
        // A run with a config resumes: from its last checkpoint, or from step 0 when it
        // was killed before the first one.
        let resume =
            spec.command == RunCommand::Train && !args.force && dir.join(CONFIG_FILE).exists();
        let mut a = vec![spec.command.as_str().to_string()];
        if resume {
            a.extend(["--resume".to_string(), dir.display().to_string()]);
        } else {
            a.extend(["--config".to_string(), base_path.display().to_string()]);
            for set in p.set_args() {
                a.extend(["--set".to_string(), set]);
            }
            a.extend(["--out".to_string(), dir.display().to_string()]);
        }
        jobs.push(Job {
            index: i,
            dir,
            args: a,
        });
    }
    // Deepest points first: the long runs start early and the pool ends balanced.
    let depth_of = |j: &Job| {
        points[j.index]
            .values
            .iter()
            .find(|(k, _)| k.rsplit('.').next() == Some("depth"))
            .and_then(|(_, v)| v.as_integer())
            .unwrap_or(0)
    };
    jobs.sort_by_key(|j| std::cmp::Reverse(depth_of(j)));
    println!(
        "sweep `{}`: {} points ({} already done{}), {} to run with {} parallel `tau-resnet {}` processes × {} threads",
        spec.name,
        points.len(),
        skipped,
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
    if args.dry_run {
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
    write_sweep_files(spec, &root)?;
    for j in &jobs {
        prepare_point(spec, &points[j.index], &j.dir, args.force)?;
    }

    // The bar advances by each point's expected cost (its depth: the work of a probe or a
    // training step grows linearly with it), so that the ETA holds although the deepest
    // points run first.
    let cost = |j: &Job| depth_of(j).max(1) as u64;
    let pb = ProgressBar::with_draw_target(
        Some(jobs.iter().map(cost).sum::<u64>()),
        ProgressDrawTarget::stderr(),
    );
    pb.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let total = points.len();
    let mut done = skipped;
    let progress = |done: usize, failed: usize, diverged: usize| {
        format!("{done}/{total} points, {failed} failed, {diverged} diverged")
    };
    pb.set_message(progress(done, 0, 0));
    let mut failed = 0usize;
    let mut diverged = 0usize;
    let mut rows: Vec<(usize, String, Status, Duration, String)> = Vec::new();
    let start = Instant::now();
    let results = pool::run_pool(bin, &jobs, jobs_n, threads, stop, |r: &JobResult| {
        let job = jobs.iter().find(|j| j.index == r.index);
        let Some(job) = job else { return };
        let point = &points[r.index];
        let state = finalize_point(spec, point, job, r, stop.load(Ordering::SeqCst));
        match state.status {
            Status::Failed => {
                failed += 1;
                pb.suspend(|| {
                    eprintln!(
                        "point {} failed: {}",
                        point.name,
                        state.message.as_deref().unwrap_or("")
                    )
                });
            }
            Status::Diverged => diverged += 1,
            _ => {}
        }
        done += 1;
        pb.inc(cost(job));
        pb.set_message(progress(done, failed, diverged));
        rows.push((
            r.index,
            point.name.clone(),
            state.status,
            r.wall,
            state.message.clone().unwrap_or_default(),
        ));
    });
    pb.finish_and_clear();
    let interrupted = stop.load(Ordering::SeqCst);
    let generated = report::generate(&root)?;
    let unfinished = generated
        .states
        .iter()
        .filter(|s| !s.status.is_done())
        .count();
    print_summary(&rows, results.len(), start.elapsed());
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
    if let Ok(old) = std::fs::read_to_string(root.join(SWEEP_COPY))
        && let Ok(old) = SweepSpec::from_str_in(&old, root)
        && (old.base != spec.base || old.command != spec.command)
        && n_done > 0
        && !force
    {
        bail!(
            "{} holds {n_done} finished points run with a different base config or command; \
             use --force to redo them, or give the sweep another name",
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
/// the earlier outputs aside), then writes `point.json`.
pub(crate) fn prepare_point(
    spec: &SweepSpec,
    point: &crate::spec::Point,
    dir: &Path,
    force: bool,
) -> anyhow::Result<()> {
    if force && dir.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = dir
            .parent()
            .unwrap_or(Path::new("."))
            .join(".replaced")
            .join(format!("{}-{stamp}", point.name));
        std::fs::create_dir_all(aside.parent().unwrap_or(Path::new(".")))?;
        std::fs::rename(dir, &aside)
            .with_context(|| format!("moving {} aside to {}", dir.display(), aside.display()))?;
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
    )
}

/// Turns a finished process into the point's final records: a failure record when it
/// failed without a result.
fn finalize_point(
    spec: &SweepSpec,
    point: &crate::spec::Point,
    job: &Job,
    r: &JobResult,
    stopping: bool,
) -> records::PointState {
    let state = records::read_point(spec.command, point, &job.dir);
    let record = match spec.command {
        RunCommand::Probe => PROBE_FILE,
        RunCommand::Train => SUMMARY_FILE,
    };
    // tau-resnet's exit codes (tau_records::exit_code): 0 finished and 3 diverged are
    // results, 130 interrupted is resumable; anything else is an error.
    let result = |code: i32| RunStatus::from_exit_code(code).is_some_and(RunStatus::is_result);
    let interrupted = |code: i32| RunStatus::from_exit_code(code) == Some(RunStatus::Interrupted);
    let message = match (r.exit_code, &r.spawn_error) {
        (_, Some(err)) => Some(err.clone()),
        (Some(code), _) if result(code) && state.status.is_done() => None,
        (Some(code), _) if interrupted(code) && state.status == Status::Interrupted => None,
        // Killed by Ctrl-C (signal, or 130 without a record): resumable, not a failure.
        (None, _) if stopping => None,
        (Some(code), _) if interrupted(code) && stopping => None,
        (Some(code), _) if result(code) => Some(format!(
            "exited with {code} but left no valid {record}{}",
            state
                .message
                .as_deref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default()
        )),
        (Some(code), _) => Some(format!(
            "exit code {code}: {}",
            pool::error_line(&job.dir).unwrap_or_else(|| "no error message".into())
        )),
        (None, _) => Some("killed by a signal".to_string()),
    };
    if let Some(message) = message {
        let f = FailureRecord {
            exit_code: r.exit_code,
            message,
        };
        if let Ok(text) = serde_json::to_string_pretty(&f) {
            // Move a half-valid record out of the way so the failure is what counts.
            if state.status.is_done() || state.status == Status::Failed {
                let rec = job.dir.join(record);
                let _ = std::fs::rename(&rec, job.dir.join(format!("{record}.invalid")));
            }
            let _ = write_atomic(&job.dir.join(FAILURE_RECORD), text.as_bytes());
        }
        return records::read_point(spec.command, point, &job.dir);
    }
    state
}

/// The table printed at the end of a sweep: one row per point run, in grid order
/// (finished points left out when there are more than 40 rows).
fn print_summary(rows: &[(usize, String, Status, Duration, String)], ran: usize, wall: Duration) {
    if rows.is_empty() {
        println!("nothing to run: every point is done (use --force to redo)");
        return;
    }
    let show_all = rows.len() <= 40;
    let width = rows.iter().map(|r| r.1.len()).max().unwrap_or(5).max(5);
    println!("\n{:width$}  {:11}  {:>8}  note", "point", "status", "time");
    let mut sorted: Vec<_> = rows.iter().collect();
    sorted.sort_by_key(|r| r.0);
    let mut hidden = 0;
    for (_, name, status, wall, msg) in sorted {
        if !show_all && matches!(status, Status::Finished) {
            hidden += 1;
            continue;
        }
        println!(
            "{name:width$}  {:11}  {:>7.1}s  {msg}",
            status.as_str(),
            wall.as_secs_f64()
        );
    }
    if hidden > 0 {
        println!("({hidden} finished points not listed)");
    }
    println!("{ran} points run in {:.1}s", wall.as_secs_f64());
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for tau-resnet: fails on depth 999 (a bad config), diverges on τ = "1",
    /// stops with status interrupted on depth 77 once, otherwise finishes. It counts its
    /// runs per point in `count`.
    const FAKE: &str = r#"#!/bin/sh
cmd=$1; shift
out=""; sets=""; resume=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2;;
    --resume) out=$2; resume=1; shift 2;;
    --set) sets="$sets $2"; shift 2;;
    *) shift;;
  esac
done
# The fields of summary.json (tau_records::Summary) and of its final metrics record that
# the tests do not look at.
run='"wall_s":0.5,"device":"cpu","version":{"crate_version":"0.1.0","git_commit":null}'
last='"step":7,"epoch":0,"epoch_end":false,"lr":0.1,"grad_norm":null,"layer_grad_norms":[],"examples_per_s":100.0,"wall_s":0.5'
case "$sets" in *depth=999*) echo "error: config base.toml: key \`model.depth\`: 999 is not 6n+2" >&2; exit 1;; esac
mkdir -p "$out"
echo "$cmd resume=$resume" >> "$out/count"
case "$sets" in *depth=77*)
  if [ ! -f "$out/was-interrupted" ]; then
    touch "$out/was-interrupted"; mkdir -p "$out/checkpoints"; touch "$out/config.toml"
    printf '{"name":"t","status":"interrupted","steps":5,"epochs_completed":0,%s}' "$run" > "$out/summary.json"; exit 130
  fi;;
esac
printf '{"step":1,"train_loss":2.0}\n{"step":10,"train_loss":0.5}\n{"step":100,"train_loss":0.01}\n' > "$out/metrics.jsonl"
case "$sets" in *'tau="1"'*)
  printf '{"name":"t","status":"diverged","diverged_at_step":7,"divergence_reason":"non-finite loss","steps":7,"epochs_completed":0,"final_metrics":{%s,"train_loss":null},%s}' "$last" "$run" > "$out/summary.json"; exit 3;;
esac
printf '{"name":"t","status":"finished","steps":100,"epochs_completed":1,"final_metrics":{%s,"train_loss":0.01,"test_acc":0.9},"best_test_acc":0.92,%s}' "$last" "$run" > "$out/summary.json"
exit 0
"#;

    fn fake_bin(dir: &Path) -> PathBuf {
        let path = dir.join("fake-tau-resnet");
        std::fs::write(&path, FAKE).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn args(force: bool) -> SweepArgs {
        SweepArgs {
            config: None,
            jobs: Some(2),
            force,
            runs_dir: None,
            bin: None,
            no_build: true,
            features: None,
            dry_run: false,
            slurm: false,
            status: false,
            slurm_opts: SlurmArgs::default(),
        }
    }

    fn spec(depths: &str) -> SweepSpec {
        let text = format!(
            "name = \"t\"\ncommand = \"train\"\n[base]\nseed = 0\n[grid]\n\"model.depth\" = [{depths}]\n\"model.tau\" = [\"1/sqrt(L)\", \"1\"]\n"
        );
        SweepSpec::from_str_in(&text, Path::new(".")).unwrap()
    }

    fn runs(root: &Path, point: &str) -> usize {
        std::fs::read_to_string(root.join(point).join("count")).map_or(0, |t| t.lines().count())
    }

    #[test]
    fn failures_and_divergence_do_not_stop_the_sweep_and_are_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = fake_bin(tmp.path());
        let stop = AtomicBool::new(false);
        let spec = spec("4, 999, 16");
        let out = run_sweep(&spec, tmp.path(), &bin, &args(false), &stop).unwrap();
        let root = tmp.path().join("t");
        assert_eq!(out.failed, 2, "depth 999 fails for both τ");
        let states = records::read_sweep(&spec, &root).unwrap();
        let by = |n: &str| states.iter().find(|s| s.point.name == n).unwrap();
        assert_eq!(by("depth-4_tau-1_sqrt_L").status, Status::Finished);
        assert_eq!(by("depth-16_tau-1_sqrt_L").status, Status::Finished);
        assert_eq!(by("depth-16_tau-1").status, Status::Diverged);
        let bad = by("depth-999_tau-1_sqrt_L");
        assert_eq!(bad.status, Status::Failed);
        assert!(
            bad.message.as_deref().unwrap().contains("model.depth"),
            "{:?}",
            bad.message
        );
        let csv = std::fs::read_to_string(root.join("results.csv")).unwrap();
        assert!(
            csv.lines()
                .next()
                .unwrap()
                .starts_with("point,model.depth,model.tau,status,message")
        );
        // The diverged point's row: no message, no accuracy, where it diverged.
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let row: Vec<&str> = csv
            .lines()
            .find(|l| l.starts_with("depth-16_tau-1,"))
            .unwrap()
            .split(',')
            .collect();
        let col = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
        assert_eq!(row[..4], ["depth-16_tau-1", "16", "1", "diverged"], "{csv}");
        assert_eq!(
            (
                col("message"),
                col("best_test_acc"),
                col("diverged_at_step")
            ),
            ("", "", "7"),
            "{csv}"
        );
        assert!(
            csv.contains("depth-999_tau-1_sqrt_L,999,1/sqrt(L),failed,exit code 1: error: config")
        );
        let report = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(
            report.contains("4 finished, 2 diverged, 2 failed") || report.contains("failed"),
            "{report}"
        );
        assert!(report.contains("Points without a result"));
        assert!(report.contains("not 6n+2"));
        let figs: Vec<String> = std::fs::read_dir(root.join("figures"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            figs.contains(&"loss_vs_step_tau_1_sqrt_L.png".to_string()),
            "{figs:?}"
        );
        assert!(root.join("figures/accuracy_vs_depth.svg").exists());
    }

    #[test]
    fn rerun_skips_finished_points_retries_failed_and_resumes_interrupted() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = fake_bin(tmp.path());
        let stop = AtomicBool::new(false);
        let root = tmp.path().join("t");
        let first = run_sweep(&spec("4, 77, 999"), tmp.path(), &bin, &args(false), &stop).unwrap();
        assert_eq!(first.failed, 2);
        assert_eq!(runs(&root, "depth-4_tau-1_sqrt_L"), 1);
        let s = records::read_sweep(&spec("4, 77, 999"), &root).unwrap();
        assert_eq!(s[2].status, Status::Interrupted);
        // Second run: finished/diverged skipped, interrupted resumed, failed retried.
        let second = run_sweep(&spec("4, 77, 999"), tmp.path(), &bin, &args(false), &stop).unwrap();
        assert_eq!(second.failed, 2);
        assert_eq!(runs(&root, "depth-4_tau-1_sqrt_L"), 1);
        assert_eq!(runs(&root, "depth-4_tau-1"), 1);
        let count = std::fs::read_to_string(root.join("depth-77_tau-1_sqrt_L/count")).unwrap();
        assert_eq!(count, "train resume=0\ntrain resume=1\n");
        let s = records::read_sweep(&spec("4, 77, 999"), &root).unwrap();
        assert_eq!(s[2].status, Status::Finished);
        // A grown grid runs only the new points.
        run_sweep(
            &spec("4, 77, 999, 8"),
            tmp.path(),
            &bin,
            &args(false),
            &stop,
        )
        .unwrap();
        assert_eq!(runs(&root, "depth-4_tau-1_sqrt_L"), 1);
        assert_eq!(runs(&root, "depth-8_tau-1_sqrt_L"), 1);
        // --force redoes everything, keeping the old outputs aside.
        run_sweep(&spec("4"), tmp.path(), &bin, &args(true), &stop).unwrap();
        assert_eq!(runs(&root, "depth-4_tau-1_sqrt_L"), 1);
        assert!(std::fs::read_dir(root.join(".replaced")).unwrap().count() >= 2);
    }

    #[test]
    fn report_reproduces_results_csv_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = fake_bin(tmp.path());
        let stop = AtomicBool::new(false);
        let root = tmp.path().join("t");
        let _ = run_sweep(&spec("2, 999, 8"), tmp.path(), &bin, &args(false), &stop).unwrap();
        let csv = std::fs::read(root.join("results.csv")).unwrap();
        let md = std::fs::read(root.join("report.md")).unwrap();
        std::fs::remove_file(root.join("results.csv")).unwrap();
        std::fs::remove_file(root.join("report.md")).unwrap();
        std::fs::remove_dir_all(root.join("figures")).unwrap();
        report::generate(&root).unwrap();
        assert_eq!(std::fs::read(root.join("results.csv")).unwrap(), csv);
        assert_eq!(std::fs::read(root.join("report.md")).unwrap(), md);
        assert!(root.join("figures/accuracy_vs_depth.png").exists());
    }

    #[test]
    fn changed_base_config_with_finished_points_needs_force() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = fake_bin(tmp.path());
        let stop = AtomicBool::new(false);
        run_sweep(&spec("4"), tmp.path(), &bin, &args(false), &stop).unwrap();
        let mut changed = spec("4");
        changed.base.insert("seed".into(), toml::Value::Integer(5));
        let err = run_sweep(&changed, tmp.path(), &bin, &args(false), &stop).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
    }

    #[test]
    fn the_build_takes_cargo_features_and_a_cuda_sweep_asks_for_them() {
        assert_eq!(
            build_args(Some("cuda")).join(" "),
            "build --release -p tau-train --bin tau-resnet --features cuda"
        );
        assert!(!build_args(None).contains(&"--features".to_string()));
        let mut cuda = spec("4");
        cuda.base.insert("device".into(), "cuda".into());
        let mut a = args(false);
        a.no_build = false;
        let err = check_cuda_build(&cuda, &a).unwrap_err();
        assert!(err.to_string().contains("--features cuda"), "{err}");
        a.features = Some("cuda".into());
        check_cuda_build(&cuda, &a).unwrap();
        // A CPU sweep, a binary given or no build: nothing to say.
        check_cuda_build(&spec("4"), &args(false)).unwrap();
        let mut given = args(false);
        given.no_build = false;
        given.bin = Some(PathBuf::from("/x/tau-resnet-cuda"));
        check_cuda_build(&cuda, &given).unwrap();
        check_cuda_build(&cuda, &args(false)).unwrap();
    }

    #[test]
    fn default_sweep_config_parses() {
        let spec =
            SweepSpec::from_str_in(DEFAULT_SWEEP, &workspace_root().join("configs")).unwrap();
        assert_eq!(spec.command, RunCommand::Probe);
        assert!(spec.n_points() >= 13);
        spec.points().unwrap();
    }
}
