//! Reading a sweep's run records (`probe.json`, `summary.json`, `xtask-failure.json`) and
//! writing `results.csv` from them alone.
//!
//! The records of `tau-resnet` are read into their own types ([`Summary`],
//! [`ProbeRecord`]), defined once in tau-records for the writer and the reader.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tau_records::{PROBE_FILE, ProbeRecord, RunStatus, SUMMARY_FILE, Summary};

use crate::spec::{Point, RunCommand, SweepSpec, display_value};

/// The record xtask writes for a point whose process failed (error exit, no record).
pub const FAILURE_RECORD: &str = "xtask-failure.json";
/// The stored sweep config under `runs/<sweep>/`.
pub const SWEEP_COPY: &str = "sweep.toml";

/// Where a point stands, as its records on disk say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Ran to the end.
    Finished,
    /// Diverged (non-finite loss or gradient): a result.
    Diverged,
    /// Stopped by Ctrl-C after a checkpoint: resumed on the next sweep.
    Interrupted,
    /// The process failed (bad config, I/O, crash): retried on the next sweep.
    Failed,
    /// Not run yet (or killed before writing anything final).
    Pending,
}

impl Status {
    /// Whether a re-run of the sweep skips this point (without `--force`).
    pub fn is_done(self) -> bool {
        matches!(self, Status::Finished | Status::Diverged)
    }

    /// Lowercase name, as in the CSV.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Finished => "finished",
            Status::Diverged => "diverged",
            Status::Interrupted => "interrupted",
            Status::Failed => "failed",
            Status::Pending => "pending",
        }
    }
}

impl From<RunStatus> for Status {
    /// The state of a point whose `summary.json` says the run ended so.
    fn from(status: RunStatus) -> Status {
        match status {
            RunStatus::Finished => Status::Finished,
            RunStatus::Diverged => Status::Diverged,
            RunStatus::Interrupted => Status::Interrupted,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure record xtask writes when a point's process exits with an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailureRecord {
    /// Exit code, or `None` when killed by a signal.
    pub exit_code: Option<i32>,
    /// The cause: the last error line the process printed.
    pub message: String,
}

/// A point with everything its records say.
#[derive(Debug, Clone)]
pub struct PointState {
    /// The grid point.
    pub point: Point,
    /// Its folder.
    pub dir: PathBuf,
    /// Status from its records.
    pub status: Status,
    /// Why it failed, for failed points.
    pub message: Option<String>,
    /// `summary.json` (training sweeps).
    pub summary: Option<Summary>,
    /// `probe.json` (probe sweeps).
    pub probe: Option<ProbeRecord>,
}

/// Reads the state of one point from its folder.
pub fn read_point(command: RunCommand, point: &Point, dir: &Path) -> PointState {
    let mut state = PointState {
        point: point.clone(),
        dir: dir.to_path_buf(),
        status: Status::Pending,
        message: None,
        summary: None,
        probe: None,
    };
    let record = match command {
        RunCommand::Probe => dir.join(PROBE_FILE),
        RunCommand::Train => dir.join(SUMMARY_FILE),
    };
    if record.exists() {
        let parsed = std::fs::read_to_string(&record)
            .map_err(anyhow::Error::from)
            .and_then(|text| match command {
                RunCommand::Probe => {
                    let probe: ProbeRecord = serde_json::from_str(&text)?;
                    state.probe = Some(probe);
                    Ok(Status::Finished)
                }
                RunCommand::Train => {
                    let summary: Summary = serde_json::from_str(&text)?;
                    let status = Status::from(summary.status);
                    state.summary = Some(summary);
                    Ok(status)
                }
            });
        match parsed {
            Ok(status) => {
                state.status = status;
                return state;
            }
            Err(err) => {
                state.status = Status::Failed;
                state.message = Some(format!("unreadable {}: {err}", record.display()));
                return state;
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string(dir.join(FAILURE_RECORD)) {
        state.status = Status::Failed;
        state.message = Some(match serde_json::from_str::<FailureRecord>(&text) {
            Ok(f) => f.message,
            Err(err) => format!("unreadable {FAILURE_RECORD}: {err}"),
        });
    }
    state
}

/// Reads every point of a sweep from `root` (`runs/<sweep>`), in grid order.
///
/// # Errors
/// Only when the grid cannot be expanded.
pub fn read_sweep(spec: &SweepSpec, root: &Path) -> anyhow::Result<Vec<PointState>> {
    Ok(spec
        .points()?
        .iter()
        .map(|p| read_point(spec.command, p, &root.join(&p.name)))
        .collect())
}

/// Writes `contents` to `path` atomically and durably ([`tau_records::write_atomic`]),
/// creating its folder first.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_atomic(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(tau_records::write_atomic(path, contents)?)
}

/// Formats a number for the CSV: shortest round-trip text, empty for non-finite values.
pub fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        String::new()
    }
}

/// The scalar fields of a run's summary under dotted keys (`final_metrics.test_acc`), as
/// [`flatten_scalars`] gives them for the summary's JSON; absent values have no key.
pub fn summary_scalars(summary: &Summary) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(value) = serde_json::to_value(summary) {
        flatten_scalars(&value, "", &mut out);
    }
    out
}

/// Flattens the scalar fields of a JSON object into dotted keys (`final_metrics.test_acc`).
/// Arrays are skipped.
pub fn flatten_scalars(
    value: &serde_json::Value,
    prefix: &str,
    out: &mut BTreeMap<String, String>,
) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_scalars(v, &key, out);
            }
        }
        serde_json::Value::Number(n) => {
            let text = match n.as_f64() {
                Some(x) if n.is_f64() => num(x),
                _ => n.to_string(),
            };
            out.insert(prefix.to_string(), text);
        }
        serde_json::Value::String(s) => {
            out.insert(prefix.to_string(), s.clone());
        }
        serde_json::Value::Bool(b) => {
            out.insert(prefix.to_string(), b.to_string());
        }
        serde_json::Value::Null | serde_json::Value::Array(_) => {}
    }
}

