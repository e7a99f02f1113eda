//! Pretrained checkpoints as people have them: this crate's checkpoints with their
//! preprocessing (and older ones without it), timm's ResNet repos (`config.json` in timm's
//! format, torchvision tensor names) and bare torchvision weights without a config
//! (`lmz/candle-resnet`'s `resnet50.safetensors`), each read from an offline hub cache laid
//! out as the real one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use candle_nn::VarMap;
use tau_model::checkpoint::{self, CheckpointConfig, CheckpointError};
use tau_model::hub::{self, HubOptions, LoadSpec};
use tau_model::preprocess::{Interpolation, Preprocessing};
use tau_model::{CifarResNetConfig, Model, ModelConfig, Norm, init_varmap, timm};

const TIMM_A1: &str = include_str!("fixtures/timm-resnet50.a1_in1k.config.json");
const TIMM_TV: &str = include_str!("fixtures/timm-resnet50.tv_in1k.config.json");

fn cifar() -> ModelConfig {
    ModelConfig::CifarResnet(CifarResNetConfig {
        depth: 8,
        norm: Norm::BatchNorm,
        ..Default::default()
    })
}

fn tensors(vm: &VarMap) -> BTreeMap<String, Tensor> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Every tensor's raw f32 bits, by name.
fn bits(vm: &VarMap) -> BTreeMap<String, Vec<u32>> {
    tensors(vm)
        .into_iter()
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (k, v.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// A repo in a hub cache as hf-hub and Python's huggingface_hub lay it out:
/// `models--owner--name/refs/main` holding the commit, the files under `blobs/`, and
/// `snapshots/<commit>/<file>` links to them.
fn cache_repo(cache: &Path, id: &str, files: &[(&str, &Path)]) -> PathBuf {
    let commit = "5f2c9a1e0b7d4c3a8e6f1b2d3c4a5e6f7a8b9c0d";
    let repo = cache.join(format!("models--{}", id.replace('/', "--")));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for (i, (name, src)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("{i:064x}"));
        std::fs::copy(src, &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(format!("../../blobs/{i:064x}"), snap.join(name)).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snap.join(name)).unwrap();
    }
    snap
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some("http://127.0.0.1:9".into()),
        retry_max_attempts: Some(0),
        local_files_only: true,
        ..Default::default()
    }
}

/// Weights of a torchvision/timm ResNet-50 as their `state_dict` holds them: every
/// parameter and buffer under torchvision's names, plus the integer
/// `*.num_batches_tracked` counters of each BatchNorm. Returns the float tensors.
fn write_resnet50_state_dict(path: &Path) -> VarMap {
    let model = timm::model_config("resnet50", 1000, 3).unwrap();
    let vm = init_varmap(&model, 7, DType::F32, &Device::Cpu).unwrap();
    let mut ts = tensors(&vm);
    let bns: Vec<String> = ts
        .keys()
        .filter_map(|k| k.strip_suffix(".running_var").map(String::from))
        .collect();
    assert_eq!(bns.len(), 53, "ResNet-50 has 53 BatchNorms");
    for bn in bns {
        ts.insert(
            format!("{bn}.num_batches_tracked"),
            Tensor::new(12345i64, &Device::Cpu).unwrap(),
        );
    }
    safetensors::tensor::serialize_to_file(ts.iter(), None, path).unwrap();
    vm
}

