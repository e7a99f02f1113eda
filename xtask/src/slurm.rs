//! `cargo xtask sweep CONFIG --slurm` and `--status`: a sweep as one Slurm job array.
//!
//! `runs/<sweep>/slurm/` holds the job script (`sweep.sbatch`, array task i runs the point
//! of line i of `index.tsv`; the deepest points have the lowest ids, so they start first),
//! the submitted jobs with the point of each of their array ids (`jobs.json`), the
//! settings of the last submission (`settings.json`), the copies of `tau-resnet` the tasks
//! run (`bin/`, one per binary content, never overwritten) and Slurm's own logs (`logs/`).
//! Each task runs `tau-resnet` into the same point folder a local sweep uses, so
//! `cargo xtask report` and a later local run read the same records.
//!
//! Nothing finished runs twice: a task whose point already holds a result exits at once,
//! and a resubmission submits only points without a result that are not queued. A task
//! warned of its time limit (`--signal=B:USR1@…`) has `tau-resnet` checkpoint (SIGTERM)
//! and requeues itself; preemption and `scancel` send SIGTERM, which checkpoints too; a
//! task killed before its first checkpoint starts over (`tau-resnet train --resume`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::records::{self, PointState, write_atomic};
use crate::spec::{Point, SweepSpec};

mod script;
mod settings;
mod status;

pub use script::*;
pub use settings::*;
pub use status::*;

/// The job script under `runs/<sweep>/slurm/`.
pub const SCRIPT_FILE: &str = "sweep.sbatch";
/// The index of array ids to points under `runs/<sweep>/slurm/`.
pub const INDEX_FILE: &str = "index.tsv";
/// The submitted jobs under `runs/<sweep>/slurm/`.
pub const JOBS_FILE: &str = "jobs.json";
/// The settings of the last submission under `runs/<sweep>/slurm/`.
pub const SETTINGS_FILE: &str = "settings.json";
/// The folder of the binaries the tasks run, under `runs/<sweep>/slurm/`.
pub const BIN_DIR: &str = "bin";
/// The largest `signal_before_s` sbatch takes (`--signal=…@time`, 0 to 65535).
pub const MAX_SIGNAL_BEFORE_S: u32 = 65535;
/// Seconds before the time limit at which a task is told to checkpoint, by default.
pub const DEFAULT_SIGNAL_BEFORE_S: u32 = 120;

/// What `submit` did.
#[derive(Debug)]
pub struct Submitted {
    /// The job id, or `None` when nothing was submitted (dry run, nothing to run).
    pub job_id: Option<String>,
    /// The array ids submitted (or that would be).
    pub ids: Vec<usize>,
    /// The copy of `tau-resnet` the tasks run.
    pub bin: PathBuf,
}

/// Copies `bin` to `slurm_dir/bin/tau-resnet-<hash of its content>`, unless a copy of
/// that content is there already, and returns the copy. A copy is never overwritten, so
/// the tasks of an earlier submission keep running the binary they were submitted with
/// whatever is rebuilt or copied later.
///
/// # Errors
/// I/O errors.
pub fn stage_binary(bin: &Path, slurm_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::hash::Hasher as _;
    let bytes = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    // SipHash with fixed keys: the same content gets the same name (a Rust release that
    // changed the hash would only make one more copy).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&bytes);
    let dir = slurm_dir.join(BIN_DIR);
    let copy = dir.join(format!(
        "tau-resnet-{:016x}{}",
        h.finish(),
        std::env::consts::EXE_SUFFIX
    ));
    if std::fs::metadata(&copy).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(copy);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".copy-{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let perms = std::fs::metadata(bin)
        .with_context(|| format!("reading {}", bin.display()))?
        .permissions();
    std::fs::set_permissions(&tmp, perms)
        .with_context(|| format!("setting the permissions of {}", tmp.display()))?;
    std::fs::rename(&tmp, &copy).with_context(|| format!("creating {}", copy.display()))?;
    Ok(copy)
}

/// Which points to submit: the array ids (places in `order`, the array order) of the
/// points that have no result (or all, with `force`) and are not `queued`; and how many
/// were left out for having a result and for being queued.
pub fn select_points(
    order: &[Point],
    states: &[PointState],
    queued: &BTreeSet<String>,
    force: bool,
) -> (Vec<usize>, usize, usize) {
    let mut ids = Vec::new();
    let (mut done, mut in_queue) = (0, 0);
    for (id, p) in order.iter().enumerate() {
        let has_result = states
            .iter()
            .find(|s| s.point.name == p.name)
            .is_some_and(|s| s.status.is_done());
        if queued.contains(&p.name) {
            in_queue += 1;
        } else if has_result && !force {
            done += 1;
        } else {
            ids.push(id);
        }
    }
    (ids, done, in_queue)
}

