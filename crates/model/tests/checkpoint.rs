//! Checkpoints: bit-exact round trips (BN running statistics included), every kind of bad
//! file as a named error, and hub loading from an offline cache built by the test.

use std::collections::BTreeMap;
use std::path::Path;

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use tau_model::checkpoint::{self, CheckpointError};
use tau_model::hub::{self, HubOptions};
use tau_model::{CifarResNetConfig, Model, ModelConfig, Norm, TheoryConfig, init_varmap};

fn small_cifar(norm: Norm) -> ModelConfig {
    ModelConfig::CifarResnet(CifarResNetConfig {
        depth: 8,
        norm,
        learnable_tau: norm == Norm::None,
        ..Default::default()
    })
}

/// Every tensor as (name, dtype, shape, raw bits).
fn dump(vm: &VarMap) -> BTreeMap<String, (DType, Vec<usize>, Vec<u64>)> {
    let data = vm.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| {
            let t = v.as_tensor();
            let bits = t
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (k.clone(), (t.dtype(), t.dims().to_vec(), bits))
        })
        .collect()
}

fn input() -> Tensor {
    let v: Vec<f32> = (0..2 * 3 * 8 * 8)
        .map(|i| ((i * 37) % 17) as f32 / 8.0 - 1.0)
        .collect();
    Tensor::from_vec(v, (2, 3, 8, 8), &Device::Cpu).unwrap()
}

