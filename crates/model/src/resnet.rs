//! Convolutional τ-ResNets: the CIFAR ResNets of He et al. (2016) (depth 6n+2, basic
//! blocks, option-A shortcut) and the ImageNet bottleneck ResNets 50/101/152, each with
//! BatchNorm (τ × the last BN's output) or without normalization (Fixup-style scalar
//! biases and one shared τ), as in PAPER.md and the paper's companion code.
//!
//! Every convolution goes through [`tau_kernels::conv2d`]. Parameter names are PyTorch's
//! (`state_dict` keys of torchvision and of the companion code); see the crate docs.
//!
//! # Example
//!
//! The two families from their configs: L and τ = 1/√L, and the parameter count of He et
//! al.'s CIFAR ResNet-20 (0.27M, option A: no shortcut parameters) and torchvision's
//! ResNet-50 (25,557,032).
//!
//! ```
//! use tau_model::ModelConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let resnet20: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 20}"#)?;
//! let resnet50: ModelConfig =
//!     serde_json::from_str(r#"{"family": "bottleneck_resnet", "depth": 50}"#)?;
//! assert_eq!((resnet20.n_blocks(), resnet50.n_blocks()), (9, 6));
//! assert_eq!(resnet20.tau_rule().resolve(9), 1.0 / 3.0);
//! assert_eq!(resnet20.num_parameters(), 269_722);
//! assert_eq!(resnet50.num_parameters(), 25_557_032);
//! # Ok(()) }
//! ```

use candle::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::family::{Family, Input, Network};
use crate::model::Model;
use crate::params::{ParamInit, ParamKind, ParamName, ParamSpec, check_size};
use crate::preprocess::Preprocessing;
use crate::tau::TauRule;
use tau_kernels::{
    add_scalar, batch_norm_block, batch_norm_residual_relu, batch_norm_t, conv2d, conv2d_shifted,
    fixup_block, global_avg_pool, option_a_shortcut, relu, residual_relu, scalar_bias_block,
};
pub use tau_kernels::{max_pool_3x3_s2, subsample2};

/// Normalization inside the residual blocks.
///
/// # Example
///
/// ```
/// use tau_model::{ModelConfig, Norm};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// assert_eq!(Norm::default(), Norm::BatchNorm);
/// assert_eq!(serde_json::from_str::<Norm>(r#""none""#)?, Norm::None);
/// // Without normalization a CIFAR block has four scalar biases instead of two BatchNorms.
/// let none: ModelConfig =
///     serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8, "norm": "none"}"#)?;
/// let names: Vec<String> = none.param_specs().into_iter().map(|s| s.name).collect();
/// assert!(names.iter().any(|n| n == "layer1.0.bias1a"));
/// assert!(!names.iter().any(|n| n.contains("bn")));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// BatchNorm after every convolution; τ multiplies the last BN's output.
    #[default]
    BatchNorm,
    /// No normalization: Fixup-style scalar biases around the convolutions.
    None,
}

