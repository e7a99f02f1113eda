//! Helpers shared by the integration tests: tiny dataset files written in each format.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Schema};

/// The real data directory of this checkout's machine (absent on a user's machine).
pub fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data")
}

/// An asymmetric (C, H, W) image: pixel (c, y, x) = (60c + 7y + 2x + seed) mod 256. No
/// transpose, flip or channel swap of it equals it.
pub fn asym_image(c: usize, h: usize, w: usize, seed: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                v.push(((60 * ch + 7 * y + 2 * x + seed) % 256) as u8);
            }
        }
    }
    v
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn idx_images(count: u32, rows: u32, cols: u32, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0x0803u32, count, rows, cols] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(pixels);
    out
}

pub fn idx_labels(count: u32, labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for v in [0x0801u32, count] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(labels);
    out
}

/// A tiny MNIST-like dataset: `n` asymmetric images of rows x cols and labels i % 10.
pub struct TinyMnist {
    pub rows: usize,
    pub cols: usize,
    pub train_pixels: Vec<u8>,
    pub train_labels: Vec<u8>,
    pub test_pixels: Vec<u8>,
    pub test_labels: Vec<u8>,
}

impl TinyMnist {
    pub fn new(n_train: usize, n_test: usize, rows: usize, cols: usize) -> Self {
        let make = |n: usize, off: usize| -> (Vec<u8>, Vec<u8>) {
            let px = (0..n)
                .flat_map(|i| asym_image(1, rows, cols, 3 * (i + off)))
                .collect();
            let lb = (0..n).map(|i| ((i + off) % 10) as u8).collect();
            (px, lb)
        };
        let (train_pixels, train_labels) = make(n_train, 0);
        let (test_pixels, test_labels) = make(n_test, 100);
        TinyMnist {
            rows,
            cols,
            train_pixels,
            train_labels,
            test_pixels,
            test_labels,
        }
    }

    /// The four files' bytes: train images, train labels, test images, test labels.
    pub fn files(&self) -> [Vec<u8>; 4] {
        let (r, c) = (self.rows as u32, self.cols as u32);
        [
            idx_images(self.train_labels.len() as u32, r, c, &self.train_pixels),
            idx_labels(self.train_labels.len() as u32, &self.train_labels),
            idx_images(self.test_labels.len() as u32, r, c, &self.test_pixels),
            idx_labels(self.test_labels.len() as u32, &self.test_labels),
        ]
    }

    /// Writes the files into `dir` under the standard names (gzip-compressed if `gz`).
    pub fn write(&self, dir: &Path, gz: bool) {
        self.write_files(dir, gz, self.files());
    }

