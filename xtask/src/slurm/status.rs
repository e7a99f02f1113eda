//! Submissions and their state: `jobs.json`, squeue / sacct / scontrol output, and
//! the per-point status table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::*;
use crate::records::{self, PointState, Status};
use crate::spec::SweepSpec;

/// One submission of a sweep's job array, as recorded in `jobs.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// The array's job id.
    pub job_id: String,
    /// The array ids submitted, as an `--array` list.
    pub array: String,
    /// Seconds since the Unix epoch.
    pub submitted_unix: u64,
    /// The point (folder name) of each array id submitted. Array ids are read through
    /// this, never against the current grid, which may have changed since. Empty in a
    /// `jobs.json` from before it was recorded: then the ids are places in the grid.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub points: BTreeMap<usize, String>,
}

impl Submission {
    /// `(array id, point)` of every task of this submission; `grid` (the current grid's
    /// point names) only serves a submission recorded without its points.
    pub fn tasks(&self, grid: &[String]) -> Vec<(usize, String)> {
        if !self.points.is_empty() {
            return self.points.iter().map(|(id, p)| (*id, p.clone())).collect();
        }
        parse_ranges(&self.array)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| grid.get(id).map(|p| (id, p.clone())))
            .collect()
    }
}

/// The points of the given live tasks (squeue), through the submissions that hold them.
pub fn points_of_tasks(
    submissions: &[Submission],
    grid: &[String],
    tasks: &[TaskState],
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in submissions {
        let by_id: BTreeMap<usize, String> = sub.tasks(grid).into_iter().collect();
        for t in tasks.iter().filter(|t| t.job_id == sub.job_id) {
            if let Some(p) = by_id.get(&t.task) {
                out.insert(p.clone());
            }
        }
    }
    out
}

/// The submissions recorded under `slurm_dir` (none when there is no `jobs.json`).
///
/// # Errors
/// An unreadable or invalid `jobs.json`.
pub fn read_submissions(slurm_dir: &Path) -> anyhow::Result<Vec<Submission>> {
    let path = slurm_dir.join(JOBS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// A Slurm array task's state, as squeue or sacct report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The array's job id.
    pub job_id: String,
    /// The array task id (the point's index).
    pub task: usize,
    /// Slurm's state (`PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`, `OUT_OF_MEMORY`, …).
    pub state: String,
    /// squeue's reason (pending tasks) or sacct's `exit:signal` code.
    pub detail: String,
}

/// Parses `squeue --array --noheader --format=%i|%T|%r` (or sacct's
/// `--parsable2 --noheader --format=JobID,State,ExitCode`): `123_4|RUNNING|None`,
/// `123_[5-7%2]|PENDING|JobArrayTaskLimit`, `123_6|CANCELLED by 0|0:15`. Lines of
/// other jobs, job steps (`123_4.batch`) and unparsable lines are skipped.
pub fn parse_task_lines(text: &str) -> Vec<TaskState> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut fields = line.trim().split('|');
        let (Some(id), Some(state)) = (fields.next(), fields.next()) else {
            continue;
        };
        let detail = fields.next().unwrap_or("").trim().to_string();
        let Some((job, tasks)) = id.trim().split_once('_') else {
            continue;
        };
        if tasks.contains('.') {
            continue;
        }
        let state = state.split_whitespace().next().unwrap_or("").to_string();
        if state.is_empty() {
            continue;
        }
        let Ok(ids) = parse_ranges(tasks) else {
            continue;
        };
        for task in ids {
            out.push(TaskState {
                job_id: job.to_string(),
                task,
                state: state.clone(),
                detail: detail.clone(),
            });
        }
    }
    out
}

/// Parses `scontrol --oneliner show job ID` (Slurm's memory of jobs, kept for
/// `MinJobAge` after they end, where sacct has no accounting database to read):
/// `JobId=13 ArrayJobId=12 ArrayTaskId=1 JobName=… JobState=CANCELLED Reason=None … ExitCode=0:15 …`.
pub fn parse_scontrol(text: &str) -> Vec<TaskState> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        let (Some(job), Some(tasks), Some(state)) = (
            fields.get("ArrayJobId"),
            fields.get("ArrayTaskId"),
            fields.get("JobState"),
        ) else {
            continue;
        };
        let detail = if *state == "PENDING" {
            fields.get("Reason").copied().unwrap_or("")
        } else {
            fields.get("ExitCode").copied().unwrap_or("")
        };
        for task in parse_ranges(tasks).unwrap_or_default() {
            out.push(TaskState {
                job_id: (*job).to_string(),
                task,
                state: (*state).to_string(),
                detail: detail.to_string(),
            });
        }
    }
    out
}

