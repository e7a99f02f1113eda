//! The model configuration shared by every family: which network, its τ rule, and the
//! list of named parameters (with shapes and initializations) that the family owns.

use serde::{Deserialize, Serialize};

use crate::resnet::{BottleneckResNetConfig, CifarResNetConfig};
use crate::theory::TheoryConfig;

/// The most scalar elements a configuration may ask for (2^36, 256 GiB in f32): a
/// guard against configs that would allocate without bound, far above any real model.
pub const MAX_ELEMENTS: u128 = 1 << 36;

/// Any τ-ResNet, tagged by `family` (`theory`, `cifar_resnet`, `bottleneck_resnet`).
///
/// A TOML `[model]` table reads directly:
/// ```
/// # use tau_model::ModelConfig;
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "theory", "depth": 16, "width": 512, "tau": "1/sqrt(L)"}"#,
/// ).unwrap();
/// assert_eq!(cfg.n_blocks(), 16);
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

/// How the optimizer treats one named tensor of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// Convolution and linear weights (and the linear bias): SGD with weight decay.
    Weight,
    /// BatchNorm γ and β.
    BnAffine,
    /// The no-BN (Fixup-style) scalar biases: learning rate / 10.
    ScalarBias,
    /// The shared learnable τ: learning rate / 10, gradient divided by L.
    Tau,
    /// BatchNorm running statistics (and `num_batches_tracked`): never optimized.
    Buffer,
    /// Parameters held at their initial value (theory A and B by default): never optimized.
    Frozen,
}

impl ParamKind {
    /// Whether an optimizer should update tensors of this kind.
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamKind::Buffer | ParamKind::Frozen)
    }
}

/// How a parameter is drawn at initialization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    /// Independent N(0, std²) entries.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// Independent U(−bound, bound) entries (PyTorch's default for linear layers).
    Uniform {
        /// Half-width of the interval.
        bound: f64,
    },
    /// Every entry equal to this value.
    Const(f64),
}

/// One named tensor a model owns: name (PyTorch `state_dict` key), shape, initialization.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// PyTorch-style dotted name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// How [`crate::init_varmap`] fills it.
    pub init: ParamInit,
    /// How an optimizer treats it.
    pub kind: ParamKind,
}

impl ParamSpec {
    pub(crate) fn new(name: String, shape: Vec<usize>, init: ParamInit, kind: ParamKind) -> Self {
        Self {
            name,
            shape,
            init,
            kind,
        }
    }

    /// Number of scalar elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

impl ModelConfig {
    /// L, the number of residual blocks τ is resolved against.
    pub fn n_blocks(&self) -> usize {
        match self {
            ModelConfig::Theory(c) => c.depth,
            ModelConfig::CifarResnet(c) => c.n_blocks(),
            ModelConfig::BottleneckResnet(c) => c.n_blocks(),
        }
    }

    /// The τ rule.
    pub fn tau_rule(&self) -> crate::TauRule {
        match self {
            ModelConfig::Theory(c) => c.tau,
            ModelConfig::CifarResnet(c) => c.tau,
            ModelConfig::BottleneckResnet(c) => c.tau,
        }
    }

    /// τ at initialization: the rule resolved at L = [`Self::n_blocks`].
    pub fn tau_init(&self) -> f64 {
        self.tau_rule().resolve(self.n_blocks())
    }

    /// Whether τ is a learnable parameter named `tau`.
    pub fn learnable_tau(&self) -> bool {
        match self {
            ModelConfig::Theory(_) => false,
            ModelConfig::CifarResnet(c) => c.learnable_tau,
            ModelConfig::BottleneckResnet(c) => c.learnable_tau,
        }
    }

    /// The family's name as in the `family` tag.
    pub fn family(&self) -> &'static str {
        match self {
            ModelConfig::Theory(_) => "theory",
            ModelConfig::CifarResnet(_) => "cifar_resnet",
            ModelConfig::BottleneckResnet(_) => "bottleneck_resnet",
        }
    }

    /// Checks every setting (depth, widths, τ, variances, total size).
    ///
    /// # Errors
    /// One message naming the bad setting.
    pub fn validate(&self) -> candle::Result<()> {
        match self {
            ModelConfig::Theory(c) => c.validate()?,
            ModelConfig::CifarResnet(c) => c.validate()?,
            ModelConfig::BottleneckResnet(c) => c.validate()?,
        }
        let tau = self.tau_init();
        if !tau.is_finite() || tau <= 0.0 {
            candle::bail!(
                "tau rule {} resolves to {tau} at L = {}: tau must be finite and > 0",
                self.tau_rule(),
                self.n_blocks()
            )
        }
        Ok(())
    }

    /// Every named tensor of the model, in the fixed order [`crate::init_varmap`] draws
    /// them (the order of the crate docs' naming scheme). Assumes a validated config.
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        match self {
            ModelConfig::Theory(c) => c.param_specs(),
            ModelConfig::CifarResnet(c) => c.param_specs(),
            ModelConfig::BottleneckResnet(c) => c.param_specs(),
        }
    }

    /// Number of parameter scalars (everything but the BN running statistics), as PyTorch
    /// counts `sum(p.numel() for p in model.parameters())`.
    pub fn num_parameters(&self) -> usize {
        self.param_specs()
            .iter()
            .filter(|s| s.kind != ParamKind::Buffer)
            .map(ParamSpec::elem_count)
            .sum()
    }

    /// How an optimizer treats the tensor `name` (see [`ParamKind`]). Names the model does
    /// not own (and `*.num_batches_tracked`) count as [`ParamKind::Buffer`], so nothing
    /// unknown is ever optimized.
    pub fn param_kind(&self, name: &str) -> ParamKind {
        if name.ends_with(".num_batches_tracked") {
            return ParamKind::Buffer;
        }
        match self {
            ModelConfig::Theory(c) => c.param_kind(name),
            _ => resnet_param_kind(name),
        }
    }
}

/// The ResNet naming scheme decides the kind from the name alone.
fn resnet_param_kind(name: &str) -> ParamKind {
    if name == "tau" {
        return ParamKind::Tau;
    }
    let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    if matches!(leaf, "running_mean" | "running_var" | "num_batches_tracked") {
        return ParamKind::Buffer;
    }
    if leaf.starts_with("bias") && leaf.len() == 6 && leaf.as_bytes()[4].is_ascii_digit() {
        return ParamKind::ScalarBias;
    }
    let last = module.rsplit('.').next().unwrap_or("");
    let is_bn = last.starts_with("bn") || module.ends_with("downsample.1");
    match leaf {
        "weight" | "bias" if is_bn => ParamKind::BnAffine,
        "weight" | "bias" => ParamKind::Weight,
        _ => ParamKind::Buffer,
    }
}

/// Total elements of a set of shapes, or an error when above [`MAX_ELEMENTS`]. Counts in
/// u128 so that absurd configs cannot overflow.
pub(crate) fn check_size(what: &str, elements: u128) -> candle::Result<()> {
    if elements > MAX_ELEMENTS {
        candle::bail!(
            "{what}: {elements} parameters is beyond the supported maximum of {MAX_ELEMENTS}"
        )
    }
    Ok(())
}
