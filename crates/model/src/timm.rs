//! Checkpoints in the layout of timm (PyTorch Image Models) hub repos, such as
//! [`timm/resnet50.a1_in1k`](https://huggingface.co/timm/resnet50.a1_in1k) or
//! [`timm/resnet50.tv_in1k`](https://huggingface.co/timm/resnet50.tv_in1k), and bare
//! torchvision weights without a `config.json` (the files of
//! [`lmz/candle-resnet`](https://huggingface.co/lmz/candle-resnet), `resnet50.safetensors`
//! …), as τ = 1 bottleneck ResNets with BatchNorm.
//!
//! timm's `config.json` names the architecture and carries the evaluation preprocessing
//! (the format timm's `save_config_for_hf` writes):
//!
//! ```json
//! {
//!   "architecture": "resnet50",
//!   "num_classes": 1000,
//!   "num_features": 2048,
//!   "global_pool": "avg",
//!   "pretrained_cfg": {
//!     "tag": "a1_in1k",
//!     "input_size": [3, 224, 224],
//!     "interpolation": "bicubic",
//!     "crop_pct": 0.95,
//!     "crop_mode": "center",
//!     "mean": [0.485, 0.456, 0.406],
//!     "std": [0.229, 0.224, 0.225],
//!     "num_classes": 1000
//!   }
//! }
//! ```
//!
//! `architecture` `resnet50`, `resnet101` or `resnet152` becomes a
//! [`BottleneckResNetConfig`] with τ = 1 (a plain ResNet: timm's and torchvision's
//! `layerK.B.convN` / `bnN` / `downsample` tensor names are this crate's), `num_classes`
//! its head, `model_args.in_chans` (else `input_size[0]`) its input channels, and
//! `pretrained_cfg` its [`Preprocessing`]; `label_names`, when present, the class names.
//! Other architectures (`resnet18`, `resnet50d`, ViTs…) are refused by name.
//!
//! # Example
//!
//! ```
//! use tau_model::{Preprocessing, timm};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let json = serde_json::json!({
//!     "architecture": "resnet101", "num_classes": 1000,
//!     "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.875,
//!                        "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
//!                        "std": [0.229, 0.224, 0.225], "tag": "tv_in1k"},
//!     "label_names": {"0": "tench", "999": "toilet tissue"}
//! });
//! assert!(timm::is_timm_config(&json));
//! assert!(timm::ARCHITECTURES.contains(&("resnet101", 101)));
//! let cfg = timm::checkpoint_config(&json)?;
//! // ResNet-101's stages have 3, 4, 23, 3 blocks: L is the largest, 23.
//! assert_eq!(cfg.model.n_blocks(), 23);
//! assert_eq!(cfg.model.tau_init(), 1.0);
//! assert_eq!(cfg.dataset.as_deref(), Some("imagenet-1k"));
//! // These are torchvision's evaluation settings: resize to 256, crop 224.
//! assert_eq!(cfg.preprocessing, Some(Preprocessing::imagenet()));
//! assert_eq!((cfg.class_name(0), cfg.class_name(1)), ("tench".into(), "class 1".into()));
//!
//! // This crate's own config.json is not timm's.
//! assert!(!timm::is_timm_config(&serde_json::json!({"family": "cifar_resnet", "depth": 20})));
//! # Ok(()) }
//! ```

use serde::Deserialize;

use crate::checkpoint::CheckpointConfig;
use crate::config::ModelConfig;
use crate::preprocess::{Interpolation, Preprocessing};
use crate::resnet::{BottleneckResNetConfig, Norm, Scaling};
use crate::tau::TauRule;

/// The architecture names this module builds, with their depths. See the
/// [module example](self#example).
pub const ARCHITECTURES: [(&str, usize); 3] =
    [("resnet50", 50), ("resnet101", 101), ("resnet152", 152)];

/// Whether a parsed `config.json` is in timm's format (an `architecture` key, none of this
/// crate's `model` / `family`). See the [module example](self#example).
pub fn is_timm_config(value: &serde_json::Value) -> bool {
    value.get("architecture").is_some()
        && value.get("model").is_none()
        && value.get("family").is_none()
}

/// The τ = 1 bottleneck ResNet with BatchNorm that timm's (and torchvision's)
/// `architecture` names.
///
/// # Errors
/// An architecture other than `resnet50`, `resnet101`, `resnet152`, naming it.
///
/// ```
/// # use tau_model::timm;
/// assert_eq!(timm::model_config("resnet152", 1000, 3).unwrap().n_blocks(), 36);
/// assert!(timm::model_config("resnet18", 1000, 3).unwrap_err().contains("resnet18"));
/// ```
pub fn model_config(
    architecture: &str,
    num_classes: usize,
    in_channels: usize,
) -> Result<ModelConfig, String> {
    let Some(&(_, depth)) = ARCHITECTURES.iter().find(|(n, _)| *n == architecture) else {
        return Err(format!(
            "architecture {architecture:?} is not supported: tau-model builds {} (torchvision's bottleneck ResNets)",
            ARCHITECTURES.map(|(n, _)| n).join(", ")
        ));
    };
    Ok(ModelConfig::BottleneckResnet(BottleneckResNetConfig {
        depth,
        norm: Norm::BatchNorm,
        tau: TauRule::Fixed(1.0),
        learnable_tau: false,
        scaling: Scaling::Tau,
        in_channels,
        num_classes,
    }))
}