/// Whether a Slurm state means the task is still in the queue or on a node.
pub(super) fn is_live(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SUSPENDED"
            | "STOPPED"
            | "SIGNALING"
            | "STAGE_OUT"
    )
}

/// A point's state for `--status`: its records and what Slurm says of its last task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// The point's folder name.
    pub point: String,
    /// `finished`, `diverged`, `running`, `pending`, `interrupted`, `failed`, `not run`
    /// (a sweep never submitted to Slurm) or `not submitted`.
    pub state: String,
    /// The point's last array task and its Slurm state (`12_3 RUNNING`,
    /// `12_3 OUT_OF_MEMORY exit 0:125`), empty when never submitted.
    pub slurm: String,
    /// Why it failed, or squeue's reason for waiting.
    pub note: String,
}

/// Combines the records of every point with the last Slurm task that ran it.
/// `queue` comes from squeue (live tasks), `acct` from sacct (all tasks it knows);
/// squeue wins where both speak of a task.
pub fn status_rows(
    states: &[PointState],
    submissions: &[Submission],
    queue: &[TaskState],
    acct: &[TaskState],
) -> Vec<StatusRow> {
    // The last task of each point, by name: (job id, array id).
    let grid: Vec<String> = states.iter().map(|s| s.point.name.clone()).collect();
    let mut last_task: BTreeMap<String, (&str, usize)> = BTreeMap::new();
    for sub in submissions {
        for (id, point) in sub.tasks(&grid) {
            last_task.insert(point, (sub.job_id.as_str(), id));
        }
    }
    let find = |list: &[TaskState], job: &str, i: usize| {
        list.iter()
            .rev()
            .find(|t| t.job_id == job && t.task == i)
            .cloned()
    };
    // A sweep never submitted to Slurm is one run here: its words are the local ones.
    let local = submissions.is_empty();
    states
        .iter()
        .map(|s| {
            let job = last_task.get(&s.point.name).copied();
            let live = job.and_then(|(j, i)| find(queue, j, i));
            let ended = job.and_then(|(j, i)| find(acct, j, i));
            let task = live.clone().or_else(|| ended.clone());
            let slurm = match (&task, job) {
                (Some(t), _) if t.state == "PENDING" || live.is_some() => {
                    format!("{}_{} {}", t.job_id, t.task, t.state)
                }
                (Some(t), _) => format!("{}_{} {} exit {}", t.job_id, t.task, t.state, t.detail),
                (None, Some((j, i))) => format!("{j}_{i}"),
                (None, None) => String::new(),
            };
            let (state, note) = if s.status.is_done() {
                (s.status.as_str().to_string(), String::new())
            } else if let Some(t) = live.as_ref().filter(|t| is_live(&t.state)) {
                let state = if t.state == "PENDING" || t.state.starts_with("REQUEUE") {
                    "pending"
                } else {
                    "running"
                };
                let note = if t.state == "PENDING" && t.detail != "None" {
                    t.detail.clone()
                } else {
                    String::new()
                };
                (state.to_string(), note)
            } else if let Some(t) = ended.as_ref().filter(|t| is_live(&t.state)) {
                // sacct still lists it as queued or running (squeue unavailable).
                let state = if t.state == "PENDING" {
                    "pending"
                } else {
                    "running"
                };
                (state.to_string(), String::new())
            } else {
                let why = s.message.clone().unwrap_or_default();
                match (s.status, &ended) {
                    (Status::Interrupted, _) => (
                        "interrupted".to_string(),
                        if local {
                            "checkpointed; resumes when the sweep runs again"
                        } else {
                            "checkpointed; resumes when resubmitted"
                        }
                        .to_string(),
                    ),
                    (Status::Failed, _) => ("failed".to_string(), why),
                    (_, Some(t)) if t.state == "COMPLETED" => (
                        "failed".to_string(),
                        "the task ended without a result".to_string(),
                    ),
                    (_, Some(t)) => (
                        "failed".to_string(),
                        format!("Slurm {} (exit {})", t.state, t.detail),
                    ),
                    (_, None) if job.is_some() => (
                        "pending".to_string(),
                        "submitted; Slurm has no record of it (yet)".to_string(),
                    ),
                    (_, None) if local => ("not run".to_string(), String::new()),
                    (_, None) => ("not submitted".to_string(), String::new()),
                }
            };
            StatusRow {
                point: s.point.name.clone(),
                state,
                slurm,
                note,
            }
        })
        .collect()
}