fn logits(model: &Model) -> Vec<f32> {
    let x: Vec<f32> = (0..3 * 32 * 32)
        .map(|i| ((i * 29) % 23) as f32 / 11.0 - 1.0)
        .collect();
    let x = Tensor::from_vec(x, (1, 3, 32, 32), &Device::Cpu).unwrap();
    model
        .forward_t(&x, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

#[test]
fn preprocessing_dataset_and_class_names_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let model = cifar();
    let vm = init_varmap(&model, 1, DType::F32, &Device::Cpu).unwrap();
    let mut cfg = CheckpointConfig::new(model.clone());
    cfg.preprocessing = Some(Preprocessing::cifar10());
    cfg.dataset = Some("cifar10".into());
    let names: Vec<String> = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    .map(String::from)
    .to_vec();
    cfg.class_names = Some(names.clone());
    checkpoint::save_with(tmp.path(), &cfg, &vm).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(
        json["preprocessing"],
        serde_json::json!({
            "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.201],
            "input_size": [3, 32, 32], "crop_pct": 1.0, "interpolation": "bilinear"
        })
    );
    assert_eq!(json["dataset"], "cifar10");
    assert_eq!(json["class_names"][9], "truck");
    let (back, vm2) = checkpoint::load_checkpoint(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(back.preprocessing, cfg.preprocessing);
    assert_eq!(back.class_names, Some(names));
    assert_eq!(back.dataset.as_deref(), Some("cifar10"));
    assert_eq!(back.class_name(3), "cat");
    assert_eq!(bits(&vm), bits(&vm2));
    // The hub path returns the same config.
    let p = hub::load_pretrained(
        tmp.path().to_str().unwrap(),
        &LoadSpec::default(),
        &HubOptions::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(p.config, back);

    // Metadata that does not fit the model is refused on save, naming the field.
    for (bad, needle) in [
        (
            CheckpointConfig {
                preprocessing: Some(Preprocessing::mnist()),
                ..cfg.clone()
            },
            "1 channels, the model takes 3",
        ),
        (
            CheckpointConfig {
                class_names: Some(vec!["a".into(), "b".into()]),
                ..cfg.clone()
            },
            "class_names has 2 names, the model has 10 outputs",
        ),
    ] {
        let dir = tmp.path().join("bad");
        let msg = checkpoint::save_with(&dir, &bad, &vm)
            .unwrap_err()
            .to_string();
        assert!(msg.contains(needle) && msg.contains("config.json"), "{msg}");
        assert!(!dir.exists());
    }
    // ... and on load.
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    for (key, value, needle) in [
        (
            "input_size",
            serde_json::json!([1, 32, 32]),
            "3 means and 3 stds for 1 channels",
        ),
        (
            "crop_pct",
            serde_json::json!(0.0),
            "crop_pct 0 must be in (0, 1]",
        ),
        ("interpolation", serde_json::json!("random"), "random"),
    ] {
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["preprocessing"][key] = value;
        std::fs::write(&path, json.to_string()).unwrap();
        let err = checkpoint::load_checkpoint(tmp.path(), &Device::Cpu)
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(matches!(err, CheckpointError::Config { .. }), "{msg}");
        assert!(msg.contains("config.json") && msg.contains(needle), "{msg}");
    }
    std::fs::write(&path, &text).unwrap();
    checkpoint::load_checkpoint(tmp.path(), &Device::Cpu).unwrap();
}

/// A `config.json` exactly as the checkpoints before the preprocessing fields were
/// written (`save` of the previous release) still loads, with nothing recorded beside the
/// model; and `save` without metadata writes that same form.
#[test]
fn checkpoints_without_the_new_fields_still_load() {
    let tmp = tempfile::tempdir().unwrap();
    let model = cifar();
    let vm = init_varmap(&model, 2, DType::F32, &Device::Cpu).unwrap();
    checkpoint::save(tmp.path(), &model, &vm).unwrap();
    let old = r#"{
  "model": {
    "family": "cifar_resnet",
    "depth": 8,
    "norm": "batch_norm",
    "tau": "1/sqrt(L)",
    "learnable_tau": false,
    "in_channels": 3,
    "num_classes": 10
  },
  "n_blocks": 3,
  "tau_resolved": 0.5773502691896258,
  "dtype": "f32"
}
"#;
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("config.json")).unwrap(),
        old
    );
    std::fs::write(tmp.path().join("config.json"), old).unwrap();
    let (cfg, vm2) = checkpoint::load_checkpoint(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(cfg.model, model);
    assert_eq!(
        (cfg.preprocessing, cfg.dataset, cfg.class_names),
        (None, None, None)
    );
    assert_eq!(bits(&vm), bits(&vm2));
}

#[test]
fn timm_configs_map_onto_the_model_and_its_preprocessing() {
    for (text, interpolation, crop_pct) in [
        (TIMM_A1, Interpolation::Bicubic, 0.95),
        (TIMM_TV, Interpolation::Bilinear, 0.875),
    ] {
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        assert!(timm::is_timm_config(&value));
        let cfg = timm::checkpoint_config(&value).unwrap();
        assert_eq!(cfg.model, timm::model_config("resnet50", 1000, 3).unwrap());
        assert_eq!(cfg.model.tau_init(), 1.0);
        assert_eq!(cfg.model.n_blocks(), 6);
        assert_eq!(
            cfg.preprocessing,
            Some(Preprocessing {
                interpolation,
                crop_pct,
                ..Preprocessing::imagenet()
            })
        );
        assert_eq!(cfg.dataset.as_deref(), Some("imagenet-1k"));
        assert_eq!(cfg.class_names, None);
    }
    // Class names as timm writes them (a list, or a map from index to name), other
    // architectures refused by name.
    let mut value: serde_json::Value = serde_json::from_str(TIMM_TV).unwrap();
    value["num_classes"] = 3.into();
    value["label_names"] = serde_json::json!({"0": "n01440764", "2": "n01443537"});
    let cfg = timm::checkpoint_config(&value).unwrap();
    assert_eq!(
        cfg.class_names.unwrap(),
        ["n01440764", "class 1", "n01443537"]
    );
    value["architecture"] = "resnet50d".into();
    let msg = timm::checkpoint_config(&value).unwrap_err();
    assert!(
        msg.contains("\"resnet50d\" is not supported") && msg.contains("resnet152"),
        "{msg}"
    );
}

/// `timm/resnet50.a1_in1k` and `timm/resnet50.tv_in1k` as they are on the hub: timm's
/// `config.json` and a `model.safetensors` of torchvision names (with the integer
/// `num_batches_tracked` buffers), read offline from a hub cache.
#[test]
fn timm_resnet50_repos_load_from_an_offline_hub_cache() {
    let work = tempfile::tempdir().unwrap();
    let weights = work.path().join("model.safetensors");
    let vm = write_resnet50_state_dict(&weights);
    let config = work.path().join("config.json");
    std::fs::write(&config, TIMM_A1).unwrap();
    let cache = tempfile::tempdir().unwrap();
    cache_repo(
        cache.path(),
        "timm/resnet50.a1_in1k",
        &[("config.json", &config), ("model.safetensors", &weights)],
    );
    let p = hub::load_pretrained(
        "timm/resnet50.a1_in1k",
        &LoadSpec::default(),
        &offline(cache.path()),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(p.config.model.family(), "bottleneck_resnet");
    assert_eq!(p.config.model.tau_init(), 1.0);
    let prep = p.config.preprocessing.clone().unwrap();
    assert_eq!(
        (prep.input_size, prep.crop_pct, prep.interpolation),
        ([3, 224, 224], 0.95, Interpolation::Bicubic)
    );
    assert_eq!(bits(&p.varmap), bits(&vm));
    let model = p.model(&Device::Cpu).unwrap();
    assert_eq!(model.tau().unwrap(), 1.0);
    let direct = Model::from_varmap(&p.config.model, &vm, &Device::Cpu).unwrap();
    assert_eq!(logits(&model), logits(&direct));

    // The same weights under a timm config of an architecture this crate lacks: one
    // error naming the file and the architecture.
    let mut value: serde_json::Value = serde_json::from_str(TIMM_TV).unwrap();
    value["architecture"] = "resnet18".into();
    std::fs::write(&config, value.to_string()).unwrap();
    cache_repo(
        cache.path(),
        "timm/resnet18.tv_in1k",
        &[("config.json", &config), ("model.safetensors", &weights)],
    );
    let err = hub::load_pretrained(
        "timm/resnet18.tv_in1k",
        &LoadSpec::default(),
        &offline(cache.path()),
        &Device::Cpu,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, CheckpointError::Config { .. }), "{msg}");
    assert!(
        msg.contains("config.json") && msg.contains("\"resnet18\" is not supported"),
        "{msg}"
    );
}

/// `lmz/candle-resnet` (the files candle's resnet example downloads): no `config.json`,
/// `resnet50.safetensors` of torchvision names; loaded with the file name and the
/// architecture.
#[test]
fn bare_torchvision_weights_load_with_a_file_name_and_an_architecture() {
    let work = tempfile::tempdir().unwrap();
    let weights = work.path().join("resnet50.safetensors");
    let vm = write_resnet50_state_dict(&weights);
    let cache = tempfile::tempdir().unwrap();
    cache_repo(
        cache.path(),
        "lmz/candle-resnet",
        &[("resnet50.safetensors", &weights)],
    );
    let options = offline(cache.path());
    let spec = LoadSpec {
        weights_file: Some("resnet50.safetensors".into()),
        config: Some(timm::architecture_checkpoint_config("resnet50").unwrap()),
        ..Default::default()
    };
    let p = hub::load_pretrained("lmz/candle-resnet", &spec, &options, &Device::Cpu).unwrap();
    assert_eq!(p.config.preprocessing, Some(Preprocessing::imagenet()));
    assert_eq!(p.config.dataset.as_deref(), Some("imagenet-1k"));
    assert_eq!(bits(&p.varmap), bits(&vm));
    assert!(p.weights_path.ends_with("resnet50.safetensors"));

    // A local folder of such files reads the same way.
    let local =
        hub::load_pretrained(work.path().to_str().unwrap(), &spec, &options, &Device::Cpu).unwrap();
    assert_eq!(bits(&local.varmap), bits(&vm));

    // Without the architecture the repo's missing config.json is named; the wrong
    // architecture names a tensor; a file name leaving the folder is refused.
    let msg = hub::load_pretrained(
        "lmz/candle-resnet",
        &LoadSpec {
            config: None,
            ..spec.clone()
        },
        &options,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("lmz/candle-resnet") && msg.contains("config.json"),
        "{msg}"
    );
    let wrong = LoadSpec {
        config: Some(timm::architecture_checkpoint_config("resnet101").unwrap()),
        ..spec.clone()
    };
    let msg = hub::load_pretrained("lmz/candle-resnet", &wrong, &options, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("resnet50.safetensors") && msg.contains("missing tensor \"layer3.6."),
        "{msg}"
    );
    let escape = LoadSpec {
        weights_file: Some("../resnet50.safetensors".into()),
        ..spec
    };
    let msg = hub::load_pretrained(
        work.path().to_str().unwrap(),
        &escape,
        &options,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("not a file name inside it"), "{msg}");
}