/// Builds `results.csv` from the point states: one row per point (training sweeps) or
/// one row per (point, τ rule) (probe sweeps). Depends on the records only.
///
/// # Errors
/// CSV encoding errors.
pub fn results_csv(spec: &SweepSpec, states: &[PointState]) -> anyhow::Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let axis_cols: Vec<String> = spec.axes.iter().map(|a| a.key.clone()).collect();
    match spec.command {
        RunCommand::Train => {
            let mut extra = std::collections::BTreeSet::new();
            let flat: Vec<BTreeMap<String, String>> = states
                .iter()
                .map(|s| {
                    let mut m = s.summary.as_ref().map(summary_scalars).unwrap_or_default();
                    m.remove("status");
                    extra.extend(m.keys().cloned());
                    m
                })
                .collect();
            let mut header = vec!["point".to_string()];
            header.extend(axis_cols.iter().cloned());
            header.extend(["status".to_string(), "message".to_string()]);
            header.extend(extra.iter().cloned());
            w.write_record(&header)?;
            for (s, m) in states.iter().zip(&flat) {
                let mut row = vec![s.point.name.clone()];
                row.extend(s.point.values.iter().map(|(_, v)| display_value(v)));
                row.push(s.status.to_string());
                row.push(s.message.clone().unwrap_or_default());
                row.extend(extra.iter().map(|k| m.get(k).cloned().unwrap_or_default()));
                w.write_record(&row)?;
            }
        }
        RunCommand::Probe => {
            let mut header = vec!["point".to_string()];
            header.extend(axis_cols.iter().cloned());
            header.extend(
                [
                    "status",
                    "message",
                    "tau_rule",
                    "alpha",
                    "tau",
                    "n_blocks",
                    "n_samples",
                    "log10_ratio_mean",
                    "log10_ratio_median",
                    "log10_ratio_q10",
                    "log10_ratio_q90",
                    "log10_grad_ratio_median",
                    "log10_grad_ratio_q10",
                    "log10_grad_ratio_q90",
                ]
                .map(String::from),
            );
            w.write_record(&header)?;
            for s in states {
                let prefix = |w: &mut Vec<String>| {
                    w.push(s.point.name.clone());
                    w.extend(s.point.values.iter().map(|(_, v)| display_value(v)));
                    w.push(s.status.to_string());
                    w.push(s.message.clone().unwrap_or_default());
                };
                match &s.probe {
                    None => {
                        let mut row = Vec::new();
                        prefix(&mut row);
                        row.resize(header.len(), String::new());
                        w.write_record(&row)?;
                    }
                    Some(p) => {
                        for t in &p.taus {
                            let mut row = Vec::new();
                            prefix(&mut row);
                            let f = crate::analysis::Summary::of_log10(&t.log10_ratio);
                            let g = crate::analysis::Summary::of_log10(&t.log10_grad_ratio);
                            row.extend([
                                t.rule.clone(),
                                t.alpha.map(num).unwrap_or_default(),
                                num(t.tau),
                                p.n_blocks.to_string(),
                                t.log10_ratio.len().to_string(),
                                num(f.log10_mean),
                                num(f.median),
                                num(f.q10),
                                num(f.q90),
                                num(g.median),
                                num(g.q10),
                                num(g.q90),
                            ]);
                            w.write_record(&row)?;
                        }
                    }
                }
            }
        }
    }
    w.into_inner()
        .map_err(|e| anyhow::anyhow!("encoding results.csv: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_keeps_scalars_with_dotted_keys() {
        let v = serde_json::json!({"status": "finished", "final_metrics": {"train_loss": 0.5, "step": 3},
            "hist": [1, 2], "ok": true, "none": null});
        let mut m = BTreeMap::new();
        flatten_scalars(&v, "", &mut m);
        assert_eq!(m["final_metrics.train_loss"], "0.5");
        assert_eq!(m["final_metrics.step"], "3");
        assert_eq!(m["ok"], "true");
        assert!(!m.contains_key("hist") && !m.contains_key("none"));
    }

    #[test]
    fn atomic_write_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b.json");
        write_atomic(&path, b"{}").unwrap();
        write_atomic(&path, b"[]").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"[]");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a")).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