/// Runs a Slurm command and returns its stdout.
pub(super) fn slurm_command(program: &str, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is Slurm installed and on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The live tasks of the given jobs (squeue).
pub(super) fn query_queue(job_ids: &[String]) -> anyhow::Result<Vec<TaskState>> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Listing the user's jobs rather than asking for these ids: squeue fails on ids it
    // no longer knows.
    let text = slurm_command(
        "squeue",
        &[
            "--me".into(),
            "--array".into(),
            "--noheader".into(),
            "--format=%i|%T|%r".into(),
        ],
    )?;
    let ids: BTreeSet<&String> = job_ids.iter().collect();
    Ok(parse_task_lines(&text)
        .into_iter()
        .filter(|t| ids.contains(&t.job_id))
        .collect())
}

/// Every task of the given jobs that Slurm's accounting knows (sacct).
pub(super) fn query_acct(job_ids: &[String]) -> anyhow::Result<Vec<TaskState>> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let text = slurm_command(
        "sacct",
        &[
            "--noheader".into(),
            "--parsable2".into(),
            "--allocations".into(),
            format!("--jobs={}", job_ids.join(",")),
            "--format=JobID,State,ExitCode".into(),
        ],
    )?;
    Ok(parse_task_lines(&text))
}

/// The tasks of the given jobs that Slurm still remembers (scontrol).
pub(super) fn query_scontrol(job_ids: &[String]) -> Vec<TaskState> {
    let mut out = Vec::new();
    for id in job_ids {
        // A job Slurm has forgotten is an error here; it has nothing to add then.
        if let Ok(text) = slurm_command(
            "scontrol",
            &["--oneliner".into(), "show".into(), "job".into(), id.clone()],
        ) {
            out.extend(parse_scontrol(&text));
        }
    }
    out
}

/// Prints every point's state: its records, and for a sweep submitted to Slurm, squeue's
/// and sacct's word on its last task.
///
/// # Errors
/// A bad grid or an unreadable `jobs.json`. A Slurm that does not answer is a note.
pub fn print_status(spec: &SweepSpec, root: &Path) -> anyhow::Result<Vec<StatusRow>> {
    let states = records::read_sweep(spec, root)?;
    let submissions = read_submissions(&root.join("slurm"))?;
    let job_ids: Vec<String> = submissions.iter().map(|s| s.job_id.clone()).collect();
    let mut notes = Vec::new();
    let queue = query_queue(&job_ids).unwrap_or_else(|err| {
        notes.push(format!("{err:#}"));
        Vec::new()
    });
    let acct = query_acct(&job_ids).unwrap_or_else(|err| {
        notes.push(format!(
            "{err:#}; the states of ended tasks come from scontrol, which forgets them MinJobAge after they end"
        ));
        query_scontrol(&job_ids)
    });
    let rows = status_rows(&states, &submissions, &queue, &acct);
    print!("{}", format_status(&spec.name, root, &submissions, &rows));
    for n in notes {
        println!("note: {n}");
    }
    Ok(rows)
}

/// The `--status` table and its summary line.
pub fn format_status(
    name: &str,
    root: &Path,
    submissions: &[Submission],
    rows: &[StatusRow],
) -> String {
    let mut s = String::new();
    let jobs: Vec<&str> = submissions.iter().map(|s| s.job_id.as_str()).collect();
    let _ = writeln!(
        s,
        "sweep `{name}` in {}{}",
        root.display(),
        if jobs.is_empty() {
            String::new()
        } else {
            format!(" (Slurm jobs {})", jobs.join(", "))
        }
    );
    let w = rows.iter().map(|r| r.point.len()).max().unwrap_or(5).max(5);
    let ws = rows.iter().map(|r| r.slurm.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(s, "{:w$}  {:13}  {:ws$}  note", "point", "state", "slurm");
    for r in rows {
        let line = format!(
            "{:w$}  {:13}  {:ws$}  {}",
            r.point, r.state, r.slurm, r.note
        );
        let _ = writeln!(s, "{}", line.trim_end());
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *counts.entry(r.state.as_str()).or_default() += 1;
    }
    let order = [
        "finished",
        "diverged",
        "running",
        "pending",
        "interrupted",
        "failed",
        "not run",
        "not submitted",
    ];
    let parts: Vec<String> = order
        .iter()
        .filter_map(|k| counts.get(k).map(|n| format!("{n} {k}")))
        .collect();
    let _ = writeln!(s, "{} points: {}", rows.len(), parts.join(", "));
    let open = rows
        .iter()
        .filter(|r| {
            matches!(
                r.state.as_str(),
                "interrupted" | "failed" | "not run" | "not submitted"
            )
        })
        .count();
    if open > 0 && jobs.is_empty() {
        let _ = writeln!(
            s,
            "{open} point(s) without a result: run them with `cargo xtask sweep CONFIG` (or submit them with --slurm)"
        );
    } else if open > 0 {
        let _ = writeln!(
            s,
            "{open} point(s) without a result and not queued: submit them with `cargo xtask sweep CONFIG --slurm`"
        );
    }
    s
}
