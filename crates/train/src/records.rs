//! Run records: `metrics.jsonl` (one JSON object per logged step), `summary.json` (the
//! run's final status and numbers), and atomic file writes (temporary file, then rename).
//!
//! The record types, the file names and the atomic write are defined once, in
//! [`tau_records`] (shared with xtask), and re-exported here; this module adds what only
//! the trainer does: appending `metrics.jsonl` and reading it back.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::Context;

pub(crate) use tau_records::sync_dir;
pub use tau_records::{
    CodeVersion, LayerNorm, METRICS_FILE, MetricsRecord, RunStatus, SUMMARY_FILE, Summary,
    WriteError, write_atomic, write_atomic as atomic_write, write_json_atomic,
};

/// The version of this build: the `tau-train` crate version and the git commit captured
/// when the binary was built (unknown outside a git checkout).
pub fn current_code_version() -> CodeVersion {
    CodeVersion::from_build(env!("CARGO_PKG_VERSION"), option_env!("TAU_GIT_COMMIT"))
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
    pub fn create(dir: &Path) -> crate::Result<MetricsWriter> {
        let path = dir.join(METRICS_FILE);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(MetricsWriter { path, file, len: 0 })
    }

    /// Opens `metrics.jsonl` in `dir` and truncates it to `len` bytes.
    ///
    /// # Errors
    /// A missing file or one shorter than `len` (the record and the checkpoint disagree).
    pub fn resume(dir: &Path, len: u64) -> crate::Result<MetricsWriter> {
        let path = dir.join(METRICS_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let actual = file.metadata()?.len();
        if actual < len {
            crate::error::bail!(
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
    pub fn append(&mut self, record: &MetricsRecord) -> crate::Result<()> {
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
    pub fn sync(&mut self) -> crate::Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// Reads every record of a `metrics.jsonl`.
///
/// # Errors
/// I/O errors or a malformed line, naming the file and line.
pub fn read_metrics(path: &Path) -> crate::Result<Vec<MetricsRecord>> {
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
    use std::fs;

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
        assert!(format!("{:#}", anyhow::Error::from(err)).contains("missing"));
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
