//! `tau-resnet import` through the binary: PyTorch `.pth` files (tau-model's fixtures,
//! written by scripts/make-pth-fixtures.py) become checkpoint directories that
//! `from_pretrained` and `predict` load, with PyTorch's logits; bad files and mismatched
//! names are one error each.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use tau_model::Model;
use tau_model::preprocess::image;

mod common;
use common::{bin, failed, ok};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/pth")
        .join(name)
}

const CONFIG: &str = r#"{"family": "cifar_resnet", "depth": 8, "tau": "1/sqrt(L)"}"#;

/// PyTorch's float64 eval-mode logits of the fixture network on the fixture input.
fn pytorch_logits() -> (Tensor, Tensor) {
    let t = candle::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    (t["input"].clone(), t["logits_eval.zero_pad"].clone())
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let d = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap()
}

/// akamaster's layout (`{'state_dict': …}`, `module.` prefix, head `linear`) imported with
/// a rename and a data set: the checkpoint loads through `from_pretrained` with PyTorch's
/// logits, records CIFAR-10's preprocessing and classes, and `predict` runs on it.
#[test]
fn import_writes_a_checkpoint_that_loads_and_predicts() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("resnet8.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    let out = tmp.path().join("ckpt");
    let stdout = ok(&bin()
        .arg("import")
        .arg(fixture("cifar8-akamaster.pth"))
        .arg("--config")
        .arg(&cfg)
        .args(["--rename", "linear.=fc.", "--dataset", "cifar10", "--out"])
        .arg(&out)
        .output()
        .unwrap());
    assert!(
        stdout.contains("37 tensors (f32) from the \"state_dict\" entry; stripped module.; renamed linear.=fc. (2); dropped 7 num_batches_tracked"),
        "{stdout}"
    );
    // sum(p.numel() for p in model.parameters()) of the script's PyTorch network.
    assert!(stdout.contains("75290 parameters"), "{stdout}");

    let (config, varmap) =
        tau_model::hub::from_pretrained(out.to_str().unwrap(), None, &Device::Cpu).unwrap();
    let (xs, want) = pytorch_logits();
    let model = Model::from_varmap(&config, &varmap, &Device::Cpu).unwrap();
    let err = max_rel_err(&model.forward_t(&xs, false).unwrap(), &want);
    assert!(err <= 1e-5, "relative error {err:e}");
    let (ckpt, _) = tau_model::checkpoint::load_checkpoint(&out, &Device::Cpu).unwrap();
    assert_eq!(ckpt.dataset.as_deref(), Some("cifar10"));
    assert_eq!(ckpt.class_name(8), "ship");
    assert_eq!(
        ckpt.preprocessing,
        Some(tau_model::Preprocessing::cifar10())
    );

    let img = tmp.path().join("img.png");
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
    })
    .save(&img)
    .unwrap();
    let pred = ok(&bin()
        .arg("predict")
        .arg("--checkpoint")
        .arg(&out)
        .args(["--top-k", "2", "--device", "cpu", "--json"])
        .arg(&img)
        .output()
        .unwrap());
    assert!(
        pred.contains("\"prob\"") && pred.contains("\"label\""),
        "{pred}"
    );

    // A second import into the same folder needs --force.
    let again = |force: bool| {
        let mut c = bin();
        c.arg("import")
            .arg(fixture("cifar8-bare.pth"))
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(&out);
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    assert!(failed(&again(false)).contains("is not empty (--force writes into it)"));
    ok(&again(true));
}

/// A run config's `[model]` table serves as the config; `--list` shows the names.
#[test]
fn toml_configs_and_list() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("run.toml");
    std::fs::write(
        &cfg,
        "name = \"x\"\nseed = 1\n[model]\nfamily = \"cifar_resnet\"\ndepth = 8\ntau = \"1/sqrt(L)\"\n",
    )
    .unwrap();
    let out = tmp.path().join("ckpt");
    ok(&bin()
        .arg("import")
        .arg(fixture("cifar8-model-dataparallel.pth"))
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    assert!(out.join("model.safetensors").is_file() && out.join("config.json").is_file());

    let list = ok(&bin()
        .arg("import")
        .arg(fixture("cifar8-model-dataparallel.pth"))
        .arg("--list")
        .output()
        .unwrap());
    assert!(
        list.contains("44 tensors in entry \"model\" (stripped module.)"),
        "{list}"
    );
    assert!(
        list.contains("layer3.0.conv2.weight\tf32\t[64, 64, 3, 3]"),
        "{list}"
    );
    assert!(list.contains("bn1.num_batches_tracked\ti64\t[]"), "{list}");
}

/// Bad files and mismatched names: exit status 1 and one message naming the file.
#[test]
fn import_errors_name_the_file_and_the_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("resnet8.json");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = |file: &str, extra: &[&str]| {
        bin()
            .arg("import")
            .arg(fixture(file))
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(tmp.path().join("out"))
            .args(extra)
            .output()
            .unwrap()
    };
    let err = failed(&run("legacy.pth", &[]));
    assert!(
        err.contains("legacy.pth: a legacy PyTorch file") && err.contains("torch.save(torch.load("),
        "{err}"
    );
    let err = failed(&run("cifar8-akamaster.pth", &[]));
    assert!(
        err.contains("missing (2): fc.weight, fc.bias")
            && err.contains("unexpected (2): linear.bias, linear.weight")
            && err.contains("linear.=fc."),
        "{err}"
    );
    let err = failed(&run("cifar8-bare.pth", &["--dtype", "i64"]));
    assert!(err.contains("--dtype \"i64\""), "{err}");
    let o = run("cifar8-bare.pth", &["--rename", "nothing"]);
    assert_eq!(o.status.code(), Some(2), "a bad --rename is a usage error");
    assert!(
        !tmp.path().join("out").exists(),
        "nothing is written on an error"
    );
}
