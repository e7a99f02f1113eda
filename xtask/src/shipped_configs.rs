//! Tests that every shipped `configs/sweep-*.toml` expands into points whose merged
//! configs `tau-resnet` accepts, checked with tau-resnet's own config readers
//! (`tau_train::config::config_from_table` for `train`, `tau_train::cmd::probe::
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
                let mut table = spec.base.clone();
                tau_train::config::apply_overrides(&mut table, &sets)
                    .and_then(|()| tau_train::config::config_from_table(table).map(|_| ()))
            }
            RunCommand::Probe => tau_train::cmd::probe::validate_config(spec.base.clone(), &sets),
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
