//! The sweep runner against a stand-in tau-resnet script.

use super::*;
use crate::spec::RunCommand;
use std::os::unix::fs::PermissionsExt;

/// A stand-in for tau-resnet: fails on depth 999 (a bad config), diverges on τ = "1",
/// stops with status interrupted on depth 77 once, otherwise finishes. It counts its
/// runs per point in `count`.
const FAKE: &str = r#"#!/bin/sh
# As a binary older than `check-points`: the sweep warns and runs the points.
if [ "$1" = check-points ]; then echo "error: unrecognized subcommand 'check-points'" >&2; exit 2; fi
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
    assert!(csv.contains("depth-999_tau-1_sqrt_L,999,1/sqrt(L),failed,exit code 1: error: config"));
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

/// A point started with the old base (interrupted: a config.toml, no summary) would resume
/// with its old config under the new one: refused like a finished point.
#[test]
fn changed_base_config_with_started_points_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = fake_bin(tmp.path());
    let stop = AtomicBool::new(false);
    run_sweep(&spec("4"), tmp.path(), &bin, &args(false), &stop).unwrap();
    let root = tmp.path().join("t");
    for p in spec("4").points().unwrap() {
        let dir = root.join(&p.name);
        let _ = std::fs::remove_file(dir.join(tau_records::SUMMARY_FILE));
        std::fs::write(dir.join(tau_records::CONFIG_FILE), "seed = 0\n").unwrap();
    }
    let mut changed = spec("4");
    changed.base.insert("seed".into(), toml::Value::Integer(5));
    let err = run_sweep(&changed, tmp.path(), &bin, &args(false), &stop).unwrap_err();
    assert!(
        err.to_string().contains("0 finished and 2 started points"),
        "{err}"
    );
}

#[test]
fn the_build_takes_cargo_features_and_a_cuda_sweep_asks_for_them() {
    assert_eq!(
        build_args(Some("cuda")).join(" "),
        "build --release -p tau-resnet --bin tau-resnet --features cuda"
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
    a.features = Some("cudnn".into());
    check_cuda_build(&cuda, &a).unwrap();
    a.features = Some("metal,cudnn".into());
    check_cuda_build(&cuda, &a).unwrap();
    a.features = Some("metal".into());
    assert!(check_cuda_build(&cuda, &a).is_err());
    // A CPU sweep, a binary given or no build: nothing to say.
    check_cuda_build(&spec("4"), &args(false)).unwrap();
    let mut given = args(false);
    given.no_build = false;
    given.bin = Some(PathBuf::from("/x/tau-resnet-cuda"));
    check_cuda_build(&cuda, &given).unwrap();
    check_cuda_build(&cuda, &args(false)).unwrap();
}

#[test]
fn a_cuda_sweep_run_here_is_refused_before_a_cpu_build() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("cuda.toml");
    std::fs::write(
        &config,
        "name = \"c\"\ncommand = \"train\"\n[base]\ndevice = \"cuda\"\n[grid]\nseed = [0]\n",
    )
    .unwrap();
    let mut a = args(false);
    a.config = Some(config);
    a.runs_dir = Some(tmp.path().join("runs"));
    a.no_build = false;
    let err = run(a).unwrap_err();
    assert!(err.to_string().contains("--features cudnn"), "{err}");
    assert!(!tmp.path().join("runs").exists(), "nothing is written");
}

#[test]
fn default_sweep_config_parses() {
    let spec = SweepSpec::from_str_in(DEFAULT_SWEEP, &workspace_root().join("configs")).unwrap();
    assert_eq!(spec.command, RunCommand::Probe);
    assert!(spec.n_points() >= 13);
    spec.points().unwrap();
}

#[test]
fn force_twice_in_one_second_keeps_both_earlier_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = spec("4");
    let point = &spec.points().unwrap()[0];
    let dir = tmp.path().join(&point.name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("summary.json"), "first").unwrap();
    let a = prepare_point(&spec, point, &dir, true).unwrap().unwrap();
    std::fs::write(dir.join("summary.json"), "second").unwrap();
    let b = prepare_point(&spec, point, &dir, true).unwrap().unwrap();
    assert_ne!(a, b);
    assert_eq!(
        std::fs::read_to_string(a.join("summary.json")).unwrap(),
        "first"
    );
    assert_eq!(
        std::fs::read_to_string(b.join("summary.json")).unwrap(),
        "second"
    );
}

/// The files xtask keeps in a point's folder are those tau-resnet lets a new run start
/// beside (tau_records::DRIVER_FILES): a new name here must be added there.
#[test]
fn the_files_xtask_writes_into_a_point_are_the_drivers_files() {
    for f in [
        "point.json",
        "stdout.log",
        "stderr.log",
        FAILURE_RECORD,
        &format!("{FAILURE_RECORD}.tmp"),
    ] {
        assert!(tau_records::DRIVER_FILES.contains(&f), "{f}");
    }
}