/// Writes `root/slurm/` for the sweep (the script runs a copy of `bin` under
/// `slurm/bin/`) and submits the points that have no result and are not queued as one
/// job array (without `dry_run`); then records the submission in `jobs.json` and its
/// settings in `settings.json`.
///
/// # Errors
/// Invalid settings, I/O errors, squeue or sbatch failing.
pub fn submit(
    spec: &SweepSpec,
    settings: &SlurmSettings,
    root: &Path,
    bin: &Path,
    force: bool,
    dry_run: bool,
) -> anyhow::Result<Submitted> {
    let grid = spec.points()?;
    let grid_names: Vec<String> = grid.iter().map(|p| p.name.clone()).collect();
    let order = array_order(&grid);
    let slurm_dir = root.join("slurm");
    let states = records::read_sweep(spec, root)?;
    let submissions = read_submissions(&slurm_dir)?;
    let queued = queued_points(&submissions, &grid_names, dry_run)?;
    let (ids, done, in_queue) = select_points(&order, &states, &queued, force);
    let staged = stage_binary(bin, &slurm_dir)?;
    let script = job_script(spec, settings, root, &staged, &order)?;
    crate::sweep::write_sweep_files(spec, root)?;
    write_atomic(&slurm_dir.join(SCRIPT_FILE), script.as_bytes())?;
    write_atomic(
        &slurm_dir.join(INDEX_FILE),
        index_tsv(spec, &order).as_bytes(),
    )?;
    let logs = slurm_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    // A dry run moves nothing aside; a real submission puts back what it moved if sbatch
    // fails (the tasks must not find the old results, so the move comes first).
    let mut moved = Vec::new();
    for &i in &ids {
        let dir = root.join(&order[i].name);
        if let Some(aside) = crate::sweep::prepare_point(spec, &order[i], &dir, force && !dry_run)?
        {
            moved.push((dir, aside));
        }
    }
    let put_back = |moved: &[(PathBuf, PathBuf)]| {
        for (dir, aside) in moved {
            let _ = std::fs::remove_dir_all(dir);
            if let Err(e) = std::fs::rename(aside, dir) {
                eprintln!(
                    "could not move {} back to {}: {e}",
                    aside.display(),
                    dir.display()
                );
            }
        }
    };
    println!(
        "sweep `{}`: {} points ({done} with a result, {in_queue} queued or running), {} to submit",
        spec.name,
        order.len(),
        ids.len()
    );
    println!("wrote {}", slurm_dir.join(SCRIPT_FILE).display());
    println!("wrote {}", slurm_dir.join(INDEX_FILE).display());
    println!(
        "tasks run {} (a copy of {}, kept as is for queued tasks)",
        staged.display(),
        bin.display()
    );
    if ids.is_empty() {
        println!("nothing to submit");
        return Ok(Submitted {
            job_id: None,
            ids,
            bin: staged,
        });
    }
    let mut array = array_ranges(&ids);
    let submitted_array = array.clone();
    if let Some(n) = settings.throttle {
        let _ = write!(array, "%{n}");
    }
    let args = vec![
        "--parsable".to_string(),
        format!("--array={array}"),
        slurm_dir.join(SCRIPT_FILE).display().to_string(),
    ];
    println!("sbatch {}", args.join(" "));
    if dry_run {
        println!("dry run: not submitted");
        return Ok(Submitted {
            job_id: None,
            ids,
            bin: staged,
        });
    }
    let out = match slurm_command("sbatch", &args) {
        Ok(out) => out,
        Err(e) => {
            put_back(&moved);
            return Err(e.context("submitting the job array"));
        }
    };
    // --parsable prints `jobid` or `jobid;cluster`.
    let job_id = out
        .trim()
        .split(';')
        .next()
        .filter(|j| !j.is_empty() && j.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("sbatch printed `{}`, not a job id", out.trim()))?
        .to_string();
    let mut all = submissions;
    all.push(Submission {
        job_id: job_id.clone(),
        array: submitted_array,
        submitted_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        points: ids.iter().map(|&i| (i, order[i].name.clone())).collect(),
    });
    write_atomic(
        &slurm_dir.join(JOBS_FILE),
        serde_json::to_string_pretty(&all)?.as_bytes(),
    )?;
    let stored = StoredSettings {
        settings: settings.clone(),
        config: spec.slurm.clone(),
    };
    write_atomic(
        &slurm_dir.join(SETTINGS_FILE),
        serde_json::to_string_pretty(&stored)?.as_bytes(),
    )?;
    Ok(Submitted {
        job_id: Some(job_id),
        ids,
        bin: staged,
    })
}

/// The points of earlier submissions that Slurm still has queued or running (none known
/// in a dry run where squeue fails).
fn queued_points(
    submissions: &[Submission],
    grid_names: &[String],
    dry_run: bool,
) -> anyhow::Result<BTreeSet<String>> {
    let job_ids: Vec<String> = submissions.iter().map(|s| s.job_id.clone()).collect();
    Ok(if job_ids.is_empty() {
        BTreeSet::new()
    } else {
        match query_queue(&job_ids) {
            Ok(tasks) => {
                let live: Vec<TaskState> =
                    tasks.into_iter().filter(|t| is_live(&t.state)).collect();
                points_of_tasks(submissions, grid_names, &live)
            }
            Err(err) if dry_run => {
                eprintln!("note: cannot tell which points are queued: {err:#}");
                BTreeSet::new()
            }
            Err(err) => {
                return Err(err).context(
                    "asking squeue which points of the earlier submissions are still queued",
                );
            }
        }
    })
}

#[cfg(all(test, unix))]
mod tests;
