//! End to end: `cargo xtask sweep` of a tiny full-batch GD sweep against the real
//! `tau-resnet train`, then `cargo xtask report` on its records.
//!
//! The tau-resnet binary comes from `TAU_RESNET_BIN`, else `target/release/tau-resnet`,
//! else `target/debug/tau-resnet` (built by the workspace's tests); when none exists the
//! test says so and skips.

use std::path::{Path, PathBuf};
use std::process::Command;

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

fn csv_rows(path: &Path) -> Vec<std::collections::BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).expect("results.csv");
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .expect("header")
        .split(',')
        .map(str::to_string)
        .collect();
    lines
        .map(|l| {
            // The fields this test reads hold no commas or quotes.
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect()
        })
        .collect()
}

#[test]
fn tiny_gd_sweep_against_the_real_trainer() {
    let Some(bin) = tau_resnet() else {
        eprintln!(
            "skipped: no tau-resnet binary (set TAU_RESNET_BIN or build the tau-resnet package)"
        );
        return;
    };
    eprintln!("using {}", bin.display());
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sweep-gd-tiny.toml");
    let runs = tempfile::tempdir().expect("temp dir");
    let xtask = env!("CARGO_BIN_EXE_xtask");
    let out = Command::new(xtask)
        .arg("sweep")
        .arg(&cfg)
        .arg("--bin")
        .arg(&bin)
        .arg("--no-build")
        .arg("--jobs")
        .arg("2")
        .arg("--runs-dir")
        .arg(runs.path())
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sweep failed:\n{stderr}");
    let dir = runs.path().join("gd-tiny");

    // One row per point, all finished, with the trainer's own summary fields.
    let rows = csv_rows(&dir.join("results.csv"));
    assert_eq!(rows.len(), 6, "{rows:?}");
    // τ = 1/√L trains at every depth; τ = 1 may diverge (deep nets blow up, PAPER.md
    // claim 3), and then the row says where and why.
    for r in &rows {
        match (r["model.tau"].as_str(), r["status"].as_str()) {
            ("1/sqrt(L)", "finished") | ("1", "finished") => {}
            ("1", "diverged") => {
                let step: u64 = r["diverged_at_step"].parse().expect("diverged_at_step");
                assert!((1..=60).contains(&step), "{r:?}");
            }
            _ => panic!("unexpected row {r:?}"),
        }
    }
    let loss = |depth: &str, tau: &str| -> f64 {
        let r = rows
            .iter()
            .find(|r| r["model.depth"] == depth && r["model.tau"] == tau)
            .unwrap_or_else(|| panic!("no row for depth {depth}, tau {tau}: {rows:?}"));
        r["final_metrics.train_loss"].parse().expect("a number")
    };
    // GD decreases the loss from its value at step 0 (the first metrics record).
    for depth in ["2", "8", "32"] {
        let first: f64 = {
            let name = format!("depth-{depth}_tau-1_sqrt_L");
            let text = std::fs::read_to_string(dir.join(&name).join("metrics.jsonl"))
                .unwrap_or_else(|e| panic!("{name}/metrics.jsonl: {e}"));
            let line = text.lines().next().expect("a record");
            let v: serde_json::Value = serde_json::from_str(line).expect("json");
            v["train_loss"].as_f64().expect("train_loss")
        };
        let last = loss(depth, "1/sqrt(L)");
        assert!(
            last < first,
            "depth {depth}, τ = 1/√L: loss {first} → {last}"
        );
    }

    // The report shows the loss curves, one figure per τ, PNG and SVG.
    let report = std::fs::read_to_string(dir.join("report.md")).expect("report.md");
    let figs: Vec<String> = std::fs::read_dir(dir.join("figures"))
        .expect("figures")
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .collect();
    // Depth 2 at τ = 1 is shallow enough to train, so both τ get a figure.
    assert_eq!(
        rows.iter()
            .find(|r| r["point"] == "depth-2_tau-1")
            .map(|r| r["status"].as_str()),
        Some("finished")
    );
    for stem in ["loss_vs_step_tau_1_sqrt_L", "loss_vs_step_tau_1"] {
        for ext in ["png", "svg"] {
            let f = format!("{stem}.{ext}");
            assert!(figs.contains(&f), "{f} missing from {figs:?}");
            let len = std::fs::metadata(dir.join("figures").join(&f))
                .expect("figure")
                .len();
            assert!(len > 1000, "{f}: {len} bytes");
        }
        assert!(report.contains(&format!("figures/{stem}.png")), "{report}");
    }

    // `report` rebuilds the CSV byte for byte from the records.
    let csv = std::fs::read(dir.join("results.csv")).expect("csv");
    std::fs::remove_file(dir.join("results.csv")).expect("remove");
    let out = Command::new(xtask)
        .arg("report")
        .arg(&dir)
        .output()
        .expect("xtask report runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(dir.join("results.csv")).expect("csv"), csv);
}

#[test]
fn a_bad_grid_value_stops_the_sweep_before_any_point_runs() {
    let Some(bin) = tau_resnet() else {
        eprintln!(
            "skipped: no tau-resnet binary (set TAU_RESNET_BIN or build the tau-resnet package)"
        );
        return;
    };
    let tiny = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sweep-gd-tiny.toml"),
    )
    .expect("the tiny sweep");
    // Depth 0 and a τ rule of K instead of L: three of the eight points are refused.
    let bad = tiny.replace(
        "\"model.depth\" = [2, 8, 32]\n\"model.tau\" = [\"1/sqrt(L)\", \"1\"]",
        "\"model.depth\" = [2, 0]\n\"model.tau\" = [\"1/sqrt(L)\", \"1\", \"1/K\", \"1/L\"]",
    );
    assert_ne!(bad, tiny, "the grid of sweep-gd-tiny.toml changed");
    let runs = tempfile::tempdir().expect("temp dir");
    let cfg = runs.path().join("bad.toml");
    std::fs::write(&cfg, bad).expect("write the config");
    // `xtask sweep` of the bad config with the binary, and the extra flags; it must refuse
    // the grid, naming how many points are bad: its stderr.
    let refused = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .arg("sweep")
            .arg(&cfg)
            .arg("--bin")
            .arg(&bin)
            .arg("--runs-dir")
            .arg(runs.path())
            .args(extra)
            .output()
            .expect("xtask runs");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "a bad sweep ran:\n{stderr}");
        assert!(
            stderr.contains("5 of 8 points have a config `tau-resnet train` refuses"),
            "{stderr}"
        );
        stderr
    };
    let stderr = refused(&["--no-build"]);
    // Each error once, with the first point that has it and how many more do.
    assert!(
        stderr.contains("depth-2_tau-1_K (and 1 more): key `model.tau`: invalid tau rule \"1/K\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("depth-0_tau-1_sqrt_L (and 2 more): invalid `model`: "),
        "{stderr}"
    );
    // Nothing started: no sweep folder.
    assert!(!runs.path().join("gd-tiny").exists(), "{stderr}");
    // A dry run with a binary at hand says the same.
    refused(&["--dry-run"]);
    // So does a Slurm submission (a dry run: no Slurm needed), before it writes anything.
    let stderr = refused(&["--slurm", "--dry-run", "--partition", "cpu", "--time", "10"]);
    assert!(!runs.path().join("gd-tiny").exists(), "{stderr}");
}
