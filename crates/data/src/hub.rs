//! MNIST and CIFAR-10 from the Hugging Face hub: the parquet conversions of `ylecun/mnist`
//! and `uoft-cs/cifar10` (the files candle-datasets reads), fetched into the hub cache with
//! [`tau_hub`] (cache first, network only on a miss), and decoded here.
//!
//! The files are parsed with the parquet crate and each PNG decoded with the `image` crate,
//! rather than through candle-datasets' loaders, because those panic on an undecodable image,
//! cannot be pointed at a chosen cache directory, and lay CIFAR images out as (C, W, H)
//! (`permute((0, 3, 2, 1))` of image-rs's (H, W, C) buffer: a transposed image). Here an
//! image's (H, W, C) buffer becomes (C, H, W), exactly the layout of the binary files.

use std::path::{Path, PathBuf};

use arrow_array::{
    Array, BinaryArray, Int32Array, Int64Array, LargeBinaryArray, RecordBatch, StructArray,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;

use crate::folder::{decode_image_bytes, hwc_to_chw};
use crate::{DataError, ImageDataset, Split, Splits};

/// Where to find the hub and its cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubConfig {
    /// The cache directory; `None`: the environment's (`HF_HUB_CACHE`, `$HF_HOME/hub`,
    /// `~/.cache/huggingface/hub`, …; [`tau_hub::default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// The hub's URL; `None`: `HF_ENDPOINT` or `https://huggingface.co`.
    pub endpoint: Option<String>,
    /// Use only the cache, never the network (a miss is an error).
    pub offline: bool,
    /// How many times an interrupted download is resumed; `None`: 0.
    pub retries: Option<usize>,
}

impl HubConfig {
    /// Defaults, with `offline` set when the `HF_HUB_OFFLINE` environment variable is
    /// `1`, `true`, `yes` or `on`.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        HubConfig {
            offline,
            ..Default::default()
        }
    }
}

/// A dataset on the hub: repository, revision and the parquet file of each split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubDataset {
    /// Dataset repository id, `owner/name`.
    pub repo: &'static str,
    /// The revision holding the parquet files.
    pub revision: &'static str,
    /// The training split's parquet file.
    pub train_file: &'static str,
    /// The test split's parquet file.
    pub test_file: &'static str,
    /// The shape of one image, (C, H, W).
    pub shape: [usize; 3],
    /// Number of classes.
    pub num_classes: usize,
}

/// MNIST on the hub.
pub const MNIST: HubDataset = HubDataset {
    repo: "ylecun/mnist",
    revision: "refs/convert/parquet",
    train_file: "mnist/train/0000.parquet",
    test_file: "mnist/test/0000.parquet",
    shape: [1, 28, 28],
    num_classes: 10,
};

/// CIFAR-10 on the hub.
pub const CIFAR10: HubDataset = HubDataset {
    repo: "uoft-cs/cifar10",
    revision: "refs/convert/parquet",
    train_file: "plain_text/train/0000.parquet",
    test_file: "plain_text/test/0000.parquet",
    shape: [3, 32, 32],
    num_classes: 10,
};

/// The local path of `file` of `ds`: from the cache, else downloaded (unless offline).
///
/// # Errors
/// [`DataError::Hub`] when the cache misses offline, or the download fails.
pub fn fetch(cfg: &HubConfig, ds: &HubDataset, file: &str) -> Result<PathBuf, DataError> {
    let options = tau_hub::HubOptions {
        cache_dir: cfg.cache_dir.clone(),
        endpoint: cfg.endpoint.clone(),
        token: None,
        retries: cfg.retries,
        offline: cfg.offline,
    };
    tau_hub::fetch(
        tau_hub::RepoKind::Dataset,
        ds.repo,
        Some(ds.revision),
        file,
        &options,
    )
    .map_err(|e| DataError::Hub {
        repo: ds.repo.into(),
        file: file.into(),
        source: Box::new(e),
    })
}

fn parquet_err(path: &Path, message: impl Into<String>) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The bytes of column `image`/`img` (a struct with a `bytes` field, as the `datasets`
/// library writes images, or plain binary), row by row.
fn image_bytes<'a>(
    path: &Path,
    batch: &'a RecordBatch,
) -> Result<Vec<Option<&'a [u8]>>, DataError> {
    let schema = batch.schema();
    let col = ["image", "img"]
        .iter()
        .find_map(|n| schema.index_of(n).ok())
        .ok_or_else(|| parquet_err(path, "expected an `image` or `img` column, found none"))?;
    let mut array: &dyn Array = batch.column(col).as_ref();
    if let Some(s) = array.as_any().downcast_ref::<StructArray>() {
        let bytes = s
            .column_by_name("bytes")
            .ok_or_else(|| parquet_err(path, "image column: expected a `bytes` field"))?;
        array = bytes.as_ref();
        if s.null_count() > 0 {
            return Err(parquet_err(path, "image column: found null images"));
        }
    }
    if let Some(b) = array.as_any().downcast_ref::<BinaryArray>() {
        Ok(b.iter().collect())
    } else if let Some(b) = array.as_any().downcast_ref::<LargeBinaryArray>() {
        Ok(b.iter().collect())
    } else {
        Err(parquet_err(
            path,
            format!("image bytes: expected binary, found {}", array.data_type()),
        ))
    }
}