    pub fn write_files(&self, dir: &Path, gz: bool, files: [Vec<u8>; 4]) {
        std::fs::create_dir_all(dir).unwrap();
        let names = [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ];
        for (name, bytes) in names.iter().zip(files) {
            if gz {
                std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
            } else {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
}

/// CIFAR records: for each image, the label bytes then the 3072 pixel bytes.
pub fn cifar_records(label_bytes: &[Vec<u8>], images: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (labels, img) in label_bytes.iter().zip(images) {
        out.extend_from_slice(labels);
        out.extend_from_slice(img);
    }
    out
}

/// Writes a tiny CIFAR-10 directory: 2 images per training file, 3 in the test file,
/// asymmetric images, labels (k % 10). Returns (train images, train labels, test images,
/// test labels).
pub fn write_cifar10(dir: &Path) -> (Vec<u8>, Vec<u32>, Vec<u8>, Vec<u32>) {
    std::fs::create_dir_all(dir).unwrap();
    let (mut tr_px, mut tr_lb) = (Vec::new(), Vec::new());
    let mut k = 0usize;
    for b in 1..=5 {
        let imgs: Vec<Vec<u8>> = (0..2)
            .map(|i| asym_image(3, 32, 32, 11 * (k + i)))
            .collect();
        let labels: Vec<Vec<u8>> = (0..2).map(|i| vec![((k + i) % 10) as u8]).collect();
        std::fs::write(
            dir.join(format!("data_batch_{b}.bin")),
            cifar_records(&labels, &imgs),
        )
        .unwrap();
        for (img, l) in imgs.iter().zip(&labels) {
            tr_px.extend_from_slice(img);
            tr_lb.push(l[0] as u32);
        }
        k += 2;
    }
    let imgs: Vec<Vec<u8>> = (0..3).map(|i| asym_image(3, 32, 32, 5 + 13 * i)).collect();
    let labels: Vec<Vec<u8>> = (0..3).map(|i| vec![(9 - i) as u8]).collect();
    std::fs::write(dir.join("test_batch.bin"), cifar_records(&labels, &imgs)).unwrap();
    let te_px = imgs.concat();
    let te_lb = labels.iter().map(|l| l[0] as u32).collect();
    (tr_px, tr_lb, te_px, te_lb)
}

/// Encodes a (C, H, W) image (C = 1 or 3) as PNG, pixel (x, y) = channels at [., y, x].
pub fn png_bytes(chw: &[u8], c: usize, h: usize, w: usize) -> Vec<u8> {
    encode(chw, c, h, w, image::ImageFormat::Png)
}

/// Encodes a (C, H, W) image as JPEG (quality 75).
pub fn jpeg_bytes(chw: &[u8], c: usize, h: usize, w: usize) -> Vec<u8> {
    encode(chw, c, h, w, image::ImageFormat::Jpeg)
}

fn encode(chw: &[u8], c: usize, h: usize, w: usize, fmt: image::ImageFormat) -> Vec<u8> {
    let hw = h * w;
    let img: image::DynamicImage = if c == 1 {
        image::GrayImage::from_fn(w as u32, h as u32, |x, y| {
            image::Luma([chw[y as usize * w + x as usize]])
        })
        .into()
    } else {
        image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
            let p = y as usize * w + x as usize;
            image::Rgb([chw[p], chw[hw + p], chw[2 * hw + p]])
        })
        .into()
    };
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

/// A parquet file in the hub's image-classification layout: `image` (or `img`) a struct
/// {bytes: binary, path: string}, `label` int64.
pub fn write_parquet(path: &Path, image_col: &str, images: &[Vec<u8>], labels: &[i64]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let bytes = BinaryArray::from_iter_values(images.iter().map(|v| v.as_slice()));
    let paths =
        StringArray::from_iter_values(images.iter().enumerate().map(|(i, _)| format!("{i}.png")));
    let fields = [
        Arc::new(Field::new("bytes", DataType::Binary, true)),
        Arc::new(Field::new("path", DataType::Utf8, true)),
    ];
    let st = StructArray::from(vec![
        (fields[0].clone(), Arc::new(bytes) as ArrayRef),
        (fields[1].clone(), Arc::new(paths) as ArrayRef),
    ]);
    let schema = Arc::new(Schema::new(vec![
        Field::new(image_col, st.data_type().clone(), true),
        Field::new("label", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(st) as ArrayRef,
            Arc::new(Int64Array::from(labels.to_vec())) as ArrayRef,
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The snapshot directory of a dataset repo in an hf-hub cache at `cache`, with
/// `refs/<revision>` pointing at a fixed commit.
pub fn hub_snapshot(cache: &Path, repo: &str, revision: &str) -> PathBuf {
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let folder = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    let ref_path = folder.join("refs").join(revision);
    std::fs::create_dir_all(ref_path.parent().unwrap()).unwrap();
    std::fs::write(&ref_path, commit).unwrap();
    folder.join("snapshots").join(commit)
}

/// An offline hub config over `cache`: no network call can succeed (closed loopback port).
pub fn offline_hub(cache: &Path) -> tau_data::HubConfig {
    tau_data::HubConfig {
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some("http://127.0.0.1:9".into()),
        offline: true,
        retries: Some(0),
    }
}
