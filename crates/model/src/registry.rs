//! The list of model families, in one place: the [`ModelConfig`] enum (a config, tagged
//! by `family` on disk), the [`Model`] enum (a built network) and the two dispatch points
//! that turn either into its family's trait object ([`ModelConfig::as_family`],
//! [`ModelConfig::as_family_mut`], [`Model::network`]). A new family is its own file
//! (its config with [`Family`], its network with [`Network`]), a variant and an arm here
//! for each enum, and its `mod` line in `lib.rs`; everything else asks the traits.
//!
//! # Example
//!
//! Every family answers the same questions through the dispatch points.
//!
//! ```
//! use candle::{DType, Device};
//! use tau_model::{Model, ModelConfig, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! for json in [
//!     r#"{"family": "theory", "input_dim": 4, "width": 8, "depth": 6}"#,
//!     r#"{"family": "cifar_resnet", "depth": 8, "norm": "none"}"#,
//! ] {
//!     let cfg: ModelConfig = serde_json::from_str(json)?;
//!     assert_eq!(cfg.as_family().name(), cfg.family());
//!     let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?, &dev)?;
//!     assert_eq!(model.network().n_blocks(), cfg.as_family().n_blocks());
//! }
//! // ResNet-50: L is its longest stage (6 blocks), its residual chain all 16.
//! let cfg: ModelConfig = serde_json::from_str(r#"{"family": "bottleneck_resnet", "depth": 50}"#)?;
//! assert_eq!(cfg.as_family().n_blocks(), 6);
//! assert_eq!(cfg.as_family().stage_blocks().iter().sum::<usize>(), 16);
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

use crate::family::{Family, Network};
use crate::resnet::{BottleneckResNet, BottleneckResNetConfig, CifarResNet, CifarResNetConfig};
use crate::theory::{TheoryConfig, TheoryNet};

/// Any τ-ResNet, tagged by `family` (`theory`, `cifar_resnet`, `bottleneck_resnet`).
///
/// A TOML `[model]` table reads directly (see the [`config` module
/// example](crate::config#example)).
///
/// # Example
///
/// CIFAR ResNet-20 with BatchNorm (the defaults): 3 stages of 3 blocks, τ = 1/√9, and the
/// 269,722 parameters of the PyTorch model (conv1 432 + bn1 32, then per block two 3×3
/// convolutions and two BNs, and the 64 × 10 + 10 classifier).
///
/// ```
/// use tau_model::{ModelConfig, ParamKind, Scaling};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 20}"#)?;
/// cfg.validate()?;
/// assert_eq!(cfg.family(), "cifar_resnet");
/// assert_eq!((cfg.n_blocks(), cfg.stage_blocks()), (9, vec![3, 3, 3]));
/// assert_eq!(cfg.tau_rule().to_string(), "1/sqrt(L)");
/// assert_eq!(cfg.tau_init(), 1.0 / 3.0);
/// assert_eq!((cfg.scaling(), cfg.learnable_tau()), (Scaling::Tau, false));
/// assert_eq!((cfg.in_channels(), cfg.num_outputs()), (Some(3), 10));
/// assert_eq!(cfg.num_parameters(), 269_722);
/// let specs = cfg.param_specs();
/// assert_eq!(specs[0].name, "conv1.weight");
/// assert_eq!(specs[0].shape, [16, 3, 3, 3]);
/// // How an optimizer treats each tensor; names the model does not own are never trained.
/// assert_eq!(cfg.param_kind("layer3.2.conv2.weight"), ParamKind::Weight);
/// assert_eq!(cfg.param_kind("bn1.bias"), ParamKind::BnAffine);
/// assert_eq!(cfg.param_kind("layer1.0.bn1.running_var"), ParamKind::Buffer);
/// assert_eq!(cfg.param_kind("no.such.tensor"), ParamKind::Buffer);
///
/// // The theory network takes vectors: no input channels.
/// let theory: ModelConfig = serde_json::from_str(
///     r#"{"family": "theory", "input_dim": 4, "width": 8, "depth": 3, "tau": "1/L"}"#,
/// )?;
/// assert_eq!((theory.in_channels(), theory.n_blocks(), theory.tau_init()), (None, 3, 1.0 / 3.0));
/// assert_eq!(theory.num_parameters(), 8 * 4 + 3 * 8 * 8 + 8); // A, W_1..W_3, B
/// // A depth that is not 6n + 2 is refused, naming it.
/// let bad: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 21}"#)?;
/// assert!(bad.validate().unwrap_err().to_string().contains("got 21"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum ModelConfig {
    /// The paper's fully connected analysis network.
    Theory(TheoryConfig),
    /// CIFAR ResNet of depth 6n+2 (basic blocks, option-A shortcut).
    CifarResnet(CifarResNetConfig),
    /// ImageNet bottleneck ResNet 50/101/152.
    BottleneckResnet(BottleneckResNetConfig),
}