fn labels(path: &Path, batch: &RecordBatch) -> Result<Vec<Option<i64>>, DataError> {
    let col = batch
        .column_by_name("label")
        .ok_or_else(|| parquet_err(path, "expected a `label` column, found none"))?;
    if let Some(a) = col.as_any().downcast_ref::<Int64Array>() {
        Ok(a.iter().collect())
    } else if let Some(a) = col.as_any().downcast_ref::<Int32Array>() {
        Ok(a.iter().map(|v| v.map(i64::from)).collect())
    } else {
        Err(parquet_err(
            path,
            format!(
                "label column: expected int64 or int32, found {}",
                col.data_type()
            ),
        ))
    }
}

/// Reads a parquet file of PNG/JPEG images and integer labels (the hub's image-classification
/// layout) into an [`ImageDataset`] of images of `shape` (C = 1: grayscale, C = 3: RGB),
/// (C, H, W) row-major like the binary formats. Class names are the label numbers.
///
/// # Errors
/// A file that is not parquet or lacks the columns, a null image or label, a label outside
/// `0..num_classes`, an image that does not decode or is not H × W: each a [`DataError`]
/// naming the file (and the row).
pub fn read_parquet(
    path: &Path,
    shape: [usize; 3],
    num_classes: usize,
) -> Result<ImageDataset, DataError> {
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| parquet_err(path, e.to_string()))?;
    let batches: Vec<RecordBatch> = reader
        .collect::<Result<_, _>>()
        .map_err(|e| parquet_err(path, e.to_string()))?;
    let mut rows: Vec<(&[u8], u32)> = Vec::new();
    for batch in &batches {
        let images = image_bytes(path, batch)?;
        let labels = labels(path, batch)?;
        for (img, label) in images.into_iter().zip(labels) {
            let index = rows.len();
            let img = img.ok_or_else(|| parquet_err(path, format!("row {index}: null image")))?;
            let label =
                label.ok_or_else(|| parquet_err(path, format!("row {index}: null label")))?;
            if label < 0 || label as u64 >= num_classes as u64 {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    label,
                    num_classes,
                });
            }
            rows.push((img, label as u32));
        }
    }
    let [c, h, w] = shape;
    let image_len = c * h * w;
    let mut images = vec![0u8; rows.len() * image_len];
    images
        .par_chunks_mut(image_len)
        .zip(rows.par_iter())
        .enumerate()
        .try_for_each(|(index, (out, (bytes, _)))| {
            let row_path = PathBuf::from(format!("{} (row {index})", path.display()));
            let img = decode_image_bytes(bytes, &row_path)?;
            let (iw, ih) = (img.width() as usize, img.height() as usize);
            if (ih, iw) != (h, w) {
                return Err(DataError::ShapeMismatch {
                    path: row_path,
                    expected: shape,
                    found: [if img.color().has_color() { 3 } else { 1 }, ih, iw],
                });
            }
            if c == 1 {
                out.copy_from_slice(img.into_luma8().as_raw());
            } else {
                hwc_to_chw(img.into_rgb8().as_raw(), 3, 3, out);
            }
            Ok(())
        })?;
    Ok(ImageDataset {
        images,
        labels: rows.iter().map(|r| r.1).collect(),
        shape,
        num_classes,
        class_names: (0..num_classes).map(|i| i.to_string()).collect(),
    })
}

/// Loads a hub dataset's train and test splits through `cfg`.
///
/// # Errors
/// As [`fetch`] and [`read_parquet`].
pub fn load_with(cfg: &HubConfig, ds: &HubDataset) -> Result<Split, DataError> {
    load_splits_with(cfg, ds, Splits::TrainAndTest)
}

/// [`load_with`], or only the test split (the training file neither fetched nor read)
/// with [`Splits::TestOnly`].
pub(crate) fn load_splits_with(
    cfg: &HubConfig,
    ds: &HubDataset,
    splits: Splits,
) -> Result<Split, DataError> {
    if splits == Splits::TestOnly {
        let test_path = fetch(cfg, ds, ds.test_file)?;
        return Ok(Split::test_only(read_parquet(
            &test_path,
            ds.shape,
            ds.num_classes,
        )?));
    }
    let train_path = fetch(cfg, ds, ds.train_file)?;
    let test_path = fetch(cfg, ds, ds.test_file)?;
    let train = read_parquet(&train_path, ds.shape, ds.num_classes)?;
    let test = read_parquet(&test_path, ds.shape, ds.num_classes)?;
    Ok(Split { train, test })
}

/// MNIST from the hub through `cfg` (images (1, 28, 28), class names "0".."9").
///
/// # Errors
/// As [`load_with`].
pub fn load_mnist_with(cfg: &HubConfig) -> Result<Split, DataError> {
    load_with(cfg, &MNIST)
}

/// CIFAR-10 from the hub through `cfg` (images (3, 32, 32) in the binary files' orientation,
/// the standard class names).
///
/// # Errors
/// As [`load_with`].
pub fn load_cifar10_with(cfg: &HubConfig) -> Result<Split, DataError> {
    load_cifar10_splits_with(cfg, Splits::TrainAndTest)
}

/// [`load_cifar10_with`], or only the test split with [`Splits::TestOnly`].
pub(crate) fn load_cifar10_splits_with(
    cfg: &HubConfig,
    splits: Splits,
) -> Result<Split, DataError> {
    let mut split = load_splits_with(cfg, &CIFAR10, splits)?;
    let names: Vec<String> = crate::cifar::CIFAR10_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    split.train.class_names = names.clone();
    split.test.class_names = names;
    Ok(split)
}
