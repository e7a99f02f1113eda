//! Round trips through every format on tiny files the tests write, with asymmetric images
//! that pin the orientation: every route gives the same (C, H, W) bytes.

mod common;

use common::*;
use tau_data::{Cifar100Labels, DataSource, LoadOptions, cifar, folder, hub, load, mnist};

#[test]
fn mnist_raw_gz_and_dotted_names_load_the_same_images() {
    let tiny = TinyMnist::new(7, 4, 5, 3);
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let gz = tmp.path().join("gz");
    tiny.write(&raw, false);
    tiny.write(&gz, true);
    let dotted = tmp.path().join("dotted");
    std::fs::create_dir_all(&dotted).unwrap();
    for (from, to) in [
        ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
        ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
        ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
    ] {
        std::fs::copy(raw.join(from), dotted.join(to)).unwrap();
    }
    let a = mnist::load_dir(&raw).unwrap();
    assert_eq!(a.train.shape, [1, 5, 3]);
    assert_eq!(a.train.images, tiny.train_pixels);
    assert_eq!(a.test.images, tiny.test_pixels);
    assert_eq!(
        a.train.labels,
        tiny.train_labels
            .iter()
            .map(|&l| l as u32)
            .collect::<Vec<_>>()
    );
    assert_eq!(
        a.test.labels,
        tiny.test_labels
            .iter()
            .map(|&l| l as u32)
            .collect::<Vec<_>>()
    );
    assert_eq!(a.train.num_classes, 10);
    // Orientation: pixel (y, x) of image 0 is 7y + 2x.
    assert_eq!(a.train.image(0)[2 * 3 + 1], 7 * 2 + 2);
    assert_eq!(mnist::load_dir(&gz).unwrap(), a);
    assert_eq!(mnist::load_dir(&dotted).unwrap(), a);
    // The conventional subdirectory of a data directory is found too.
    let parent = tmp.path().join("data");
    tiny.write(&parent.join("mnist"), true);
    assert_eq!(mnist::load_dir(&parent).unwrap(), a);
    let opts = LoadOptions {
        dir: Some(parent),
        ..Default::default()
    };
    assert_eq!(load(&DataSource::Mnist, &opts).unwrap(), a);
}

#[test]
fn cifar10_binary_keeps_the_file_orientation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    let (tr_px, tr_lb, te_px, te_lb) = write_cifar10(&dir);
    let s = cifar::load_cifar10_dir(&dir).unwrap();
    assert_eq!(s.train.shape, [3, 32, 32]);
    assert_eq!((s.train.len(), s.test.len()), (10, 3));
    assert_eq!(s.train.images, tr_px);
    assert_eq!(s.train.labels, tr_lb);
    assert_eq!(s.test.images, te_px);
    assert_eq!(s.test.labels, te_lb);
    assert_eq!(s.train.class_names[0], "airplane");
    // Image 0: pixel (c, y, x) = 60c + 7y + 2x.
    assert_eq!(s.train.image(0)[1024 + 32 * 3 + 5], (60 + 21 + 10) as u8);
    // From the parent directory, and through `load`.
    assert_eq!(cifar::load_cifar10_dir(tmp.path()).unwrap(), s);
    let opts = LoadOptions {
        dir: Some(tmp.path().into()),
        ..Default::default()
    };
    assert_eq!(load(&DataSource::Cifar10, &opts).unwrap(), s);
    // Class names from batches.meta.txt.
    let names: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    std::fs::write(dir.join("batches.meta.txt"), names.join("\n") + "\n\n").unwrap();
    assert_eq!(
        cifar::load_cifar10_dir(&dir).unwrap().train.class_names,
        names
    );
}

