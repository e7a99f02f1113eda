//! `cargo xtask report runs/<sweep>`: regenerates `results.csv`, `report.md` and
//! `figures/` from a sweep's stored config and its run records alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::records::{self, PointState, SWEEP_COPY, Status, write_atomic};
use crate::spec::{RunCommand, SweepSpec};

mod probe;
mod train;

use probe::probe_report;
use train::train_report;

/// Arguments of `cargo xtask report`.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The sweep's output folder, e.g. `runs/stability`.
    pub dir: PathBuf,
    /// Also copy the figures (SVG) into this folder, e.g. `docs/figures/stability` for
    /// the figures that docs/RESULTS.md shows.
    #[arg(long)]
    pub figures_out: Option<PathBuf>,
}

/// Runs `cargo xtask report`.
///
/// # Errors
/// A folder without a stored sweep config, or I/O errors.
pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let out = generate(&args.dir)?;
    if let Some(dest) = &args.figures_out {
        let n = publish_figures(&args.dir.join("figures"), dest)?;
        println!("copied {n} figures (SVG) to {}", dest.display());
    }
    println!("{}", out.summary_line);
    println!("wrote {}", args.dir.join("results.csv").display());
    println!("wrote {}", args.dir.join("report.md").display());
    println!(
        "wrote {} figures under {}",
        out.n_figures,
        args.dir.join("figures").display()
    );
    Ok(())
}

/// Copies the SVG figures of `src` into `dest` (created if needed), replacing files of
/// the same name; returns how many were copied.
///
/// # Errors
/// I/O errors, or `src` without any SVG figure.
pub fn publish_figures(src: &Path, dest: &Path) -> anyhow::Result<usize> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "svg"))
        .collect();
    names.sort();
    if names.is_empty() {
        anyhow::bail!("{} holds no SVG figure to copy", src.display());
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for path in &names {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().unwrap_or_default();
        write_atomic(&dest.join(name), &bytes)?;
    }
    Ok(names.len())
}

/// What [`generate`] produced.
#[derive(Debug)]
pub struct Generated {
    /// Every point's state, in grid order.
    pub states: Vec<PointState>,
    /// One line: counts per status.
    pub summary_line: String,
    /// Figures drawn (each as PNG and SVG).
    pub n_figures: usize,
}

/// Loads the stored sweep config of a sweep folder.
///
/// # Errors
/// Missing or invalid `sweep.toml`.
pub fn load_stored_spec(root: &Path) -> anyhow::Result<SweepSpec> {
    let path = root.join(SWEEP_COPY);
    if !path.exists() {
        anyhow::bail!(
            "{} has no {SWEEP_COPY}: not a sweep folder written by `cargo xtask sweep`",
            root.display()
        );
    }
    SweepSpec::from_file(&path)
}

/// Writes `results.csv`, `report.md` and the figures of the sweep in `root`.
///
/// # Errors
/// Missing stored config or I/O errors. A figure that cannot be drawn is reported in the
/// report rather than failing the whole report.
pub fn generate(root: &Path) -> anyhow::Result<Generated> {
    let spec = load_stored_spec(root)?;
    let states = records::read_sweep(&spec, root)?;
    let csv = records::results_csv(&spec, &states)?;
    write_atomic(&root.join("results.csv"), &csv)?;
    let fig_dir = root.join("figures");
    std::fs::create_dir_all(&fig_dir).with_context(|| format!("creating {}", fig_dir.display()))?;
    let mut md = String::new();
    let summary_line = status_line(&states);
    let _ = writeln!(md, "# Sweep `{}`\n", spec.name);
    if let Some(d) = &spec.description {
        let _ = writeln!(md, "{}\n", d.trim());
    }
    let _ = writeln!(
        md,
        "Command: `tau-resnet {}` per point, {} points over {}. {summary_line}.\n\
         Per-point records are in `<point>/`; one row per {} in `results.csv`.\n",
        spec.command,
        states.len(),
        spec.axes
            .iter()
            .map(|a| format!("`{}` ({} values)", a.key, a.values.len()))
            .collect::<Vec<_>>()
            .join(" × "),
        match spec.command {
            RunCommand::Probe => "(point, τ rule)",
            RunCommand::Train => "point",
        }
    );
    let figures = match spec.command {
        RunCommand::Probe => probe_report(&spec, &states, &fig_dir, &mut md),
        RunCommand::Train => train_report(&spec, &states, &fig_dir, &mut md),
    };
    let mut n_figures = 0;
    for (name, chart) in figures {
        match chart.save(&fig_dir.join(&name)) {
            Ok(()) => n_figures += 1,
            Err(err) => {
                let _ = writeln!(md, "\nFigure `{name}` could not be drawn: {err:#}\n");
            }
        }
    }
    failures_section(&states, &mut md);
    write_atomic(&root.join("report.md"), md.as_bytes())?;
    Ok(Generated {
        states,
        summary_line,
        n_figures,
    })
}

