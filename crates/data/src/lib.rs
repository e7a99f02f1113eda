//! Datasets for τ-ResNet experiments: MNIST, CIFAR-10/100, image folders and synthetic data,
//! from files or the Hugging Face hub, hardened against bad files.
//!
//! # Sources and where they are found
//!
//! [`load`] takes a [`DataSource`] and [`LoadOptions`] and resolves the data in this order:
//!
//! 1. **An explicit directory** (`LoadOptions::dir`): the data must be there (in the
//!    directory itself or in its conventional subdirectory, below); nothing else is tried.
//! 2. **`TAU_DATA_DIR`**: if the environment variable is set and the dataset is in one of
//!    these places, it is loaded from there:
//!    - MNIST: `$TAU_DATA_DIR/mnist/`, `$TAU_DATA_DIR/MNIST/raw/`, or `$TAU_DATA_DIR` itself;
//!    - CIFAR-10: `$TAU_DATA_DIR/cifar-10-batches-bin/`, `$TAU_DATA_DIR/cifar10/`, or itself;
//!    - CIFAR-100: `$TAU_DATA_DIR/cifar-100-binary/`, `$TAU_DATA_DIR/cifar100/`, or itself.
//! 3. **The hub** (MNIST and CIFAR-10 only): the parquet files of `ylecun/mnist` and
//!    `uoft-cs/cifar10` (revision `refs/convert/parquet`), from the hub cache first and
//!    downloaded on a miss; `HF_HUB_OFFLINE=1` forbids the download, and `HF_HOME`,
//!    `HF_HUB_CACHE`, `HF_ENDPOINT` choose the cache and the server (see [`hub`]).
//!
//! CIFAR-100 has no hub route, and an image folder ([`DataSource::Folder`]) always needs
//! an explicit directory.
//!
//! With [`Splits::TestOnly`] (`LoadOptions::splits`, for evaluation) only the test split is
//! looked for and read, everywhere: MNIST's `t10k-*` files, CIFAR-10's `test_batch.bin`,
//! CIFAR-100's `test.bin`, a folder's `test/`, the hub's test parquet file. The training
//! files need not exist (a directory holding only the test files is found in
//! `TAU_DATA_DIR` too), are never read, and are never downloaded.
//!
//! # Formats
//!
//! - MNIST ([`mnist`]): the four IDX files, raw or gzip (detected by content), under the
//!   standard names (`train-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`, …) or the
//!   dotted ones (`train-images.idx3-ubyte`). Images (1, 28, 28).
//! - CIFAR-10 / CIFAR-100 ([`cifar`]): the binary versions (`data_batch_1..5.bin` +
//!   `test_batch.bin`; `train.bin` + `test.bin` with coarse and fine labels, fine by default).
//!   Images (3, 32, 32) in the files' orientation.
//! - Image folders ([`folder`]): torchvision's `ImageFolder` layout
//!   `root/{train,test}/<class>/*.{png,jpg,jpeg}`, classes sorted by name.
//! - The hub ([`hub`]): parquet files of PNG images with integer labels; images come out in
//!   exactly the layout of the binary files.
//! - Synthetic ([`synthetic`]): points uniform on the unit sphere with Gaussian or
//!   teacher-network targets.
//!
//! Every image dataset is an [`ImageDataset`] of u8 pixels in (N, C, H, W) order; [`batch`]
//! turns it into tensors (seeded order, normalization, augmentation).
//!
//! # Errors
//!
//! Every failure is a [`DataError`] naming the file and saying what was expected and what was
//! found: a missing file, a bad magic number, a header whose dimensions disagree with the
//! file's size (checked before anything is allocated: a header claiming 4 billion images in
//! a 1 KB file fails at once; a gzip stream is decompressed through a reader bounded by what
//! the header implies, and the header may not claim more than the compressed file can hold),
//! a gzip stream that ends early, record counts, image and label counts that disagree, labels
//! out of range (MNIST and CIFAR-10 < 10, CIFAR-100 fine < 100, coarse < 20), an image that
//! does not decode, an empty class folder, images of different sizes. Loading never panics on
//! bad input.
//!
//! # Example
//!
//! ```no_run
//! use candle::Device;
//! use tau_data::batch::{Augment, Batches, Normalize, make_batch};
//! use tau_data::{DataSource, LoadOptions, load};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let opts = LoadOptions { dir: Some("../shared/data/mnist".into()), ..Default::default() };
//! let split = load(&DataSource::Mnist, &opts)?;
//! assert_eq!(split.train.len(), 60_000);
//! let train = split.train.balanced_first_k(100); // 1,000 images, 100 per digit
//! for indices in Batches::new(train.len(), 128, false, 42, 0) {
//!     let (xs, ys) = make_batch(&train, &indices, &Normalize::mnist(), Augment::None, 42, 0, &Device::Cpu)?;
//!     assert_eq!(xs.dims()[1..], [1, 28, 28]);
//!     assert_eq!(ys.dims(), &[indices.len()]);
//! }
//! # Ok(())
//! # }
//! ```

