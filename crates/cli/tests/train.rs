//! The `tau-resnet` binary's training commands: exit codes, resume, interruption, bad
//! input, help texts, eval and bench.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle::Device;
use tau_train::setup::{prepare, start};

#[path = "../../train/tests/support/mod.rs"]
mod support;

use support::*;

mod common;
use common::bin;

/// Asserts that a `tau-resnet` run exited with status 0, showing its stderr otherwise.
fn assert_success(o: &std::process::Output) {
    common::ok(o);
}

// --- The CLI -------------------------------------------------------------------------

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn deep_tau_one_diverges_with_exit_code_3() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let out = tmp.path().join("run");
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args([
            "--set",
            "model.depth=64",
            "--set",
            "model.tau=1",
            "--set",
            "optim.lr=0.5",
        ])
        .args(["--set", "model.width=16", "--set", "steps=50", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "diverged");
    assert!(s["diverged_at_step"].as_u64().unwrap() < 50);
    assert!(
        s["divergence_reason"]
            .as_str()
            .unwrap()
            .contains("non-finite")
    );
}

#[test]
fn stop_then_resume_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let out = tmp.path().join("run");
    let o = bin()
        .args(["train", "--stop-after-steps", "4", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "interrupted");
    // Starting again into the same directory is refused: it already holds a run.
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let o = bin()
        .args(["train", "--resume"])
        .arg(&out)
        .output()
        .unwrap();
    assert_success(&o);
    let o = bin()
        .args(["eval", "--checkpoint"])
        .arg(&out)
        .args(["--data", "mnist", "--data-dir"])
        .arg(tmp.path().join("nothing-here"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}

/// A run killed before its first checkpoint (a cluster job requeued after a node failure
/// or an out-of-memory kill) holds a config and partial records but nothing to resume
/// from: `--resume` starts it over from step 0 and ends with the records of a clean run.
#[test]
fn resume_without_a_checkpoint_starts_over_from_step_0() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let clean = tmp.path().join("clean");
    let killed = tmp.path().join("killed");
    for out in [&clean, &killed] {
        let o = bin()
            .args(["train", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap();
        assert_success(&o);
    }
    // What a kill before the first checkpoint leaves: the config and a torn metrics line.
    std::fs::remove_dir_all(killed.join("checkpoints")).unwrap();
    std::fs::remove_file(killed.join("summary.json")).unwrap();
    let mut metrics = std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap();
    metrics.truncate(metrics.len() / 2);
    std::fs::write(killed.join("metrics.jsonl"), metrics).unwrap();
    let o = bin()
        .args(["train", "--resume"])
        .arg(&killed)
        .output()
        .unwrap();
    assert_success(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("starting it over from step 0"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        records_without_timing(&killed),
        records_without_timing(&clean)
    );
    assert_eq!(
        std::fs::read(killed.join("config.toml")).unwrap(),
        std::fs::read(clean.join("config.toml")).unwrap()
    );
    // A directory that is not a run at all is still refused.
    let o = bin()
        .args(["train", "--resume"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a run directory"));
}

/// `--resume` never starts a run over when that would delete checkpoints (`last` removed
/// or dangling), and does not repeat a run that diverged before its first checkpoint.
#[cfg(unix)]
#[test]
fn resume_keeps_damaged_checkpoints_and_ended_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let run = tmp.path().join("run");
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--set", "log.checkpoint_every=2", "--stop-after-steps", "3"])
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ckpts = run.join("checkpoints");
    let step = std::fs::read_link(ckpts.join("last")).unwrap();
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let resume = || {
        bin()
            .args(["train", "--resume"])
            .arg(&run)
            .output()
            .unwrap()
    };
    // `last` removed: refused, naming the checkpoint that is left and how to use it.
    std::fs::remove_file(ckpts.join("last")).unwrap();
    let o = resume();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is missing") && err.contains(&*step.to_string_lossy()),
        "{err}"
    );
    assert!(ckpts.join(&step).is_dir());
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), metrics);
    // `last` dangling and no checkpoint left: refused too.
    std::fs::remove_dir_all(ckpts.join(&step)).unwrap();
    std::os::unix::fs::symlink(&step, ckpts.join("last")).unwrap();
    let o = resume();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("leads to no checkpoint"), "{err}");
    assert!(run.join("config.toml").is_file());

    // A run that diverged before its first checkpoint: resume reports it, runs nothing.
    let div = tmp.path().join("div");
    let diverge = [
        "--set",
        "model.depth=64",
        "--set",
        "model.tau=1",
        "--set",
        "optim.lr=0.5",
        "--set",
        "model.width=16",
        "--set",
        "steps=50",
    ];
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args(diverge)
        .arg("--out")
        .arg(&div)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!div.join("checkpoints/last").exists());
    let before = std::fs::read(div.join("metrics.jsonl")).unwrap();
    let o = bin()
        .args(["train", "--resume"])
        .arg(&div)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(!err.contains("starting it over"), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("diverged"));
    assert_eq!(std::fs::read(div.join("metrics.jsonl")).unwrap(), before);
    // A revision names a hub commit; given with a local directory it is refused, not ignored.
    let o = bin()
        .args([
            "eval",
            "--data",
            "mnist",
            "--revision",
            "v2",
            "--checkpoint",
        ])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("a revision applies to hub ids only"), "{err}");
    // eval of that run says what is missing, once.
    let o = bin()
        .args(["eval", "--data", "mnist", "--checkpoint"])
        .arg(&div)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is a run directory without a checkpoint"),
        "{err}"
    );
}

