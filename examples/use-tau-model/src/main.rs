//! The README's "Using tau-model from another crate", compiled and run by the tests: build
//! a τ-ResNet from a JSON config, run it on a batch, take one SGD step with candle-nn's
//! optimizer (τ and the scalar biases at lr/10), save a checkpoint, load it back from the
//! directory and from a Hugging Face hub cache, and check that the logits are unchanged.
//!
//! The part between the `README` markers is quoted in the README verbatim (a test checks).

use std::path::Path;

use anyhow::{Context, Result, ensure};
use candle::{DType, Device, Tensor};
use candle_nn::{Optimizer, SGD};
use tau_model::hub::{HubOptions, from_pretrained_with};
use tau_model::{Model, ModelConfig, ParamKind, init_varmap, named_vars};

fn main() -> Result<()> {
    let work = std::env::temp_dir().join(format!("use-tau-model-{}", std::process::id()));
    let result = story(&work);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    println!("ok: trained one step, saved, loaded from a directory and a hub cache");
    Ok(())
}

fn story(work: &Path) -> Result<()> {
    // README:start
    let dev = Device::Cpu;
    let cfg: ModelConfig = serde_json::from_str(
        r#"{"family": "cifar_resnet", "depth": 20, "norm": "none", "tau": "1/sqrt(L)", "learnable_tau": true}"#,
    )?;
    let varmap = init_varmap(&cfg, /* seed */ 42, DType::F32, &dev)?;
    let model = Model::from_varmap(&cfg, &varmap, &dev)?; // checks every tensor first
    let images = Tensor::randn(0f32, 1.0, (8, 3, 32, 32), &dev)?;
    let labels = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &dev)?;

    // One SGD step. The paper's no-BN recipe trains τ and the scalar biases at lr/10:
    // `param_kind` sorts every tensor by name.
    let (mut main, mut slow) = (Vec::new(), Vec::new());
    for (name, var) in named_vars(&varmap) {
        match cfg.param_kind(&name) {
            ParamKind::Tau | ParamKind::ScalarBias => slow.push(var),
            kind if kind.is_trainable() => main.push(var),
            _ => {} // BatchNorm running statistics, frozen tensors
        }
    }
    let (mut sgd, mut sgd_slow) = (SGD::new(main, 0.1)?, SGD::new(slow, 0.01)?);
    let logits = model.forward_t(&images, /* train */ true)?;
    let grads = candle_nn::loss::cross_entropy(&logits, &labels)?.backward()?;
    sgd.step(&grads)?;
    sgd_slow.step(&grads)?;

    // Save (config.json + model.safetensors), then load back from the directory, or from
    // a hub repo id ("owner/name", cache first) with `tau_model::hub::from_pretrained`.
    let ckpt = work.join("ckpt"); // a directory of your choice
    tau_model::checkpoint::save(&ckpt, &cfg, &varmap)?;
    let (cfg2, varmap2) = tau_model::checkpoint::load(&ckpt, &dev)?;
    let reloaded = Model::from_varmap(&cfg2, &varmap2, &dev)?;
    let before = model.forward_t(&images, false)?;
    let after = reloaded.forward_t(&images, false)?;
    // README:end
    ensure!(
        cfg2 == cfg,
        "config changed on the way through the checkpoint"
    );
    ensure!(
        max_abs_diff(&before, &after)? == 0.0,
        "logits changed after reloading"
    );

    // The same checkpoint as a repo in a hub cache laid out as hf-hub's (refs/main, one
    // snapshot per commit), loaded with no network access.
    let cache = work.join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--tau-resnet--example");
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::create_dir_all(&snapshot)?;
    std::fs::write(repo.join("refs/main"), commit)?;
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(ckpt.join(file), snapshot.join(file))
            .with_context(|| format!("copying {file} into the hub cache"))?;
    }
    let options = HubOptions {
        cache_dir: Some(cache),
        local_files_only: true,
        ..Default::default()
    };
    let (cfg3, varmap3) = from_pretrained_with("tau-resnet/example", None, &options, &dev)?;
    let from_hub = Model::from_varmap(&cfg3, &varmap3, &dev)?;
    ensure!(
        max_abs_diff(&before, &from_hub.forward_t(&images, false)?)? == 0.0,
        "logits changed after loading from the hub cache"
    );
    // The step changed the weights: the logits before it differ.
    ensure!(
        max_abs_diff(&logits, &before)? > 0.0,
        "the SGD step changed nothing"
    );
    Ok(())
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
}
