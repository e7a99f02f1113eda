//! Resolution through `TAU_DATA_DIR` (a test binary of its own: it sets the process's
//! environment).

mod common;

use common::*;
use tau_data::{DataError, DataSource, LoadOptions, load};

#[test]
fn tau_data_dir_is_searched_before_the_hub() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = TinyMnist::new(3, 2, 4, 4);
    tiny.write(&tmp.path().join("mnist"), true);
    write_cifar10(&tmp.path().join("cifar-10-batches-bin"));
    let cache = tempfile::tempdir().unwrap();
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("TAU_DATA_DIR", tmp.path());
        // If the hub were reached, it would find an empty cache and no network.
        std::env::set_var("HF_HUB_CACHE", cache.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let opts = LoadOptions::default();
    let m = load(&DataSource::Mnist, &opts).unwrap();
    assert_eq!(m.train.images, tiny.train_pixels);
    let c = load(&DataSource::Cifar10, &opts).unwrap();
    assert_eq!(c.train.len(), 10);
    // CIFAR-100 is not there and has no hub route.
    let err = load(&DataSource::Cifar100, &opts).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    // An explicit directory wins over TAU_DATA_DIR, and does not fall back.
    let empty = tempfile::tempdir().unwrap();
    let explicit = LoadOptions {
        dir: Some(empty.path().into()),
        ..Default::default()
    };
    let err = load(&DataSource::Mnist, &explicit).unwrap_err();
    assert!(matches!(err, DataError::NotFound { .. }), "{err}");
    // The directory itself is accepted too.
    unsafe { std::env::set_var("TAU_DATA_DIR", tmp.path().join("mnist")) };
    assert_eq!(load(&DataSource::Mnist, &opts).unwrap(), m);
    // Not in TAU_DATA_DIR: on to the hub, offline here, so a hub error.
    let err = load(&DataSource::Cifar10, &opts).unwrap_err();
    assert!(matches!(err, DataError::Hub { .. }), "{err}");
}
