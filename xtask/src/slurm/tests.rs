//! Tests of the Slurm job array: settings, script, index, squeue/scontrol/sacct parsing,
//! status, and the job script run under bash with stand-ins for tau-resnet and scontrol.

use super::*;
use crate::records::{FAILURE_RECORD, Status};
use crate::spec::RunCommand;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

const SWEEP: &str = r#"
name = "s"
command = "train"
[base]
seed = 0
[grid]
"model.depth" = [4, 8]
"model.tau" = ["1/sqrt(L)", "1"]
[slurm]
partition = "gpu"
time = "01:00:00"
gpus_per_task = "1"
throttle = 2
sbatch = ["--constraint=a100"]
setup = ["module load cuda"]
"#;

fn spec() -> SweepSpec {
    SweepSpec::from_str_in(SWEEP, Path::new(".")).unwrap()
}

#[test]
fn array_lists_round_trip() {
    assert_eq!(array_ranges(&[5, 0, 1, 2, 3, 7, 8, 3]), "0-3,5,7-8");
    assert_eq!(array_ranges(&[4]), "4");
    assert_eq!(array_ranges(&[]), "");
    assert_eq!(
        parse_ranges("0-3,5,7-8").unwrap(),
        vec![0, 1, 2, 3, 5, 7, 8]
    );
    assert_eq!(parse_ranges("[5-7%2]").unwrap(), vec![5, 6, 7]);
    assert!(parse_ranges("3-1").is_err());
    assert!(parse_ranges("a").is_err());
}

#[test]
fn config_table_and_command_line_combine() {
    let s = spec().slurm;
    assert_eq!(s.partition.as_deref(), Some("gpu"));
    let cli = SlurmArgs {
        time: Some("02:00:00".into()),
        cpus_per_task: Some(4),
        sbatch: vec!["--exclusive".into()],
        ..SlurmArgs::default()
    };
    let o = s.overridden_by(&cli);
    assert_eq!(
        o.sbatch_options().unwrap(),
        [
            "--partition=gpu",
            "--time=02:00:00",
            "--cpus-per-task=4",
            "--gpus-per-task=1",
            "--constraint=a100",
            "--exclusive"
        ]
    );
    assert_eq!(o.throttle, Some(2));
    let bad = |s: SlurmSettings, needle: &str| {
        let err = format!("{:#}", s.sbatch_options().unwrap_err());
        assert!(err.contains(needle), "{needle}: {err}");
    };
    bad(
        SlurmSettings {
            time: Some("1:00\n#SBATCH --x".into()),
            ..SlurmSettings::default()
        },
        "line breaks",
    );
    bad(
        SlurmSettings {
            sbatch: vec!["constraint=a100".into()],
            ..SlurmSettings::default()
        },
        "starts with `-`",
    );
    bad(
        SlurmSettings {
            throttle: Some(0),
            ..SlurmSettings::default()
        },
        "throttle",
    );
    let err = SweepSpec::from_str_in(
        "name = \"a\"\ncommand = \"train\"\n[grid]\nseed = [0]\n[slurm]\npartion = \"x\"\n",
        Path::new("."),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("partion"), "{err:#}");
}

#[test]
fn index_maps_array_ids_to_points_deepest_first() {
    let spec = spec();
    let idx = index_tsv(&spec, &array_order(&spec.points().unwrap()));
    assert_eq!(
        idx,
        "array_id\tpoint\tmodel.depth\tmodel.tau\n\
         0\tdepth-8_tau-1_sqrt_L\t8\t1/sqrt(L)\n\
         1\tdepth-8_tau-1\t8\t1\n\
         2\tdepth-4_tau-1_sqrt_L\t4\t1/sqrt(L)\n\
         3\tdepth-4_tau-1\t4\t1\n"
    );
    // Equal depths keep their grid order.
    let text = "name = \"d\"\ncommand = \"train\"\n[grid]\nseed = [0, 1]\n\"model.depth\" = [20, 1202, 56]\n";
    let spec = SweepSpec::from_str_in(text, Path::new(".")).unwrap();
    let names: Vec<String> = array_order(&spec.points().unwrap())
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(
        names,
        [
            "depth-1202_seed-0",
            "depth-1202_seed-1",
            "depth-56_seed-0",
            "depth-56_seed-1",
            "depth-20_seed-0",
            "depth-20_seed-1"
        ]
    );
}