/// A full disk behind standard output is one error (exit 1), not a panic; a closed pipe
/// (`tau-resnet train … | head -0`) drops the output and the run ends as it would have.
#[cfg(target_os = "linux")]
#[test]
fn unwritable_stdout_is_an_error_and_a_closed_pipe_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("full"))
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("writing to standard output"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let mut child = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(tmp.path().join("pipe"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away before anything is printed
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let summary = std::fs::read_to_string(tmp.path().join("pipe/summary.json")).unwrap();
    assert!(summary.contains("\"finished\""), "{summary}");
}

/// SIGTERM (what Slurm sends on scancel, preemption and at the time limit, and what a
/// sweep's job script forwards on its warning signal) stops a run as Ctrl-C does: a
/// checkpoint, status `interrupted`, exit code 130.
#[cfg(unix)]
#[test]
fn sigterm_writes_a_checkpoint_and_exits_130() {
    sigterm_run(1);
}

/// `timeout` (and some job runners) send their signal twice, to the process and to its
/// group, a moment apart: that is still one interrupt, with its checkpoint.
#[cfg(unix)]
#[test]
fn a_doubled_sigterm_is_one_interrupt() {
    sigterm_run(2);
}

/// Sends SIGTERM `signals` times back to back (separate `kill` calls) to a training run.
#[cfg(unix)]
fn sigterm_run(signals: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let out = tmp.path().join("run");
    let child = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args([
            "--set",
            "steps=100000000",
            "--set",
            "log.checkpoint_every=0",
        ])
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed().as_secs() < 120, "no metrics after 120 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    for _ in 0..signals {
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["status"], "interrupted");
    assert!(out.join("checkpoints/last").is_dir());
}

fn assert_fails_cleanly(args: &[&str], cfg_text: Option<&str>, expect: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let mut c = bin();
    c.arg("train");
    if let Some(text) = cfg_text {
        c.arg("--config").arg(write(tmp.path(), "c.toml", text));
    }
    // RUST_BACKTRACE (set in many shells and CI) keeps backtraces for panics; errors,
    // candle's among them, print none.
    let o = c.args(args).arg("--out").arg(&out);
    let o = o
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LIB_BACKTRACE");
    let o = o.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(expect), "expected `{expect}` in: {err}");
    assert!(!err.contains("backtrace") && !err.contains(" 0: "), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{err}"
    );
    assert!(!out.exists(), "a failed start left {}", out.display());
}

