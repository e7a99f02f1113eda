//! Sweep configs (`configs/sweep-*.toml`): a base run config plus grid axes over dotted
//! config keys, expanded into named points.
//!
//! ```toml
//! name = "stability"          # runs/<name>/
//! command = "probe"           # or "train": the tau-resnet subcommand run per point
//! base_config = "theory.toml" # optional, relative to this file; [base] is merged over it
//!
//! [base.model]                # the run config every point starts from
//! family = "theory"
//!
//! [grid]                      # axes: dotted key -> values; points are their product
//! "model.depth" = [1, 2, 4]
//! seed = [0, 1, 2]
//!
//! [report]                    # optional: what the report features
//! rules = ["1", "1/sqrt(L)"]
//!
//! [slurm]                     # optional: job settings for `cargo xtask sweep --slurm`
//! time = "04:00:00"
//! gpus_per_task = "1"
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::slurm::SlurmSettings;

/// The `tau-resnet` subcommand a sweep runs for each point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunCommand {
    /// `tau-resnet train`: one training run per point; record `summary.json`.
    Train,
    /// `tau-resnet probe`: stability at initialization; record `probe.json`.
    Probe,
}

impl RunCommand {
    /// The subcommand's name on the `tau-resnet` command line.
    pub fn as_str(self) -> &'static str {
        match self {
            RunCommand::Train => "train",
            RunCommand::Probe => "probe",
        }
    }
}

impl fmt::Display for RunCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the report features (all optional).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReportSettings {
    /// Probe sweeps: the τ rules shown in the norm-vs-depth figure and table (all rules
    /// when empty).
    #[serde(default)]
    pub rules: Vec<String>,
    /// Training sweeps: the metric plotted against depth (default: the last test accuracy).
    #[serde(default)]
    pub accuracy_metric: Option<String>,
    /// Training sweeps: report, per depth and group, the first logged step at which the
    /// training loss is at most this value (e.g. `1e-3` for the GD convergence sweep).
    #[serde(default)]
    pub loss_threshold: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    name: String,
    command: RunCommand,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    base_config: Option<PathBuf>,
    #[serde(default)]
    base: toml::Table,
    grid: toml::Table,
    #[serde(default)]
    report: ReportSettings,
    #[serde(default)]
    slurm: SlurmSettings,
}

/// One grid axis: a dotted config key and the values it takes.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    /// Dotted key into the run config, e.g. `model.depth`.
    pub key: String,
    /// The values, in the order written.
    pub values: Vec<toml::Value>,
}

/// The most points a sweep's grid may have (each is a process and a folder).
pub const MAX_POINTS: usize = 100_000;

/// A parsed sweep: everything needed to expand and run it.
#[derive(Debug, Clone)]
pub struct SweepSpec {
    /// The sweep's name: its output folder under `runs/`.
    pub name: String,
    /// The subcommand run per point.
    pub command: RunCommand,
    /// Free text shown at the top of the report.
    pub description: Option<String>,
    /// The base run config (the `base_config` file with `[base]` merged over it).
    pub base: toml::Table,
    /// Grid axes, in key order.
    pub axes: Vec<Axis>,
    /// Report settings.
    pub report: ReportSettings,
    /// Job settings for `cargo xtask sweep --slurm` (the `[slurm]` table).
    pub slurm: SlurmSettings,
}

/// One point of a sweep: its folder name and the value of every axis.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Folder name under `runs/<sweep>/`, made from the axis values.
    pub name: String,
    /// `(dotted key, value)` for every axis, in axis order.
    pub values: Vec<(String, toml::Value)>,
}

impl Point {
    /// The `--set key=value` arguments that turn the base config into this point's.
    pub fn set_args(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(k, v)| format!("{k}={}", toml_value_text(v)))
            .collect()
    }
}

/// A value as TOML source text (`"1/sqrt(L)"`, `64`, `[0, 1]`).
pub fn toml_value_text(v: &toml::Value) -> String {
    v.to_string()
}

