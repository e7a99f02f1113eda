//! The one durable atomic write: a temporary file in the destination's directory is
//! written, flushed to disk, renamed over the destination, and the directory flushed.

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// The step of an atomic write that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStep {
    /// Creating the temporary file (a missing or read-only directory).
    Create,
    /// Writing the bytes into the temporary file.
    Write,
    /// Flushing the temporary file to disk.
    Sync,
    /// Renaming the temporary file over the destination.
    Rename,
}

impl fmt::Display for WriteStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteStep::Create => "creating the temporary file",
            WriteStep::Write => "writing the temporary file",
            WriteStep::Sync => "syncing the temporary file",
            WriteStep::Rename => "renaming the temporary file onto it",
        })
    }
}

/// Why an atomic write failed. Every variant names the destination path.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The path names no file (it ends in `..` or is a root).
    #[error("writing {}: the path has no file name", path.display())]
    NoFileName {
        /// The destination.
        path: PathBuf,
    },
    /// An I/O error; the destination is untouched and the temporary file removed.
    #[error("writing {}: {step} {}", path.display(), tmp.display())]
    Io {
        /// The destination.
        path: PathBuf,
        /// The temporary file.
        tmp: PathBuf,
        /// The step that failed.
        step: WriteStep,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The value could not be serialized (nothing was written).
    #[error("serializing {}", path.display())]
    Serialize {
        /// The destination.
        path: PathBuf,
        /// The serialization error.
        #[source]
        source: serde_json::Error,
    },
}

impl WriteError {
    /// The destination path of the failed write.
    pub fn path(&self) -> &Path {
        match self {
            WriteError::NoFileName { path }
            | WriteError::Io { path, .. }
            | WriteError::Serialize { path, .. } => path,
        }
    }
}

/// Distinguishes the temporary files of concurrent writes from one process.
static WRITES: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same
/// directory is written, flushed to disk (fsync) and renamed over `path`, then the
/// directory is flushed so that the rename itself survives a crash (on Unix; elsewhere
/// the platform gives no portable way, and that step is skipped). A process killed at
/// any instant leaves either the old file or the new one, never a torn one, and no
/// temporary file once the write has returned.
///
/// The directory must exist: it is not created.
///
/// # Errors
/// [`WriteError`], naming `path`: no file name, or an I/O error creating, writing,
/// syncing or renaming the temporary file (which is then removed). A failure to flush
/// the directory after the rename is not reported: the new file is in place by then.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let name = path.file_name().ok_or_else(|| WriteError::NoFileName {
        path: path.to_path_buf(),
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let io_err = |step: WriteStep| {
        let (path, tmp) = (path.to_path_buf(), tmp.clone());
        move |source: io::Error| WriteError::Io {
            path,
            tmp,
            step,
            source,
        }
    };
    let mut file = File::create(&tmp).map_err(io_err(WriteStep::Create))?;
    let result = file
        .write_all(bytes)
        .map_err(io_err(WriteStep::Write))
        .and_then(|()| file.sync_all().map_err(io_err(WriteStep::Sync)))
        .and_then(|()| {
            drop(file);
            fs::rename(&tmp, path).map_err(io_err(WriteStep::Rename))
        });
    match result {
        Ok(()) => {
            sync_dir(dir);
            Ok(())
        }
        Err(err) => {
            let _ = fs::remove_file(&tmp);
            Err(err)
        }
    }
}

/// Serializes `value` as pretty JSON followed by a newline and writes it with
/// [`write_atomic`].
///
/// # Errors
/// [`WriteError`], naming `path`: serialization or I/O errors.
pub fn write_json_atomic<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), WriteError> {
    let mut text = serde_json::to_string_pretty(value).map_err(|source| WriteError::Serialize {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Flushes a directory's entries (the renames in it) to disk, where the platform allows
/// (Unix); best effort: errors are ignored, as some file systems refuse to sync a
/// directory.
pub fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_replaces_an_existing_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(names(dir.path()), ["a.json"]);
    }

    #[test]
    fn write_into_a_missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing/a.json");
        let err = write_atomic(&p, b"x").unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::Io {
                    step: WriteStep::Create,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.path(), p);
        assert!(err.to_string().contains(&p.display().to_string()), "{err}");
        assert!(!dir.path().join("missing").exists());
        assert!(names(dir.path()).is_empty());
    }

    #[test]
    fn failed_rename_removes_the_temporary_and_keeps_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        // A non-empty directory cannot be replaced by a file.
        let p = dir.path().join("a.json");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("inside"), b"kept").unwrap();
        let err = write_atomic(&p, b"x").unwrap_err();
        assert!(
            matches!(
                err,
                WriteError::Io {
                    step: WriteStep::Rename,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(names(dir.path()), ["a.json"]);
        assert_eq!(fs::read(p.join("inside")).unwrap(), b"kept");
    }

    #[test]
    fn a_path_without_a_file_name_is_an_error() {
        let err = write_atomic(Path::new("/"), b"x").unwrap_err();
        assert!(matches!(err, WriteError::NoFileName { .. }), "{err:?}");
    }

    #[test]
    fn json_is_pretty_with_a_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.json");
        write_json_atomic(&p, &serde_json::json!({"a": [1, 2]})).unwrap();
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\n  \"a\": [\n    1,\n    2\n  ]\n}\n"
        );
        let err = write_json_atomic(&dir.path().join("no/v.json"), &1).unwrap_err();
        assert!(err.to_string().contains("v.json"), "{err}");
    }
}
