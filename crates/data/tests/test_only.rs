//! `Splits::TestOnly` (what evaluation loads): only the test files are needed and read, in
//! every format; the default still needs and reads both splits.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tau_data::{
    Cifar100Labels, DataError, DataSource, LoadOptions, Split, Splits, cifar, folder, load, mnist,
};

fn opts(dir: &Path, splits: Splits) -> LoadOptions {
    LoadOptions {
        dir: Some(dir.into()),
        splits,
        ..Default::default()
    }
}

/// The train split of a test-only load: no image, the test split's shape and classes.
fn assert_empty_train_like_test(split: &Split) {
    assert!(split.train.is_empty());
    assert!(split.train.images.is_empty());
    assert_eq!(split.train.shape, split.test.shape);
    assert_eq!(split.train.num_classes, split.test.num_classes);
    assert_eq!(split.train.class_names, split.test.class_names);
}

/// A NotFound error whose message names `file`.
fn assert_not_found(err: DataError, file: &str) {
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(file), "{err}");
}

#[test]
fn mnist_test_only_needs_only_the_t10k_files() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = TinyMnist::new(5, 3, 4, 3);
    let full = tmp.path().join("full");
    tiny.write(&full, false);
    let both = mnist::load_dir(&full).unwrap();
    // Only the test files, gzip-compressed, in the conventional `mnist/` subdirectory.
    for (gz, sub) in [(false, ""), (true, "mnist")] {
        let root = tmp.path().join(format!("test-only-{gz}"));
        let dir = root.join(sub);
        tiny.write(&dir, gz);
        let ext = if gz { ".gz" } else { "" };
        for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
            std::fs::remove_file(dir.join(format!("{name}{ext}"))).unwrap();
        }
        let split = load(&DataSource::Mnist, &opts(&root, Splits::TestOnly)).unwrap();
        assert_eq!(split.test, both.test);
        assert_eq!(split.test.images, tiny.test_pixels);
        assert_empty_train_like_test(&split);
        // The default still needs the training files, and says which.
        let err = load(&DataSource::Mnist, &opts(&root, Splits::TrainAndTest)).unwrap_err();
        assert_not_found(err, "train-images-idx3-ubyte");
    }
    // A missing test file is named, as before.
    std::fs::remove_file(full.join("t10k-labels-idx1-ubyte")).unwrap();
    let err = load(&DataSource::Mnist, &opts(&full, Splits::TestOnly)).unwrap_err();
    assert_not_found(err, "t10k-labels-idx1-ubyte");
}

#[test]
fn cifar10_test_only_needs_only_test_batch_bin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    let (_, _, te_px, te_lb) = write_cifar10(&dir);
    let both = cifar::load_cifar10_dir(&dir).unwrap();
    for b in 1..=5 {
        std::fs::remove_file(dir.join(format!("data_batch_{b}.bin"))).unwrap();
    }
    // Found through the conventional subdirectory, by its test file.
    let split = load(&DataSource::Cifar10, &opts(tmp.path(), Splits::TestOnly)).unwrap();
    assert_eq!(split.test, both.test);
    assert_eq!((split.test.images, split.test.labels), (te_px, te_lb));
    let split = load(&DataSource::Cifar10, &opts(&dir, Splits::TestOnly)).unwrap();
    assert_empty_train_like_test(&split);
    assert_eq!(split.test.class_names, both.test.class_names);
    let err = load(&DataSource::Cifar10, &opts(&dir, Splits::TrainAndTest)).unwrap_err();
    assert_not_found(err, "data_batch_1.bin");
    std::fs::remove_file(dir.join("test_batch.bin")).unwrap();
    let err = load(&DataSource::Cifar10, &opts(&dir, Splits::TestOnly)).unwrap_err();
    assert_not_found(err, "test_batch.bin");
}

#[test]
fn cifar100_test_only_needs_only_test_bin() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let imgs: Vec<Vec<u8>> = (0..2).map(|i| asym_image(3, 32, 32, i)).collect();
    let labels: Vec<Vec<u8>> = vec![vec![19, 99], vec![7, 42]];
    std::fs::write(dir.join("test.bin"), cifar_records(&labels, &imgs)).unwrap();
    let o = LoadOptions {
        cifar100_labels: Cifar100Labels::Coarse,
        ..opts(tmp.path(), Splits::TestOnly)
    };
    let split = load(&DataSource::Cifar100, &o).unwrap();
    assert_eq!(split.test.labels, vec![19, 7]);
    assert_eq!(split.test.num_classes, 20);
    assert_eq!(split.test.images, imgs.concat());
    assert_empty_train_like_test(&split);
    let o = LoadOptions {
        splits: Splits::TrainAndTest,
        ..o
    };
    let err = load(&DataSource::Cifar100, &o).unwrap_err();
    assert_not_found(err, "train.bin");
}