#[test]
fn bad_input_fails_with_one_message_and_writes_nothing() {
    assert_fails_cleanly(&["--config", "no/such.toml"], None, "no/such.toml");
    assert_fails_cleanly(&[], Some("name = \"x\"\nseed = [1"), "parsing config");
    assert_fails_cleanly(&["--set", "optim.momentom=0.9"], Some(THEORY), "momentom");
    assert_fails_cleanly(&["--set", "optim.lr=\"fast\""], Some(THEORY), "optim.lr");
    assert_fails_cleanly(
        &["--set", "model.input_dim=9"],
        Some(THEORY),
        "model.input_dim",
    );
    assert_fails_cleanly(
        &["--set", "data.source=\"mnist\"", "--set", "data.n=1"],
        Some(THEORY),
        "data.n",
    );
    assert_fails_cleanly(
        &["--set", "optim.freeze=[\"zzz.\"]"],
        Some(THEORY),
        "`optim.freeze`: no parameter name starts with `zzz.`",
    );
    // An error candle raises (with a backtrace attached when RUST_BACKTRACE is set).
    assert_fails_cleanly(
        &["--set", "model.depth=0"],
        Some(THEORY),
        "depth must be at least 1",
    );
}

/// A run too large for the machine's memory is refused before it allocates (an allocation
/// failure aborts the process; the kernel's OOM killer takes it, or others, down).
#[test]
fn a_run_too_large_for_memory_is_refused() {
    // 10^11 synthetic points of 17 values: 20 TB.
    assert_fails_cleanly(
        &["--set", "data.n=100000000000"],
        Some(THEORY),
        "the synthetic data set needs about",
    );
    // A theory network of width 8192 and 256 blocks: 17 G weights, 137 GB with their
    // gradients.
    let Some(avail) = tau_train::memory::available() else {
        eprintln!("skipped the step check: the available memory cannot be read here");
        return;
    };
    let avail = avail as f64 / tau_train::memory::GIB;
    if avail > 120.0 {
        eprintln!("skipped the step check: {avail:.0} GiB are available");
        return;
    }
    assert_fails_cleanly(
        &["--set", "model.width=8192", "--set", "model.depth=256"],
        Some(THEORY),
        "a training step on",
    );
}

/// `--out` naming a directory of other files (a typo'd home folder) is refused, and
/// nothing is written into it; a sweep point's own files do not count.
#[test]
fn a_new_run_does_not_start_among_other_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let foreign = tmp.path().join("documents");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("thesis.tex"), "x").unwrap();
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&foreign)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("is not empty and holds no run (`thesis.tex` is there)"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
    // What xtask leaves in a point's folder before the run starts is fine.
    let point = tmp.path().join("point");
    std::fs::create_dir_all(&point).unwrap();
    for f in ["point.json", "stdout.log", "stderr.log", ".nfs0001"] {
        std::fs::write(point.join(f), "").unwrap();
    }
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&point)
        .output()
        .unwrap();
    assert_success(&o);
}

#[test]
fn dry_run_prints_the_resolved_config_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let out = tmp.path().join("run");
    let o = bin()
        .args(["train", "--dry-run", "--config"])
        .arg(&cfg)
        .args(["--set", "model.depth=16", "--set", "model.tau=1/L", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_success(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    let (head, toml_text) = text.split_once('\n').unwrap();
    assert!(
        head.contains("would start in") && head.contains("run"),
        "{head}"
    );
    // The printed config is the run's: it reads back with the overrides in it.
    let table: toml::Table = toml_text.parse().unwrap();
    assert_eq!(table["model"]["depth"].as_integer(), Some(16));
    assert_eq!(table["model"]["tau"].as_str(), Some("1/L"));
    tau_train::config::config_from_table(table).unwrap();
    assert!(!out.exists(), "a dry run wrote {}", out.display());
    // A bad override fails as the run would, and writes nothing either.
    let o = bin()
        .args(["train", "--dry-run", "--config"])
        .arg(&cfg)
        .args(["--set", "model.depth=abc", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("key `model.depth`"), "{err}");
    assert!(!out.exists());
    // The probe too.
    let o = bin()
        .args(["probe", "--dry-run", "--depth", "8", "--tau", "1/L"])
        .output()
        .unwrap();
    assert_success(&o);
    let text = String::from_utf8_lossy(&o.stdout);
    let table: toml::Table = text.split_once('\n').unwrap().1.parse().unwrap();
    assert_eq!(table["model"]["depth"].as_integer(), Some(8));
}

#[test]
fn check_points_answers_for_every_point() {
    use std::io::Write;
    let request = tau_records::CheckRequest {
        command: "train".into(),
        base: THEORY.into(),
        points: vec![
            vec!["model.depth=8".into()],
            vec!["model.depth=abc".into()],
            vec![],
        ],
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_tau-resnet"))
        .arg(tau_records::CHECK_COMMAND)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&request).unwrap())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_success(&o);
    let reply: tau_records::CheckReply = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(reply.errors.len(), 3);
    assert_eq!(reply.errors[0], None);
    assert!(
        reply.errors[1]
            .as_deref()
            .is_some_and(|e| e.starts_with("key `model.depth`: invalid type")),
        "{reply:?}"
    );
    assert_eq!(reply.errors[2], None);
}

#[test]
fn corrupt_data_dir_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist");
    std::fs::create_dir(&data).unwrap();
    for f in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(data.join(f), b"\x00\x00\x08\x03garbage").unwrap();
    }
    let set_dir = format!("data.dir={:?}", data.display().to_string());
    assert_fails_cleanly(
        &[
            "--set",
            "data={ source = \"mnist\", batch_size = 4 }",
            "--set",
            &set_dir,
            "--set",
            "model.input_dim=784",
            "--set",
            "model.output_dim=10",
        ],
        Some(THEORY),
        "mnist",
    );
}