#[test]
fn extra_task_counts_and_out_of_range_signal_times_are_handled() {
    let with = |sbatch: &[&str]| SlurmSettings {
        sbatch: sbatch.iter().map(|s| (*s).to_string()).collect(),
        ..SlurmSettings::default()
    };
    // The script sets --ntasks=1 itself: an extra one is dropped, another count refused.
    assert_eq!(
        with(&[
            "--ntasks=1",
            "-n 1",
            "#SBATCH --ntasks 1",
            "--ntasks-per-node=1"
        ])
        .sbatch_options()
        .unwrap(),
        ["--ntasks-per-node=1"]
    );
    for bad in ["--ntasks=2", "-n4", "--ntasks 8"] {
        let err = format!("{:#}", with(&[bad]).sbatch_options().unwrap_err());
        assert!(err.contains("--ntasks=1"), "{bad}: {err}");
    }
    // Options the script sets for the sweep to work are refused, naming the option.
    for (bad, option) in [
        ("--no-requeue", "--no-requeue"),
        ("#SBATCH --output=/tmp/x.out", "--output"),
        ("-o /tmp/x.out", "--output (-o)"),
        ("-e/tmp/x.err", "--error (-e)"),
        ("--array 0-3", "--array"),
        ("--signal=USR1@60", "--signal"),
        ("--open-mode=truncate", "--open-mode"),
    ] {
        let err = format!("{:#}", with(&[bad]).sbatch_options().unwrap_err());
        assert!(
            err.contains(&format!("the job script sets {option} itself")),
            "{bad}: {err}"
        );
    }
    // Others pass as given.
    let fine = [
        "--constraint=a100",
        "--exclusive",
        "-J name",
        "--mail-type=END",
    ];
    assert_eq!(with(&fine).sbatch_options().unwrap(), fine);
    let signal = |s: u32| SlurmSettings {
        signal_before_s: Some(s),
        ..SlurmSettings::default()
    };
    signal(0).sbatch_options().unwrap();
    signal(65535).sbatch_options().unwrap();
    let err = format!("{:#}", signal(65536).sbatch_options().unwrap_err());
    assert!(err.contains("0 to 65535"), "{err}");
    // --time in one of Slurm's forms; no value with a space (one #SBATCH word).
    let time = |t: &str| SlurmSettings {
        time: Some(t.into()),
        ..SlurmSettings::default()
    };
    for good in [
        "90",
        "30:00",
        "04:00:00",
        "2-00",
        "2-12:30",
        "1-00:00:00",
        "UNLIMITED",
    ] {
        assert_eq!(
            time(good).sbatch_options().unwrap(),
            [format!("--time={good}")]
        );
    }
    for bad in ["abc", "4h", "1:2:3:4", "-5", "2-", ":30"] {
        let err = format!("{:#}", time(bad).sbatch_options().unwrap_err());
        assert!(err.contains("Slurm takes minutes"), "{bad}: {err}");
    }
    let spaced = SlurmSettings {
        partition: Some("gpu debug".into()),
        ..SlurmSettings::default()
    };
    let err = format!("{:#}", spaced.sbatch_options().unwrap_err());
    assert!(err.contains("without spaces"), "{err}");
}

fn cli(f: impl FnOnce(&mut SlurmArgs)) -> SlurmArgs {
    let mut a = SlurmArgs::default();
    f(&mut a);
    a
}