/// A two-class image folder of 4x6 RGB PNGs with only the given splits.
fn write_folder(root: &Path, splits: &[&str]) -> PathBuf {
    for split in splits {
        for (l, class) in ["cat", "dog"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..2 {
                std::fs::write(
                    d.join(format!("{i}.png")),
                    png_bytes(&asym_image(3, 4, 6, l * 10 + i), 3, 4, 6),
                )
                .unwrap();
            }
        }
    }
    root.to_path_buf()
}

#[test]
fn folder_test_only_needs_only_test() {
    let tmp = tempfile::tempdir().unwrap();
    let full = write_folder(&tmp.path().join("full"), &["train", "test"]);
    let both = folder::load_dir(&full).unwrap();
    let root = write_folder(&tmp.path().join("test-only"), &["test"]);
    let split = load(&DataSource::Folder, &opts(&root, Splits::TestOnly)).unwrap();
    assert_eq!(split.test, both.test);
    assert_eq!(split.test.class_names, ["cat", "dog"]);
    assert_eq!(split.test.labels, [0, 0, 1, 1]);
    assert_empty_train_like_test(&split);
    let err = load(&DataSource::Folder, &opts(&root, Splits::TrainAndTest)).unwrap_err();
    assert_not_found(err, "train");
    // Without test/, test-only names it.
    let err = load(
        &DataSource::Folder,
        &opts(&tmp.path().join("none"), Splits::TestOnly),
    )
    .unwrap_err();
    assert_not_found(err, "test");
    // A folder without a directory still says it needs one, and what it must hold.
    let o = LoadOptions {
        splits: Splits::TestOnly,
        ..Default::default()
    };
    let err = load(&DataSource::Folder, &o).unwrap_err();
    assert!(matches!(err, DataError::NeedsDir { .. }), "{err}");
    assert!(err.to_string().contains("test/"), "{err}");
}

#[test]
fn corrupt_training_files_are_never_read_by_a_test_only_load() {
    let tmp = tempfile::tempdir().unwrap();
    // MNIST: garbage training images.
    let m = tmp.path().join("mnist");
    let tiny = TinyMnist::new(5, 3, 4, 3);
    tiny.write(&m, false);
    std::fs::write(m.join("train-images-idx3-ubyte"), b"not an idx file").unwrap();
    let split = load(&DataSource::Mnist, &opts(&m, Splits::TestOnly)).unwrap();
    assert_eq!(split.test.images, tiny.test_pixels);
    let err = load(&DataSource::Mnist, &opts(&m, Splits::TrainAndTest)).unwrap_err();
    assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");

    // CIFAR-10: a truncated training batch.
    let c = tmp.path().join("cifar");
    let (_, _, te_px, _) = write_cifar10(&c);
    std::fs::write(c.join("data_batch_3.bin"), [0u8; 100]).unwrap();
    let split = load(&DataSource::Cifar10, &opts(&c, Splits::TestOnly)).unwrap();
    assert_eq!(split.test.images, te_px);
    let err = load(&DataSource::Cifar10, &opts(&c, Splits::TrainAndTest)).unwrap_err();
    assert!(matches!(err, DataError::WrongSize { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_3.bin"), "{err}");

    // Image folder: a corrupt training JPEG.
    let f = write_folder(&tmp.path().join("folder"), &["train", "test"]);
    let both = folder::load_dir(&f).unwrap();
    std::fs::write(f.join("train/dog/bad.jpg"), b"\xff\xd8\xff\xe0 not a jpeg").unwrap();
    let split = load(&DataSource::Folder, &opts(&f, Splits::TestOnly)).unwrap();
    assert_eq!(split.test, both.test);
    let err = load(&DataSource::Folder, &opts(&f, Splits::TrainAndTest)).unwrap_err();
    assert!(matches!(err, DataError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("bad.jpg"), "{err}");
}

#[test]
fn splits_defaults_to_both_and_round_trips_through_serde() {
    assert_eq!(LoadOptions::default().splits, Splits::TrainAndTest);
    let o: LoadOptions = serde_json::from_str(r#"{"dir": null}"#).unwrap();
    assert_eq!(o.splits, Splits::TrainAndTest);
    let o: LoadOptions = serde_json::from_str(r#"{"dir": "d", "splits": "test_only"}"#).unwrap();
    assert_eq!(o.splits, Splits::TestOnly);
    assert_eq!(
        serde_json::to_value(Splits::TestOnly).unwrap(),
        serde_json::json!("test_only")
    );
}
