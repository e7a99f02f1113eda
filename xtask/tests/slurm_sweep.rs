//! End to end against a real Slurm: `cargo xtask sweep --slurm` of a small training sweep,
//! one array task cancelled (`scancel`) mid-run, `--status`, a resubmission that runs only
//! that point (resumed from its checkpoint), and `cargo xtask report`, whose results.csv
//! must equal a local run's of the same sweep byte for byte (less the timing columns).
//!
//! Runs when `sbatch` is on PATH and a cluster answers `sinfo` (scripts/slurm-local-cluster.sh
//! starts one on this machine); otherwise it says why and skips. The sweep folders go to a
//! temporary folder, or under `TAU_SLURM_TEST_DIR` (a folder the compute nodes share).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn tau_resnet() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TAU_RESNET_BIN") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let exe = format!("tau-resnet{}", std::env::consts::EXE_SUFFIX);
    ["release", "debug"]
        .iter()
        .map(|p| target.join(p).join(&exe))
        .find(|p| p.is_file())
}

/// Why Slurm cannot be used here, or `None` when it can.
fn no_slurm() -> Option<String> {
    match Command::new("sbatch").arg("--version").output() {
        Err(_) => return Some("no Slurm (sbatch not found)".into()),
        Ok(o) if !o.status.success() => {
            let err = String::from_utf8_lossy(&o.stderr);
            return Some(format!(
                "no Slurm cluster configured (sbatch --version: {})",
                err.lines().last().unwrap_or("failed").trim()
            ));
        }
        Ok(_) => {}
    }
    match Command::new("sinfo")
        .args(["--noheader", "-o", "%T"])
        .output()
    {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => None,
        Ok(o) => Some(format!(
            "no Slurm cluster answers (sinfo: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(err) => Some(format!("no Slurm cluster answers (sinfo: {err})")),
    }
}

/// Runs a command, echoes it and its output (the transcript of the test), and returns
/// its stdout; panics with its stderr when it fails.
fn run(cmd: &mut Command) -> String {
    let shown = format!(
        "$ {} {}",
        Path::new(cmd.get_program())
            .file_name()
            .unwrap_or_default()
            .to_string_lossy(),
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = cmd.output().expect("the command starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{shown}\n{stdout}{stderr}");
    assert!(out.status.success(), "{shown} failed: {}", out.status);
    stdout
}

fn xtask() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
}

/// The array tasks of `job` that squeue still lists.
fn queued(job: &str) -> Vec<String> {
    let out = Command::new("squeue")
        .args(["--me", "--array", "--noheader", "--format=%i %T"])
        .output()
        .expect("squeue runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("{job}_")))
        .map(str::to_string)
        .collect()
}

fn wait_for_job(job: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let q = queued(job);
        if q.is_empty() {
            return;
        }
        assert!(start.elapsed() < limit, "job {job} still queued: {q:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn last_job(root: &Path) -> String {
    let text = std::fs::read_to_string(root.join("slurm/jobs.json")).expect("jobs.json");
    let jobs: serde_json::Value = serde_json::from_str(&text).expect("json");
    jobs.as_array()
        .and_then(|a| a.last())
        .and_then(|j| j["job_id"].as_str())
        .expect("a job id")
        .to_string()
}

/// results.csv without the columns that measure time (wall_s, examples_per_s).
fn csv_without_timing(path: &Path) -> String {
    let mut r = csv::Reader::from_path(path).expect("results.csv");
    let header = r.headers().expect("header").clone();
    let keep: Vec<usize> = (0..header.len())
        .filter(|&i| !header[i].ends_with("wall_s") && !header[i].ends_with("examples_per_s"))
        .collect();
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(keep.iter().map(|&i| &header[i])).unwrap();
    for row in r.records() {
        let row = row.expect("row");
        w.write_record(keep.iter().map(|&i| &row[i])).unwrap();
    }
    String::from_utf8(w.into_inner().unwrap()).unwrap()
}

#[test]
fn slurm_sweep_with_a_cancelled_task_matches_a_local_run() {
    if let Some(why) = no_slurm() {
        eprintln!("skipped: {why}");
        return;
    }
    let Some(bin) = tau_resnet() else {
        eprintln!(
            "skipped: no tau-resnet binary (set TAU_RESNET_BIN or build the tau-resnet package)"
        );
        return;
    };
    let start = Instant::now();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sweep-slurm-tiny.toml");
    let tmp = match std::env::var_os("TAU_SLURM_TEST_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let (local, cluster) = (tmp.path().join("local"), tmp.path().join("slurm"));
    let sweep = |runs: &Path| {
        let mut c = xtask();
        c.arg("sweep")
            .arg(&cfg)
            .arg("--bin")
            .arg(&bin)
            .arg("--no-build")
            .arg("--runs-dir")
            .arg(runs);
        c
    };
    let root = cluster.join("slurm-tiny");

    // The sweep as a job array.
    let out = run(sweep(&cluster).args(["--slurm", "--cpus-per-task", "1"]));
    assert!(out.contains("4 to submit"), "{out}");
    let job = last_job(&root);

    // Cancel one task between two of its checkpoints.
    let deadline = Instant::now() + Duration::from_secs(600);
    let cancelled = loop {
        assert!(Instant::now() < deadline, "no task reached a checkpoint");
        let index = std::fs::read_to_string(root.join("slurm/index.tsv")).expect("index");
        let running = index.lines().skip(1).find_map(|l| {
            let mut f = l.split('\t');
            let (id, point) = (f.next()?, f.next()?);
            let dir = root.join(point);
            (dir.join("checkpoints/last").exists() && !dir.join("summary.json").exists())
                .then(|| (id.to_string(), point.to_string()))
        });
        if let Some(found) = running {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    run(Command::new("scancel").arg(format!("{job}_{}", cancelled.0)));
    wait_for_job(&job, Duration::from_secs(900));

    let status = run(sweep(&cluster).arg("--status"));
    let row = |text: &str, point: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{point} ")))
            .unwrap_or_else(|| panic!("no row for {point}:\n{text}"))
            .to_string()
    };
    let cancelled_row = row(&status, &cancelled.1);
    assert!(cancelled_row.contains("interrupted"), "{status}");
    assert!(status.contains("1 interrupted"), "{status}");

    // Resubmitting runs only the cancelled point, which resumes from its checkpoint,
    // with the settings of the first submission although none is given now.
    let out = run(sweep(&cluster).arg("--slurm"));
    assert!(out.contains("1 to submit"), "{out}");
    assert!(
        out.contains("settings of the last submission reused") && out.contains("cpus_per_task = 1"),
        "{out}"
    );
    let script = std::fs::read_to_string(root.join("slurm/sweep.sbatch")).expect("script");
    assert!(script.contains("\n#SBATCH --cpus-per-task=1\n"), "{script}");
    assert!(out.contains(&format!("--array={} ", cancelled.0)), "{out}");
    let job2 = last_job(&root);
    assert_ne!(job, job2);
    wait_for_job(&job2, Duration::from_secs(900));
    let status = run(sweep(&cluster).arg("--status"));
    let counts = status
        .lines()
        .find(|l| l.starts_with("4 points: "))
        .unwrap_or_else(|| panic!("no summary line:\n{status}"));
    assert!(
        counts
            .trim_start_matches("4 points: ")
            .split(", ")
            .all(|c| c.ends_with(" finished") || c.ends_with(" diverged")),
        "{status}"
    );
    let log = std::fs::read_to_string(root.join(&cancelled.1).join("stdout.log")).expect("log");
    assert!(
        log.contains("interrupted after") && log.lines().count() == 2,
        "{log}"
    );
    // Nothing that finished ran twice; a third submission has nothing to do.
    for entry in std::fs::read_dir(&root).expect("sweep folder") {
        let dir = entry.expect("entry").path();
        if dir.join("point.json").exists() && !dir.ends_with(&cancelled.1) {
            let log = std::fs::read_to_string(dir.join("stdout.log")).expect("log");
            assert_eq!(log.lines().count(), 1, "{}: {log}", dir.display());
        }
    }
    let out = run(sweep(&cluster).arg("--slurm"));
    assert!(out.contains("nothing to submit"), "{out}");
    run(xtask().arg("report").arg(&root));

    // The same sweep run here, without Slurm.
    run(sweep(&local).args(["--jobs", "2"]));
    let a = csv_without_timing(&local.join("slurm-tiny/results.csv"));
    let b = csv_without_timing(&root.join("results.csv"));
    assert_eq!(
        a, b,
        "results.csv differs between the local and the Slurm run"
    );
    eprintln!("slurm sweep test: {:.0} s", start.elapsed().as_secs_f64());
}

/// `cargo xtask … | head`: a closed stdout ends xtask as it ends other tools (SIGPIPE),
/// not with a panic. Needs no Slurm: `--status` of a sweep never submitted.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_xtask_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().expect("temp dir");
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sweep-slurm-tiny.toml");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = xtask()
        .arg("sweep")
        .arg(&cfg)
        .arg("--status")
        .arg("--runs-dir")
        .arg(tmp.path())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "{:?}: {stderr}", out.status);
}
