//! MNIST in the IDX format of the original download (LeCun, Cortes & Burges,
//! <http://yann.lecun.com/exdb/mnist/>), raw or gzip-compressed.
//!
//! Image files: big-endian u32 magic 2051 (`0x00000803`), count, rows, cols, then
//! `count * rows * cols` pixel bytes, row-major. Label files: magic 2049 (`0x00000801`),
//! count, then `count` label bytes. Every header is checked against the file's size before
//! anything is allocated.

use std::path::{Path, PathBuf};

use crate::io::{HeaderedFile, find_dir_with, read_headered};
use crate::{DataError, ImageDataset, Split, Splits};

/// Magic number of an IDX file of u8 values with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of u8 values with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Number of MNIST classes (the digits 0 to 9).
pub const NUM_CLASSES: usize = 10;

/// Largest image side accepted in a header (MNIST's is 28; EMNIST and Fashion-MNIST too).
const MAX_SIDE: u32 = 1 << 12;

/// Subdirectories of a data directory searched for the files, after the directory itself.
pub const SUBDIRS: &[&str] = &["mnist", "MNIST/raw"];

/// The four standard file stems.
const TRAIN_IMAGES: &str = "train-images";
const TRAIN_LABELS: &str = "train-labels";
const TEST_IMAGES: &str = "t10k-images";
const TEST_LABELS: &str = "t10k-labels";

fn candidates(stem: &str, kind: &str) -> [String; 4] {
    [
        format!("{stem}-{kind}-ubyte"),
        format!("{stem}.{kind}-ubyte"),
        format!("{stem}-{kind}-ubyte.gz"),
        format!("{stem}.{kind}-ubyte.gz"),
    ]
}