/// How the residual branches are scaled (and initialized) so that a deep network trains:
/// the paper's τ, or one of the schemes it is compared with. The CIFAR ResNets take every
/// scheme; the bottleneck ResNets `tau` only.
///
/// | scheme | block | per block | init | norm |
/// | --- | --- | --- | --- | --- |
/// | `tau` | relu(τ·F(x) + x) | — (one τ, fixed or learnable) | He | either |
/// | `fixup` | relu(s·F(x) + b2b + x), F with scalar biases | `scale` s | last conv 0, other He·L^(−1/2), classifier 0 | none |
/// | `skipinit` | relu(α·F(x) + x) | `alpha` α | α = 0, He | either |
/// | `rezero` | x + α·F(x) (no ReLU after the sum, no biases) | `alpha` α | α = 0, He | none |
///
/// # Example
///
/// A CIFAR ResNet-8 without normalization under each scheme: the first block's multiplier
/// at initialization is τ = 1/√3, Fixup's `scale` 1, or SkipInit's / ReZero's `alpha` 0.
///
/// ```
/// use candle::{DType, Device};
/// use candle_nn::VarBuilder;
/// use tau_model::{CifarResNet, CifarResNetConfig, ModelConfig, Norm, Scaling, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let tau = 1.0 / 3f32.sqrt();
/// for (scaling, name, multiplier, identity) in [
///     (Scaling::Tau, "tau", tau, false),
///     (Scaling::Fixup, "fixup", 1.0, false),
///     (Scaling::SkipInit, "skipinit", 0.0, true),
///     (Scaling::ReZero, "rezero", 0.0, true),
/// ] {
///     assert_eq!((scaling.name(), scaling.to_string()), (name, name.to_string()));
///     assert_eq!((scaling.is_tau(), scaling.identity_at_init()), (name == "tau", identity));
///     let cfg = CifarResNetConfig { depth: 8, norm: Norm::None, scaling, ..Default::default() };
///     let varmap = init_varmap(&ModelConfig::CifarResnet(cfg.clone()), 0, DType::F32, &dev)?;
///     let net = CifarResNet::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
///     let m = net.blocks()[0].multiplier().to_vec1::<f32>()?;
///     assert!((m[0] - multiplier).abs() < 1e-7, "{name}: {m:?}");
/// }
/// // Fixup and ReZero train without normalization only.
/// let bn = CifarResNetConfig { scaling: Scaling::Fixup, ..Default::default() };
/// assert!(bn.validate().unwrap_err().to_string().contains("set norm = \"none\""));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scaling {
    /// The paper's τ: one τ (from the τ rule, fixed or learnable) shared by every block.
    #[default]
    Tau,
    /// Fixup (Zhang, Dauphin & Ma 2019): scalar biases before each convolution, activation
    /// and the classifier, a multiplier per branch (init 1) before the branch's last bias,
    /// the branch's last convolution and the classifier initialized at zero, the other
    /// branch convolution at He init × L^(−1/(2m−2)) with m = 2 layers per branch.
    /// Without normalization only.
    Fixup,
    /// SkipInit (De & Smith 2020): a learnable scalar α per branch, initialized at 0, with
    /// BatchNorm kept or removed (then with this project's scalar biases).
    SkipInit,
    /// ReZero (Bachlechner et al. 2020): x + α·F(x), a learnable α per block initialized
    /// at 0, no normalization, no biases, no activation after the sum.
    ReZero,
}

impl Scaling {
    /// The scheme's name as in configs (`tau`, `fixup`, `skipinit`, `rezero`).
    /// See the [example](Scaling#example).
    pub fn name(self) -> &'static str {
        match self {
            Scaling::Tau => "tau",
            Scaling::Fixup => "fixup",
            Scaling::SkipInit => "skipinit",
            Scaling::ReZero => "rezero",
        }
    }

    /// Whether this is [`Scaling::Tau`], the default (which configs and checkpoints leave
    /// unwritten, so that they read as before the option existed).
    /// See the [example](Scaling#example).
    pub fn is_tau(&self) -> bool {
        *self == Scaling::Tau
    }

    /// Whether every residual block starts as the identity on its input (α = 0):
    /// SkipInit's and ReZero's branches contribute nothing at initialization.
    /// See the [example](Scaling#example).
    pub fn identity_at_init(self) -> bool {
        matches!(self, Scaling::SkipInit | Scaling::ReZero)
    }
}

impl std::fmt::Display for Scaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Largest CIFAR ResNet depth accepted (ResNet-1202 is the largest in the paper).
pub(super) const MAX_CIFAR_DEPTH: usize = 60_002;
/// Largest input-channel and class counts accepted.
pub(super) const MAX_CHANNELS: usize = 1 << 16;
pub(super) const MAX_CLASSES: usize = 1 << 20;

/// BatchNorm settings of PyTorch's `BatchNorm2d` defaults.
pub(super) fn bn_config() -> BatchNormConfig {
    BatchNormConfig {
        eps: 1e-5,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    }
}