fn status_line(states: &[PointState]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in states {
        *counts.entry(s.status.as_str()).or_default() += 1;
    }
    let order = ["finished", "diverged", "interrupted", "failed", "pending"];
    order
        .iter()
        .filter_map(|k| counts.get(k).map(|n| format!("{n} {k}")))
        .collect::<Vec<_>>()
        .join(", ")
}

fn failures_section(states: &[PointState], md: &mut String) {
    let bad: Vec<&PointState> = states
        .iter()
        .filter(|s| {
            matches!(
                s.status,
                Status::Failed | Status::Pending | Status::Interrupted
            )
        })
        .collect();
    if bad.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## Points without a result\n");
    let _ = writeln!(md, "| point | status | cause |\n| --- | --- | --- |");
    for s in bad {
        let cause = s.message.clone().unwrap_or_else(|| match s.status {
            Status::Pending => "not run yet (or stopped before it wrote a record)".into(),
            Status::Interrupted => "interrupted; resumed by the next `cargo xtask sweep`".into(),
            _ => String::new(),
        });
        let _ = writeln!(
            md,
            "| `{}` | {} | {} |",
            s.point.name,
            s.status,
            cause.replace('|', "\\|")
        );
    }
}

fn sanitize_file(s: &str) -> String {
    crate::spec::sanitize(s)
}

