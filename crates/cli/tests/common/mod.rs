//! What the `tau-resnet` binary's test files share: the command, the checks of how it
//! ended, and small image folders and runs to work on. Each test file uses a part, so the
//! rest is dead code there.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tau_model::preprocess::image;

/// `tau-resnet --quiet`, independent of the caller's `TAU_DATA_DIR` and `RUST_BACKTRACE`.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tau-resnet"));
    c.arg("--quiet")
        .env_remove("TAU_DATA_DIR")
        .env_remove("RUST_BACKTRACE");
    c
}

/// The standard output of a command that exited with status 0 (else its stderr, as the
/// panic message).
pub fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// The standard error of a command that failed with status 1 (an error, not a panic, an
/// abort or a usage error).
pub fn failed(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "stderr: {err}\nstdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    err
}

/// [`failed`], and the error is one line, `error: …`.
pub fn one_error(o: &Output) -> String {
    let err = failed(o);
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "{err}"
    );
    err
}

/// A 2-step ResNet-8 run on an image folder of 2 classes (`data.dir` set by [`train`]).
pub const FOLDER_RUN: &str = r#"
name = "folder-resnet8"
seed = 3
steps = 2
device = "cpu"
[model]
family = "cifar_resnet"
depth = 8
num_classes = 2
[data]
source = "folder"
normalize = "cifar10"
batch_size = 4
[loss]
kind = "cross_entropy"
[optim]
kind = "sgd"
lr = 0.05
"#;

/// `tau-resnet eval --json --device cpu` of `checkpoint` on the data set `data` (`mnist`,
/// `folder`, …) in `dir`: the parsed result (the command must succeed).
pub fn eval_json(checkpoint: &Path, data: &str, dir: &Path) -> serde_json::Value {
    let out = ok(&bin()
        .args(["eval", "--json", "--device", "cpu", "--data", data])
        .arg("--checkpoint")
        .arg(checkpoint)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap());
    serde_json::from_str(&out).unwrap()
}

/// A 16×16 test image: class 0 darker, class 1 brighter, with some texture.
pub fn picture(class: usize, i: usize) -> image::RgbImage {
    image::RgbImage::from_fn(16, 16, |x, y| {
        let base = 60 + 120 * class as u32;
        let v = |k: u32| (base + (x * 7 + y * 3 + k * 11 + i as u32 * 5) % 50) as u8;
        image::Rgb([v(0), v(1), v(2)])
    })
}

/// An image folder with the given splits (`train/` 4, `test/` 2 images per class, classes
/// `cat` and `dog`).
pub fn image_folder(root: &Path, splits: &[&str]) {
    for split in splits {
        let n = if *split == "train" { 4 } else { 2 };
        for (c, class) in ["cat", "dog"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                picture(c, i).save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

/// Trains the run config `config` on the data folder `data` into `tmp/run`; returns the
/// run directory.
pub fn train(tmp: &Path, config: &str, data: &Path) -> PathBuf {
    let cfg = tmp.join("run.toml");
    std::fs::write(&cfg, config).unwrap();
    let run = tmp.join("run");
    let set = format!("data.dir={:?}", data.display().to_string());
    ok(&bin()
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--set", &set, "--out"])
        .arg(&run)
        .output()
        .unwrap());
    run
}