/// A value for tables and file names: strings without quotes, other values as TOML.
pub fn display_value(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl SweepSpec {
    /// Reads and validates a sweep file.
    ///
    /// # Errors
    /// Unreadable file, malformed TOML, unknown keys, a bad name, an empty grid axis, or
    /// an unreadable `base_config`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading sweep config {}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::from_str_in(&text, dir).with_context(|| format!("sweep config {}", path.display()))
    }

    /// Parses a sweep from TOML text; `base_config` paths are relative to `dir`.
    ///
    /// # Errors
    /// As [`SweepSpec::from_file`].
    pub fn from_str_in(text: &str, dir: &Path) -> anyhow::Result<Self> {
        let file: SweepFile = toml::from_str(text)?;
        validate_name(&file.name)?;
        let mut base = match &file.base_config {
            Some(rel) => {
                let path = dir.join(rel);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading base_config {}", path.display()))?;
                toml::from_str::<toml::Table>(&text)
                    .with_context(|| format!("parsing base_config {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        merge_tables(&mut base, file.base);
        if file.grid.is_empty() {
            bail!("[grid] has no axes: a sweep needs at least one");
        }
        let mut axes = Vec::new();
        for (key, value) in file.grid {
            if key.is_empty() || key.split('.').any(str::is_empty) {
                bail!("grid key `{key}` is not a dotted config key");
            }
            let values = match value {
                toml::Value::Array(values) => values,
                _ => bail!("grid axis `{key}` must be an array of values"),
            };
            if values.is_empty() {
                bail!("grid axis `{key}` has no values");
            }
            axes.push(Axis { key, values });
        }
        let sizes: Vec<usize> = axes.iter().map(|a| a.values.len()).collect();
        let n = sizes.iter().try_fold(1usize, |n, &k| n.checked_mul(k));
        if n.is_none_or(|n| n > MAX_POINTS) {
            bail!(
                "the grid has {} points ({}); a sweep holds at most {MAX_POINTS}",
                n.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                sizes
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(" × ")
            );
        }
        Ok(SweepSpec {
            name: file.name,
            command: file.command,
            description: file.description,
            base,
            axes,
            report: file.report,
            slurm: file.slurm,
        })
    }

    /// The number of points (the product of the axis lengths).
    pub fn n_points(&self) -> usize {
        self.axes.iter().map(|a| a.values.len()).product()
    }

    /// Expands the grid into points, the last axis varying fastest.
    ///
    /// # Errors
    /// Two points whose folder names coincide (values that differ only in characters
    /// that cannot appear in a folder name).
    pub fn points(&self) -> anyhow::Result<Vec<Point>> {
        let labels = axis_labels(&self.axes);
        let mut points = Vec::with_capacity(self.n_points());
        let mut index = vec![0usize; self.axes.len()];
        'outer: loop {
            let values: Vec<(String, toml::Value)> = self
                .axes
                .iter()
                .zip(&index)
                .map(|(a, &i)| (a.key.clone(), a.values[i].clone()))
                .collect();
            let name = labels
                .iter()
                .zip(&values)
                .map(|(label, (_, v))| format!("{label}-{}", sanitize(&display_value(v))))
                .collect::<Vec<_>>()
                .join("_");
            points.push(Point { name, values });
            for axis in (0..self.axes.len()).rev() {
                index[axis] += 1;
                if index[axis] < self.axes[axis].values.len() {
                    continue 'outer;
                }
                index[axis] = 0;
            }
            break;
        }
        let mut seen = BTreeSet::new();
        for p in &points {
            if !seen.insert(p.name.as_str()) {
                bail!(
                    "two grid points share the folder name `{}`: make the axis values differ in letters or digits",
                    p.name
                );
            }
        }
        Ok(points)
    }
}

/// Short labels for the axes in folder names: the last component of each key, or the
/// whole key where two axes share a last component.
fn axis_labels(axes: &[Axis]) -> Vec<String> {
    let last = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    axes.iter()
        .map(|a| {
            let short = last(&a.key);
            if axes.iter().filter(|b| last(&b.key) == short).count() > 1 {
                a.key.clone()
            } else {
                short
            }
        })
        .collect()
}

/// Keeps letters, digits, `.` and `-`; every other run of characters becomes one `_`.
pub(crate) fn sanitize(s: &str) -> String {
    let mut out = String::new();
    let mut pending = false;
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
            if pending && !out.is_empty() {
                out.push('_');
            }
            pending = false;
            out.push(c);
        } else {
            pending = true;
        }
    }
    if out.is_empty() { "x".to_string() } else { out }
}

fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !name.starts_with('-');
    if !ok {
        bail!("sweep name `{name}` must be letters, digits, `-` and `_`");
    }
    Ok(())
}

