//! Corrupted, truncated and hostile variants of every format: each must be one clear error
//! of the right kind that names the file, never a panic and never a huge allocation.

mod common;

use std::path::Path;

use common::*;
use tau_data::{Cifar100Labels, DataError, cifar, folder, hub, mnist};

/// The kind of a [`DataError`], for table-driven checks.
fn kind(e: &DataError) -> &'static str {
    match e {
        DataError::Io { .. } => "io",
        DataError::NotFound { .. } => "not_found",
        DataError::BadMagic { .. } => "bad_magic",
        DataError::BadHeader { .. } => "bad_header",
        DataError::Truncated { .. } => "truncated",
        DataError::WrongSize { .. } => "wrong_size",
        DataError::TooLarge { .. } => "too_large",
        DataError::Gzip { .. } => "gzip",
        DataError::CountMismatch { .. } => "count_mismatch",
        DataError::LabelOutOfRange { .. } => "label_out_of_range",
        DataError::Decode { .. } => "decode",
        DataError::ShapeMismatch { .. } => "shape_mismatch",
        DataError::EmptyClass { .. } => "empty_class",
        DataError::ClassMismatch { .. } => "class_mismatch",
        DataError::BadMeta { .. } => "bad_meta",
        DataError::Parquet { .. } => "parquet",
        DataError::Hub { .. } => "hub",
        DataError::NeedsDir { .. } => "needs_dir",
    }
}

fn be(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// Replaces bytes `at..at + 4` of `bytes` with `v` big-endian.
fn set_u32(mut bytes: Vec<u8>, at: usize, v: u32) -> Vec<u8> {
    bytes[at..at + 4].copy_from_slice(&be(v));
    bytes
}

fn check(name: &str, result: Result<tau_data::Split, DataError>, expected_kind: &str, file: &str) {
    let err = match result {
        Ok(_) => panic!("{name}: loaded, expected a {expected_kind} error"),
        Err(e) => e,
    };
    assert_eq!(kind(&err), expected_kind, "{name}: got {err}");
    let msg = err.to_string();
    assert!(
        msg.contains(file),
        "{name}: message does not name {file}: {msg}"
    );
}

#[test]
fn corrupted_mnist_files_are_clear_errors() {
    let tiny = TinyMnist::new(5, 3, 4, 3);
    let [img, lbl, test_img, test_lbl] = tiny.files();
    let img_len = img.len();
    type Case = (&'static str, usize, Vec<u8>, &'static str);
    // (name, which file (0 train images, 1 train labels), bytes, expected kind)
    let mut cases: Vec<Case> = vec![
        (
            "images bad magic",
            0,
            set_u32(img.clone(), 0, 0x0801),
            "bad_magic",
        ),
        (
            "labels bad magic",
            1,
            set_u32(lbl.clone(), 0, 0x0803),
            "bad_magic",
        ),
        (
            "images zero rows",
            0,
            set_u32(img.clone(), 8, 0),
            "bad_header",
        ),
        (
            "images absurd cols",
            0,
            set_u32(img.clone(), 12, 1_000_000),
            "bad_header",
        ),
        (
            "images count too high",
            0,
            set_u32(img.clone(), 4, 6),
            "truncated",
        ),
        (
            "images count too low",
            0,
            set_u32(img.clone(), 4, 4),
            "wrong_size",
        ),
        (
            "4 billion images in a small file",
            0,
            set_u32(set_u32(img.clone(), 4, u32::MAX), 8, 4096),
            "truncated",
        ),
        (
            "labels count too high",
            1,
            set_u32(lbl.clone(), 4, 9),
            "truncated",
        ),
        (
            "trailing bytes",
            0,
            [img.clone(), vec![0; 5]].concat(),
            "wrong_size",
        ),
        (
            "label out of range",
            1,
            {
                let mut l = lbl.clone();
                l[8 + 2] = 10;
                l
            },
            "label_out_of_range",
        ),
        (
            "fewer labels than images",
            1,
            idx_labels(4, &tiny.train_labels[..4]),
            "count_mismatch",
        ),
    ];
    for cut in [0, 3, 15, 16, 17, img_len / 2, img_len - 1] {
        cases.push(("images truncated", 0, img[..cut].to_vec(), "truncated"));
    }
    for cut in [0, 7, 8, lbl.len() - 1] {
        cases.push(("labels truncated", 1, lbl[..cut].to_vec(), "truncated"));
    }
    let tmp = tempfile::tempdir().unwrap();
    for (i, (name, which, bytes, expected)) in cases.into_iter().enumerate() {
        for gz in [false, true] {
            let dir = tmp.path().join(format!("case{i}-{gz}"));
            let mut files = [img.clone(), lbl.clone(), test_img.clone(), test_lbl.clone()];
            files[which] = bytes.clone();
            tiny.write_files(&dir, gz, files);
            let file = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"][which];
            // A gzip header can claim at most what the compressed file can hold.
            let expected = if gz && name == "4 billion images in a small file" {
                "too_large"
            } else {
                expected
            };
            let file = if expected == "count_mismatch" {
                "train-labels-idx1-ubyte"
            } else {
                file
            };
            check(
                &format!("{name} (gz: {gz})"),
                mnist::load_dir(&dir),
                expected,
                file,
            );
        }
    }
}

#[test]
fn broken_gzip_streams_are_clear_errors() {
    let tiny = TinyMnist::new(50, 3, 28, 28);
    let [img, lbl, test_img, test_lbl] = tiny.files();
    let gz = gzip(&img);
    let tmp = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    // The compressed stream cut short: in the gzip header, mid-deflate, in the trailer.
    for cut in [5, 12, gz.len() / 2, gz.len() - 6, gz.len() - 1] {
        cases.push((format!("cut at {cut}"), gz[..cut].to_vec()));
    }
    // A flipped byte in the deflate data or in the CRC.
    for at in [gz.len() / 2, gz.len() - 6] {
        let mut b = gz.clone();
        b[at] ^= 0x5a;
        cases.push((format!("flipped byte {at}"), b));
    }
    for (i, (name, bytes)) in cases.into_iter().enumerate() {
        let dir = tmp.path().join(format!("gz{i}"));
        tiny.write_files(
            &dir,
            true,
            [img.clone(), lbl.clone(), test_img.clone(), test_lbl.clone()],
        );
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), &bytes).unwrap();
        let err = mnist::load_dir(&dir).expect_err(&name);
        // A stream cut short may end as a short payload (truncated) or a decoder error.
        assert!(matches!(kind(&err), "gzip" | "truncated"), "{name}: {err}");
        assert!(
            err.to_string().contains("train-images-idx3-ubyte.gz"),
            "{name}: {err}"
        );
    }
}

