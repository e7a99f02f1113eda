//! The real MNIST of `../shared/data/mnist` (when present): counts and per-class counts as
//! published (and listed in its SOURCE.md).

mod common;

use tau_data::{DataSource, LoadOptions, load, mnist};

#[test]
fn real_mnist_has_the_published_counts() {
    let dir = common::shared_data().join("mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: real MNIST not found at {}", dir.display());
        return;
    }
    let s = mnist::load_dir(&dir).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
    assert_eq!(s.train.shape, [1, 28, 28]);
    assert_eq!(s.train.images.len(), 60_000 * 784);
    assert_eq!(
        s.train.class_counts(),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    assert_eq!(
        s.test.class_counts(),
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    // The first training digit of MNIST is a 5, the first test digit a 7.
    assert_eq!((s.train.labels[0], s.test.labels[0]), (5, 7));
    // Balanced subsets for full-batch experiments.
    let b = s.train.balanced_first_k(100);
    assert_eq!(b.class_counts(), [100; 10]);
    let opts = LoadOptions {
        dir: Some(dir),
        ..Default::default()
    };
    assert_eq!(load(&DataSource::Mnist, &opts).unwrap().test, s.test);
}