#[test]
fn cifar100_fine_and_coarse_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let imgs: Vec<Vec<u8>> = (0..4).map(|i| asym_image(3, 32, 32, i)).collect();
    let labels: Vec<Vec<u8>> = vec![vec![19, 99], vec![0, 0], vec![7, 42], vec![3, 58]];
    std::fs::write(dir.join("train.bin"), cifar_records(&labels, &imgs)).unwrap();
    std::fs::write(
        dir.join("test.bin"),
        cifar_records(&labels[..2], &imgs[..2]),
    )
    .unwrap();
    let fine = cifar::load_cifar100_dir(&dir, Cifar100Labels::Fine).unwrap();
    assert_eq!(fine.train.labels, vec![99, 0, 42, 58]);
    assert_eq!(fine.train.num_classes, 100);
    assert_eq!(fine.train.class_names[99], "worm");
    assert_eq!(fine.train.images, imgs.concat());
    assert_eq!(fine.test.labels, vec![99, 0]);
    let coarse = cifar::load_cifar100_dir(tmp.path(), Cifar100Labels::Coarse).unwrap();
    assert_eq!(coarse.train.labels, vec![19, 0, 7, 3]);
    assert_eq!(coarse.train.num_classes, 20);
    assert_eq!(coarse.train.class_names[19], "vehicles_2");
    assert_eq!(coarse.train.images, fine.train.images);
    let opts = LoadOptions {
        dir: Some(dir),
        cifar100_labels: Cifar100Labels::Coarse,
        ..Default::default()
    };
    assert_eq!(load(&DataSource::Cifar100, &opts).unwrap(), coarse);
}

#[test]
fn folder_png_route_matches_the_binary_route() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    let (tr_px, tr_lb, te_px, te_lb) = write_cifar10(&bin);
    let from_bin = cifar::load_cifar10_dir(&bin).unwrap();
    // The same images as PNG files in the ImageFolder layout, class folders named so that
    // sorting gives the CIFAR label order; file names keep the dataset order within a class.
    let root = tmp.path().join("folder");
    for (split, px, lb) in [("train", &tr_px, &tr_lb), ("test", &te_px, &te_lb)] {
        for class in cifar::CIFAR10_CLASSES {
            std::fs::create_dir_all(root.join(split).join(class)).unwrap();
        }
        for (i, (img, &l)) in px.chunks(3072).zip(lb.iter()).enumerate() {
            let path = root
                .join(split)
                .join(cifar::CIFAR10_CLASSES[l as usize])
                .join(format!("{i:04}.png"));
            std::fs::write(path, png_bytes(img, 3, 32, 32)).unwrap();
        }
    }
    // A test class folder may not be empty: give the empty ones an image in both splits.
    for split in ["train", "test"] {
        for (l, class) in cifar::CIFAR10_CLASSES.iter().enumerate() {
            let d = root.join(split).join(class);
            if std::fs::read_dir(&d).unwrap().next().is_none() {
                std::fs::write(
                    d.join("9999.png"),
                    png_bytes(&asym_image(3, 32, 32, 200 + l), 3, 32, 32),
                )
                .unwrap();
            }
        }
    }
    let from_folder = folder::load_dir(&root).unwrap();
    assert_eq!(from_folder.train.class_names, from_bin.train.class_names);
    assert_eq!(from_folder.train.shape, [3, 32, 32]);
    // Every binary image appears in the folder dataset with its label, byte for byte.
    for (ds_bin, ds_folder) in [
        (&from_bin.train, &from_folder.train),
        (&from_bin.test, &from_folder.test),
    ] {
        for i in 0..ds_bin.len() {
            let found = (0..ds_folder.len()).any(|j| {
                ds_folder.image(j) == ds_bin.image(i) && ds_folder.labels[j] == ds_bin.labels[i]
            });
            assert!(found, "image {i} not found with the same bytes and label");
        }
    }
    // Labels follow the sorted class folders, files their name order.
    assert!(from_folder.train.labels.windows(2).all(|w| w[0] <= w[1]));
}

#[test]
fn folder_loads_non_square_gray_and_jpeg_images() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Non-square grayscale PNGs: rows and columns must not be swapped.
    for split in ["train", "test"] {
        for (l, class) in ["b_second", "a_first"].iter().enumerate() {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("x.png"), png_bytes(&asym_image(1, 5, 7, l), 1, 5, 7)).unwrap();
            std::fs::write(d.join("notes.txt"), b"not an image").unwrap();
        }
    }
    let s = folder::load_dir(root).unwrap();
    assert_eq!(s.train.shape, [1, 5, 7]);
    assert_eq!(s.train.class_names, vec!["a_first", "b_second"]);
    assert_eq!(s.train.labels, vec![0, 1]);
    assert_eq!(s.train.image(0), asym_image(1, 5, 7, 1).as_slice());
    assert_eq!(s.train.image(0)[7 * 4 + 6], (7 * 4 + 2 * 6 + 1) as u8);

    // JPEG (lossy): a smooth RGB image comes back close, at the right size.
    let jroot = tmp.path().join("jpeg");
    let smooth: Vec<u8> = (0..3 * 16 * 24).map(|i| ((i % 384) / 3) as u8).collect();
    for split in ["train", "test"] {
        let d = jroot.join(split).join("only");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("0.JPG"), jpeg_bytes(&smooth, 3, 16, 24)).unwrap();
    }
    let j = folder::load_dir(&jroot).unwrap();
    assert_eq!(j.train.shape, [3, 16, 24]);
    let mean_err: f64 = j
        .train
        .images
        .iter()
        .zip(&smooth)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / smooth.len() as f64;
    assert!(mean_err < 8.0, "mean absolute JPEG error {mean_err}");
}