#[test]
fn gzip_bomb_is_read_only_up_to_the_header_size() {
    // A valid header for 5 images of 4x3, followed by 64 MiB of zeros: decompression stops
    // one byte past what the header implies.
    let tiny = TinyMnist::new(5, 3, 4, 3);
    let [img, lbl, test_img, test_lbl] = tiny.files();
    let mut bomb = img[..16].to_vec();
    bomb.resize(64 << 20, 0);
    let tmp = tempfile::tempdir().unwrap();
    tiny.write_files(tmp.path(), true, [bomb, lbl, test_img, test_lbl]);
    let err = mnist::load_dir(tmp.path()).unwrap_err();
    match &err {
        DataError::WrongSize { found, .. } => assert_eq!(*found, img.len() as u64 + 1),
        other => panic!("expected wrong_size, got {other}"),
    }
}

#[test]
fn missing_mnist_file_names_the_expected_file() {
    let tmp = tempfile::tempdir().unwrap();
    TinyMnist::new(2, 2, 2, 2).write(tmp.path(), false);
    std::fs::remove_file(tmp.path().join("t10k-labels-idx1-ubyte")).unwrap();
    check(
        "missing test labels",
        mnist::load_dir(tmp.path()),
        "not_found",
        "t10k-labels-idx1-ubyte",
    );
}

fn cifar10_case(name: &str, edit: impl Fn(&Path), expected: &str, file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path());
    edit(tmp.path());
    check(name, cifar::load_cifar10_dir(tmp.path()), expected, file);
}

