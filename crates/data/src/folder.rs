//! Image folders in the torchvision `ImageFolder` layout: `root/<split>/<class>/*.png|jpg`,
//! decoded with the `image` crate on all cores (rayon).
//!
//! Classes are the subfolders of `root/train`, sorted by name; their positions are the
//! label ids (so CIFAR-10 as folders gets airplane 0 … truck 9). `root/test` must have the
//! same class folders. Files ending in `.png`, `.jpg` or `.jpeg` (any case) are images,
//! read in name order; other files and hidden entries are ignored. Images are stored as
//! (C, H, W): C = 1 when every image of the dataset is grayscale, else 3 (grayscale images
//! are then replicated to RGB, as torchvision's RGB loader does). All images must have the
//! same height and width.
//!
//! When only the test split is loaded ([`Splits::TestOnly`]), `root/train` is not needed
//! nor read, and the classes are the subfolders of `root/test`, sorted by name.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, Limits};
use rayon::prelude::*;

use crate::io::file_len;
use crate::{DataError, ImageDataset, Split, Splits};

/// Largest image file accepted (64 MiB).
const MAX_IMAGE_FILE: u64 = 64 << 20;
/// Largest image side accepted.
const MAX_IMAGE_SIDE: u32 = 1 << 14;

/// Whether a file name is one of the image extensions this loader reads.
fn is_image_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !name.starts_with('.')
        && (lower.ends_with(".png") || lower.ends_with(".jpg") || lower.ends_with(".jpeg"))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>, DataError> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let is_dir = path.is_dir();
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Image files with their labels.
type LabelledFiles = Vec<(PathBuf, u32)>;

/// The class names (sorted) and the image files of each class, of one split folder.
fn list_split(split_dir: &Path) -> Result<(Vec<String>, LabelledFiles), DataError> {
    if !split_dir.is_dir() {
        return Err(DataError::NotFound {
            path: split_dir.to_path_buf(),
            expected: "a split folder holding one folder of images per class".into(),
        });
    }
    let mut classes = Vec::new();
    let mut files = Vec::new();
    for (name, path, is_dir) in read_dir_sorted(split_dir)? {
        if !is_dir {
            continue;
        }
        let label = classes.len() as u32;
        let before = files.len();
        for (fname, fpath, fis_dir) in read_dir_sorted(&path)? {
            if !fis_dir && is_image_name(&fname) {
                files.push((fpath, label));
            }
        }
        if files.len() == before {
            return Err(DataError::EmptyClass { path });
        }
        classes.push(name);
    }
    if classes.is_empty() {
        return Err(DataError::NotFound {
            path: split_dir.to_path_buf(),
            expected: "at least one class folder".into(),
        });
    }
    Ok((classes, files))
}

/// One decoded image: (grayscale?, height, width, pixels HWC as luma8 or rgb8).
struct Decoded {
    gray: bool,
    h: usize,
    w: usize,
    pixels: Vec<u8>,
}

