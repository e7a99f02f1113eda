//! Tests that every shipped `configs/sweep-*.toml` expands into points whose merged
//! configs `tau-resnet` accepts, checked with tau-resnet's own config readers
//! (`tau_train::config::config_with_overrides` for `train`, `tau_train::probe::
//! validate_config` for `probe`): what `tau-resnet <command> --config base.toml --set ...`
//! would read, without running anything.

use std::path::{Path, PathBuf};

use crate::spec::{RunCommand, SweepSpec};

fn sweep_configs() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("the configs folder is part of the repository")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("sweep-") && n.ends_with(".toml"))
        })
        .collect();
    files.sort();
    files
}

/// Every point of `spec`, checked as tau-resnet reads it; the first error per point.
fn check(spec: &SweepSpec) -> Vec<String> {
    let mut errors = Vec::new();
    for point in spec.points().expect("grid expands") {
        let sets = point.set_args();
        let result = match spec.command {
            RunCommand::Train => {
                tau_train::config::config_with_overrides(spec.base.clone(), &sets).map(|_| ())
            }
            RunCommand::Probe => tau_train::probe::validate_config(spec.base.clone(), &sets),
        };
        if let Err(e) = result {
            errors.push(format!("{}: {e:#}", point.name));
        }
    }
    errors
}

#[test]
fn every_shipped_sweep_point_is_a_valid_tau_resnet_config() {
    let files = sweep_configs();
    assert!(files.len() >= 7, "found only {files:?}");
    let mut problems = Vec::new();
    for file in &files {
        let spec = SweepSpec::from_file(file).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(spec.n_points() > 0, "{}: no points", file.display());
        for e in check(&spec) {
            problems.push(format!("{}: {e}", file.display()));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The residual-scaling comparisons (MNIST and the CIFAR-10 subset) are shipped, pass the
/// check above with every other sweep, and compare what they say they compare: the four
/// schemes, without normalization, at two or more depths and seeds, every other setting in
/// the base (one optimizer budget for all schemes), test accuracy in the report.
#[test]
fn the_scheme_sweeps_compare_every_scheme_with_one_budget() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let files = sweep_configs();
    for name in ["sweep-schemes-mnist.toml", "sweep-schemes-cifar10.toml"] {
        let path = dir.join(name);
        assert!(files.contains(&path), "{name} is not among {files:?}");
        let spec = SweepSpec::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(spec.command, RunCommand::Train, "{name}");
        let mut keys: Vec<&str> = spec.axes.iter().map(|a| a.key.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["model.depth", "model.scaling", "seed"], "{name}");
        let values = |key: &str| {
            spec.axes
                .iter()
                .find(|a| a.key == key)
                .map(|a| a.values.clone())
                .unwrap_or_default()
        };
        let schemes: Vec<String> = values("model.scaling")
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        assert_eq!(schemes, ["tau", "fixup", "skipinit", "rezero"], "{name}");
        assert!(values("model.depth").len() >= 2, "{name}");
        assert!(values("seed").len() >= 2, "{name}");
        let model = spec.base.get("model").and_then(|m| m.as_table()).unwrap();
        assert_eq!(
            model.get("norm").and_then(|v| v.as_str()),
            Some("none"),
            "{name}"
        );
        assert_eq!(
            spec.report.accuracy_metric.as_deref(),
            Some("final_metrics.test_acc"),
            "{name}"
        );
        assert!(check(&spec).is_empty(), "{name}: {:?}", check(&spec));
    }
}

/// The check itself catches a bad point: an unknown key in the base and an impossible
/// grid value, for both commands.
#[test]
fn the_check_rejects_bad_points() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let gd = SweepSpec::from_file(&dir.join("sweep-gd-convergence.toml")).expect("parses");
    let mut bad = gd.clone();
    bad.base
        .insert("learning_rate".into(), toml::Value::Float(0.1));
    assert_eq!(check(&bad).len(), bad.n_points());
    let mut bad = gd;
    bad.axes[0].values.push(toml::Value::Integer(0));
    let errors = check(&bad);
    assert!(!errors.is_empty(), "depth 0 accepted");
    let probe = SweepSpec::from_file(&dir.join("sweep-stability.toml")).expect("parses");
    let mut bad = probe.clone();
    if let Some(toml::Value::Table(p)) = bad.base.get_mut("probe") {
        p.insert(
            "grad_taus".into(),
            toml::Value::Array(vec![toml::Value::String("L^-0.123".into())]),
        );
    }
    assert_eq!(check(&bad).len(), bad.n_points());
}