#[test]
fn corrupted_cifar_files_are_clear_errors() {
    let batch = |d: &Path| d.join("data_batch_3.bin");
    for cut in [0usize, 1, 3072, 3074, 6145] {
        cifar10_case(
            &format!("cut at {cut}"),
            |d| {
                let b = std::fs::read(batch(d)).unwrap();
                std::fs::write(batch(d), &b[..cut]).unwrap();
            },
            "wrong_size",
            "data_batch_3.bin",
        );
    }
    cifar10_case(
        "extra bytes",
        |d| {
            let mut b = std::fs::read(batch(d)).unwrap();
            b.extend_from_slice(&[1, 2, 3]);
            std::fs::write(batch(d), b).unwrap();
        },
        "wrong_size",
        "data_batch_3.bin",
    );
    cifar10_case(
        "label 10",
        |d| {
            let mut b = std::fs::read(batch(d)).unwrap();
            b[3073] = 10;
            std::fs::write(batch(d), b).unwrap();
        },
        "label_out_of_range",
        "data_batch_3.bin",
    );
    cifar10_case(
        "missing test batch",
        |d| std::fs::remove_file(d.join("test_batch.bin")).unwrap(),
        "not_found",
        "test_batch.bin",
    );
    cifar10_case(
        "meta with 9 names",
        |d| std::fs::write(d.join("batches.meta.txt"), "a\nb\nc\nd\ne\nf\ng\nh\ni\n").unwrap(),
        "bad_meta",
        "batches.meta.txt",
    );

    // CIFAR-100: coarse < 20 and fine < 100 are both checked, whichever labels are used.
    let tmp = tempfile::tempdir().unwrap();
    let img = asym_image(3, 32, 32, 0);
    for (i, (labels, expected)) in [
        (vec![20u8, 5], "label_out_of_range"),
        (vec![5u8, 100], "label_out_of_range"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tmp.path().join(format!("c100-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        let good = cifar_records(&[vec![1, 2]], std::slice::from_ref(&img));
        std::fs::write(
            dir.join("train.bin"),
            cifar_records(&[labels], std::slice::from_ref(&img)),
        )
        .unwrap();
        std::fs::write(dir.join("test.bin"), &good).unwrap();
        for which in [Cifar100Labels::Fine, Cifar100Labels::Coarse] {
            check(
                "cifar100 label",
                cifar::load_cifar100_dir(&dir, which),
                expected,
                "train.bin",
            );
        }
        // A CIFAR-10 record length is not a CIFAR-100 record length.
        std::fs::write(dir.join("test.bin"), &good[1..]).unwrap();
        std::fs::write(dir.join("train.bin"), &good).unwrap();
        check(
            "cifar100 wrong record size",
            cifar::load_cifar100_dir(&dir, Cifar100Labels::Fine),
            "wrong_size",
            "test.bin",
        );
    }
}

/// A valid two-class image folder of 4x6 RGB PNGs.
fn write_folder(root: &Path) {
    for split in ["train", "test"] {
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
}

fn folder_case(name: &str, edit: impl Fn(&Path), expected: &str, file: &str) {
    let tmp = tempfile::tempdir().unwrap();
    write_folder(tmp.path());
    folder::load_dir(tmp.path()).expect("the unedited folder loads");
    edit(tmp.path());
    check(name, folder::load_dir(tmp.path()), expected, file);
}

#[test]
fn corrupted_image_folders_are_clear_errors() {
    let png = |r: &Path| r.join("train/dog/1.png");
    folder_case(
        "garbage png",
        |r| std::fs::write(png(r), b"\x89PNG\r\n\x1a\nnot really").unwrap(),
        "decode",
        "dog/1.png",
    );
    folder_case(
        "truncated png",
        |r| {
            let b = std::fs::read(png(r)).unwrap();
            std::fs::write(png(r), &b[..b.len() / 2]).unwrap();
        },
        "decode",
        "dog/1.png",
    );
    folder_case(
        "text as jpg",
        |r| std::fs::write(r.join("test/cat/0.jpg"), b"hello").unwrap(),
        "decode",
        "cat/0.jpg",
    );
    folder_case(
        "different size",
        |r| std::fs::write(png(r), png_bytes(&asym_image(3, 6, 4, 0), 3, 6, 4)).unwrap(),
        "shape_mismatch",
        "dog/1.png",
    );
    folder_case(
        "empty class folder",
        |r| std::fs::create_dir_all(r.join("train/emu")).unwrap(),
        "empty_class",
        "emu",
    );
    folder_case(
        "class folder with no image files",
        |r| {
            std::fs::create_dir_all(r.join("test/zebra")).unwrap();
            std::fs::write(r.join("test/zebra/readme.txt"), "x").unwrap();
        },
        "empty_class",
        "zebra",
    );
    folder_case(
        "test classes differ",
        |r| std::fs::rename(r.join("test/dog"), r.join("test/wolf")).unwrap(),
        "class_mismatch",
        "test",
    );
    folder_case(
        "no test split",
        |r| std::fs::remove_dir_all(r.join("test")).unwrap(),
        "not_found",
        "test",
    );
}

#[test]
fn corrupted_parquet_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.parquet");
    let good = png_bytes(&asym_image(1, 28, 28, 0), 1, 28, 28);
    let read = |p: &Path| hub::read_parquet(p, [1, 28, 28], 10).map(|_| ());
    let expect = |name: &str, r: Result<(), DataError>, k: &str| {
        let e = r.expect_err(name);
        assert_eq!(kind(&e), k, "{name}: {e}");
        assert!(e.to_string().contains("x.parquet"), "{name}: {e}");
    };
    std::fs::write(&p, b"PAR1 not parquet at all").unwrap();
    expect("not parquet", read(&p), "parquet");
    write_parquet(&p, "image", &[good.clone(), good.clone()], &[3, 10]);
    expect("label 10", read(&p), "label_out_of_range");
    write_parquet(&p, "image", &[good.clone(), good.clone()], &[3, -1]);
    expect("label -1", read(&p), "label_out_of_range");
    write_parquet(&p, "image", &[good.clone(), b"garbage".to_vec()], &[3, 4]);
    expect("undecodable", read(&p), "decode");
    write_parquet(
        &p,
        "image",
        &[png_bytes(&asym_image(1, 27, 28, 0), 1, 27, 28)],
        &[3],
    );
    expect("wrong size", read(&p), "shape_mismatch");
    write_parquet(&p, "picture", std::slice::from_ref(&good), &[3]);
    expect("no image column", read(&p), "parquet");
    let full = std::fs::read({
        write_parquet(&p, "image", &[good.clone(), good], &[1, 2]);
        &p
    })
    .unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    expect("truncated parquet", read(&p), "parquet");
}
