//! `tau-resnet train`: start a run from a TOML config, or resume one from its last
//! checkpoint.

use crate::cmd::outln;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tau_records::{
    CHECKPOINTS_DIR, CONFIG_FILE, METRICS_FILE, RunStatus, SUMMARY_FILE, Summary, exit_code,
};
use tracing_indicatif::span_ext::IndicatifSpanExt;

use super::Outcome;
use tau_train::config::{DeviceSpec, load_config};
use tau_train::setup::{prepare, resume, run_config, start};
use tau_train::trainer::{Progress, RunObserver, RunOptions, last_checkpoint};

/// Signals closer together than this are one interrupt (see the handler in [`run`]).
const SAME_SIGNAL: Duration = Duration::from_millis(500);

/// Arguments of `tau-resnet train`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  tau-resnet train --config configs/theory-gd.toml
  tau-resnet train --config configs/theory-gd.toml --set model.depth=64 --set 'model.tau=1/L' --out runs/theory-L64-invL
  tau-resnet train --resume runs/theory-gd
  tau-resnet train --config configs/cifar10-resnet110-bn.toml --set model.norm=none --dry-run

Exit status: 0 finished, 3 diverged (a result, recorded in summary.json),
130 interrupted (checkpoint written; continue with --resume), 1 error, 2 usage.")]
pub struct TrainArgs {
    /// The run config (TOML); see docs/training.md.
    #[arg(long, value_name = "FILE", required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Override a config key, e.g. `--set optim.lr=0.05` or `--set 'model.tau=0.5/sqrt(L)'`
    /// (repeatable; the value is TOML, or else a string).
    #[arg(long = "set", value_name = "KEY=VALUE", conflicts_with = "resume")]
    pub sets: Vec<String>,
    /// The run directory (default: the config's `out_dir`, else `runs/<name>`).
    #[arg(long, value_name = "DIR", conflicts_with = "resume")]
    pub out: Option<PathBuf>,
    /// Continue the run in DIR from its last checkpoint (from step 0 when it was killed
    /// before its first one).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub resume: Option<PathBuf>,
    /// Where to compute: auto, cpu, cuda, cuda:N or metal (overrides the config's `device`).
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<DeviceSpec>,
    /// Read and check the config (with the --set overrides), print it resolved, and exit:
    /// no data is read, no model is built and nothing is written.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop as on Ctrl-C once this many steps are done (checkpoint, status `interrupted`).
    #[arg(long, value_name = "STEPS", hide = true)]
    pub stop_after_steps: Option<u64>,
}

/// Runs `tau-resnet train`.
///
/// # Errors
/// A bad config, data or checkpoint, an unwritable run directory, or I/O errors while
/// training. Divergence is not an error: it returns [`Outcome::Diverged`].
pub fn run(args: TrainArgs) -> anyhow::Result<Outcome> {
    let (mut cfg, run_dir, mut resuming) = match (&args.resume, &args.config) {
        (Some(dir), _) => (run_config(dir)?, dir.clone(), true),
        (None, Some(path)) => {
            let mut cfg = load_config(path, &args.sets)?;
            // The run's config.toml names the data folder absolutely, so that `--resume`
            // finds it from any working directory.
            if let Some(d) = &cfg.data.dir {
                cfg.data.dir = Some(
                    std::path::absolute(d)
                        .with_context(|| format!("resolving data.dir {}", d.display()))?,
                );
            }
            let dir = cfg.run_dir(args.out.as_deref());
            (cfg, dir, false)
        }
        (None, None) => anyhow::bail!("give --config FILE or --resume DIR"),
    };
    if let Some(d) = args.device {
        cfg.device = d;
    }
    if args.dry_run {
        let action = if resuming {
            "would resume"
        } else {
            "would start"
        };
        outln!(
            "# tau-resnet train --dry-run: config OK; the run {action} in {}\n{}",
            run_dir.display(),
            cfg.to_toml()?.trim_end()
        )?;
        return Ok(Outcome::Finished);
    }
    let device = cfg.device.device()?;
    let prepared = prepare(&cfg, &device)?;

    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let first = std::sync::OnceLock::new();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            // One signal often arrives twice: `timeout` and some job runners send it to
            // the process and then to its group, and Ctrl-C in a terminal reaches every
            // process of the foreground group. Only a second signal a moment later is
            // someone asking to quit at once.
            if first.get().is_some_and(|t: &Instant| t.elapsed() < SAME_SIGNAL) {
                return;
            }
            eprintln!("second interrupt: exiting without a checkpoint");
            std::process::exit(i32::from(exit_code::INTERRUPTED));
        }
        let _ = first.set(Instant::now());
        eprintln!("interrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to quit now)");
    })
    .context("installing the Ctrl-C handler")?;
    let opts = RunOptions {
        interrupt,
        stop_after_steps: args.stop_after_steps,
        observer: super::progress_enabled().then(|| Arc::new(ProgressBar) as Arc<dyn RunObserver>),
    };
    if resuming && last_checkpoint(&run_dir).is_none() {
        if let Some(summary) = ended_without_checkpoint(&run_dir) {
            // A run that diverged (or finished) before its first checkpoint has its result:
            // there is nothing to resume, and starting over would only repeat it.
            return report(&run_dir, &summary);
        }
        check_no_checkpoints(&run_dir)?;
        start_over(&run_dir)?;
        resuming = false;
    }
    let summary = if resuming {
        resume(prepared, &run_dir, &opts)?
    } else {
        start(prepared, &run_dir, &opts)?
    };
    report(&run_dir, &summary)
}