/// A checkpoint config for bare torchvision-named weights of `architecture` (a repo or
/// directory without `config.json`, as `lmz/candle-resnet`): [`model_config`] with 1000
/// classes and 3 channels, [`Preprocessing::imagenet`], data set `imagenet-1k`.
///
/// # Errors
/// As [`model_config`].
///
/// ```
/// # use tau_model::{timm, preprocess::Preprocessing};
/// let cfg = timm::architecture_checkpoint_config("resnet50").unwrap();
/// assert_eq!(cfg.preprocessing, Some(Preprocessing::imagenet()));
/// ```
pub fn architecture_checkpoint_config(architecture: &str) -> Result<CheckpointConfig, String> {
    let mut cfg = CheckpointConfig::new(model_config(architecture, 1000, 3)?);
    cfg.preprocessing = Some(Preprocessing::imagenet());
    cfg.dataset = Some("imagenet-1k".into());
    Ok(cfg)
}

/// The keys of timm's `config.json` this module reads (the others are ignored).
#[derive(Debug, Deserialize)]
struct TimmConfig {
    architecture: String,
    #[serde(default)]
    num_classes: Option<usize>,
    #[serde(default)]
    label_names: Option<LabelNames>,
    #[serde(default)]
    model_args: Option<ModelArgs>,
    #[serde(default)]
    pretrained_cfg: Option<PretrainedCfg>,
}

/// timm's class names: a list, or a map from class index (as a string) to name.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LabelNames {
    List(Vec<String>),
    Map(std::collections::BTreeMap<String, String>),
}

#[derive(Debug, Deserialize)]
struct ModelArgs {
    #[serde(default)]
    in_chans: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct PretrainedCfg {
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    input_size: Option<[usize; 3]>,
    #[serde(default)]
    interpolation: Option<String>,
    #[serde(default)]
    crop_pct: Option<f64>,
    #[serde(default)]
    crop_mode: Option<String>,
    #[serde(default)]
    mean: Option<Vec<f64>>,
    #[serde(default)]
    std: Option<Vec<f64>>,
    #[serde(default)]
    num_classes: Option<usize>,
}

/// The data set a timm weight tag names by its suffix (`a1_in1k` → `imagenet-1k`).
fn dataset_of_tag(tag: &str) -> Option<&'static str> {
    let last = tag.rsplit('_').next().unwrap_or(tag);
    match last {
        "in1k" => Some("imagenet-1k"),
        "in21k" => Some("imagenet-21k"),
        "in22k" => Some("imagenet-22k"),
        _ => None,
    }
}

/// Reads a timm `config.json` (already parsed) as a checkpoint config: the model, its
/// preprocessing (`pretrained_cfg`; ImageNet's values for what it leaves out), the class
/// names (`label_names`) and the data set (from the weight tag, `…_in1k` → `imagenet-1k`).
/// See the [module example](self#example).
///
/// # Errors
/// A config that is not timm's format, an unsupported architecture or interpolation, class
/// names that do not match `num_classes`; each message names the key.
pub fn checkpoint_config(value: &serde_json::Value) -> Result<CheckpointConfig, String> {
    let timm: TimmConfig =
        serde_json::from_value(value.clone()).map_err(|e| format!("invalid timm config: {e}"))?;
    let pre = timm.pretrained_cfg;
    let num_classes = timm
        .num_classes
        .or(pre.as_ref().and_then(|p| p.num_classes))
        .unwrap_or(1000);
    let input_size = pre.as_ref().and_then(|p| p.input_size);
    let in_channels = timm
        .model_args
        .and_then(|a| a.in_chans)
        .or(input_size.map(|s| s[0]))
        .unwrap_or(3);
    let model = model_config(&timm.architecture, num_classes, in_channels)?;
    let mut cfg = CheckpointConfig::new(model);
    let base = Preprocessing::imagenet();
    let mut prep = Preprocessing {
        input_size: [in_channels, base.input_size[1], base.input_size[2]],
        ..base
    };
    if let Some(p) = &pre {
        if let Some([_, h, w]) = p.input_size {
            prep.input_size = [in_channels, h, w];
        }
        if let Some(m) = &p.mean {
            prep.mean.clone_from(m);
        }
        if let Some(s) = &p.std {
            prep.std.clone_from(s);
        }
        if let Some(c) = p.crop_pct {
            prep.crop_pct = c;
        }
        if let Some(i) = &p.interpolation {
            prep.interpolation = Interpolation::from_name(i)?;
        }
        if let Some(mode) = p.crop_mode.as_deref()
            && mode != "center"
        {
            tracing::warn!(
                crop_mode = mode,
                "timm crop_mode is not supported: images are center-cropped"
            );
        }
        cfg.dataset = p.tag.as_deref().and_then(dataset_of_tag).map(String::from);
    }
    prep.validate().map_err(|e| e.to_string())?;
    cfg.preprocessing = Some(prep);
    cfg.class_names = match timm.label_names {
        None => None,
        Some(LabelNames::List(names)) => Some(names),
        Some(LabelNames::Map(map)) => {
            let mut names = vec![None; num_classes];
            for (k, v) in map {
                let i: usize = k
                    .parse()
                    .map_err(|_| format!("label_names: key {k:?} is not a class index"))?;
                let slot = names.get_mut(i).ok_or_else(|| {
                    format!("label_names: class {i} is beyond num_classes {num_classes}")
                })?;
                *slot = Some(v);
            }
            Some(
                names
                    .into_iter()
                    .enumerate()
                    .map(|(i, n)| n.unwrap_or_else(|| format!("class {i}")))
                    .collect(),
            )
        }
    };
    Ok(cfg)
}