#[test]
fn a_later_submission_reuses_the_settings_of_the_last_one() {
    let table = SlurmSettings {
        time: Some("01:00:00".into()),
        setup: vec!["module load cuda".into()],
        ..SlurmSettings::default()
    };
    // The first submission: the table and its command line.
    let first = cli(|a| {
        a.partition = Some("gpu".into());
        a.gpus_per_task = Some("1".into());
        a.throttle = Some(4);
        a.sbatch = vec!["--constraint=a100".into()];
    });
    let (s1, reused) = effective_settings(&table, None, &first).unwrap();
    assert!(reused.is_empty());
    let stored = StoredSettings {
        settings: s1.clone(),
        config: table.clone(),
    };
    // A resubmission without options submits with the same settings, and says so.
    let (s2, reused) = effective_settings(&table, Some(&stored), &SlurmArgs::default()).unwrap();
    assert_eq!(s2, s1);
    assert_eq!(
        reused,
        [
            "gpus_per_task = \"1\"",
            "partition = \"gpu\"",
            "sbatch = [\"--constraint=a100\"]",
            "throttle = 4"
        ]
    );
    // Options on the command line replace what they name, field by field; a repeated
    // --sbatch does not pile up.
    let again = cli(|a| {
        a.throttle = Some(2);
        a.sbatch = vec!["--constraint=a100".into()];
    });
    let (s3, reused) = effective_settings(&table, Some(&stored), &again).unwrap();
    assert_eq!(s3.throttle, Some(2));
    assert_eq!(s3.sbatch, ["--constraint=a100"]);
    assert_eq!(s3.partition.as_deref(), Some("gpu"));
    assert_eq!(reused, ["gpus_per_task = \"1\"", "partition = \"gpu\""]);
    // A key changed in the [slurm] table since takes the table's value (removal too);
    // the unchanged ones keep the last submission's.
    let edited = SlurmSettings {
        time: Some("24:00:00".into()),
        setup: vec![],
        ..table.clone()
    };
    let (s4, _) = effective_settings(&edited, Some(&stored), &SlurmArgs::default()).unwrap();
    assert_eq!(s4.time.as_deref(), Some("24:00:00"));
    assert!(s4.setup.is_empty());
    assert_eq!(s4.gpus_per_task.as_deref(), Some("1"));
    // settings.json reads back.
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(read_stored_settings(tmp.path()).unwrap(), None);
    std::fs::write(
        tmp.path().join(SETTINGS_FILE),
        serde_json::to_string_pretty(&stored).unwrap(),
    )
    .unwrap();
    assert_eq!(read_stored_settings(tmp.path()).unwrap(), Some(stored));
}

#[test]
fn the_binary_is_copied_once_per_content_and_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("tau-resnet");
    std::fs::write(&bin, "#!/bin/sh\necho cpu\n").unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let slurm = tmp.path().join("slurm");
    let a = stage_binary(&bin, &slurm).unwrap();
    assert!(a.starts_with(slurm.join(BIN_DIR)), "{}", a.display());
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&bin).unwrap());
    assert_eq!(
        std::fs::metadata(&a).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        stage_binary(&bin, &slurm).unwrap(),
        a,
        "same content, same copy"
    );
    // A rebuild (here: a CPU binary replaced by a CUDA one) gets a copy of its own; the
    // copy queued tasks run stays as it was.
    std::fs::write(&bin, "#!/bin/sh\necho cuda\n").unwrap();
    let b = stage_binary(&bin, &slurm).unwrap();
    assert_ne!(a, b);
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        "#!/bin/sh\necho cpu\n"
    );
    assert_eq!(
        std::fs::read_to_string(&b).unwrap(),
        "#!/bin/sh\necho cuda\n"
    );
    assert_eq!(std::fs::read_dir(slurm.join(BIN_DIR)).unwrap().count(), 2);
}

