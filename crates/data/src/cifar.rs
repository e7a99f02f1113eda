//! CIFAR-10 and CIFAR-100 in their binary versions (Krizhevsky 2009,
//! <https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! CIFAR-10 (`cifar-10-batches-bin/`): `data_batch_1.bin` .. `data_batch_5.bin` and
//! `test_batch.bin`, records of 1 label byte + 3072 pixel bytes. CIFAR-100
//! (`cifar-100-binary/`): `train.bin` and `test.bin`, records of 1 coarse label byte,
//! 1 fine label byte and 3072 pixel bytes. Pixels are three 32×32 planes (red, green, blue),
//! each row-major: exactly (C, H, W), kept in the files' orientation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::io::{find_dir_with, read_class_names, read_records};
use crate::{DataError, ImageDataset, Split, Splits};

/// Pixel bytes of one CIFAR image (3 × 32 × 32).
pub const IMAGE_BYTES: usize = 3 * 32 * 32;
/// The shape of a CIFAR image, (C, H, W).
pub const SHAPE: [usize; 3] = [3, 32, 32];

/// Subdirectories searched for CIFAR-10, after the directory itself.
pub const CIFAR10_SUBDIRS: &[&str] = &["cifar-10-batches-bin", "cifar10"];
/// Subdirectories searched for CIFAR-100, after the directory itself.
pub const CIFAR100_SUBDIRS: &[&str] = &["cifar-100-binary", "cifar100"];

/// The CIFAR-10 training files, in order.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// The CIFAR-10 test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// CIFAR-10 class names, by label (also in `batches.meta.txt`).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// CIFAR-100 fine class names, by label (also in `fine_label_names.txt`).
pub const CIFAR100_FINE_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// CIFAR-100 coarse (superclass) names, by label (also in `coarse_label_names.txt`).
pub const CIFAR100_COARSE_CLASSES: [&str; 20] = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
];

/// Which CIFAR-100 labels to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cifar100Labels {
    /// The 100 fine classes (the usual benchmark).
    #[default]
    Fine,
    /// The 20 coarse superclasses.
    Coarse,
}

/// Reads one binary CIFAR file with `label_bytes` label bytes per record. Returns the pixel
/// bytes and, per label byte position, the labels, each checked against `num_classes[k]`.
fn read_cifar_file(
    path: &Path,
    num_classes: &[usize],
) -> Result<(Vec<u8>, Vec<Vec<u32>>), DataError> {
    let label_bytes = num_classes.len();
    let record = label_bytes + IMAGE_BYTES;
    let describe = format!("{label_bytes} label byte(s) + {IMAGE_BYTES} pixel bytes per record");
    let data = read_records(path, record, &describe)?;
    let n = data.len() / record;
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = vec![Vec::with_capacity(n); label_bytes];
    for (index, rec) in data.chunks_exact(record).enumerate() {
        for (k, &classes) in num_classes.iter().enumerate() {
            let label = rec[k];
            if label as usize >= classes {
                return Err(DataError::LabelOutOfRange {
                    path: path.to_path_buf(),
                    index,
                    label: label as i64,
                    num_classes: classes,
                });
            }
            labels[k].push(label as u32);
        }
        images.extend_from_slice(&rec[label_bytes..]);
    }
    Ok((images, labels))
}

fn require(dir: &Path, name: &str) -> Result<std::path::PathBuf, DataError> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(DataError::NotFound {
            path: p,
            expected: format!("the CIFAR file {name}"),
        })
    }
}

/// Loads CIFAR-10 from `dir` or its `cifar-10-batches-bin/` subdirectory. Class names come
/// from `batches.meta.txt` when present (it must list 10), else the standard ones.
///
/// Each file may hold any positive number of records (the real ones hold 10,000), so small
/// files in the same format load too.
///
/// # Errors
/// A missing file, a size that is not a whole number of records, a label ≥ 10, a bad
/// `batches.meta.txt`: each a [`DataError`] naming the file.
pub fn load_cifar10_dir(dir: impl AsRef<Path>) -> Result<Split, DataError> {
    load_cifar10_splits(dir.as_ref(), Splits::TrainAndTest)
}

/// The file whose presence marks a CIFAR directory holding `splits`.
fn marker<'a>(splits: Splits, train: &'a str, test: &'a str) -> &'a str {
    match splits {
        Splits::TrainAndTest => train,
        Splits::TestOnly => test,
    }
}