#[test]
fn hub_parquet_route_matches_the_file_routes() {
    let tmp = tempfile::tempdir().unwrap();
    // CIFAR-10: the binary files and the same images as PNGs in a parquet file of an offline
    // hub cache.
    let (tr_px, tr_lb, te_px, te_lb) = write_cifar10(&tmp.path().join("bin"));
    let from_bin = cifar::load_cifar10_dir(tmp.path().join("bin")).unwrap();
    let cache = tmp.path().join("hub");
    let snap = hub_snapshot(&cache, hub::CIFAR10.repo, hub::CIFAR10.revision);
    let pngs = |px: &[u8]| {
        px.chunks(3072)
            .map(|img| png_bytes(img, 3, 32, 32))
            .collect::<Vec<_>>()
    };
    let longs = |lb: &[u32]| lb.iter().map(|&l| l as i64).collect::<Vec<_>>();
    write_parquet(
        &snap.join(hub::CIFAR10.train_file),
        "img",
        &pngs(&tr_px),
        &longs(&tr_lb),
    );
    write_parquet(
        &snap.join(hub::CIFAR10.test_file),
        "img",
        &pngs(&te_px),
        &longs(&te_lb),
    );
    let from_hub = hub::load_cifar10_with(&offline_hub(&cache)).unwrap();
    assert_eq!(from_hub, from_bin);

    // MNIST: gray PNGs (non-square, to catch a transposition) against IDX files.
    let tiny = TinyMnist::new(6, 3, 28, 28);
    tiny.write(&tmp.path().join("idx"), true);
    let from_idx = mnist::load_dir(tmp.path().join("idx")).unwrap();
    let snap = hub_snapshot(&cache, hub::MNIST.repo, hub::MNIST.revision);
    let gray = |px: &[u8]| {
        px.chunks(784)
            .map(|img| png_bytes(img, 1, 28, 28))
            .collect::<Vec<_>>()
    };
    let labels = |lb: &[u8]| lb.iter().map(|&l| l as i64).collect::<Vec<_>>();
    write_parquet(
        &snap.join(hub::MNIST.train_file),
        "image",
        &gray(&tiny.train_pixels),
        &labels(&tiny.train_labels),
    );
    write_parquet(
        &snap.join(hub::MNIST.test_file),
        "image",
        &gray(&tiny.test_pixels),
        &labels(&tiny.test_labels),
    );
    let from_hub = hub::load_mnist_with(&offline_hub(&cache)).unwrap();
    assert_eq!(from_hub, from_idx);
}

#[test]
fn hub_cache_miss_offline_is_a_hub_error() {
    let tmp = tempfile::tempdir().unwrap();
    let err = hub::load_mnist_with(&offline_hub(tmp.path())).unwrap_err();
    assert!(matches!(err, tau_data::DataError::Hub { .. }), "{err}");
    assert!(err.to_string().contains("ylecun/mnist"), "{err}");
    // Online against a closed local port: a network error, reported the same way.
    let mut cfg = offline_hub(tmp.path());
    cfg.offline = false;
    let err = hub::load_cifar10_with(&cfg).unwrap_err();
    assert!(matches!(err, tau_data::DataError::Hub { .. }), "{err}");
}

#[test]
fn folder_source_needs_a_directory() {
    let err = load(&DataSource::Folder, &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, tau_data::DataError::NeedsDir { .. }), "{err}");
}

#[test]
fn data_source_names_round_trip() {
    for s in [
        DataSource::Mnist,
        DataSource::Cifar10,
        DataSource::Cifar100,
        DataSource::Folder,
    ] {
        assert_eq!(s.name().parse::<DataSource>().unwrap(), s);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            format!("\"{}\"", s.name())
        );
    }
    assert!("cifar".parse::<DataSource>().is_err());
}