/// A saved BN ResNet whose running statistics have moved away from their init.
fn saved_bn_checkpoint(dir: &Path) -> (ModelConfig, VarMap) {
    let cfg = small_cifar(Norm::BatchNorm);
    let vm = init_varmap(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let model = Model::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    model.forward_t(&input(), true).unwrap();
    checkpoint::save(dir, &cfg, &vm).unwrap();
    (cfg, vm)
}

/// Rewrites `model.safetensors` in `dir` from `tensors`.
fn write_weights(dir: &Path, tensors: &BTreeMap<String, Tensor>) {
    safetensors::tensor::serialize_to_file(tensors.iter(), None, &dir.join("model.safetensors"))
        .unwrap();
}

fn weights(dir: &Path) -> BTreeMap<String, Tensor> {
    candle::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn round_trip_is_bit_exact_including_bn_statistics() {
    let tmp = tempfile::tempdir().unwrap();
    let (cfg, vm) = saved_bn_checkpoint(tmp.path());
    let running = vm.data().lock().unwrap()["layer2.0.bn1.running_mean"]
        .as_tensor()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        running.iter().any(|v| *v != 0.0),
        "statistics moved before saving"
    );
    let (cfg2, vm2) = checkpoint::load(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(cfg, cfg2);
    assert_eq!(dump(&vm), dump(&vm2));
    // The reloaded model computes the same eval output, bit for bit.
    let a = Model::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
    let b = Model::new(
        &cfg2,
        VarBuilder::from_varmap(&vm2, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let ya = a.forward_t(&input(), false).unwrap().flatten_all().unwrap();
    let yb = b.forward_t(&input(), false).unwrap().flatten_all().unwrap();
    assert_eq!(ya.to_vec1::<f32>().unwrap(), yb.to_vec1::<f32>().unwrap());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(json["model"]["family"], "cifar_resnet");
    assert_eq!(json["model"]["tau"], "1/sqrt(L)");
    assert_eq!(json["tau_resolved"], 1.0 / 3f64.sqrt());
    assert_eq!(json["dtype"], "f32");
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn round_trip_no_bn_learnable_tau_and_theory_f64() {
    for (cfg, dtype) in [
        (small_cifar(Norm::None), DType::F32),
        (
            ModelConfig::Theory(TheoryConfig {
                input_dim: 3,
                width: 5,
                depth: 4,
                train_a: true,
                ..Default::default()
            }),
            DType::F64,
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let vm = init_varmap(&cfg, 9, dtype, &Device::Cpu).unwrap();
        checkpoint::save(tmp.path(), &cfg, &vm).unwrap();
        let (cfg2, vm2) = checkpoint::load(tmp.path(), &Device::Cpu).unwrap();
        assert_eq!(cfg, cfg2);
        assert_eq!(dump(&vm), dump(&vm2));
        assert_eq!(checkpoint::varmap_dtype(&vm2), Some(dtype));
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    saved_bn_checkpoint(tmp.path());
    let mut ts = weights(tmp.path());
    let w = ts["layer2.0.conv2.weight"].clone();
    ts.insert("layer2.0.conv2.weight".into(), w.narrow(0, 0, 31).unwrap());
    write_weights(tmp.path(), &ts);
    let err = checkpoint::load(tmp.path(), &Device::Cpu).err().unwrap();
    assert!(matches!(err, CheckpointError::Shape { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("layer2.0.conv2.weight") && msg.contains("[31, 32, 3, 3]"),
        "{msg}"
    );
}

#[test]
fn missing_unexpected_and_mistyped_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    saved_bn_checkpoint(tmp.path());
    let good = weights(tmp.path());

    let mut ts = good.clone();
    ts.remove("layer1.0.bn1.running_var");
    write_weights(tmp.path(), &ts);
    let msg = checkpoint::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("missing tensor \"layer1.0.bn1.running_var\""),
        "{msg}"
    );

    let mut ts = good.clone();
    ts.insert(
        "layer9.0.conv1.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    write_weights(tmp.path(), &ts);
    let msg = checkpoint::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("unexpected tensor \"layer9.0.conv1.weight\""),
        "{msg}"
    );

    let mut ts = good.clone();
    let w = ts["fc.bias"].to_dtype(DType::F64).unwrap();
    ts.insert("fc.bias".into(), w);
    write_weights(tmp.path(), &ts);
    let msg = checkpoint::load(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("\"fc.bias\" has dtype f64"), "{msg}");

    // PyTorch's integer num_batches_tracked buffers are accepted and dropped.
    let mut ts = good.clone();
    ts.insert(
        "bn1.num_batches_tracked".into(),
        Tensor::new(7i64, &Device::Cpu).unwrap(),
    );
    write_weights(tmp.path(), &ts);
    let (_, vm) = checkpoint::load(tmp.path(), &Device::Cpu).unwrap();
    assert!(
        !vm.data()
            .lock()
            .unwrap()
            .contains_key("bn1.num_batches_tracked")
    );
}

#[test]
fn truncated_garbage_and_hostile_weights_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::Theory(TheoryConfig {
        input_dim: 2,
        width: 3,
        depth: 2,
        ..Default::default()
    });
    let vm = init_varmap(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    checkpoint::save(tmp.path(), &cfg, &vm).unwrap();
    let path = tmp.path().join("model.safetensors");
    let good = std::fs::read(&path).unwrap();
    // Every truncation.
    for len in 0..good.len() {
        std::fs::write(&path, &good[..len]).unwrap();
        let err = checkpoint::load(tmp.path(), &Device::Cpu).err().unwrap();
        assert!(
            matches!(err, CheckpointError::Safetensors { .. }),
            "{len}: {err}"
        );
    }
    // Garbage, and headers announcing absurd sizes or shapes.
    let mut hostile: Vec<Vec<u8>> = vec![
        b"not a safetensors file at all".to_vec(),
        u64::MAX.to_le_bytes().to_vec(),
        [(1u64 << 40).to_le_bytes().to_vec(), b"{}".to_vec()].concat(),
    ];
    let header = br#"{"input.weight":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,24]}}"#;
    hostile.push(
        [
            (header.len() as u64).to_le_bytes().to_vec(),
            header.to_vec(),
            vec![0; 24],
        ]
        .concat(),
    );
    let header = br#"{"input.weight":{"dtype":"F32","shape":[3,2],"data_offsets":[0,999999999]}}"#;
    hostile.push(
        [
            (header.len() as u64).to_le_bytes().to_vec(),
            header.to_vec(),
            vec![0; 24],
        ]
        .concat(),
    );
    let mut x: u64 = 0x9E3779B97F4A7C15;
    for _ in 0..50 {
        let bytes: Vec<u8> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        hostile.push(bytes);
    }
    for bytes in hostile {
        std::fs::write(&path, &bytes).unwrap();
        assert!(checkpoint::load(tmp.path(), &Device::Cpu).is_err());
    }
}

#[test]
fn bad_config_json_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    saved_bn_checkpoint(tmp.path());
    let path = tmp.path().join("config.json");
    for (text, needle) in [
        ("{not json", "invalid JSON"),
        (r#"{"model": {"family": "vgg"}}"#, "vgg"),
        (
            r#"{"model": {"family": "cifar_resnet", "depth": 21}}"#,
            "6n+2",
        ),
        (
            r#"{"model": {"family": "cifar_resnet", "depth": 8, "tau": "-1"}}"#,
            "accepted forms",
        ),
        (
            r#"{"model": {"family": "cifar_resnet", "depth": 8}, "tau_resolved": 0.9}"#,
            "tau_resolved",
        ),
        (
            r#"{"model": {"family": "cifar_resnet", "depth": 8}, "colour": 1}"#,
            "colour",
        ),
        (r#"{"family": "theory", "width": 0}"#, "width"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = checkpoint::load(tmp.path(), &Device::Cpu).err().unwrap();
        let msg = err.to_string();
        assert!(
            matches!(err, CheckpointError::Config { .. }),
            "{text}: {msg}"
        );
        assert!(
            msg.contains("config.json") && msg.contains(needle),
            "{text}: {msg}"
        );
    }
    // The bare form (a model config without the wrapper) is accepted.
    std::fs::write(&path, r#"{"family": "cifar_resnet", "depth": 8}"#).unwrap();
    checkpoint::load(tmp.path(), &Device::Cpu).unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = checkpoint::load(tmp.path(), &Device::Cpu).err().unwrap();
    assert!(matches!(err, CheckpointError::Io { .. }), "{err}");
}

#[test]
fn save_refuses_a_varmap_that_does_not_match_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cifar(Norm::BatchNorm);
    let vm = init_varmap(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
    vm.data().lock().unwrap().remove("fc.bias");
    let dir = tmp.path().join("ckpt");
    let msg = checkpoint::save(&dir, &cfg, &vm).err().unwrap().to_string();
    assert!(msg.contains("fc.bias"), "{msg}");
    assert!(!dir.exists());
}

#[test]
fn model_from_varmap_refuses_a_partial_map_that_new_would_fill_in() {
    let cfg = small_cifar(Norm::None);
    let dev = Device::Cpu;
    let vm = init_varmap(&cfg, 0, DType::F32, &dev).unwrap();
    let x = input();
    let full = Model::from_varmap(&cfg, &vm, &dev).unwrap();
    let reference = Model::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let (a, b) = (
        full.forward_t(&x, false).unwrap(),
        reference.forward_t(&x, false).unwrap(),
    );
    assert_eq!(dump_tensor(&a), dump_tensor(&b));

    vm.data().lock().unwrap().remove("layer2.0.conv1.weight");
    let msg = Model::from_varmap(&cfg, &vm, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("missing tensor \"layer2.0.conv1.weight\""),
        "{msg}"
    );
    // The map is left as it was: nothing was created in it.
    assert!(
        !vm.data()
            .lock()
            .unwrap()
            .contains_key("layer2.0.conv1.weight")
    );

    let f64_map = init_varmap(&cfg, 0, DType::F64, &dev).unwrap();
    let m = Model::from_varmap(&cfg, &f64_map, &dev).unwrap();
    assert_eq!(
        m.forward_t(&x.to_dtype(DType::F64).unwrap(), false)
            .unwrap()
            .dtype(),
        DType::F64
    );
}

fn dump_tensor(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// A hub cache laid out as hf-hub (and Python's huggingface_hub) write it, read with no
/// network: the endpoint is a closed loopback port and retries are off.
#[test]
fn hub_loads_from_an_offline_cache() {
    let ckpt = tempfile::tempdir().unwrap();
    let (cfg, vm) = saved_bn_checkpoint(ckpt.path());
    let cache = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.path().join("models--tau-resnet--resnet8-test");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(ckpt.path().join(f), snap.join(f)).unwrap();
    }
    let options = HubOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        endpoint: Some("http://127.0.0.1:9".into()),
        retry_max_attempts: Some(0),
        ..Default::default()
    };
    let (cfg2, vm2) =
        hub::from_pretrained_with("tau-resnet/resnet8-test", None, &options, &Device::Cpu).unwrap();
    assert_eq!(cfg, cfg2);
    assert_eq!(dump(&vm), dump(&vm2));
    // A pinned commit resolves too.
    hub::from_pretrained_with(
        "tau-resnet/resnet8-test",
        Some(commit),
        &options,
        &Device::Cpu,
    )
    .unwrap();
    // A local directory is loaded directly.
    let (cfg3, _) =
        hub::from_pretrained(ckpt.path().to_str().unwrap(), None, &Device::Cpu).unwrap();
    assert_eq!(cfg, cfg3);
    // Cache misses: local-only is an error naming the file; with downloads allowed the
    // closed endpoint fails fast with an error, never a panic.
    let offline = HubOptions {
        local_files_only: true,
        ..options.clone()
    };
    let err = hub::from_pretrained_with("tau-resnet/absent", None, &offline, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tau-resnet/absent") && err.contains("config.json"),
        "{err}"
    );
    let err = hub::from_pretrained_with("tau-resnet/absent", None, &options, &Device::Cpu);
    assert!(matches!(err, Err(CheckpointError::Hub { .. })));
    let err = hub::from_pretrained_with("../no/such/dir", None, &options, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("neither a checkpoint directory"), "{err}");
}