/// [`load_cifar10_dir`], or only the test split (`test_batch.bin`, the `data_batch_*.bin`
/// files unread and not needed) with [`Splits::TestOnly`].
pub(crate) fn load_cifar10_splits(dir: &Path, splits: Splits) -> Result<Split, DataError> {
    let found = marker(splits, CIFAR10_TRAIN_FILES[0], CIFAR10_TEST_FILE);
    let dir = find_dir_with(dir, CIFAR10_SUBDIRS, &[found]).unwrap_or_else(|| dir.to_path_buf());
    let test_only = splits == Splits::TestOnly;
    let train_files: &[&str] = if test_only { &[] } else { &CIFAR10_TRAIN_FILES };
    let mut paths = Vec::new();
    for name in train_files.iter().chain([&CIFAR10_TEST_FILE]) {
        paths.push(require(&dir, name)?);
    }
    let class_names = read_class_names(&dir.join("batches.meta.txt"), 10)?
        .unwrap_or_else(|| CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect());
    use rayon::prelude::*;
    let parts = paths
        .par_iter()
        .map(|p| read_cifar_file(p, &[10]))
        .collect::<Result<Vec<_>, _>>()?;
    let mut train = ImageDataset {
        images: Vec::new(),
        labels: Vec::new(),
        shape: SHAPE,
        num_classes: 10,
        class_names,
    };
    let mut test = train.clone();
    for (i, (images, mut labels)) in parts.into_iter().enumerate() {
        let ds = if i < train_files.len() {
            &mut train
        } else {
            &mut test
        };
        ds.images.extend_from_slice(&images);
        ds.labels.append(&mut labels[0]);
    }
    Ok(Split { train, test })
}

/// Loads CIFAR-100 from `dir` or its `cifar-100-binary/` subdirectory, with fine (100) or
/// coarse (20) labels. Both label bytes are validated whichever is used. Class names come
/// from `fine_label_names.txt` / `coarse_label_names.txt` when present, else the standard ones.
///
/// # Errors
/// A missing file, a size that is not a whole number of 3074-byte records, a coarse label
/// ≥ 20 or fine label ≥ 100, a bad names file: each a [`DataError`] naming the file.
pub fn load_cifar100_dir(
    dir: impl AsRef<Path>,
    labels: Cifar100Labels,
) -> Result<Split, DataError> {
    load_cifar100_splits(dir.as_ref(), labels, Splits::TrainAndTest)
}

/// [`load_cifar100_dir`], or only the test split (`test.bin`, `train.bin` unread and not
/// needed) with [`Splits::TestOnly`].
pub(crate) fn load_cifar100_splits(
    dir: &Path,
    labels: Cifar100Labels,
    splits: Splits,
) -> Result<Split, DataError> {
    let found = marker(splits, "train.bin", "test.bin");
    let dir = find_dir_with(dir, CIFAR100_SUBDIRS, &[found]).unwrap_or_else(|| dir.to_path_buf());
    let test_only = splits == Splits::TestOnly;
    let train_path = if test_only {
        None
    } else {
        Some(require(&dir, "train.bin")?)
    };
    let test_path = require(&dir, "test.bin")?;
    let (names_file, defaults, k, num_classes): (&str, &[&str], usize, usize) = match labels {
        Cifar100Labels::Coarse => ("coarse_label_names.txt", &CIFAR100_COARSE_CLASSES, 0, 20),
        Cifar100Labels::Fine => ("fine_label_names.txt", &CIFAR100_FINE_CLASSES, 1, 100),
    };
    let class_names = read_class_names(&dir.join(names_file), num_classes)?
        .unwrap_or_else(|| defaults.iter().map(|s| s.to_string()).collect());
    let make = |(images, mut labels): (Vec<u8>, Vec<Vec<u32>>)| ImageDataset {
        images,
        labels: std::mem::take(&mut labels[k]),
        shape: SHAPE,
        num_classes,
        class_names: class_names.clone(),
    };
    let Some(train_path) = train_path else {
        return Ok(Split::test_only(make(read_cifar_file(
            &test_path,
            &[20, 100],
        )?)));
    };
    let (train, test) = rayon::join(
        || read_cifar_file(&train_path, &[20, 100]),
        || read_cifar_file(&test_path, &[20, 100]),
    );
    Ok(Split {
        train: make(train?),
        test: make(test?),
    })
}

/// Whether `dir` (or a CIFAR-10 subdirectory) holds CIFAR-10 (its test file, when only
/// the test split is wanted).
pub(crate) fn cifar10_present_in(dir: &Path, splits: Splits) -> bool {
    let found = marker(splits, CIFAR10_TRAIN_FILES[0], CIFAR10_TEST_FILE);
    find_dir_with(dir, CIFAR10_SUBDIRS, &[found]).is_some()
}

/// Whether `dir` (or a CIFAR-100 subdirectory) holds CIFAR-100 (its test file, when only
/// the test split is wanted).
pub(crate) fn cifar100_present_in(dir: &Path, splits: Splits) -> bool {
    let found = marker(splits, "train.bin", "test.bin");
    find_dir_with(dir, CIFAR100_SUBDIRS, &[found]).is_some()
}