#[test]
fn unwritable_out_dir_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = write(tmp.path(), "a-file", "");
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(file.join("run"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("creating the run directory"), "{err}");
}

#[test]
fn resume_with_a_checkpoint_of_another_architecture_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(THEORY, &[]);
    let run = tmp.path().join("run");
    start(prepare(&cfg, &Device::Cpu).unwrap(), &run, &stop_after(2)).unwrap();
    // Someone edits the run's config to another depth.
    let text = std::fs::read_to_string(run.join("config.toml")).unwrap();
    std::fs::write(
        run.join("config.toml"),
        text.replace("depth = 4", "depth = 5"),
    )
    .unwrap();
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let o = bin()
        .args(["train", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("different architecture"), "{err}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
}

/// A malformed flag value is a usage error (exit status 2, clap's message naming the
/// flag), before any checkpoint or data is read.
#[test]
fn malformed_flag_values_are_usage_errors() {
    for args in [
        &[
            "eval",
            "--checkpoint",
            "x",
            "--data",
            "mnist",
            "--batch-size",
            "0",
        ][..],
        &[
            "eval",
            "--checkpoint",
            "x",
            "--data",
            "mnist",
            "--loss",
            "hinge",
        ],
        &["predict", "--checkpoint", "x", "-k", "0", "a.png"],
        &["predict", "--checkpoint", "x", "--batch-size", "0", "a.png"],
    ] {
        let o = bin().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        let flag = args[args.len() - 2];
        let flag = if args[0] == "predict" {
            args[args.len() - 3]
        } else {
            flag
        };
        assert!(
            err.contains("invalid value") && err.contains(flag),
            "{args:?}: {err}"
        );
    }
}

/// A warm-up longer than the run is said once as a warning (the learning rate would never
/// reach `optim.lr`), and the run goes on.
#[test]
fn a_warmup_longer_than_the_run_is_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--set", "optim.warmup=100", "--out"])
        .arg(tmp.path().join("run"))
        .output()
        .unwrap();
    assert_success(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("optim.warmup (100 steps) is longer than the run (12 steps)"),
        "{err}"
    );
}

#[test]
fn every_command_help_has_an_example() {
    for cmd in [
        vec!["--help"],
        vec!["train", "--help"],
        vec!["eval", "--help"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_tau-resnet"))
            .args(&cmd)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("Example"), "{cmd:?}: {text}");
    }
}