pub mod batch;
pub mod cifar;
mod dataset;
mod error;
pub mod folder;
pub mod hub;
mod io;
pub mod mnist;
mod rng;
pub mod synthetic;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use batch::{Augment, Batches, Normalize, batches, epoch_order, flatten_unit_norm, make_batch};
pub use cifar::Cifar100Labels;
pub use dataset::{ImageDataset, Split};
pub use error::DataError;
pub use hub::HubConfig;
pub use synthetic::{SphereData, Targets, sphere};

/// The environment variable naming a directory that holds datasets.
pub const DATA_DIR_ENV: &str = "TAU_DATA_DIR";

/// Which dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// MNIST (IDX files, or the hub).
    Mnist,
    /// CIFAR-10 (binary version, or the hub).
    Cifar10,
    /// CIFAR-100 (binary version).
    Cifar100,
    /// An image folder in the `ImageFolder` layout (needs a directory).
    Folder,
}

impl DataSource {
    /// The name used in configs: `mnist`, `cifar10`, `cifar100`, `folder`.
    pub fn name(&self) -> &'static str {
        match self {
            DataSource::Mnist => "mnist",
            DataSource::Cifar10 => "cifar10",
            DataSource::Cifar100 => "cifar100",
            DataSource::Folder => "folder",
        }
    }
}

impl std::fmt::Display for DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mnist" => Ok(DataSource::Mnist),
            "cifar10" => Ok(DataSource::Cifar10),
            "cifar100" => Ok(DataSource::Cifar100),
            "folder" => Ok(DataSource::Folder),
            other => Err(format!(
                "unknown data source {other:?}: expected mnist, cifar10, cifar100 or folder"
            )),
        }
    }
}

/// Which splits [`load`] reads.
///
/// # Example
///
/// ```
/// use tau_data::{DataSource, LoadOptions, Splits, load, mnist};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // A directory holding only MNIST's test files (no `train-*` files).
/// let dir = tempfile::tempdir()?;
/// let images = mnist::encode_images(2, 28, 28, &[0; 2 * 784]);
/// std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), images)?;
/// std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), mnist::encode_labels(&[3, 7]))?;
/// let opts = LoadOptions {
///     dir: Some(dir.path().into()),
///     splits: Splits::TestOnly,
///     ..Default::default()
/// };
/// let split = load(&DataSource::Mnist, &opts)?;
/// assert_eq!(split.test.labels, [3, 7]);
/// assert!(split.train.is_empty());
/// assert_eq!(split.train.shape, [1, 28, 28]);
/// // Both splits (the default) need the training files.
/// let opts = LoadOptions { splits: Splits::TrainAndTest, ..opts };
/// assert!(load(&DataSource::Mnist, &opts).is_err());
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Splits {
    /// The training and the test split (the default; what training needs).
    #[default]
    TrainAndTest,
    /// The test split only (what evaluation needs): the training files need not exist and
    /// are neither read nor downloaded; [`Split::train`] comes back empty, with the test
    /// split's shape and classes. An image folder's classes are then the subfolders of
    /// its `test/`.
    TestOnly,
}

