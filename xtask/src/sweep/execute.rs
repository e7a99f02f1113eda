//! Running a sweep's points: which to run and in what order, the process pool with its
//! progress bar, each finished process turned into the point's records, and the summary
//! table.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tau_records::{CONFIG_FILE, PROBE_FILE, RunStatus, SUMMARY_FILE};

use super::BASE_FILE;
use crate::pool::{self, Job, JobResult};
use crate::records::{self, FAILURE_RECORD, FailureRecord, Status, write_atomic};
use crate::spec::{RunCommand, SweepSpec};

/// A row of the summary table: grid index, point, status, wall time, message.
pub(super) type SummaryRow = (usize, String, Status, Duration, String);

/// The jobs of the points still to run (all with `force`), deepest first, and how many
/// points were skipped as done.
pub(super) fn plan_jobs(
    spec: &SweepSpec,
    points: &[crate::spec::Point],
    states: &[records::PointState],
    root: &Path,
    force: bool,
) -> (Vec<Job>, usize) {
    let base_path = root.join(BASE_FILE);
    let mut jobs = Vec::new();
    let mut skipped = 0;
    for (i, (p, s)) in points.iter().zip(states).enumerate() {
        if s.status.is_done() && !force {
            skipped += 1;
            continue;
        }
        let dir = root.join(&p.name);
        // A run with a config resumes: from its last checkpoint, or from step 0 when it
        // was killed before the first one.
        let resume = spec.command == RunCommand::Train && !force && dir.join(CONFIG_FILE).exists();
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
    jobs.sort_by_key(|j| std::cmp::Reverse(depth_of(&points[j.index])));
    (jobs, skipped)
}

/// A point's value on the depth axis (0 without one).
fn depth_of(point: &crate::spec::Point) -> i64 {
    point
        .values
        .iter()
        .find(|(k, _)| k.rsplit('.').next() == Some("depth"))
        .and_then(|(_, v)| v.as_integer())
        .unwrap_or(0)
}

/// Runs `jobs` on the process pool with a progress bar; returns the summary rows (grid
/// index, point, status, wall time, message) and how many processes ran.
pub(super) fn run_jobs(
    spec: &SweepSpec,
    points: &[crate::spec::Point],
    jobs: &[Job],
    bin: &Path,
    (jobs_n, threads): (usize, usize),
    skipped: usize,
    stop: &AtomicBool,
) -> (Vec<SummaryRow>, usize) {
    // The bar advances by each point's expected cost (its depth: the work of a probe or a
    // training step grows linearly with it), so that the ETA holds although the deepest
    // points run first.
    let cost = |j: &Job| depth_of(&points[j.index]).max(1) as u64;
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
    let mut rows: Vec<SummaryRow> = Vec::new();
    let results = pool::run_pool(bin, jobs, jobs_n, threads, stop, |r: &JobResult| {
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
    (rows, results.len())
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
pub(super) fn print_summary(rows: &[SummaryRow], ran: usize, wall: Duration) {
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