/// Trains a tiny theory network on a few MNIST images and evaluates its checkpoint on
/// the MNIST test set through `tau-resnet eval --json`. Skips when MNIST is absent.
#[test]
fn eval_reads_a_run_checkpoint() {
    let mnist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
    if !mnist.join("t10k-images-idx3-ubyte.gz").exists() {
        eprintln!("skipped: MNIST not found at {}", mnist.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(tmp.path(), "c.toml", THEORY);
    let out = tmp.path().join("run");
    let data = format!(
        "data={{ source = \"mnist\", dir = {:?}, subset = {{ balanced_k = 2 }}, test_subset = {{ first_n = 10 }}, batch_size = 20 }}",
        mnist.display().to_string()
    );
    let o = bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args([
            "--set",
            &data,
            "--set",
            "model.input_dim=784",
            "--set",
            "model.output_dim=10",
        ])
        .args([
            "--set",
            "optim={ kind = \"gd\", lr = 0.1 }",
            "--set",
            "steps=3",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_success(&o);
    let o = bin()
        .args(["eval", "--json", "--data", "mnist", "--checkpoint"])
        .arg(&out)
        .arg("--data-dir")
        .arg(&mnist)
        .output()
        .unwrap();
    assert_success(&o);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["examples"], 10_000);
    assert_eq!(r["loss_kind"], "squared");
    let acc = r["test_acc"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(r["test_loss"].as_f64().unwrap().is_finite());
}

/// The records of `tau-resnet bench ARGS --steps 1 --warmup 0 --json`, which must succeed.
fn bench_records(args: &[&str]) -> Vec<serde_json::Value> {
    let o = bin()
        .arg("bench")
        .args(args)
        .args(["--steps", "1", "--warmup", "0", "--json"])
        .output()
        .unwrap();
    assert_success(&o);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn bench_measures_the_theory_network_gd_step_at_each_depth() {
    let recs = bench_records(&[
        "--skip-resnets",
        "--theory-depth",
        "4,8",
        "--theory-width",
        "16",
        "--theory-inputs",
        "3",
    ]);
    let out = format!("{recs:?}");
    let points: Vec<(u64, &str)> = recs
        .iter()
        .map(|r| (r["depth"].as_u64().unwrap(), r["phase"].as_str().unwrap()))
        .collect();
    assert_eq!(
        points,
        [
            (4, "forward"),
            (4, "gd_step"),
            (8, "forward"),
            (8, "gd_step")
        ],
        "{out}"
    );
    // Forward multiply-adds per input at L = 8: A (16×16) + 8 W (16×16) + B (1×16).
    let gflop = 2.0 * (16 * 16 + 8 * 16 * 16 + 16) as f64 * 3.0 / 1e9;
    assert!(
        (recs[2]["gflop"].as_f64().unwrap() - gflop).abs() < 1e-12,
        "{out}"
    );
    assert!(
        recs.iter()
            .all(|r| r["batch"] == 3 && r["model"] == "theory")
    );
}

#[test]
fn bench_times_the_evaluation_forward_pass_on_request() {
    let run = |extra: &[&str]| {
        let base = [
            "--depths",
            "8",
            "--norms",
            "bn",
            "--batch",
            "4",
            "--theory-depth",
            "0",
        ];
        bench_records(&[&base[..], extra].concat())
    };
    // By default only the training step.
    let plain = run(&[]);
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0]["phase"], "train_step");
    // With --eval, the forward pass in evaluation mode first: a third of the step's flops.
    let both = run(&["--eval"]);
    assert_eq!(both.len(), 2, "{both:?}");
    assert_eq!(both[0]["phase"], "eval");
    assert_eq!(both[1]["phase"], "train_step");
    let (eval, step) = (
        both[0]["gflop"].as_f64().unwrap(),
        both[1]["gflop"].as_f64().unwrap(),
    );
    assert!((3.0 * eval - step).abs() < 1e-9 * step, "{eval} {step}");
    assert!(both[0]["median_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_measures_a_bottleneck_resnet_and_rejects_bad_depths() {
    // A ResNet-50 step on two 32×32 images (BatchNorm needs two values per channel in the
    // last stage, which is 1×1): the point is the record, not the speed.
    let recs = bench_records(&[
        "--skip-resnets",
        "--bottleneck-depths",
        "50",
        "--bottleneck-batch",
        "2",
        "--bottleneck-size",
        "32",
        "--norms",
        "bn",
        "--theory-depth",
        "0",
    ]);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let r = &recs[0];
    assert_eq!(r["model"], "bottleneck_resnet");
    assert_eq!(r["depth"], 50);
    assert_eq!(r["batch"], 2);
    assert!(r["median_s"].as_f64().unwrap() > 0.0, "{r}");
    // 3 × (forward multiply-adds at 32×32) × 2 flops: the stem, 16 blocks and the head.
    assert!(r["gflop"].as_f64().unwrap() > 0.1, "{r}");

    let o = bin()
        .args(["bench", "--skip-resnets", "--bottleneck-depths", "34"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("50, 101 or 152"), "{err}");
}
