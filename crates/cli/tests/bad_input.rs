//! Bad input through the `tau-resnet` binary: one error naming the cause, exit status 1,
//! never a panic or an abort. Probe settings no machine can hold or no network can run,
//! checkpoints whose weights hold NaN or ±∞; and half-precision checkpoints, which
//! `eval`, `predict` and `probe` run in f32, exactly as the same weights stored in f32.

use std::path::Path;

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use tau_model::checkpoint::{self, CheckpointConfig};
use tau_model::preprocess::image;
use tau_model::{ModelConfig, Preprocessing, init_varmap};

mod common;
use common::{bin, eval_json, ok, one_error as failed};

/// A CIFAR ResNet-8 for 3×8×8 images and 2 classes (`cat`, `dog`).
fn model() -> ModelConfig {
    serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8, "num_classes": 2}"#).unwrap()
}

/// Saves `varmap` as a checkpoint of [`model`] into `dir`, with CIFAR-10's statistics for
/// 8×8 inputs and the class names.
fn save(dir: &Path, varmap: &VarMap) {
    let mut cfg = CheckpointConfig::new(model());
    cfg.preprocessing = Some(Preprocessing {
        input_size: [3, 8, 8],
        ..Preprocessing::cifar10()
    });
    cfg.class_names = Some(vec!["cat".into(), "dog".into()]);
    checkpoint::save_with(dir, &cfg, varmap).unwrap();
}

/// An 8×8 image with some texture, saved as `path`.
fn picture(path: &Path, shade: u32) {
    image::RgbImage::from_fn(8, 8, |x, y| {
        let v = |k: u32| (shade + (x * 7 + y * 3 + k * 11) % 50) as u8;
        image::Rgb([v(0), v(1), v(2)])
    })
    .save(path)
    .unwrap();
}

/// `probe.image_size=100000` aborted with a 1.9 TB allocation; 0 failed inside the stem's
/// convolution, and a bottleneck ResNet ran on 16×16 images whose later stages are 1×1.
#[test]
#[cfg(any(target_os = "linux", target_os = "macos"))] // where the memory check can read the memory
fn probe_refuses_image_sizes_it_cannot_run() {
    let probe = |family: &str, depth: &str, image: &str| {
        bin()
            .args(["probe", "--family", family, "--depth", depth, "--set"])
            .arg(format!("probe.image_size={image}"))
            .output()
            .unwrap()
    };
    let err = failed(&probe("cifar_resnet", "8", "100000"));
    assert!(
        err.starts_with("error: this probe needs about ")
            && err.contains(" GiB of memory, ")
            && err.contains("lower probe.image_size (100000), probe.n_inputs (8) or model.depth"),
        "{err}"
    );
    let err = failed(&probe("cifar_resnet", "8", "0"));
    assert!(
        err.contains("key `probe.image_size`: must be at least 4 for a cifar_resnet"),
        "{err}"
    );
    let err = failed(&probe("bottleneck_resnet", "50", "16"));
    assert!(
        err.contains("key `probe.image_size`: must be at least 32 for a bottleneck_resnet"),
        "{err}"
    );
    // The theory network has no images: the key is refused, not ignored.
    let err = failed(&probe("theory", "4", "32"));
    assert!(
        err.contains("key `probe.image_size`: the theory network takes vectors"),
        "{err}"
    );
}