impl ModelConfig {
    /// The family behind the tag: the one place that lists the families. Every other
    /// method asks it. See the [module example](crate::family#example).
    pub fn as_family(&self) -> &dyn Family {
        match self {
            ModelConfig::Theory(c) => c,
            ModelConfig::CifarResnet(c) => c,
            ModelConfig::BottleneckResnet(c) => c,
        }
    }

    /// Where a `[model]` table that does not read as a [`ModelConfig`] goes wrong: the key
    /// within the table and serde's message, e.g. `("depth", "invalid type: string \"abc\",
    /// expected usize")`. serde reports every error inside a tagged enum at the enum itself
    /// (`model`); this reads the table again as its family's own settings, where the key is
    /// known. `None` when the family is missing or unknown or the settings read.
    ///
    /// ```
    /// # use tau_model::ModelConfig;
    /// let table = serde_json::json!({"family": "cifar_resnet", "depth": "abc"});
    /// assert!(serde_json::from_value::<ModelConfig>(table.clone()).is_err());
    /// let (key, message) = ModelConfig::locate_error(&table).unwrap();
    /// assert_eq!(key, "depth");
    /// assert!(message.contains("expected usize"), "{message}");
    /// ```
    pub fn locate_error(table: &serde_json::Value) -> Option<(String, String)> {
        fn settings<T: serde::de::DeserializeOwned>(
            rest: serde_json::Value,
        ) -> Option<(String, String)> {
            let err = serde_path_to_error::deserialize::<_, T>(rest).err()?;
            let key = err.path().to_string();
            Some((
                if key == "." { String::new() } else { key },
                err.into_inner().to_string(),
            ))
        }
        let mut rest = table.as_object()?.clone();
        let family = rest.remove("family")?;
        let rest = serde_json::Value::Object(rest);
        match family.as_str()? {
            "theory" => settings::<TheoryConfig>(rest),
            "cifar_resnet" => settings::<CifarResNetConfig>(rest),
            "bottleneck_resnet" => settings::<BottleneckResNetConfig>(rest),
            _ => None,
        }
    }

    /// The family behind the tag, to change its settings (as
    /// [`Family::set_tau_rule`]). See the [module example](crate::family#example).
    pub fn as_family_mut(&mut self) -> &mut dyn Family {
        match self {
            ModelConfig::Theory(c) => c,
            ModelConfig::CifarResnet(c) => c,
            ModelConfig::BottleneckResnet(c) => c,
        }
    }
}

/// A built τ-ResNet of any family.
///
/// # Example
///
/// ```
/// use std::collections::HashMap;
///
/// use candle::{DType, Device, Tensor};
/// use candle_nn::VarBuilder;
/// use tau_model::{Model, ModelConfig, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// // A scalar theory network with every weight 1: y = (1 + τ)^L x for x > 0.
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "theory", "input_dim": 1, "width": 1, "depth": 4, "tau": "1/sqrt(L)"}"#,
/// )?;
/// let one = Tensor::ones((1, 1), DType::F32, &dev)?;
/// let tensors: HashMap<String, Tensor> =
///     cfg.param_specs().into_iter().map(|s| (s.name, one.clone())).collect();
/// let model = Model::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
/// assert_eq!((model.n_blocks(), model.tau()?), (4, 0.5));
/// let ys = model.forward_t(&Tensor::new(&[[2f32]], &dev)?, false)?;
/// assert_eq!(ys.to_vec2::<f32>()?, [[2.0 * 1.5f32.powi(4)]]); // 10.125
/// assert!(model.as_theory().is_some());
///
/// // A CIFAR ResNet-8 (L = 3) with a learnable τ, on a seeded VarMap.
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "cifar_resnet", "depth": 8, "tau": "1/sqrt(L)", "learnable_tau": true}"#,
/// )?;
/// let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?, &dev)?;
/// assert_eq!(model.n_blocks(), 3);
/// assert!((model.tau()? - 1.0 / 3f64.sqrt()).abs() < 1e-7); // τ is an f32 tensor
/// let logits = model.forward_t(&Tensor::zeros((2, 3, 8, 8), DType::F32, &dev)?, true)?;
/// assert_eq!(logits.dims(), [2, 10]);
/// assert!(model.as_theory().is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub enum Model {
    /// The theory network.
    Theory(TheoryNet),
    /// A CIFAR ResNet.
    CifarResNet(CifarResNet),
    /// A bottleneck ResNet.
    BottleneckResNet(BottleneckResNet),
}

impl Model {
    /// The network behind the variant: the one place that lists the families. Every other
    /// method runs it. See the [module example](crate::family#example).
    pub fn network(&self) -> &dyn Network {
        match self {
            Model::Theory(m) => m,
            Model::CifarResNet(m) => m,
            Model::BottleneckResNet(m) => m,
        }
    }
}
