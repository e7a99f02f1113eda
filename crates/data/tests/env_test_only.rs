//! `Splits::TestOnly` through `TAU_DATA_DIR` and the hub (a test binary of its own: it sets
//! the process's environment).

mod common;

use common::*;
use tau_data::{DataError, DataSource, LoadOptions, Splits, hub, load};

#[test]
fn test_only_is_found_in_tau_data_dir_and_fetches_only_the_hub_test_file() {
    let data = tempfile::tempdir().unwrap();
    // TAU_DATA_DIR holding only the test files of MNIST and CIFAR-10.
    let tiny = TinyMnist::new(3, 2, 28, 28);
    let m = data.path().join("mnist");
    tiny.write(&m, true);
    for name in ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"] {
        std::fs::remove_file(m.join(name)).unwrap();
    }
    let c = data.path().join("cifar-10-batches-bin");
    let (_, _, te_px, _) = write_cifar10(&c);
    for b in 1..=5 {
        std::fs::remove_file(c.join(format!("data_batch_{b}.bin"))).unwrap();
    }
    // A hub cache holding only MNIST's test parquet file, and no network.
    let cache = tempfile::tempdir().unwrap();
    let snap = hub_snapshot(cache.path(), hub::MNIST.repo, hub::MNIST.revision);
    let pngs: Vec<Vec<u8>> = tiny
        .test_pixels
        .chunks(784)
        .map(|img| png_bytes(img, 1, 28, 28))
        .collect();
    let labels: Vec<i64> = tiny.test_labels.iter().map(|&l| l as i64).collect();
    write_parquet(&snap.join(hub::MNIST.test_file), "image", &pngs, &labels);
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("TAU_DATA_DIR", data.path());
        std::env::set_var("HF_HUB_CACHE", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    }
    let test_only = LoadOptions {
        splits: Splits::TestOnly,
        ..Default::default()
    };
    let split = load(&DataSource::Mnist, &test_only).unwrap();
    assert_eq!(split.test.images, tiny.test_pixels);
    assert!(split.train.is_empty());
    let split = load(&DataSource::Cifar10, &test_only).unwrap();
    assert_eq!(split.test.images, te_px);
    assert!(split.train.is_empty());
    // Both splits: not in TAU_DATA_DIR, so on to the (offline, test-only) hub cache, which
    // misses the training file.
    let both = LoadOptions::default();
    let err = load(&DataSource::Mnist, &both).unwrap_err();
    assert!(matches!(err, DataError::Hub { .. }), "{err}");
    assert!(err.to_string().contains(hub::MNIST.train_file), "{err}");
    let err = load(&DataSource::Cifar10, &both).unwrap_err();
    assert!(matches!(err, DataError::Hub { .. }), "{err}");
    // CIFAR-100 found nowhere: the message names the test file only.
    let err = load(&DataSource::Cifar100, &test_only).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("test.bin"), "{err}");
    assert!(!err.to_string().contains("train.bin"), "{err}");

    // From the hub: only the test parquet file is needed (the training file is not fetched).
    unsafe { std::env::remove_var("TAU_DATA_DIR") };
    let split = load(&DataSource::Mnist, &test_only).unwrap();
    assert_eq!(split.test.images, tiny.test_pixels);
    assert_eq!(
        split.test.labels,
        tiny.test_labels
            .iter()
            .map(|&l| l as u32)
            .collect::<Vec<_>>()
    );
    assert!(split.train.is_empty());
    assert_eq!(split.train.shape, [1, 28, 28]);
}
