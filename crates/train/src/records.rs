//! Run records: `metrics.jsonl` (one JSON object per logged step), `summary.json` (the
//! run's final status and numbers), and atomic file writes (temporary file, then rename).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is
/// written, flushed to disk and renamed over `path`. A process killed at any instant
/// leaves either the old file or the new one, never a torn one.
///
/// # Errors
/// Any I/O error, naming the path.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_dir(dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Flushes a directory's entries (the renames in it) to disk, where the platform allows.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Serializes `value` as pretty JSON and writes it atomically.
///
/// # Errors
/// Serialization or I/O errors, naming the path.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .with_context(|| format!("serializing {}", path.display()))?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

/// The gradient norm of one layer (a block, or a named module outside the blocks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerNorm {
    /// The layer's name: a block (`layer2.3`, `blocks.7`) or a module (`conv1`, `fc`).
    pub name: String,
    /// Euclidean norm of the gradient of all the layer's trained parameters.
    pub norm: f64,
}

/// One line of `metrics.jsonl`.
///
/// Non-finite numbers are written as `null` (JSON has no NaN or infinity).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MetricsRecord {
    /// Optimizer steps taken when the record was written.
    pub step: u64,
    /// Epoch (0-based) the last step belonged to; a record at the end of epoch `e` has
    /// `epoch = e` and `epoch_end = true`.
    pub epoch: u64,
    /// Whether this record closes an epoch.
    pub epoch_end: bool,
    /// The base learning rate of the last step.
    pub lr: f64,
    /// Training loss: for full-batch GD, exact over the whole set at the last step's
    /// parameters; for SGD, the mean over the batches since the previous record.
    pub train_loss: Option<f64>,
    /// Training accuracy, measured as `train_loss` is (classification data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_acc: Option<f64>,
    /// Test loss, when the test set was evaluated at this record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_loss: Option<f64>,
    /// Test accuracy, when evaluated (classification data only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    /// Norm of the whole gradient of the last step (before weight decay).
    pub grad_norm: Option<f64>,
    /// Gradient norm of each layer at the last step.
    pub layer_grad_norms: Vec<LayerNorm>,
    /// The current τ, when it is learnable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tau: Option<f64>,
    /// Theory network: mean over (up to one chunk of) the training points of
    /// ‖h_L(x)‖ / ‖h_0(x)‖ at the current parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub h_ratio: Option<f64>,
    /// Training examples per second since the previous record (wall-clock; differs
    /// between runs).
    pub examples_per_s: f64,
    /// Seconds since the run started, counting earlier sessions of a resumed run
    /// (wall-clock; differs between runs).
    pub wall_s: f64,
}

impl MetricsRecord {
    /// The record without its wall-clock fields, for comparing runs.
    pub fn without_timing(&self) -> MetricsRecord {
        MetricsRecord {
            examples_per_s: 0.0,
            wall_s: 0.0,
            ..self.clone()
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// All epochs or steps done.
    Finished,
    /// A non-finite loss or gradient stopped the run.
    Diverged,
    /// Ctrl-C (or a requested stop): a checkpoint was written and the run can be resumed.
    Interrupted,
}

/// The exact version of the code that produced a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeVersion {
    /// The `tau-train` crate version.
    pub crate_version: String,
    /// The git commit the binary was built from, when known. (Uncommitted changes in
    /// the working tree at build time are not recorded.)
    pub git_commit: Option<String>,
}

impl CodeVersion {
    /// The version of this build: the crate version and the git commit captured when the
    /// binary was built (unknown outside a git checkout).
    pub fn current() -> CodeVersion {
        let git_commit = option_env!("TAU_GIT_COMMIT")
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        CodeVersion {
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit,
        }
    }
}

/// `summary.json`: the run's status and numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The run's name.
    pub name: String,
    /// `finished`, `diverged` or `interrupted`.
    pub status: RunStatus,
    /// The step whose loss or gradient was non-finite (0-based: the number of updates
    /// applied before it).
    pub diverged_at_step: Option<u64>,
    /// What went non-finite.
    pub divergence_reason: Option<String>,
    /// Optimizer steps applied.
    pub steps: u64,
    /// Epochs completed.
    pub epochs_completed: u64,
    /// The number of steps after which the training loss fell below the config's
    /// `target_loss` (the run stops there).
    pub reached_target_at_step: Option<u64>,
    /// The last record written.
    pub final_metrics: Option<MetricsRecord>,
    /// Lowest training loss seen in a record.
    pub best_train_loss: Option<f64>,
    /// Lowest test loss seen.
    pub best_test_loss: Option<f64>,
    /// Highest test accuracy seen.
    pub best_test_acc: Option<f64>,
    /// Total wall time in seconds, over all sessions of the run.
    pub wall_s: f64,
    /// The device the run used (last session).
    pub device: String,
    /// The code that produced the run.
    pub version: CodeVersion,
}

/// Appends records to `metrics.jsonl`, one line each, flushed after every line.
///
/// A resumed run first truncates the file to the length it had at the checkpoint, so a
/// line written after the checkpoint (or torn by a kill) is replaced by the same line
/// computed again.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
    len: u64,
}

impl MetricsWriter {
    /// Creates `metrics.jsonl` (empty) in `dir`.
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn create(dir: &Path) -> anyhow::Result<MetricsWriter> {
        let path = dir.join("metrics.jsonl");
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(MetricsWriter { path, file, len: 0 })
    }

    /// Opens `metrics.jsonl` in `dir` and truncates it to `len` bytes.
    ///
    /// # Errors
    /// A missing file or one shorter than `len` (the record and the checkpoint disagree).
    pub fn resume(dir: &Path, len: u64) -> anyhow::Result<MetricsWriter> {
        let path = dir.join("metrics.jsonl");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let actual = file.metadata()?.len();
        if actual < len {
            anyhow::bail!(
                "{}: {actual} bytes, but the checkpoint was taken at {len}: the records do not belong to this checkpoint",
                path.display()
            );
        }
        file.set_len(len)
            .with_context(|| format!("truncating {}", path.display()))?;
        file.seek(SeekFrom::Start(len))?;
        Ok(MetricsWriter { path, file, len })
    }

    /// Appends one record as a line.
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn append(&mut self, record: &MetricsRecord) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Bytes written so far (what a checkpoint records).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Flushes the file to disk (before a checkpoint refers to its length).
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Reads every record of a `metrics.jsonl`.
///
/// # Errors
/// I/O errors or a malformed line, naming the file and line.
pub fn read_metrics(path: &Path) -> anyhow::Result<Vec<MetricsRecord>> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_write_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing/a.json");
        let err = atomic_write(&p, b"x").unwrap_err();
        assert!(format!("{err:#}").contains("missing"));
    }

    #[test]
    fn non_finite_numbers_are_null_and_metrics_resume_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::create(dir.path()).unwrap();
        let r = MetricsRecord {
            step: 1,
            train_loss: Some(0.5),
            ..Default::default()
        };
        w.append(&r).unwrap();
        let len = w.len();
        w.append(&MetricsRecord {
            step: 2,
            train_loss: Some(f64::NAN),
            ..Default::default()
        })
        .unwrap();
        let text = fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert!(text.lines().nth(1).unwrap().contains("\"train_loss\":null"));
        drop(w);
        let mut w = MetricsWriter::resume(dir.path(), len).unwrap();
        w.append(&r).unwrap();
        let back = read_metrics(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!(back, vec![r.clone(), r]);
        assert!(MetricsWriter::resume(dir.path(), 10_000).is_err());
    }
}