/// Checkpoints in bf16 and f16 (`import --dtype bf16`) failed in `predict` (`unsupported
/// dtype BF16 for op matmul`) and `probe` (`dtype mismatch in add`), and `eval` refused
/// them; all three now compute in f32, with the results of the same weights stored in f32.
#[test]
fn eval_predict_and_probe_run_half_precision_checkpoints_in_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("img.png");
    picture(&img, 90);
    let predict = |dir: &Path| {
        let out = ok(&bin()
            .args(["predict", "--json", "--device", "cpu", "--checkpoint"])
            .arg(dir)
            .arg(&img)
            .output()
            .unwrap());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["predictions"].clone()
    };
    let probe = |dir: &Path| {
        let out = ok(&bin()
            .args([
                "probe",
                "--json",
                "--seeds",
                "1",
                "--inputs",
                "2",
                "--checkpoint",
            ])
            .arg(dir)
            .output()
            .unwrap());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["taus"].clone()
    };
    let data = tmp.path().join("images");
    for (split, class, shade) in [
        ("train", "cat", 60),
        ("test", "cat", 60),
        ("train", "dog", 180),
        ("test", "dog", 180),
    ] {
        let dir = data.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        picture(&dir.join("0.png"), shade);
    }
    let eval = |dir: &Path| {
        let v = eval_json(dir, "folder", &data);
        (v["test_loss"].clone(), v["test_acc"].clone())
    };
    for dtype in [DType::BF16, DType::F16] {
        let half = init_varmap(&model(), 0, dtype, &Device::Cpu).unwrap();
        let (half_dir, wide_dir) = (tmp.path().join("half"), tmp.path().join("wide"));
        save(&half_dir, &half);
        save(&wide_dir, &checkpoint::widen_to_f32(&half).unwrap());
        let config = std::fs::read_to_string(half_dir.join("config.json")).unwrap();
        assert!(config.contains(&format!("\"dtype\": \"{}\"", dtype.as_str())));

        let predictions = predict(&half_dir);
        assert_eq!(predictions, predict(&wide_dir), "{dtype:?}");
        let top = &predictions[0]["top"];
        let total: f64 = (0..2).map(|k| top[k]["prob"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{dtype:?}: {predictions}");

        let evaluated = eval(&half_dir);
        assert!(evaluated.0.is_number(), "{dtype:?}: {evaluated:?}");
        assert_eq!(evaluated, eval(&wide_dir), "{dtype:?}");

        let taus = probe(&half_dir);
        assert_eq!(taus, probe(&wide_dir), "{dtype:?}");
        assert_eq!(taus[0]["log10_ratio"].as_array().unwrap().len(), 2);
    }
}

/// Weights with NaN or ±∞ were accepted: `eval --json` printed `"test_loss":null` with
/// exit status 0 and `predict` printed `NaN%`. Every command that loads a checkpoint now
/// refuses it, naming the tensor.
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("images");
    for (split, (class, shade)) in ["train", "test"]
        .into_iter()
        .flat_map(|s| [(s, ("cat", 60)), (s, ("dog", 180))])
    {
        let dir = data.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        picture(&dir.join("0.png"), shade);
    }
    let img = data.join("test/cat/0.png");
    let varmap = init_varmap(&model(), 0, DType::F32, &Device::Cpu).unwrap();
    let ckpt = tmp.path().join("ckpt");
    let set = |name: &str, head: &[f32]| {
        let data = varmap.data().lock().unwrap();
        let var = &data[name];
        let mut values = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[..head.len()].copy_from_slice(head);
        var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    };
    for (name, head, what) in [
        (
            "fc.weight",
            &[f32::NAN, 0.5, f32::NAN, f32::NAN][..],
            "3 NaN",
        ),
        (
            "layer1.0.bn1.running_var",
            &[f32::INFINITY, f32::NAN],
            "1 NaN, 1 infinite",
        ),
    ] {
        let before = varmap.data().lock().unwrap()[name]
            .as_tensor()
            .copy()
            .unwrap();
        set(name, head);
        save(&ckpt, &varmap);
        let want = format!("model.safetensors: tensor \"{name}\" holds non-finite values ({what})");
        let runs: [&[&str]; 3] = [
            &[
                "eval",
                "--json",
                "--data",
                "folder",
                "--device",
                "cpu",
                "--data-dir",
            ],
            &["predict", "--device", "cpu"],
            &["probe", "--seeds", "1", "--inputs", "2"],
        ];
        for args in runs {
            let mut c = bin();
            c.args(args);
            match args[0] {
                "eval" => c.arg(&data),
                "predict" => c.arg(&img),
                _ => &mut c,
            };
            let err = failed(&c.arg("--checkpoint").arg(&ckpt).output().unwrap());
            assert!(err.trim_end().ends_with(&want), "{args:?}: {err}");
        }
        varmap.data().lock().unwrap()[name].set(&before).unwrap();
    }
    // The weights restored, every command runs.
    save(&ckpt, &varmap);
    eval_json(&ckpt, "folder", &data);
}