pub(super) fn check_common(
    what: &str,
    tau: &TauRule,
    in_channels: usize,
    num_classes: usize,
) -> Result<()> {
    tau.validate().map_err(candle::Error::wrap)?;
    if in_channels == 0 || in_channels > MAX_CHANNELS {
        candle::bail!("{what}: in_channels must be in 1..={MAX_CHANNELS}, got {in_channels}")
    }
    if num_classes == 0 || num_classes > MAX_CLASSES {
        candle::bail!("{what}: num_classes must be in 1..={MAX_CLASSES}, got {num_classes}")
    }
    Ok(())
}

/// Specs of a BatchNorm over `c` channels under `prefix` (γ = 1, β = 0, mean 0, var 1).
pub(super) fn bn_specs(specs: &mut Vec<ParamSpec>, prefix: &str, c: usize) {
    for (leaf, v, kind) in [
        ("weight", 1.0, ParamKind::BnAffine),
        ("bias", 0.0, ParamKind::BnAffine),
        ("running_mean", 0.0, ParamKind::Buffer),
        ("running_var", 1.0, ParamKind::Buffer),
    ] {
        specs.push(ParamSpec::new(
            format!("{prefix}.{leaf}"),
            vec![c],
            ParamInit::Const(v),
            kind,
        ));
    }
}

/// A k×k convolution weight, N(0, 2/(k·k·c_out)) (He et al.; the companion code).
pub(super) fn conv_spec(
    specs: &mut Vec<ParamSpec>,
    name: String,
    c_out: usize,
    c_in: usize,
    k: usize,
) {
    let std = (2.0 / (k * k * c_out) as f64).sqrt();
    specs.push(ParamSpec::new(
        name,
        vec![c_out, c_in, k, k],
        ParamInit::Normal { std },
        ParamKind::Weight,
    ));
}

pub(super) fn scalar_bias_spec(specs: &mut Vec<ParamSpec>, name: String) {
    scalar_spec(specs, name, 0.0, ParamKind::ScalarBias);
}

/// A one-element parameter of `kind` starting at `init`.
pub(super) fn scalar_spec(specs: &mut Vec<ParamSpec>, name: String, init: f64, kind: ParamKind) {
    specs.push(ParamSpec::new(name, vec![1], ParamInit::Const(init), kind));
}

/// The linear head, PyTorch's default `nn.Linear` init: U(−1/√fan_in, 1/√fan_in).
pub(super) fn fc_specs(specs: &mut Vec<ParamSpec>, c_in: usize, classes: usize) {
    let bound = 1.0 / (c_in as f64).sqrt();
    specs.push(ParamSpec::new(
        "fc.weight".into(),
        vec![classes, c_in],
        ParamInit::Uniform { bound },
        ParamKind::Weight,
    ));
    specs.push(ParamSpec::new(
        "fc.bias".into(),
        vec![classes],
        ParamInit::Uniform { bound },
        ParamKind::Weight,
    ));
}

pub(super) fn tau_spec(specs: &mut Vec<ParamSpec>, learnable: bool, tau: f64) {
    if learnable {
        specs.push(ParamSpec::new(
            "tau".into(),
            vec![1],
            ParamInit::Const(tau),
            ParamKind::Tau,
        ));
    }
}

/// τ as a one-element tensor: the learnable `tau` parameter, or a constant.
pub(super) fn tau_tensor(learnable: bool, tau: f64, vb: &VarBuilder) -> Result<Tensor> {
    if learnable {
        vb.get(1, "tau")
    } else {
        Tensor::new(&[tau], &Device::Cpu)?
            .to_dtype(vb.dtype())?
            .to_device(vb.device())
    }
}

pub(super) fn tau_value(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()
}

