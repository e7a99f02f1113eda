//! PyTorch `.pth` import against files `torch.save` wrote (tests/fixtures/pth, made by
//! scripts/make-pth-fixtures.py): the weights of a CIFAR ResNet-8 give PyTorch's float64
//! logits, in every wrapper and name layout real checkpoints come in; bad files are one
//! error naming the file and the tensor.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use tau_model::pth::{PthError, PthOptions, load_pth, read_index};
use tau_model::{Model, ModelConfig};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pth")
        .join(name)
}

fn cifar8() -> ModelConfig {
    serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8, "tau": "1/sqrt(L)"}"#).unwrap()
}

/// The theory network the small bad files describe: input.weight [4, 2],
/// blocks.0.weight [4, 4], output.weight [1, 4].
fn theory() -> ModelConfig {
    serde_json::from_str(
        r#"{"family": "theory", "input_dim": 2, "width": 4, "depth": 1, "output_dim": 1}"#,
    )
    .unwrap()
}

fn expected(name: &str) -> Tensor {
    let t = candle::safetensors::load(fixture("expected.safetensors"), &Device::Cpu).unwrap();
    t.get(name)
        .unwrap_or_else(|| panic!("no {name} in expected.safetensors"))
        .clone()
}

fn import(file: &str, cfg: &ModelConfig, options: &PthOptions) -> Result<VarMap, PthError> {
    load_pth(&fixture(file), cfg, options, &Device::Cpu).map(|(vm, _)| vm)
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    diff / b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn logits(cfg: &ModelConfig, vm: &VarMap, train: bool) -> Tensor {
    let model = Model::from_varmap(cfg, vm, &Device::Cpu).unwrap();
    let xs = expected("input").to_dtype(vm_dtype(vm)).unwrap();
    model.forward_t(&xs, train).unwrap()
}

/// The error of a call expected to fail.
fn fail<T>(r: Result<T, PthError>) -> PthError {
    match r {
        Ok(_) => panic!("the import succeeded"),
        Err(e) => e,
    }
}

fn vm_dtype(vm: &VarMap) -> DType {
    tau_model::checkpoint::varmap_dtype(vm).unwrap()
}

fn assert_same_tensors(a: &VarMap, b: &VarMap) {
    let a = a.data().lock().unwrap();
    let b = b.data().lock().unwrap();
    let mut names: Vec<&String> = a.keys().collect();
    names.sort();
    let mut other: Vec<&String> = b.keys().collect();
    other.sort();
    assert_eq!(names, other);
    for n in names {
        let (x, y) = (a[n].as_tensor(), b[n].as_tensor());
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{n}");
    }
}

/// PyTorch (float64, the script's mirror of CifarResNet) computes these logits from the
/// same weights: eval mode with the running statistics, train mode with batch statistics.
#[test]
fn imported_weights_give_pytorchs_logits() {
    let cfg = cifar8();
    let (vm, report) = load_pth(
        &fixture("cifar8-bare.pth"),
        &cfg,
        &PthOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(report.key, None);
    assert_eq!(report.dtype, DType::F32);
    assert_eq!(report.tensors, cfg.param_specs().len());
    // The seven BatchNorms' counters.
    assert_eq!(report.dropped.len(), 7, "{:?}", report.dropped);
    for (train, name) in [
        (false, "logits_eval.zero_pad"),
        (true, "logits_train.zero_pad"),
    ] {
        let err = rel_err(&logits(&cfg, &vm, train), &expected(name));
        assert!(err <= 1e-5, "{name}: relative error {err:e}");
    }
    // Converted to f64 on import, the network computes in f64: PyTorch's numbers to ~1e-12.
    let f64_options = PthOptions {
        dtype: Some(DType::F64),
        ..Default::default()
    };
    let (vm, report) = load_pth(
        &fixture("cifar8-bare.pth"),
        &cfg,
        &f64_options,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        (report.dtype, report.converted_from.as_slice()),
        (DType::F64, &[DType::F32][..])
    );
    for (train, name) in [
        (false, "logits_eval.zero_pad"),
        (true, "logits_train.zero_pad"),
    ] {
        let err = rel_err(&logits(&cfg, &vm, train), &expected(name));
        assert!(err <= 1e-9, "{name} in f64: relative error {err:e}");
    }
}

/// `{'state_dict': …}`, `{'model': …}` with DataParallel's `module.` prefix, and
/// akamaster's layout (`state_dict`, `module.`, the head named `linear`) hold the same
/// weights as the bare file.
#[test]
fn wrappers_prefixes_and_renames_give_the_same_weights() {
    let cfg = cifar8();
    let bare = import("cifar8-bare.pth", &cfg, &PthOptions::default()).unwrap();
    let aka = PthOptions {
        renames: vec!["linear.=fc.".parse().unwrap()],
        ..Default::default()
    };
    for (file, options, key, stripped, renamed) in [
        (
            "cifar8-state-dict.pth",
            PthOptions::default(),
            "state_dict",
            false,
            0,
        ),
        (
            "cifar8-model-dataparallel.pth",
            PthOptions::default(),
            "model",
            true,
            0,
        ),
        ("cifar8-akamaster.pth", aka.clone(), "state_dict", true, 2),
    ] {
        let (vm, report) = load_pth(&fixture(file), &cfg, &options, &Device::Cpu).unwrap();
        assert_same_tensors(&vm, &bare);
        assert_eq!(report.key.as_deref(), Some(key), "{file}");
        assert_eq!(report.stripped.is_empty(), !stripped, "{file}");
        assert_eq!(
            report.renamed.iter().map(|r| r.1).sum::<usize>(),
            renamed,
            "{file}"
        );
        let line = report.to_string();
        assert!(line.contains(&format!("from the {key:?} entry")), "{line}");
    }
    // The key given explicitly, and one the file lacks.
    let explicit = PthOptions {
        key: Some("state_dict".into()),
        ..Default::default()
    };
    assert_same_tensors(
        &import("cifar8-state-dict.pth", &cfg, &explicit).unwrap(),
        &bare,
    );
    let missing = PthOptions {
        key: Some("net".into()),
        ..Default::default()
    };
    let err = fail(import("cifar8-state-dict.pth", &cfg, &missing)).to_string();
    assert!(
        err.contains("no \"net\" entry")
            && err.contains("\"best_prec1\"")
            && err.contains("\"epoch\""),
        "{err}"
    );
}

/// Without the rename, akamaster's file is one error listing every difference, with the
/// rename that fixes it.
#[test]
fn mismatched_names_are_listed_with_the_rename_that_fits() {
    let err = fail(import(
        "cifar8-akamaster.pth",
        &cifar8(),
        &PthOptions::default(),
    ));
    let PthError::Mismatch { names, .. } = &err else {
        panic!("{err}")
    };
    let (missing, unexpected, misshapen) = (&names.missing, &names.unexpected, &names.misshapen);
    assert_eq!(missing, &["fc.weight", "fc.bias"]);
    assert_eq!(unexpected, &["linear.bias", "linear.weight"]);
    assert!(misshapen.is_empty());
    let msg = err.to_string();
    assert!(msg.contains("cifar8-akamaster.pth"), "{msg}");
    assert!(
        msg.contains("a rename would match them: linear.=fc."),
        "{msg}"
    );

    // Another family's file: no rename suggested from a lone `weight` under several heads
    // (the theory network's input. and output. both hold only `weight`, as conv1. does).
    for (file, cfg) in [
        ("theory-ok.pth", cifar8()),
        ("cifar8-akamaster.pth", theory()),
    ] {
        let msg = fail(import(file, &cfg, &PthOptions::default())).to_string();
        assert!(
            msg.contains("unexpected") && !msg.contains("a rename"),
            "{file}: {msg}"
        );
    }

    // A deeper config than the file's: the blocks it lacks, by name.
    let deeper: ModelConfig =
        serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 14, "tau": "1/sqrt(L)"}"#)
            .unwrap();
    let msg = fail(import("cifar8-bare.pth", &deeper, &PthOptions::default())).to_string();
    assert!(msg.contains("missing (30): layer1.1.conv1.weight"), "{msg}");
    assert!(msg.contains("and 18 more"), "{msg}");

    // A misshapen tensor, with both shapes.
    let msg = fail(import("bad-shape.pth", &theory(), &PthOptions::default())).to_string();
    assert!(
        msg.contains("misshapen (1): output.weight is [4, 1] in the file, [1, 4] in the model"),
        "{msg}"
    );

    // A rename that matches nothing is a mistake, not a no-op.
    let typo = PthOptions {
        renames: vec!["linaer.=fc.".parse().unwrap()],
        ..Default::default()
    };
    let msg = fail(import("cifar8-akamaster.pth", &cifar8(), &typo)).to_string();
    assert!(
        msg.contains("rename linaer.=fc. matches no tensor") && msg.contains("linear"),
        "{msg}"
    );
}

/// The small hand-built files: values land where PyTorch put them, a transposed
/// (non-contiguous) tensor included.
#[test]
fn storages_offsets_and_strides_are_honoured() {
    let vm = import("theory-ok.pth", &theory(), &PthOptions::default()).unwrap();
    let get = |vm: &VarMap, n: &str| -> Vec<f32> {
        vm.data().lock().unwrap()[n]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    // Storage k holds k + 0.25 i.
    assert_eq!(
        get(&vm, "input.weight"),
        (0..8).map(|i| 0.25 * i as f32).collect::<Vec<_>>()
    );
    let rows: Vec<f32> = (0..16).map(|i| 1.0 + 0.25 * i as f32).collect();
    assert_eq!(get(&vm, "blocks.0.weight"), rows);
    let vm = import("theory-transposed.pth", &theory(), &PthOptions::default()).unwrap();
    let transposed: Vec<f32> = (0..16)
        .map(|k| 1.0 + 0.25 * ((k % 4) * 4 + k / 4) as f32)
        .collect();
    assert_eq!(get(&vm, "blocks.0.weight"), transposed);

    let index = read_index(&fixture("cifar8-bare.pth"), &PthOptions::default()).unwrap();
    let conv = index
        .tensors
        .iter()
        .find(|t| t.name == "layer3.0.conv2.weight")
        .unwrap();
    assert_eq!(conv.shape, [64, 64, 3, 3]);
    assert_eq!(conv.storage_len, 37_000, "the weights share one storage");
}

fn error_of(file: &Path, cfg: &ModelConfig) -> String {
    let err = fail(load_pth(file, cfg, &PthOptions::default(), &Device::Cpu));
    let msg = err.to_string();
    assert!(msg.contains(&file.display().to_string()), "{msg}");
    msg
}

#[test]
fn bad_files_are_one_error_naming_file_and_tensor() {
    let th = theory();
    let cases: &[(&str, &[&str])] = &[
        (
            "legacy.pth",
            &[
                "legacy PyTorch file",
                "torch.save(torch.load('OLD.pth'",
                "_use_new_zipfile_serialization=True",
            ],
        ),
        ("bad-no-data-pkl.pth", &["without data.pkl"]),
        (
            "bad-int32.pth",
            &["\"blocks.0.weight\"", "IntStorage", "only float tensors"],
        ),
        (
            "bad-short-storage.pth",
            &["\"blocks.0.weight\"", "storage 1 holds 40 bytes", "need 64"],
        ),
        (
            "bad-huge-claim.pth",
            &["\"blocks.0.weight\"", "more than the file's"],
        ),
    ];
    for (file, wants) in cases {
        let msg = error_of(&fixture(file), &th);
        for want in *wants {
            assert!(msg.contains(want), "{file}: {msg:?} lacks {want:?}");
        }
    }
}

/// A storage missing from the archive is named as missing, not weighed against the
/// file's size.
#[test]
fn a_storage_missing_from_the_archive_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = std::fs::File::open(fixture("cifar8-bare.pth")).unwrap();
    let mut zip = zip::ZipArchive::new(src).unwrap();
    let path = dir.path().join("missing-storage.pth");
    let mut out = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let mut dropped = None;
    for i in 0..zip.len() {
        let f = zip.by_index_raw(i).unwrap();
        let name = f.name().unwrap().to_string();
        if dropped.is_none() && name.ends_with("/data/0") {
            dropped = Some(name);
            continue;
        }
        out.raw_copy_file(f).unwrap();
    }
    out.finish().unwrap();
    let dropped = dropped.expect("the fixture has a storage 0");
    let msg = error_of(&path, &cifar8());
    assert!(
        msg.contains(&format!(
            "storage 0 ({dropped}) cannot be read from the archive"
        )),
        "{msg}"
    );
}

/// Truncated and garbage copies of a real file: an error each, never a panic.
#[test]
fn truncated_and_garbage_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("cifar8-bare.pth")).unwrap();
    let cfg = cifar8();
    for cut in [0, 3, 100, 4_000, bytes.len() / 2, bytes.len() - 30] {
        let p = dir.path().join(format!("cut-{cut}.pth"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        error_of(&p, &cfg);
    }
    // Flipped bytes inside data.pkl (the zip's checksum fails) and in a storage.
    for at in [200, 3_000, 100_000] {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        let p = dir.path().join(format!("flip-{at}.pth"));
        std::fs::write(&p, &b).unwrap();
        let _ = load_pth(&p, &cfg, &PthOptions::default(), &Device::Cpu);
    }
    let p = dir.path().join("text.pth");
    std::fs::write(&p, "not a checkpoint\n").unwrap();
    assert!(error_of(&p, &cfg).contains("not a zip header"));
    let p = dir.path().join("missing.pth");
    assert!(error_of(&p, &cfg).contains("No such file"));
}

/// An imported model saved as a checkpoint loads back through `from_pretrained` with the
/// same logits.
#[test]
fn an_import_saved_as_a_checkpoint_loads_back() {
    let cfg = cifar8();
    let vm = import("cifar8-bare.pth", &cfg, &PthOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tau_model::checkpoint::save(dir.path(), &cfg, &vm).unwrap();
    let (cfg2, vm2) =
        tau_model::hub::from_pretrained(dir.path().to_str().unwrap(), None, &Device::Cpu).unwrap();
    assert_eq!(cfg2, cfg);
    assert_same_tensors(&vm, &vm2);
}
