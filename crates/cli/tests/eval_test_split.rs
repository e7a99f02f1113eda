//! `tau-resnet eval` reads only the test split: a data directory (or `TAU_DATA_DIR`)
//! holding only the test files is enough, and the training files are never read.

use std::path::Path;

use tau_model::preprocess::image;

mod common;
use common::{FOLDER_RUN, bin, eval_json, image_folder, ok, picture, train};

const MNIST_RUN: &str = r#"
name = "mnist-resnet8"
seed = 3
steps = 2
device = "cpu"
[model]
family = "cifar_resnet"
depth = 8
in_channels = 1
num_classes = 10
[data]
source = "mnist"
normalize = "mnist"
batch_size = 10
[loss]
kind = "cross_entropy"
[optim]
kind = "sgd"
lr = 0.05
"#;

#[test]
fn eval_on_a_folder_with_only_test_gives_the_full_folders_result() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("images");
    image_folder(&full, &["train", "test"]);
    let run = train(tmp.path(), FOLDER_RUN, &full);
    let want = eval_json(&run, "folder", &full);
    assert_eq!(want["examples"], 4);

    let test_only = tmp.path().join("test-only");
    image_folder(&test_only, &["test"]);
    let got = eval_json(&run, "folder", &test_only);
    assert_eq!(got, want);

    // A corrupt training image is never read by eval.
    std::fs::write(
        full.join("train/dog/broken.jpg"),
        b"\xff\xd8\xff\xe0 not a jpeg",
    )
    .unwrap();
    assert_eq!(eval_json(&run, "folder", &full), want);

    // A grayscale test/ is replicated to RGB for the RGB model, as when train/ is loaded
    // too: the same result as the same gray pictures stored as RGB.
    let (gray, rgb) = (tmp.path().join("gray"), tmp.path().join("rgb"));
    for (c, class) in ["cat", "dog"].iter().enumerate() {
        for root in [&gray, &rgb] {
            std::fs::create_dir_all(root.join("test").join(class)).unwrap();
        }
        for i in 0..2 {
            let luma = image::DynamicImage::ImageRgb8(picture(c, i)).into_luma8();
            let name = format!("test/{class}/{i}.png");
            luma.save(gray.join(&name)).unwrap();
            image::DynamicImage::ImageLuma8(luma)
                .into_rgb8()
                .save(rgb.join(&name))
                .unwrap();
        }
    }
    let from_rgb = eval_json(&run, "folder", &rgb);
    assert_eq!(from_rgb["examples"], 4);
    assert_eq!(eval_json(&run, "folder", &gray), from_rgb);
}

/// Writes MNIST IDX files (`n_train`, `n_test` 8×8 images, labels i % 10) into `dir`,
/// the test files only when `n_train` is 0, gzip-free.
fn mnist_files(dir: &Path, n_train: usize, n_test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut splits = vec![("t10k", n_test, 7usize)];
    if n_train > 0 {
        splits.push(("train", n_train, 0));
    }
    for (stem, n, off) in splits {
        let pixels: Vec<u8> = (0..n * 64)
            .map(|p| ((p / 64 + off) * 29 + (p % 64) * 3) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        std::fs::write(
            dir.join(format!("{stem}-images-idx3-ubyte")),
            tau_data::mnist::encode_images(n, 8, 8, &pixels),
        )
        .unwrap();
        std::fs::write(
            dir.join(format!("{stem}-labels-idx1-ubyte")),
            tau_data::mnist::encode_labels(&labels),
        )
        .unwrap();
    }
}

#[test]
fn eval_on_mnist_test_files_alone_from_a_directory_or_tau_data_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("mnist-full");
    mnist_files(&full, 20, 10);
    let run = train(tmp.path(), MNIST_RUN, &full);
    let want = eval_json(&run, "mnist", &full);
    assert_eq!(want["examples"], 10);

    let test_only = tmp.path().join("data");
    mnist_files(&test_only.join("mnist"), 0, 10);
    assert_eq!(eval_json(&run, "mnist", &test_only), want);

    // Through TAU_DATA_DIR: found there without training files, not sought on the hub.
    let out = ok(&bin()
        .args([
            "eval",
            "--json",
            "--device",
            "cpu",
            "--offline",
            "--data",
            "mnist",
        ])
        .arg("--checkpoint")
        .arg(&run)
        .env("TAU_DATA_DIR", &test_only)
        .env("HF_HUB_CACHE", tmp.path().join("empty-cache"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap());
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got, want);
}