/// Keys whose last component names the depth or the seed.
fn axis_role(key: &str) -> Option<&'static str> {
    match key.rsplit('.').next().unwrap_or(key) {
        "depth" => Some("depth"),
        "seed" => Some("seed"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::display_value;

    /// A train sweep's report from planted run records: the accuracy table shows the mean
    /// and range over seeds and counts diverged runs, differences within the seeds' spread
    /// are called so, and the loss-threshold table reads the first step at or below it.
    #[test]
    fn train_report_from_planted_records_aggregates_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("planted-train");
        let spec_text = "name = \"planted-train\"\ncommand = \"train\"\n[grid]\n\"model.depth\" = [20, 56]\n\"model.tau\" = [\"1/sqrt(L)\", \"1\"]\nseed = [0, 1]\n[report]\nloss_threshold = 1e-3\n";
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join(SWEEP_COPY), spec_text).unwrap();
        let spec = load_stored_spec(&root).unwrap();
        for p in spec.points().unwrap() {
            let get = |k: &str| {
                p.values
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| display_value(v))
                    .unwrap()
            };
            let (depth, tau, seed) = (get("model.depth"), get("model.tau"), get("seed"));
            let seed: f64 = seed.parse().unwrap();
            let dir = root.join(&p.name);
            std::fs::create_dir_all(&dir).unwrap();
            // τ = 1 diverges at depth 56 and learns less at 20; τ = 1/√L: 97 + seed (depth
            // 20), 98 + seed / 2 (depth 56); its loss reaches 1e-3 at step 30 + 10·seed.
            let (status, acc) = match (tau.as_str(), depth.as_str()) {
                ("1", "56") => ("diverged", None),
                ("1", _) => ("finished", Some(0.5 + 0.01 * seed)),
                (_, "20") => ("finished", Some(0.97 + 0.01 * seed)),
                _ => ("finished", Some(0.98 + 0.005 * seed)),
            };
            let reach = 3 + seed as u64;
            let mut metrics = String::new();
            for i in 1..=6u64 {
                let loss = if tau == "1" {
                    2.0
                } else if i >= reach {
                    1e-4
                } else {
                    0.5
                };
                metrics.push_str(&format!("{{\"step\":{},\"epoch\":0,\"epoch_end\":false,\"lr\":0.1,\"train_loss\":{loss},\"grad_norm\":1.0,\"layer_grad_norms\":[]}}\n", 10 * i));
            }
            std::fs::write(dir.join(tau_records::METRICS_FILE), metrics).unwrap();
            let summary = serde_json::json!({
                "name": p.name, "status": status,
                "diverged_at_step": if status == "diverged" { Some(3) } else { None },
                "divergence_reason": null, "steps": 60, "epochs_completed": 0,
                "reached_target_at_step": null,
                "final_metrics": acc.map(|a| serde_json::json!({
                    "step": 60, "epoch": 0, "epoch_end": false, "lr": 0.0, "train_loss": 0.1,
                    "test_acc": a, "grad_norm": 1.0, "layer_grad_norms": [],
                    "examples_per_s": 1.0, "wall_s": 1.0})),
                "best_train_loss": null, "best_test_loss": null, "best_test_acc": acc,
                "wall_s": 1.0, "device": "cpu",
                "version": {"crate_version": "0.1.0", "git_commit": null}
            });
            std::fs::write(dir.join(tau_records::SUMMARY_FILE), summary.to_string()).unwrap();
        }
        let out = generate(&root).unwrap();
        assert_eq!(out.summary_line, "6 finished, 2 diverged");
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(md.contains("## Test accuracy by depth"), "{md}");
        assert!(
            md.contains("| depth | τ = 1 | τ = 1/sqrt(L) |\n| --- | --- | --- |\n| 20 | 50.50 (50.00–51.00) | 97.50 (97.00–98.00) |\n| 56 | 2 of 2 diverged | 98.25 (98.00–98.50) |"),
            "{md}"
        );
        assert!(!md.contains("Not separated by these seeds"), "{md}");
        assert!(md.contains("## Steps to training loss ≤ 1e-3"), "{md}");
        assert!(
            md.contains("| 20 | 2 of 2 did not reach it in the run | 35 (30–40) |"),
            "{md}"
        );
        assert!(md.contains("| 56 | 2 of 2 diverged | 35 (30–40) |"), "{md}");
        for fig in ["accuracy_vs_depth", "steps_to_threshold_vs_depth"] {
            assert!(
                root.join("figures").join(format!("{fig}.png")).exists(),
                "{fig}"
            );
        }
        // A damaged metrics line (not a torn last one) is named, not silently dropped.
        let first = &spec.points().unwrap()[0].name;
        let path = root.join(first).join(tau_records::METRICS_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("garbage\n{text}")).unwrap();
        generate(&root).unwrap();
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(
            md.contains(&format!("left out of the figures: `{first}` (1)")),
            "{md}"
        );
        std::fs::write(&path, text).unwrap();
        // Without a test set (full-batch GD on synthetic data) no run has an accuracy:
        // no accuracy section then, the losses as before.
        for p in spec.points().unwrap() {
            let path = root.join(&p.name).join(tau_records::SUMMARY_FILE);
            let mut summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            summary["best_test_acc"] = serde_json::Value::Null;
            if let Some(m) = summary["final_metrics"].as_object_mut() {
                m.remove("test_acc");
            }
            std::fs::write(&path, summary.to_string()).unwrap();
        }
        generate(&root).unwrap();
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(!md.contains("## Test accuracy by depth"), "{md}");
        assert!(md.contains("| 56 | 2 of 2 diverged | 35 (30–40) |"), "{md}");
    }

    #[test]
    fn probe_report_from_planted_records_finds_alpha_star() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("planted");
        let spec_text = "name = \"planted\"\ncommand = \"probe\"\n[grid]\n\"model.depth\" = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]\nseed = [0, 1, 2]\n[report]\nrules = [\"L^-0.25\", \"L^-0.50\", \"L^-1.00\"]\n";
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join(SWEEP_COPY), spec_text).unwrap();
        for s in crate::analysis::tests::planted(0.5) {
            let dir = root.join(&s.point.name);
            std::fs::create_dir_all(&dir).unwrap();
            let json = serde_json::to_string(s.probe.as_ref().unwrap()).unwrap();
            std::fs::write(dir.join(tau_records::PROBE_FILE), json).unwrap();
        }
        let out = generate(&root).unwrap();
        assert_eq!(out.summary_line, "39 finished");
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        assert!(md.contains("**Measured α* = 0.5"), "{md}");
        assert!(md.contains("| τ = L^-0.25 | 0.25 |"), "{md}");
        for fig in [
            "norm_ratio_vs_depth",
            "norm_ratio_vs_depth_zoom",
            "grad_ratio_vs_depth",
            "growth_vs_alpha",
            "norm_ratio_vs_depth_alpha",
        ] {
            assert!(
                root.join("figures").join(format!("{fig}.png")).exists(),
                "{fig}"
            );
            assert!(
                root.join("figures").join(format!("{fig}.svg")).exists(),
                "{fig}"
            );
        }
        let csv = std::fs::read_to_string(root.join("results.csv")).unwrap();
        assert_eq!(csv.lines().count(), 1 + 39 * 16);

        // Two depths fit no growth: the table says so instead of "bounded".
        let two = tmp.path().join("two");
        std::fs::create_dir_all(&two).unwrap();
        std::fs::write(
            two.join(SWEEP_COPY),
            spec_text
                .replace(
                    "[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]",
                    "[2, 4]",
                )
                .replace("planted", "two"),
        )
        .unwrap();
        for s in crate::analysis::tests::planted(0.5) {
            let name = &s.point.name;
            if name.starts_with("depth-2_") || name.starts_with("depth-4_") {
                std::fs::create_dir_all(two.join(name)).unwrap();
                let json = serde_json::to_string(s.probe.as_ref().unwrap()).unwrap();
                std::fs::write(two.join(name).join(tau_records::PROBE_FILE), json).unwrap();
            }
        }
        generate(&two).unwrap();
        let md = std::fs::read_to_string(two.join("report.md")).unwrap();
        assert!(
            md.contains("– (2 depths; a fit needs 3) | too few depths |"),
            "{md}"
        );
        assert!(
            !md.contains("| bounded |") && !md.contains("| grows |"),
            "{md}"
        );
        if let Ok(keep) = std::env::var("XTASK_KEEP_PLANTED_REPORT") {
            let _ = std::fs::remove_dir_all(&keep);
            std::fs::rename(&root, keep).unwrap();
        }
    }
}
