//! A bounded pool of `tau-resnet` processes: one process per sweep point, at most
//! `workers` at a time, each with its share of the CPU threads.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One process to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Index of the point in the sweep.
    pub index: usize,
    /// The point's folder: stdout/stderr go to `stdout.log` / `stderr.log` in it.
    pub dir: PathBuf,
    /// Arguments after the binary.
    pub args: Vec<String>,
}

/// How a job's process ended.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// Index of the point.
    pub index: usize,
    /// The exit code; `None` when killed by a signal or never started.
    pub exit_code: Option<i32>,
    /// Set when the process could not be started at all.
    pub spawn_error: Option<String>,
    /// Wall time.
    pub wall: Duration,
}

/// Runs `jobs` with at most `workers` processes at once; calls `on_done` on the calling
/// thread as each finishes. Stops launching new jobs once `stop` is set (running ones
/// are waited for). Returns the results of the jobs that ran.
pub fn run_pool(
    bin: &Path,
    jobs: &[Job],
    workers: usize,
    threads_per_child: usize,
    stop: &AtomicBool,
    mut on_done: impl FnMut(&JobResult),
) -> Vec<JobResult> {
    let next = Mutex::new(0usize);
    let (tx, rx) = mpsc::channel::<JobResult>();
    let mut results = Vec::new();
    std::thread::scope(|scope| {
        for _ in 0..workers.max(1).min(jobs.len().max(1)) {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || {
                loop {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let i = {
                        let Ok(mut n) = next.lock() else { break };
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(job) = jobs.get(i) else { break };
                    let result = run_one(bin, job, threads_per_child);
                    if tx.send(result).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for result in rx {
            on_done(&result);
            results.push(result);
        }
    });
    results
}

fn run_one(bin: &Path, job: &Job, threads: usize) -> JobResult {
    let start = Instant::now();
    let fail = |msg: String| JobResult {
        index: job.index,
        exit_code: None,
        spawn_error: Some(msg),
        wall: start.elapsed(),
    };
    if let Err(err) = std::fs::create_dir_all(&job.dir) {
        return fail(format!("creating {}: {err}", job.dir.display()));
    }
    let open = |name: &str| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(job.dir.join(name))
    };
    let (stdout, stderr) = match (open("stdout.log"), open("stderr.log")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(err), _) | (_, Err(err)) => {
            return fail(format!("opening logs in {}: {err}", job.dir.display()));
        }
    };
    let status = Command::new(bin)
        .args(&job.args)
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status();
    match status {
        Ok(status) => JobResult {
            index: job.index,
            exit_code: status.code(),
            spawn_error: None,
            wall: start.elapsed(),
        },
        Err(err) => fail(format!("starting {}: {err}", bin.display())),
    }
}

/// The cause of a failure as the process printed it: the last line starting with
/// `error` in its stderr log, else the last non-empty line.
pub fn error_line(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("stderr.log")).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error"))
        .or(lines.last())
        .map(|l| l.chars().take(400).collect())
}