#[test]
fn script_has_the_options_and_one_case_per_point() {
    let spec = spec();
    let points = array_order(&spec.points().unwrap());
    let script = job_script(
        &spec,
        &spec.slurm,
        Path::new("/r/s"),
        Path::new("/b/tau-resnet"),
        &points,
    )
    .unwrap();
    for line in [
        "#SBATCH --job-name=tau-s",
        "#SBATCH --output=/r/s/slurm/logs/%A_%a.out",
        "#SBATCH --requeue",
        "#SBATCH --ntasks=1",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --partition=gpu",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --constraint=a100",
        "module load cuda",
        "root='/r/s'",
        "bin='/b/tau-resnet'",
        "  0) point='depth-8_tau-1_sqrt_L'; sets=(--set 'model.depth=8' --set 'model.tau=\"1/sqrt(L)\"') ;;",
        "  3) point='depth-4_tau-1'; sets=(--set 'model.depth=4' --set 'model.tau=\"1\"') ;;",
        "  args=(train --resume \"$dir\")",
    ] {
        assert!(
            script.lines().any(|l| l == line),
            "no line {line:?} in\n{script}"
        );
    }
    // The throttle goes on the sbatch command line with the array list.
    assert!(!script.contains("#SBATCH --array"), "{script}");
    // --gpus-per-task needs an explicit task count: there is one even without settings.
    let bare = job_script(
        &spec,
        &SlurmSettings::default(),
        Path::new("/r/s"),
        Path::new("/b/tau-resnet"),
        &points,
    )
    .unwrap();
    assert_eq!(bare.matches("#SBATCH --ntasks=1\n").count(), 1, "{bare}");
    assert_eq!(sh_quote("it's"), r"'it'\''s'");
}

/// A stand-in for tau-resnet that the job script runs: it logs its arguments, fails on
/// depth 8 with an error line, diverges on τ = 1, and with `$HANG` set waits for
/// SIGTERM and exits 130 as tau-resnet does.
const FAKE: &str = r#"#!/bin/sh
echo "$*" >> "$LOG"
case "$*" in *depth=8*) echo 'error: config: bad "depth" \ here' >&2; exit 1;; esac
if [ -n "${HANG:-}" ]; then
  trap 'echo interrupted >> "$LOG"; exit 130' TERM
  touch "$HANG"
  while :; do sleep 0.05; done
fi
case "$*" in *--out*) out=$(echo "$*" | sed 's/.*--out //');; *) out=$(echo "$*" | sed 's/.*--resume //');; esac
mkdir -p "$out"; touch "$out/config.toml"
case "$*" in *'tau="1"'*) printf '{\n  "status": "diverged"\n}\n' > "$out/summary.json"; exit 3;; esac
exit 0
"#;

struct Harness {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    script: PathBuf,
    path_env: String,
    log: PathBuf,
}