/// Options of [`load`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOptions {
    /// Load from this directory (or its conventional subdirectory) and nowhere else.
    pub dir: Option<PathBuf>,
    /// CIFAR-100's labels: fine (default) or coarse.
    #[serde(default)]
    pub cifar100_labels: Cifar100Labels,
    /// Which splits to read: both (default), or only the test split.
    #[serde(default)]
    pub splits: Splits,
}

fn load_from_dir(source: &DataSource, dir: &Path, opts: &LoadOptions) -> Result<Split, DataError> {
    match source {
        DataSource::Mnist => mnist::load_splits(dir, opts.splits),
        DataSource::Cifar10 => cifar::load_cifar10_splits(dir, opts.splits),
        DataSource::Cifar100 => cifar::load_cifar100_splits(dir, opts.cifar100_labels, opts.splits),
        DataSource::Folder => folder::load_splits(dir, opts.splits),
    }
}

fn present_in(source: &DataSource, dir: &Path, splits: Splits) -> bool {
    match source {
        DataSource::Mnist => mnist::present_in(dir, splits),
        DataSource::Cifar10 => cifar::cifar10_present_in(dir, splits),
        DataSource::Cifar100 => cifar::cifar100_present_in(dir, splits),
        DataSource::Folder => false,
    }
}

/// Loads a dataset's train and test splits (or only its test split, as
/// `opts.splits` says), resolving where from as the crate docs say: the explicit directory,
/// then `TAU_DATA_DIR`, then the hub.
///
/// # Errors
/// Any [`DataError`] of the format's loader, [`DataError::NeedsDir`] for a folder without
/// a directory, [`DataError::NotFound`] for CIFAR-100 found nowhere, [`DataError::Hub`] when
/// the hub route fails.
pub fn load(source: &DataSource, opts: &LoadOptions) -> Result<Split, DataError> {
    if let Some(dir) = &opts.dir {
        return load_from_dir(source, dir, opts);
    }
    let test_only = opts.splits == Splits::TestOnly;
    if *source == DataSource::Folder {
        let holding = if test_only {
            "test/"
        } else {
            "train/ and test/"
        };
        return Err(DataError::NeedsDir {
            source_name: source.name().into(),
            hint: format!("give the image folder's root (holding {holding}) as the data directory"),
        });
    }
    let env_dir = std::env::var_os(DATA_DIR_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    if let Some(dir) = &env_dir {
        if present_in(source, dir, opts.splits) {
            tracing::info!("loading {source} from {} ({DATA_DIR_ENV})", dir.display());
            return load_from_dir(source, dir, opts);
        }
        tracing::info!("{source} not found in {} ({DATA_DIR_ENV})", dir.display());
    }
    let hub = HubConfig::from_env();
    match source {
        DataSource::Mnist => {
            tracing::info!("loading mnist from the hub ({})", hub::MNIST.repo);
            hub::load_splits_with(&hub, &hub::MNIST, opts.splits)
        }
        DataSource::Cifar10 => {
            tracing::info!("loading cifar10 from the hub ({})", hub::CIFAR10.repo);
            hub::load_cifar10_splits_with(&hub, opts.splits)
        }
        _ => Err(DataError::NotFound {
            path: env_dir.unwrap_or_else(|| PathBuf::from(format!("${DATA_DIR_ENV}"))),
            expected: format!(
                "{source} ({}, or cifar-100-binary/): give a data directory or set {DATA_DIR_ENV}; it has no hub route",
                if test_only {
                    "test.bin"
                } else {
                    "train.bin and test.bin"
                }
            ),
        }),
    }
}
