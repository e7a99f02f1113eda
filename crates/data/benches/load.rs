//! Loading speed: full MNIST from its `.gz` files, and decoding the 60,000 CIFAR-10 JPEGs of
//! `../shared/data/cifar10-jpeg.tar.gz` (unpacked into a temporary directory first).
//! Both are skipped, with a message, when the data is absent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

fn mnist_gz(c: &mut Criterion) {
    let dir = shared_data().join("mnist");
    if !dir.join("train-images-idx3-ubyte.gz").is_file() {
        eprintln!("skipped: real MNIST not found at {}", dir.display());
        return;
    }
    let mut g = c.benchmark_group("load");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("mnist_gz_full", |b| {
        b.iter(|| {
            let s = tau_data::mnist::load_dir(&dir).expect("MNIST loads");
            assert_eq!(s.train.len() + s.test.len(), 70_000);
            s
        })
    });
    g.finish();
}

fn cifar10_jpeg(c: &mut Criterion) {
    let archive = shared_data().join("cifar10-jpeg.tar.gz");
    if !archive.is_file() {
        eprintln!("skipped: {} not found", archive.display());
        return;
    }
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(tmp.path())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("skipped: could not unpack {} with tar", archive.display());
        return;
    }
    // The archive may hold the split folders at its top or one level down.
    let root = if tmp.path().join("train").is_dir() {
        tmp.path().to_path_buf()
    } else {
        match std::fs::read_dir(tmp.path()).ok().and_then(|mut d| {
            d.find_map(|e| {
                e.ok()
                    .map(|e| e.path())
                    .filter(|p| p.join("train").is_dir())
            })
        }) {
            Some(p) => p,
            None => {
                eprintln!("skipped: no train/ folder in {}", archive.display());
                return;
            }
        }
    };
    let mut g = c.benchmark_group("load");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function("cifar10_jpeg_folder_60000", |b| {
        b.iter(|| {
            let s = tau_data::folder::load_dir(&root).expect("the JPEG folder loads");
            assert_eq!(s.train.len() + s.test.len(), 60_000);
            s
        })
    });
    g.finish();
}

criterion_group!(benches, mnist_gz, cifar10_jpeg);
criterion_main!(benches);