/// Merges `over` into `base`: tables merge key by key, other values replace.
pub fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SWEEP: &str = r#"
name = "demo"
command = "train"
[base.model]
family = "theory"
width = 8
[grid]
"model.depth" = [2, 4, 8]
"model.tau" = ["1/sqrt(L)", "1"]
seed = [0, 1]
"#;

    #[test]
    fn grid_expands_to_the_product_last_axis_fastest() {
        let spec = SweepSpec::from_str_in(SWEEP, Path::new(".")).unwrap();
        assert_eq!(spec.n_points(), 12);
        let points = spec.points().unwrap();
        assert_eq!(points.len(), 12);
        assert_eq!(points[0].name, "depth-2_tau-1_sqrt_L_seed-0");
        assert_eq!(points[1].name, "depth-2_tau-1_sqrt_L_seed-1");
        assert_eq!(points[2].name, "depth-2_tau-1_seed-0");
        assert_eq!(points[11].name, "depth-8_tau-1_seed-1");
        assert_eq!(
            points[0].set_args(),
            vec!["model.depth=2", "model.tau=\"1/sqrt(L)\"", "seed=0"]
        );
        let names: BTreeSet<_> = points.iter().map(|p| p.name.clone()).collect();
        assert_eq!(names.len(), 12);
        assert_eq!(spec.base["model"]["width"].as_integer(), Some(8));
    }

    #[test]
    fn colliding_folder_names_are_an_error() {
        let text =
            "name = \"x\"\ncommand = \"probe\"\n[grid]\n\"model.tau\" = [\"1/L\", \"1*L\"]\n";
        let spec = SweepSpec::from_str_in(text, Path::new(".")).unwrap();
        let err = spec.points().unwrap_err().to_string();
        assert!(err.contains("tau-1_L"), "{err}");
    }

    #[test]
    fn bad_sweep_files_name_the_problem() {
        let cases = [
            (
                "name = \"a b\"\ncommand = \"train\"\n[grid]\nseed = [0]\n",
                "sweep name",
            ),
            (
                "name = \"a\"\ncommand = \"fly\"\n[grid]\nseed = [0]\n",
                "fly",
            ),
            (
                "name = \"a\"\ncommand = \"train\"\n[grid]\nseed = []\n",
                "no values",
            ),
            (
                "name = \"a\"\ncommand = \"train\"\n[grid]\nseed = 3\n",
                "array",
            ),
            ("name = \"a\"\ncommand = \"train\"\n[grid]\n", "no axes"),
            (
                "name = \"a\"\ncommand = \"train\"\ngird = 1\n[grid]\nseed = [1]\n",
                "gird",
            ),
        ];
        // A grid too large to expand (10^6 points) is one error with its size.
        let axis: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let huge = format!(
            "name = \"a\"\ncommand = \"train\"\n[grid]\nseed = [{0}]\n\"a.b\" = [{0}]\n\"a.c\" = [{0}]\n",
            axis.join(", ")
        );
        let err = format!(
            "{:#}",
            SweepSpec::from_str_in(&huge, Path::new(".")).unwrap_err()
        );
        assert!(
            err.contains("the grid has 1000000 points (100 × 100 × 100)"),
            "{err}"
        );
        for (text, needle) in cases {
            let err = format!(
                "{:#}",
                SweepSpec::from_str_in(text, Path::new(".")).unwrap_err()
            );
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn base_config_file_is_merged_under_the_inline_base() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("run.toml"),
            "seed = 1\n[model]\nwidth = 4\ndepth = 2\n",
        )
        .unwrap();
        let text = "name = \"a\"\ncommand = \"train\"\nbase_config = \"run.toml\"\n[base.model]\nwidth = 16\n[grid]\nseed = [0]\n";
        let spec = SweepSpec::from_str_in(text, dir.path()).unwrap();
        assert_eq!(spec.base["model"]["width"].as_integer(), Some(16));
        assert_eq!(spec.base["model"]["depth"].as_integer(), Some(2));
        assert_eq!(spec.base["seed"].as_integer(), Some(1));
    }
}
