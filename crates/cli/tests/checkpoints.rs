//! Checkpoints as users meet them, through the `tau-resnet` binary: a run's checkpoint
//! records its preprocessing and class names, `eval` applies them, `predict` classifies
//! image files with them, and `export` writes a hub-ready folder that loads back through a
//! hub cache.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle::{DType, Device, Tensor};
use tau_model::hub::{self, HubOptions, LoadSpec};
use tau_model::preprocess::image;

mod common;
use common::{FOLDER_RUN, bin, eval_json, image_folder, ok, picture};

/// Trains [`FOLDER_RUN`] on a fresh image folder (`train/` and `test/`) under `tmp`; returns the
/// run directory.
fn train(tmp: &Path) -> PathBuf {
    let data = tmp.join("images");
    image_folder(&data, &["train", "test"]);
    common::train(tmp, FOLDER_RUN, &data)
}

#[test]
fn a_run_records_preprocessing_and_predict_export_and_eval_use_it() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train(tmp.path());
    let ckpt = run.join("checkpoints/last");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["preprocessing"],
        serde_json::json!({
            "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.201],
            "input_size": [3, 16, 16], "crop_pct": 1.0, "interpolation": "bilinear"
        })
    );
    assert_eq!(config["class_names"], serde_json::json!(["cat", "dog"]));

    // eval normalizes with the checkpoint's statistics, and says so.
    let data_dir = tmp.path().join("images");
    let r = eval_json(&run, "folder", &data_dir);
    assert_eq!(r["examples"], 4);
    assert_eq!(r["normalize"]["source"], "checkpoint");
    assert_eq!(r["normalize"]["mean"][0], 0.4914);
    let out = ok(&bin()
        .args([
            "eval",
            "--json",
            "--data",
            "folder",
            "--mean",
            "0.5,0.5,0.5",
        ])
        .args(["--std", "0.25,0.25,0.25", "--checkpoint"])
        .arg(&run)
        .arg("--data-dir")
        .arg(&data_dir)
        .output()
        .unwrap());
    let r2: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r2["normalize"]["source"], "command_line");
    assert_ne!(r2["test_loss"], r["test_loss"]);

    // predict: the probabilities are the softmax of the model's logits on the image
    // normalized by hand with the recorded mean and std (a 16×16 image needs no resize).
    let img = tmp.path().join("dog.png");
    picture(1, 9).save(&img).unwrap();
    let big = tmp.path().join("big.jpg");
    image::DynamicImage::ImageRgb8(picture(0, 1))
        .resize_exact(40, 30, image::imageops::FilterType::Triangle)
        .save(&big)
        .unwrap();
    let out = ok(&bin()
        .args(["predict", "--json", "--top-k", "2", "--checkpoint"])
        .arg(&run)
        .arg(&img)
        .arg(&big)
        .output()
        .unwrap());
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let preds = r["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), 2);
    let top = preds[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    let (pretrained_cfg, vm) = tau_model::checkpoint::load_checkpoint(&ckpt, &Device::Cpu).unwrap();
    let model = tau_model::Model::from_varmap(&pretrained_cfg.model, &vm, &Device::Cpu).unwrap();
    let (mean, std) = ([0.4914f32, 0.4822, 0.4465], [0.2023f32, 0.1994, 0.2010]);
    let px = picture(1, 9);
    let mut x = vec![0f32; 3 * 16 * 16];
    for (i, p) in px.pixels().enumerate() {
        for c in 0..3 {
            x[c * 256 + i] = (p.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    let x = Tensor::from_vec(x, (1, 3, 16, 16), &Device::Cpu).unwrap();
    let logits = model
        .forward_t(&x, false)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let z: f64 = logits.iter().map(|l| (l - logits[0]).exp()).sum();
    for s in top {
        let class = s["class"].as_u64().unwrap() as usize;
        let want = (logits[class] - logits[0]).exp() / z;
        let got = s["prob"].as_f64().unwrap();
        assert!((got - want).abs() < 1e-6, "class {class}: {got} vs {want}");
        assert_eq!(s["label"], ["cat", "dog"][class]);
    }
    assert!(top[0]["prob"].as_f64() >= top[1]["prob"].as_f64());
    assert_eq!(
        r["preprocessing"]["input_size"],
        serde_json::json!([3, 16, 16])
    );
    // The table form names the classes.
    let text = ok(&bin()
        .args(["predict", "--checkpoint"])
        .arg(&run)
        .arg(&img)
        .output()
        .unwrap());
    assert!(
        text.contains("dog.png") && text.contains("cat (0)") && text.contains('%'),
        "{text}"
    );

    // A bad image file: one error naming it, exit status 1.
    let bad = tmp.path().join("broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let o = bin()
        .args(["predict", "--checkpoint"])
        .arg(&run)
        .arg(&img)
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("broken.png") && !err.contains("panicked"),
        "{err}"
    );

    // export → a hub cache → load_pretrained gives the same config and tensors.
    let hub_dir = tmp.path().join("hub-folder");
    let out = ok(&bin()
        .arg("export")
        .arg(&run)
        .arg(&hub_dir)
        .args(["--repo-id", "someone/folder-resnet8"])
        .output()
        .unwrap());
    assert!(out.contains("model.safetensors"), "{out}");
    let mut names: Vec<String> = std::fs::read_dir(&hub_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["README.md", "config.json", "model.safetensors"]);
    let card = std::fs::read_to_string(hub_dir.join("README.md")).unwrap();
    assert!(card.starts_with("---\nlibrary_name: tau-model\n"), "{card}");
    for needle in [
        "- image-classification",
        "τ rule",
        "on an image folder",
        "`1/sqrt(L)`, at L = 3 residual blocks τ = 0.577350",
        "load_pretrained(\"someone/folder-resnet8\"",
        "safetensors.torch import load_file",
        "[model]\nfamily = \"cifar_resnet\"",
        "mean [0.4914, 0.4822, 0.4465]",
    ] {
        assert!(
            card.to_lowercase().contains(&needle.to_lowercase()),
            "{needle}: {card}"
        );
    }
    let front = card.split("---\n").nth(1).unwrap();
    assert!(
        front.contains("metrics:\n- accuracy\n- loss\n") && front.contains("value: 1\n"),
        "{front}"
    );
    // The card names no path of the machine it was exported on.
    assert!(!card.contains(tmp.path().to_str().unwrap()), "{card}");
    // No optimizer state: the weights are exactly the model's tensors.
    let st = candle::safetensors::load(hub_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(st.len(), vm.data().lock().unwrap().len());
    assert!(
        !st.keys()
            .any(|k| k.contains("momentum") || k.contains("optim"))
    );

    let cache = tempfile::tempdir().unwrap();
    let commit = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c";
    let repo = cache.path().join("models--someone--folder-resnet8");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors", "README.md"] {
        std::fs::copy(hub_dir.join(f), snap.join(f)).unwrap();
    }
    let options = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        endpoint: Some("http://127.0.0.1:9".into()),
        retry_max_attempts: Some(0),
        local_files_only: true,
        ..Default::default()
    };
    let p = hub::load_pretrained(
        "someone/folder-resnet8",
        &LoadSpec::default(),
        &options,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(p.config.model, pretrained_cfg.model);
    assert_eq!(p.config.preprocessing, pretrained_cfg.preprocessing);
    assert_eq!(p.config.class_names, pretrained_cfg.class_names);
    let a = p.model(&Device::Cpu).unwrap().forward_t(&x, false).unwrap();
    let b = model.forward_t(&x, false).unwrap();
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );

    // An existing non-empty folder is refused without --force, and nothing is changed.
    let before = std::fs::read(hub_dir.join("README.md")).unwrap();
    let o = bin()
        .arg("export")
        .arg(&run)
        .arg(&hub_dir)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(hub_dir.join("README.md")).unwrap(), before);
    ok(&bin()
        .arg("export")
        .arg(&run)
        .arg(&hub_dir)
        .arg("--force")
        .output()
        .unwrap());
    // Not a run directory: one clear error.
    let o = bin()
        .arg("export")
        .arg(tmp.path().join("images"))
        .arg(tmp.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a run directory"));
}

#[test]
fn predict_and_export_have_help_with_examples() {
    for cmd in ["predict", "export"] {
        let o = Command::new(env!("CARGO_BIN_EXE_tau-resnet"))
            .args([cmd, "--help"])
            .output()
            .unwrap();
        let text = ok(&o);
        assert!(text.contains("Example"), "{cmd}: {text}");
    }
}

#[test]
fn eval_offline_keeps_the_data_set_off_the_network_too() {
    let tmp = tempfile::tempdir().unwrap();
    let run = train(tmp.path());
    // An empty cache and an endpoint nothing listens on: a download attempt would fail with
    // a download error; offline, the miss is named as one before any network.
    let o = bin()
        .args(["eval", "--offline", "--data", "mnist", "--checkpoint"])
        .arg(&run)
        .env_remove("TAU_DATA_DIR")
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_CACHE", tmp.path().join("empty-cache"))
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("offline: no download"), "{err}");
}

#[test]
fn a_relative_data_dir_is_recorded_absolutely_so_resume_works_from_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    image_folder(&tmp.path().join("images"), &["train", "test"]);
    std::fs::write(tmp.path().join("run.toml"), FOLDER_RUN).unwrap();
    let o = bin()
        .current_dir(tmp.path())
        .args([
            "train",
            "--config",
            "run.toml",
            "--set",
            "data.dir=\"images\"",
        ])
        .args(["--stop-after-steps", "1", "--out", "run"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let config = std::fs::read_to_string(tmp.path().join("run/config.toml")).unwrap();
    let want = std::path::absolute(tmp.path().join("images")).unwrap();
    assert!(config.contains(&*want.to_string_lossy()), "{config}");
    // Resumed from another working directory, the run finds its data.
    ok(&bin()
        .current_dir(std::env::temp_dir())
        .args(["train", "--resume"])
        .arg(tmp.path().join("run"))
        .output()
        .unwrap());
}