fn find_file(dir: &Path, stem: &str, kind: &str) -> Result<PathBuf, DataError> {
    let names = candidates(stem, kind);
    names
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::NotFound {
            path: dir.to_path_buf(),
            expected: format!("one of {}", names.join(", ")),
        })
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn check_magic(path: &Path, header: &[u8], expected: u32) -> Result<(), DataError> {
    let found = be_u32(header, 0);
    if found != expected {
        return Err(DataError::BadMagic {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    Ok(())
}

/// Reads an IDX image file: returns `(count, rows, cols, pixels)`.
///
/// # Errors
/// Bad magic, zero or absurd dimensions, a size that disagrees with the header, a broken
/// gzip stream: each a [`DataError`] naming `path`.
pub fn read_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>), DataError> {
    let HeaderedFile { header, payload } = read_headered(path, 16, |h| {
        check_magic(path, h, IMAGES_MAGIC)?;
        let (n, rows, cols) = (be_u32(h, 4), be_u32(h, 8), be_u32(h, 12));
        if rows == 0 || cols == 0 || rows > MAX_SIDE || cols > MAX_SIDE {
            return Err(DataError::BadHeader {
                path: path.to_path_buf(),
                message: format!(
                    "expected image sides between 1 and {MAX_SIDE}, found {rows} x {cols}"
                ),
            });
        }
        Ok(n as u64 * rows as u64 * cols as u64)
    })?;
    let (n, rows, cols) = (be_u32(&header, 4), be_u32(&header, 8), be_u32(&header, 12));
    Ok((n as usize, rows as usize, cols as usize, payload))
}

/// Reads an IDX label file, checking every label is below `num_classes`.
///
/// # Errors
/// Bad magic, a size that disagrees with the header, a broken gzip stream, a label out of
/// range: each a [`DataError`] naming `path`.
pub fn read_labels(path: &Path, num_classes: usize) -> Result<Vec<u32>, DataError> {
    let HeaderedFile { payload, .. } = read_headered(path, 8, |h| {
        check_magic(path, h, LABELS_MAGIC)?;
        Ok(be_u32(h, 4) as u64)
    })?;
    if let Some((index, &label)) = payload
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= num_classes)
    {
        return Err(DataError::LabelOutOfRange {
            path: path.to_path_buf(),
            index,
            label: label as i64,
            num_classes,
        });
    }
    Ok(payload.into_iter().map(u32::from).collect())
}

fn read_split(dir: &Path, images_stem: &str, labels_stem: &str) -> Result<ImageDataset, DataError> {
    let images_path = find_file(dir, images_stem, "idx3")?;
    let labels_path = find_file(dir, labels_stem, "idx1")?;
    let (images, labels) = rayon::join(
        || read_images(&images_path),
        || read_labels(&labels_path, NUM_CLASSES),
    );
    let (n, rows, cols, images) = images?;
    let labels = labels?;
    if n != labels.len() {
        return Err(DataError::CountMismatch {
            images_path,
            labels_path,
            images: n,
            labels: labels.len(),
        });
    }
    Ok(ImageDataset {
        images,
        labels,
        shape: [1, rows, cols],
        num_classes: NUM_CLASSES,
        class_names: (0..NUM_CLASSES).map(|d| d.to_string()).collect(),
    })
}

/// Loads MNIST from a directory holding the four IDX files (raw or `.gz`; standard names
/// like `train-images-idx3-ubyte[.gz]`, or the dotted `train-images.idx3-ubyte`), or from
/// its `mnist/` or `MNIST/raw/` subdirectory. Images are (1, 28, 28).
///
/// # Errors
/// A missing file, or any validation failure of [`read_images`] / [`read_labels`], or image
/// and label files that disagree on the count or train and test images on the shape.
pub fn load_dir(dir: impl AsRef<Path>) -> Result<Split, DataError> {
    load_splits(dir.as_ref(), Splits::TrainAndTest)
}

/// The directory holding the files of `splits`: `dir` or one of its [`SUBDIRS`], found by
/// its training images (its test images when only the test split is wanted).
fn data_dir(dir: &Path, splits: Splits) -> Option<PathBuf> {
    let stem = match splits {
        Splits::TrainAndTest => TRAIN_IMAGES,
        Splits::TestOnly => TEST_IMAGES,
    };
    let markers = candidates(stem, "idx3");
    let markers: Vec<&str> = markers.iter().map(String::as_str).collect();
    find_dir_with(dir, SUBDIRS, &markers)
}

/// [`load_dir`], or only the test split (`t10k-*`, the `train-*` files unread and not
/// needed) with [`Splits::TestOnly`].
pub(crate) fn load_splits(dir: &Path, splits: Splits) -> Result<Split, DataError> {
    let dir = data_dir(dir, splits).unwrap_or_else(|| dir.to_path_buf());
    if splits == Splits::TestOnly {
        return Ok(Split::test_only(read_split(
            &dir,
            TEST_IMAGES,
            TEST_LABELS,
        )?));
    }
    let (train, test) = rayon::join(
        || read_split(&dir, TRAIN_IMAGES, TRAIN_LABELS),
        || read_split(&dir, TEST_IMAGES, TEST_LABELS),
    );
    let (train, test) = (train?, test?);
    if train.shape != test.shape {
        return Err(DataError::ShapeMismatch {
            path: find_file(&dir, TEST_IMAGES, "idx3")?,
            expected: train.shape,
            found: test.shape,
        });
    }
    Ok(Split { train, test })
}

/// Whether `dir` (or one of its [`SUBDIRS`]) holds MNIST training images (test images
/// when only the test split is wanted).
pub(crate) fn present_in(dir: &Path, splits: Splits) -> bool {
    data_dir(dir, splits).is_some()
}

/// Writes MNIST-format IDX bytes (for tests and tools): an image file for `images`
/// ((count, rows, cols), row-major).
pub fn encode_images(count: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + pixels.len());
    for v in [IMAGES_MAGIC, count as u32, rows as u32, cols as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

/// Writes MNIST-format IDX label bytes (for tests and tools).
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    for v in [LABELS_MAGIC, labels.len() as u32] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}