fn harness() -> Harness {
    let tmp = tempfile::tempdir().unwrap();
    let exe = |name: &str, text: &str| {
        let p = tmp.path().join("bin").join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    let bin = exe("tau-resnet", FAKE);
    // scontrol stand-in: records the requeue request.
    exe("scontrol", "#!/bin/sh\necho \"scontrol $*\" >> \"$LOG\"\n");
    let root = tmp.path().join("runs/s");
    let spec = spec();
    let mut settings = spec.slurm.clone();
    settings.setup.clear();
    let script = job_script(&spec, &settings, &root, &bin, &spec.points().unwrap()).unwrap();
    let script_path = tmp.path().join("sweep.sbatch");
    std::fs::write(&script_path, script).unwrap();
    let path_env = format!(
        "{}:{}",
        tmp.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = tmp.path().join("log");
    Harness {
        root,
        script: script_path,
        path_env,
        log,
        _tmp: tmp,
    }
}

impl Harness {
    fn task(&self, i: usize) -> Command {
        let mut c = Command::new("bash");
        c.arg(&self.script)
            .env("SLURM_ARRAY_TASK_ID", i.to_string())
            .env("SLURM_ARRAY_JOB_ID", "77")
            .env("PATH", &self.path_env)
            .env("LOG", &self.log)
            .env_remove("HANG");
        c
    }
    fn run(&self, i: usize) -> i32 {
        let out = self.task(i).output().unwrap();
        out.status.code().unwrap_or(-1)
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

#[test]
fn script_starts_resumes_skips_and_records_failures() {
    let h = harness();
    let spec = spec();
    let points = spec.points().unwrap();
    // Fresh start with the point's settings, into the point's folder.
    assert_eq!(h.run(0), 0);
    let dir0 = h.root.join(&points[0].name);
    assert_eq!(
        h.log(),
        format!(
            "train --config {}/base.toml --set model.depth=4 --set model.tau=\"1/sqrt(L)\" --out {}\n",
            h.root.display(),
            dir0.display()
        )
    );
    // Its folder holds a config now: the next attempt resumes.
    assert_eq!(h.run(0), 0);
    assert!(
        h.log()
            .ends_with(&format!("train --resume {}\n", dir0.display()))
    );
    // Diverged is a result: exit 0, and a later task of the point runs nothing.
    assert_eq!(h.run(1), 0);
    let before = h.log();
    assert_eq!(h.run(1), 0);
    assert_eq!(h.log(), before, "a point with a result ran again");
    // A failure exits with tau-resnet's code and leaves the record a local sweep does.
    assert_eq!(h.run(2), 1);
    let state = records::read_point(RunCommand::Train, &points[2], &h.root.join(&points[2].name));
    assert_eq!(state.status, Status::Failed);
    assert_eq!(
        state.message.as_deref(),
        Some(r#"exit code 1: error: config: bad "depth" \ here"#)
    );
    // An id outside the sweep is refused.
    assert_eq!(h.run(9), 2);
}

#[test]
fn warning_signal_checkpoints_then_requeues_and_sigterm_does_not() {
    for (signal, requeued) in [("USR1", true), ("TERM", false)] {
        let h = harness();
        let ready = h.root.join("ready");
        let mut c = h.task(0);
        c.env("HANG", &ready);
        let mut child = c.spawn().unwrap();
        let start = std::time::Instant::now();
        while !ready.exists() {
            assert!(start.elapsed().as_secs() < 30, "the task did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // USR1 goes to the batch shell only (--signal=B:USR1); SIGTERM goes to
        // every process, as Slurm sends it.
        let pids = if signal == "TERM" {
            let out = Command::new("pgrep")
                .args(["-P", &child.id().to_string()])
                .output()
                .unwrap();
            let mut p: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            p.push(child.id().to_string());
            p
        } else {
            vec![child.id().to_string()]
        };
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .args(&pids)
            .status()
            .unwrap();
        assert!(status.success());
        let code = child.wait().unwrap().code();
        assert_eq!(code, Some(130), "{signal}");
        let log = h.log();
        assert_eq!(log.matches("interrupted").count(), 1, "{signal}: {log}");
        assert_eq!(
            log.contains("scontrol requeue 77_0"),
            requeued,
            "{signal}: {log}"
        );
    }
}

/// Recorded from a single-node Slurm 22.05: an array of 6 tasks with throttle 3,
/// task 0 exiting 0, task 1 exiting 7, task 2 cancelled.
const SQUEUE: &str = "3_5|PENDING|Resources\n3_4|RUNNING|None\n3_3|RUNNING|None\n";
const SCONTROL: &str = "JobId=3 ArrayJobId=3 ArrayTaskId=5 ArrayTaskThrottle=3 JobName=r.sh JobState=PENDING Reason=Resources Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00
JobId=6 ArrayJobId=3 ArrayTaskId=2 ArrayTaskThrottle=3 JobName=r.sh JobState=CANCELLED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:15 RunTime=00:00:01
JobId=5 ArrayJobId=3 ArrayTaskId=1 ArrayTaskThrottle=3 JobName=r.sh JobState=FAILED Reason=NonZeroExitCode Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=7:0 RunTime=00:00:00
JobId=4 ArrayJobId=3 ArrayTaskId=0 ArrayTaskThrottle=3 JobName=r.sh JobState=COMPLETED Reason=None Dependency=(null) Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode=0:0 RunTime=00:00:00
";
/// sacct's `--parsable2 --noheader --allocations --format=JobID,State,ExitCode`, in
/// the shape its manual gives (pending tasks collapsed, "CANCELLED by UID").
const SACCT: &str = "3_0|COMPLETED|0:0\n3_1|FAILED|7:0\n3_2|CANCELLED by 0|0:15\n3_3|OUT_OF_MEMORY|0:125\n3_1.batch|FAILED|7:0\n3_[4-5%3]|PENDING|0:0\n41|COMPLETED|0:0\n";

#[test]
fn squeue_scontrol_and_sacct_output_parse() {
    let q = parse_task_lines(SQUEUE);
    assert_eq!(q.len(), 3);
    assert_eq!(
        q[0],
        TaskState {
            job_id: "3".into(),
            task: 5,
            state: "PENDING".into(),
            detail: "Resources".into()
        }
    );
    let a = parse_task_lines(SACCT);
    let states: Vec<(usize, &str, &str)> = a
        .iter()
        .map(|t| (t.task, t.state.as_str(), t.detail.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            (0, "COMPLETED", "0:0"),
            (1, "FAILED", "7:0"),
            (2, "CANCELLED", "0:15"),
            (3, "OUT_OF_MEMORY", "0:125"),
            (4, "PENDING", "0:0"),
            (5, "PENDING", "0:0")
        ]
    );
    let s = parse_scontrol(SCONTROL);
    let states: Vec<(usize, &str, &str)> = s
        .iter()
        .map(|t| (t.task, t.state.as_str(), t.detail.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            (5, "PENDING", "Resources"),
            (2, "CANCELLED", "0:15"),
            (1, "FAILED", "7:0"),
            (0, "COMPLETED", "0:0")
        ]
    );
}

#[test]
fn status_combines_records_with_slurm() {
    let text = "name = \"s\"\ncommand = \"train\"\n[grid]\nseed = [0, 1, 2, 3, 4, 5, 6]\n";
    let spec = SweepSpec::from_str_in(text, Path::new(".")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let points = spec.points().unwrap();
    let write = |i: usize, name: &str, text: &str| {
        let d = tmp.path().join(&points[i].name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), text).unwrap();
    };
    // 0 finished; 1 failed (its record); 2 cancelled after a checkpoint; 3 killed for
    // memory without a word; 4 running; 5 waiting; 6 never submitted.
    let summary = |status: &str| {
        format!(
            "{{\"name\":\"t\",\"status\":\"{status}\",\"steps\":5,\"epochs_completed\":0,\"wall_s\":0.5,\"device\":\"cpu\",\"version\":{{\"crate_version\":\"0.1.0\",\"git_commit\":null}}}}"
        )
    };
    write(0, "summary.json", &summary("finished"));
    write(
        1,
        FAILURE_RECORD,
        "{\"exit_code\": 7, \"message\": \"exit code 7: error: boom\"}",
    );
    write(2, "summary.json", &summary("interrupted"));
    let states = records::read_sweep(&spec, tmp.path()).unwrap();
    let subs = [
        // Recorded without point names (a jobs.json from before they were): the ids
        // are places in the grid.
        Submission {
            job_id: "2".into(),
            array: "0-3".into(),
            submitted_unix: 0,
            points: BTreeMap::new(),
        },
        Submission {
            job_id: "3".into(),
            array: "0-5".into(),
            submitted_unix: 1,
            points: BTreeMap::new(),
        },
    ];
    let queue = parse_task_lines("3_5|PENDING|JobArrayTaskLimit\n3_4|RUNNING|None\n");
    let rows = status_rows(&states, &subs, &queue, &parse_task_lines(SACCT));
    let got: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|r| (r.state.as_str(), r.slurm.as_str(), r.note.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("finished", "3_0 COMPLETED exit 0:0", ""),
            ("failed", "3_1 FAILED exit 7:0", "exit code 7: error: boom"),
            (
                "interrupted",
                "3_2 CANCELLED exit 0:15",
                "checkpointed; resumes when resubmitted"
            ),
            (
                "failed",
                "3_3 OUT_OF_MEMORY exit 0:125",
                "Slurm OUT_OF_MEMORY (exit 0:125)"
            ),
            ("running", "3_4 RUNNING", ""),
            ("pending", "3_5 PENDING", "JobArrayTaskLimit"),
            ("not submitted", "", ""),
        ]
    );
    let table = format_status("s", tmp.path(), &subs, &rows);
    assert!(
        table.contains(
            "7 points: 1 finished, 1 running, 1 pending, 1 interrupted, 2 failed, 1 not submitted"
        ),
        "{table}"
    );
    assert!(
        table.contains("4 point(s) without a result and not queued"),
        "{table}"
    );
    // The same records of a sweep never submitted to Slurm: local words.
    let rows = status_rows(&states, &[], &[], &[]);
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.state.as_str(), r.note.as_str()))
        .collect();
    assert_eq!(
        got[2],
        (
            "interrupted",
            "checkpointed; resumes when the sweep runs again"
        )
    );
    assert_eq!(got[6], ("not run", ""));
    let table = format_status("s", tmp.path(), &[], &rows);
    assert!(
        table.contains("1 interrupted, 1 failed, 4 not run"),
        "{table}"
    );
    assert!(
        table.contains("run them with `cargo xtask sweep CONFIG` (or submit them with --slurm)"),
        "{table}"
    );
}

#[test]
fn dry_run_writes_the_slurm_folder_and_leaves_finished_points_out() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec();
    let root = tmp.path().join("s");
    let points = spec.points().unwrap();
    let done = root.join(&points[1].name);
    std::fs::create_dir_all(&done).unwrap();
    std::fs::write(
        done.join("summary.json"),
        "{\"name\":\"t\",\"status\":\"diverged\",\"steps\":5,\"epochs_completed\":0,\"wall_s\":0.5,\"device\":\"cpu\",\"version\":{\"crate_version\":\"0.1.0\",\"git_commit\":null}}",
    )
    .unwrap();
    let bin = tmp.path().join("tau-resnet");
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    let sub = submit(&spec, &spec.slurm, &root, &bin, false, true).unwrap();
    assert_eq!(sub.job_id, None);
    // Array order: depth 8 (ids 0, 1), then depth 4; the diverged depth-4 τ = 1 is id 3.
    assert_eq!(sub.ids, [0, 1, 2]);
    for f in [SCRIPT_FILE, INDEX_FILE] {
        assert!(root.join("slurm").join(f).is_file(), "{f}");
    }
    let index = std::fs::read_to_string(root.join("slurm").join(INDEX_FILE)).unwrap();
    assert!(
        index
            .lines()
            .nth(4)
            .unwrap()
            .starts_with(&format!("3\t{}\t", points[1].name)),
        "{index}"
    );
    // The script runs the copy under slurm/bin/, not the binary given.
    assert!(sub.bin.starts_with(root.join("slurm").join(BIN_DIR)));
    let script = std::fs::read_to_string(root.join("slurm").join(SCRIPT_FILE)).unwrap();
    assert!(
        script.contains(&format!("bin={}\n", sh_quote(sub.bin.to_str().unwrap()))),
        "{script}"
    );
    assert!(!root.join("slurm").join(SETTINGS_FILE).exists());
    assert!(root.join("slurm/logs").is_dir());
    assert!(!root.join("slurm").join(JOBS_FILE).exists());
    assert!(root.join("base.toml").is_file() && root.join("sweep.toml").is_file());
    assert!(root.join(&points[0].name).join("point.json").is_file());
    // The stored config keeps [slurm] and reads back.
    let stored = crate::report::load_stored_spec(&root).unwrap();
    assert_eq!(stored.slurm, spec.slurm);
    // A dry run with --force moves no result aside.
    let sub = submit(&spec, &spec.slurm, &root, &bin, true, true).unwrap();
    assert_eq!(sub.ids, [0, 1, 2, 3]);
    assert!(done.join("summary.json").is_file());
    assert!(!root.join(".replaced").exists());
}

/// With --force, a submission that sbatch refuses (here: no sbatch at all) puts the
/// results it moved aside back where they were.
#[test]
fn a_failed_submission_puts_back_what_force_moved() {
    if std::process::Command::new("sbatch")
        .arg("--version")
        .output()
        .is_ok()
    {
        eprintln!("skipped: sbatch is on PATH (this test needs it absent)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec();
    let root = tmp.path().join("s");
    let points = spec.points().unwrap();
    let done = root.join(&points[1].name);
    std::fs::create_dir_all(&done).unwrap();
    std::fs::write(done.join("summary.json"), "{}").unwrap();
    let bin = tmp.path().join("tau-resnet");
    std::fs::write(&bin, "#!/bin/sh\n").unwrap();
    let err = submit(&spec, &spec.slurm, &root, &bin, true, false).unwrap_err();
    assert!(
        format!("{err:#}").contains("submitting the job array"),
        "{err:#}"
    );
    assert_eq!(
        std::fs::read_to_string(done.join("summary.json")).unwrap(),
        "{}"
    );
    let replaced = root.join(".replaced");
    assert!(!replaced.exists() || std::fs::read_dir(&replaced).unwrap().next().is_none());
}

#[test]
fn a_changed_grid_reads_earlier_tasks_by_point_name() {
    // Submitted from a grid of depths 4 and 8 (ids 0-3, depth 8 first)...
    let old = spec();
    let old_order = array_order(&old.points().unwrap());
    let sub = Submission {
        job_id: "5".into(),
        array: "0-3".into(),
        submitted_unix: 0,
        points: old_order
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.name.clone()))
            .collect(),
    };
    // ...then the grid grew by depth 16 while task 0 (depth-8 τ = 1/√L) runs and task 3
    // (depth-4 τ = 1) waits: in the new array order ids 0 and 3 are other points.
    let new =
        SweepSpec::from_str_in(&SWEEP.replace("[4, 8]", "[4, 8, 16]"), Path::new(".")).unwrap();
    let grid = new.points().unwrap();
    let order = array_order(&grid);
    assert_eq!(order[0].name, "depth-16_tau-1_sqrt_L");
    let names: Vec<String> = grid.iter().map(|p| p.name.clone()).collect();
    let queue = parse_task_lines("5_0|RUNNING|None\n5_3|PENDING|Priority\n");
    let queued = points_of_tasks(std::slice::from_ref(&sub), &names, &queue);
    assert_eq!(
        queued,
        BTreeSet::from([
            "depth-8_tau-1_sqrt_L".to_string(),
            "depth-4_tau-1".to_string()
        ])
    );
    let tmp = tempfile::tempdir().unwrap();
    let states = records::read_sweep(&new, tmp.path()).unwrap();
    let (ids, done, in_queue) = select_points(&order, &states, &queued, false);
    let to_submit: Vec<&str> = ids.iter().map(|&i| order[i].name.as_str()).collect();
    assert_eq!(
        to_submit,
        [
            "depth-16_tau-1_sqrt_L",
            "depth-16_tau-1",
            "depth-8_tau-1",
            "depth-4_tau-1_sqrt_L"
        ]
    );
    assert_eq!((done, in_queue), (0, 2));
    // --status shows each point's own task.
    let rows = status_rows(&states, &[sub], &queue, &[]);
    let row = |p: &str| {
        let r = rows.iter().find(|r| r.point == p).unwrap();
        (r.state.as_str(), r.slurm.as_str())
    };
    assert_eq!(row("depth-8_tau-1_sqrt_L"), ("running", "5_0 RUNNING"));
    assert_eq!(row("depth-4_tau-1"), ("pending", "5_3 PENDING"));
    assert_eq!(row("depth-16_tau-1_sqrt_L"), ("not submitted", ""));
    assert_eq!(row("depth-8_tau-1").0, "pending");
    assert_eq!(row("depth-8_tau-1").1, "5_1");
}