/// Decodes one image file with bounded size and dimensions.
pub fn decode_image_file(path: &Path) -> Result<DynamicImage, DataError> {
    let len = file_len(path)?;
    if len > MAX_IMAGE_FILE {
        return Err(DataError::TooLarge {
            path: path.to_path_buf(),
            claimed: len,
            limit: MAX_IMAGE_FILE,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_image_bytes(&bytes, path)
}

/// Decodes an in-memory image (format guessed from its content) with bounded dimensions;
/// `path` names it in errors.
pub(crate) fn decode_image_bytes(bytes: &[u8], path: &Path) -> Result<DynamicImage, DataError> {
    let decode_err = |source| DataError::Decode {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    reader.decode().map_err(decode_err)
}

fn decode(path: &Path) -> Result<Decoded, DataError> {
    let img = decode_image_file(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let gray = !img.color().has_color();
    let pixels = if gray {
        img.into_luma8().into_raw()
    } else {
        img.into_rgb8().into_raw()
    };
    Ok(Decoded { gray, h, w, pixels })
}

/// Copies an HWC image (`src_c` channels) into a CHW buffer of `c` channels
/// (`src_c` is `c`, or 1 with `c` = 3 to replicate gray).
pub(crate) fn hwc_to_chw(src: &[u8], src_c: usize, c: usize, out: &mut [u8]) {
    let hw = out.len() / c;
    for ch in 0..c {
        let sc = if src_c == 1 { 0 } else { ch };
        let plane = &mut out[ch * hw..(ch + 1) * hw];
        for (p, o) in plane.iter_mut().enumerate() {
            *o = src[p * src_c + sc];
        }
    }
}

fn load_split(
    split_dir: &Path,
    files: &[(PathBuf, u32)],
    classes: &[String],
) -> Result<ImageDataset, DataError> {
    let decoded: Vec<Decoded> = files
        .par_iter()
        .map(|(p, _)| decode(p))
        .collect::<Result<_, _>>()?;
    let first = decoded.first().ok_or_else(|| DataError::NotFound {
        path: split_dir.to_path_buf(),
        expected: "image files".into(),
    })?;
    let c = if decoded.iter().all(|d| d.gray) { 1 } else { 3 };
    let shape = [c, first.h, first.w];
    for (d, (p, _)) in decoded.iter().zip(files) {
        if (d.h, d.w) != (first.h, first.w) {
            return Err(DataError::ShapeMismatch {
                path: p.clone(),
                expected: shape,
                found: [if d.gray { 1 } else { 3 }, d.h, d.w],
            });
        }
    }
    let image_len = c * first.h * first.w;
    let mut images = vec![0u8; decoded.len() * image_len];
    images
        .par_chunks_mut(image_len)
        .zip(decoded.par_iter())
        .for_each(|(out, d)| hwc_to_chw(&d.pixels, if d.gray { 1 } else { 3 }, c, out));
    Ok(ImageDataset {
        images,
        labels: files.iter().map(|(_, l)| *l).collect(),
        shape,
        num_classes: classes.len(),
        class_names: classes.to_vec(),
    })
}

/// Loads an image folder: `root/train/<class>/*` and `root/test/<class>/*`.
///
/// # Errors
/// A missing split folder, a split with no class folder, an empty class folder, test
/// classes that differ from the train classes, an image that does not decode, images of
/// different sizes (train and test must agree too): each a [`DataError`] naming the path.
pub fn load_dir(root: impl AsRef<Path>) -> Result<Split, DataError> {
    load_splits(root.as_ref(), Splits::TrainAndTest)
}

/// [`load_dir`], or only `root/test` (`root/train` unread and not needed; the classes are
/// `root/test`'s subfolders) with [`Splits::TestOnly`].
pub(crate) fn load_splits(root: &Path, splits: Splits) -> Result<Split, DataError> {
    let train_dir = root.join("train");
    let test_dir = root.join("test");
    if splits == Splits::TestOnly {
        let (classes, test_files) = list_split(&test_dir)?;
        return Ok(Split::test_only(load_split(
            &test_dir,
            &test_files,
            &classes,
        )?));
    }
    let (classes, train_files) = list_split(&train_dir)?;
    let (test_classes, test_files) = list_split(&test_dir)?;
    if test_classes != classes {
        return Err(DataError::ClassMismatch {
            path: test_dir,
            expected: classes,
            found: test_classes,
        });
    }
    let train = load_split(&train_dir, &train_files, &classes)?;
    let mut test = load_split(&test_dir, &test_files, &classes)?;
    if test.shape != train.shape {
        if test.shape[1..] == train.shape[1..] && train.shape[0] == 3 {
            // A grayscale-only test split of an RGB dataset: replicate to RGB.
            test = test.to_rgb();
        } else {
            return Err(DataError::ShapeMismatch {
                path: test_files
                    .first()
                    .map(|(p, _)| p.clone())
                    .unwrap_or(test_dir),
                expected: train.shape,
                found: test.shape,
            });
        }
    }
    Ok(Split { train, test })
}