/// The summary of a run that ended (finished or diverged) without writing a checkpoint.
fn ended_without_checkpoint(run_dir: &Path) -> Option<Summary> {
    let text = std::fs::read_to_string(run_dir.join(SUMMARY_FILE)).ok()?;
    let summary: Summary = serde_json::from_str(&text).ok()?;
    matches!(summary.status, RunStatus::Finished | RunStatus::Diverged).then_some(summary)
}

/// Refuses to start a run over when `checkpoints/` holds anything of a checkpoint while
/// `checkpoints/last` does not lead to one (removed, or pointing at a removed directory):
/// starting over would delete the checkpoints that are there.
fn check_no_checkpoints(run_dir: &Path) -> anyhow::Result<()> {
    let dir = run_dir.join(CHECKPOINTS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    let mut steps: Vec<String> = Vec::new();
    let mut has_last = false;
    for entry in entries {
        let name = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name == "last" {
            has_last = true;
        } else if name.starts_with("step-") {
            steps.push(name);
        }
    }
    steps.sort();
    match (steps.last(), has_last) {
        (None, false) => Ok(()),
        (Some(newest), _) => anyhow::bail!(
            "{}: checkpoints/last {}, but {} holds {newest}: the run's checkpoints are damaged, \
             so it is not started over (which would delete them); to resume from {newest}, \
             point the link at it (`ln -sfn {newest} {}`)",
            run_dir.display(),
            if has_last {
                "leads to no checkpoint"
            } else {
                "is missing"
            },
            dir.display(),
            dir.join("last").display()
        ),
        (None, true) => anyhow::bail!(
            "{}: checkpoints/last leads to no checkpoint (its directory is gone): the run's \
             checkpoints are damaged; remove {} to start the run over from step 0",
            run_dir.display(),
            dir.display()
        ),
    }
}

/// Prints the one-line result of a run and returns its outcome.
fn report(run_dir: &Path, summary: &Summary) -> anyhow::Result<Outcome> {
    let last = summary.final_metrics.as_ref();
    let mut line = format!(
        "{}: {} after {} steps",
        run_dir.display(),
        summary.status.as_str(),
        summary.steps
    );
    if let Some(l) = last.and_then(|r| r.train_loss) {
        line.push_str(&format!(", train loss {l:.4e}"));
    }
    if let Some(a) = last.and_then(|r| r.test_acc) {
        line.push_str(&format!(", test accuracy {:.2}%", 100.0 * a));
    }
    if let Some(s) = summary.diverged_at_step {
        line.push_str(&format!(
            " (diverged at step {s}: {})",
            summary.divergence_reason.as_deref().unwrap_or("")
        ));
    }
    outln!("{line}")?;
    Ok(Outcome::from(summary.status))
}

/// Clears the records of a run killed before its first checkpoint (a requeued cluster job
/// hits this), so that it starts over from step 0 with the config it was given.
fn start_over(run_dir: &std::path::Path) -> anyhow::Result<()> {
    eprintln!(
        "note: {} has no checkpoint yet (stopped before the first one): starting it over from step 0",
        run_dir.display()
    );
    // config.toml last: a directory killed in between still resumes (it holds a config).
    for name in [SUMMARY_FILE, METRICS_FILE, CONFIG_FILE] {
        let path = run_dir.join(name);
        if let Err(err) = std::fs::remove_file(&path)
            && err.kind() != std::io::ErrorKind::NotFound
        {
            return Err(err).with_context(|| format!("removing {}", path.display()));
        }
    }
    Ok(())
}

/// The training progress bar: drawn by tracing-indicatif on the loop's `train` span.
struct ProgressBar;

impl RunObserver for ProgressBar {
    fn started(&self, span: &tracing::Span, p: &Progress) {
        span.pb_set_style(
            &indicatif::ProgressStyle::with_template(
                "{span_child_prefix}{bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        span.pb_set_length(p.total);
        span.pb_set_position(p.step);
    }

    fn stepped(&self, span: &tracing::Span, p: &Progress) {
        span.pb_set_position(p.step);
        span.pb_set_message(&format!(
            "epoch {}/{} loss {:.4e} lr {:.3e}",
            p.step.div_ceil(p.steps_per_epoch),
            p.total.div_ceil(p.steps_per_epoch),
            p.loss,
            p.lr
        ));
    }
}