pub(super) fn linear(c_in: usize, classes: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((classes, c_in), "weight")?;
    let b = vb.get(classes, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

/// The ResNet naming scheme decides the kind from the name alone (read through
/// [`ParamName`]).
pub(crate) fn param_kind(name: &str) -> ParamKind {
    let p = ParamName::parse(name);
    if name == "tau" {
        return ParamKind::Tau;
    }
    if p.is_bn_buffer() {
        return ParamKind::Buffer;
    }
    // Fixup's scalar biases of the stem (`bias1`) and before the classifier (`bias2`).
    if p.is_scalar_bias() || matches!(name, "bias1" | "bias2") {
        return ParamKind::ScalarBias;
    }
    if p.block.is_some() && p.module.is_empty() {
        match p.leaf {
            "scale" => return ParamKind::BranchScale,
            "alpha" => return ParamKind::Alpha,
            _ => {}
        }
    }
    match p.leaf {
        "weight" | "bias" if p.in_batch_norm() => ParamKind::BnAffine,
        "weight" | "bias" => ParamKind::Weight,
        _ => ParamKind::Buffer,
    }
}

/// What a block's residual branch holds besides its convolutions, for a description.
pub(super) fn describe_branch(norm: Norm, scaling: Scaling) -> &'static str {
    match (norm, scaling) {
        (Norm::BatchNorm, _) => "BatchNorm",
        (Norm::None, Scaling::ReZero) => "no normalization, no biases",
        (Norm::None, _) => "no normalization, scalar biases",
    }
}

/// The preprocessing of the data sets the ResNets train on, guessed from the channels:
/// MNIST's for 1, CIFAR-10's for 3, pixels in `[0, 1]` at 32×32 otherwise.
pub(super) fn guess_preprocessing(channels: usize) -> Preprocessing {
    match channels {
        1 => Preprocessing::mnist(),
        3 => Preprocessing::cifar10(),
        c => Preprocessing::identity([c, 32, 32]),
    }
}

mod bottleneck;
mod cifar;

pub use bottleneck::{BottleneckBlock, BottleneckResNet, BottleneckResNetConfig};
pub use cifar::{BasicBlock, CifarResNet, CifarResNetConfig, ScalarBiases, Shortcut};

#[cfg(test)]
mod tests {
    use candle::{DType, Device, ModuleT, Tensor};
    use candle_nn::{VarBuilder, VarMap};

    use super::{CifarResNet, CifarResNetConfig, Norm};

    /// Activation nodes (not parameters) with at least `min` elements behind the loss of a
    /// CIFAR ResNet of `depth` on one 3×8×8 image: the tensors `backward` gives a gradient.
    fn big_nodes(depth: usize, norm: Norm, min: usize) -> usize {
        let cfg = CifarResNetConfig {
            depth,
            norm,
            ..Default::default()
        };
        let model_cfg = crate::ModelConfig::CifarResnet(cfg.clone());
        let vm: VarMap = crate::init_varmap(&model_cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let net = CifarResNet::new(&cfg, vb).unwrap();
        let x = Tensor::ones((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let loss = net.forward_t(&x, true).unwrap().sum_all().unwrap();
        loss.sorted_nodes()
            .iter()
            .filter(|t| {
                // activations: (1, C, H, W); packed or reshaped parameters have other ranks
                !t.is_variable() && t.rank() == 4 && t.dim(0).unwrap() == 1 && t.elem_count() >= min
            })
            .count()
    }

    /// Activation-sized graph nodes per stage-1 block without normalization: depth 14 has
    /// one more block per stage than depth 8; stage-1 tensors are 16×8×8 = 1024 values (the
    /// stage-2/3 ones 512 and 256, the weights are parameters). One: the whole block is
    /// `scalar_bias_block`. (Composed of the per-layer fused ops it was four: conv1 of the
    /// shifted input, relu(· + b1b) + b2a, conv2, the residual end; with three `add_scalar`
    /// ops six; with candle's composed ops, and their broadcast views, fourteen.)
    #[test]
    fn no_bn_block_is_one_activation_sized_node() {
        assert_eq!(
            big_nodes(14, Norm::None, 1024) - big_nodes(8, Norm::None, 1024),
            1
        );
    }
}
