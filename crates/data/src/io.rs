//! Bounded file reading: a header is read and checked against the file's real size (or,
//! for gzip, against what the compressed file can possibly hold) before any allocation.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;

use crate::DataError;

/// The largest decompressed payload accepted from one file (2 GiB): far above any dataset
/// file this crate reads (MNIST's largest is 47 MB), far below what would exhaust memory.
pub(crate) const MAX_FILE_BYTES: u64 = 2 << 30;

/// DEFLATE cannot expand data by more than about 1032:1 (a 258-byte match per 2 bits), so
/// a gzip file of `c` bytes decompresses to at most this many bytes.
fn gzip_capacity(compressed: u64) -> u64 {
    compressed.saturating_mul(1032).saturating_add(1 << 16)
}

/// Size of a file, as an error naming it when it cannot be read.
pub(crate) fn file_len(path: &Path) -> Result<u64, DataError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| DataError::io(path, e))
}

/// A file's header and payload.
pub(crate) struct HeaderedFile {
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
}

/// Reads a file (raw, or gzip-compressed: detected by its magic bytes) made of a
/// `header_len`-byte header and a payload whose exact length `payload_len(header)` says.
///
/// The payload length is checked before allocation: against the file size for raw files,
/// and against [`MAX_FILE_BYTES`] and the most the compressed file can expand to for gzip;
/// the gzip stream is then decompressed through `take(expected + 1)`, so a stream holding
/// more than the header implies cannot allocate more either.
pub(crate) fn read_headered(
    path: &Path,
    header_len: usize,
    payload_len: impl FnOnce(&[u8]) -> Result<u64, DataError>,
) -> Result<HeaderedFile, DataError> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let file_len = file
        .metadata()
        .map(|m| m.len())
        .map_err(|e| DataError::io(path, e))?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let start = reader.fill_buf().map_err(|e| DataError::io(path, e))?;
    let gz = start.len() >= 2 && start[0] == 0x1f && start[1] == 0x8b;
    if gz {
        read_stream(
            path,
            GzDecoder::new(reader),
            header_len,
            payload_len,
            true,
            file_len,
        )
    } else {
        read_stream(path, reader, header_len, payload_len, false, file_len)
    }
}

fn read_stream(
    path: &Path,
    mut reader: impl Read,
    header_len: usize,
    payload_len: impl FnOnce(&[u8]) -> Result<u64, DataError>,
    gz: bool,
    file_len: u64,
) -> Result<HeaderedFile, DataError> {
    let stream_err = |e: std::io::Error| -> DataError {
        if gz {
            DataError::Gzip {
                path: path.to_path_buf(),
                source: e,
            }
        } else {
            DataError::io(path, e)
        }
    };
    let mut header = Vec::with_capacity(header_len);
    (&mut reader)
        .take(header_len as u64)
        .read_to_end(&mut header)
        .map_err(stream_err)?;
    if header.len() < header_len {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: header_len as u64,
            found: header.len() as u64,
        });
    }
    let expected = payload_len(&header)?;
    let total = expected.saturating_add(header_len as u64);
    if gz {
        let limit = MAX_FILE_BYTES.min(gzip_capacity(file_len));
        if total > limit {
            return Err(DataError::TooLarge {
                path: path.to_path_buf(),
                claimed: total,
                limit,
            });
        }
    } else if file_len < total {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: total,
            found: file_len,
        });
    } else if file_len > total {
        return Err(DataError::WrongSize {
            path: path.to_path_buf(),
            expected: format!("{total} bytes as the header implies"),
            found: file_len,
        });
    }
    // `total` is now bounded by the file's real size or by the gzip limit above.
    let mut payload = Vec::with_capacity(expected as usize);
    reader
        .take(expected.saturating_add(1))
        .read_to_end(&mut payload)
        .map_err(stream_err)?;
    let found = payload.len() as u64 + header_len as u64;
    if found < total {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: total,
            found,
        });
    }
    if found > total {
        return Err(DataError::WrongSize {
            path: path.to_path_buf(),
            expected: format!("{total} decompressed bytes as the header implies"),
            found: if gz { found } else { file_len },
        });
    }
    Ok(HeaderedFile { header, payload })
}

/// Reads a whole raw file whose size must be a positive multiple of `record_len`, after
/// checking the size against [`MAX_FILE_BYTES`].
pub(crate) fn read_records(
    path: &Path,
    record_len: usize,
    describe: &str,
) -> Result<Vec<u8>, DataError> {
    let len = file_len(path)?;
    if len == 0 || len % record_len as u64 != 0 {
        return Err(DataError::WrongSize {
            path: path.to_path_buf(),
            expected: format!("a positive multiple of {record_len} bytes ({describe})"),
            found: len,
        });
    }
    if len > MAX_FILE_BYTES {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            claimed: len,
            limit: MAX_FILE_BYTES,
        });
    }
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut data = Vec::with_capacity(len as usize);
    file.take(len + 1)
        .read_to_end(&mut data)
        .map_err(|e| DataError::io(path, e))?;
    if data.len() as u64 != len {
        // The file changed size while being read.
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            expected: len,
            found: data.len() as u64,
        });
    }
    Ok(data)
}

/// The first directory among `dir` and `dir/<sub>` (for each of `subdirs`) that holds
/// `marker`, if any.
pub(crate) fn find_dir_with(dir: &Path, subdirs: &[&str], marker: &[&str]) -> Option<PathBuf> {
    std::iter::once(dir.to_path_buf())
        .chain(subdirs.iter().map(|s| dir.join(s)))
        .find(|d| marker.iter().any(|m| d.join(m).is_file()))
}

/// Reads a class-name file (one name per non-empty line) if it exists, checking the count.
pub(crate) fn read_class_names(
    path: &Path,
    expected: usize,
) -> Result<Option<Vec<String>>, DataError> {
    if !path.is_file() {
        return Ok(None);
    }
    let len = file_len(path)?;
    if len > 1 << 20 {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            claimed: len,
            limit: 1 << 20,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != expected {
        return Err(DataError::BadMeta {
            path: path.to_path_buf(),
            expected,
            found: names.len(),
        });
    }
    Ok(Some(names))
}
