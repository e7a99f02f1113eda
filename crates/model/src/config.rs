//! The model configuration shared by every family: which network, its τ rule, and the
//! list of named parameters (with shapes and initializations) that the family owns.
//!
//! # Example
//!
//! A TOML `[model]` table (as in `configs/*.toml`) reads straight into a [`ModelConfig`].
//!
//! ```
//! use tau_model::{ModelConfig, TauRule};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(serde::Deserialize)]
//! struct Experiment {
//!     model: ModelConfig,
//! }
//! let exp: Experiment = toml::from_str(
//!     r#"
//!     [model]
//!     family = "cifar_resnet"
//!     depth = 110
//!     norm = "none"
//!     tau = "1/sqrt(L)"
//!     "#,
//! )?;
//! // ResNet-110: 6n + 2 with n = 18 blocks per stage, L = 54.
//! assert_eq!(exp.model.stage_blocks(), [18, 18, 18]);
//! assert_eq!(exp.model.tau_rule(), TauRule::InvSqrtDepth { scale: 1.0 });
//! assert!((exp.model.tau_init() - 54f64.sqrt().recip()).abs() < 1e-15);
//! // A typo is an error, not a default.
//! let typo = "[model]\nfamily = \"cifar_resnet\"\ndepht = 20";
//! assert!(toml::from_str::<Experiment>(typo).is_err());
//! # Ok(()) }
//! ```

use std::any::Any;

pub use crate::params::{MAX_ELEMENTS, ParamInit, ParamKind, ParamName, ParamSpec};
pub use crate::registry::ModelConfig;
use crate::resnet::Scaling;
use crate::theory::TheoryConfig;

impl ModelConfig {
    /// The theory network's config, if this is one (it has fast paths of its own).
    ///
    /// ```
    /// # use tau_model::ModelConfig;
    /// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "theory", "depth": 5}"#).unwrap();
    /// assert_eq!(cfg.as_theory().map(|t| t.depth), Some(5));
    /// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet"}"#).unwrap();
    /// assert!(cfg.as_theory().is_none());
    /// ```
    pub fn as_theory(&self) -> Option<&TheoryConfig> {
        (self.as_family() as &dyn Any).downcast_ref()
    }

    /// L, the number of residual blocks τ is resolved against.
    /// See the [example](ModelConfig#example).
    pub fn n_blocks(&self) -> usize {
        self.as_family().n_blocks()
    }

    /// The number of residual blocks in each stage, in order: `[depth]` for the theory
    /// network, `[n, n, n]` for a CIFAR ResNet, e.g. `[3, 4, 6, 3]` for ResNet-50. Their
    /// sum is the length of the residual chain, which for the bottleneck ResNets is more
    /// than [`Self::n_blocks`] (the largest stage).
    /// See the [example](ModelConfig#example).
    pub fn stage_blocks(&self) -> Vec<usize> {
        self.as_family().stage_blocks()
    }

    /// The residual block (0-based, counted over all stages, see [`Self::stage_blocks`])
    /// that the tensor `name` belongs to; `None` for the stem, the head, τ and names the
    /// model does not have. The names are read by [`ParamName`].
    ///
    /// ```
    /// # use tau_model::ModelConfig;
    /// let cfg: ModelConfig =
    ///     serde_json::from_str(r#"{"family": "bottleneck_resnet", "depth": 50}"#).unwrap();
    /// assert_eq!(cfg.block_index("layer2.0.downsample.1.weight"), Some(3));
    /// assert_eq!(cfg.block_index("layer4.2.conv3.weight"), Some(15));
    /// assert_eq!(cfg.block_index("conv1.weight"), None);
    /// ```
    pub fn block_index(&self, name: &str) -> Option<usize> {
        ParamName::parse(name).block_index(&self.stage_blocks())
    }

    /// The τ rule.
    /// See the [example](ModelConfig#example).
    pub fn tau_rule(&self) -> crate::TauRule {
        self.as_family().tau_rule()
    }

    /// τ at initialization: the rule resolved at L = [`Self::n_blocks`]; 1 for a ResNet
    /// whose branches another [`Scaling`] scheme scales.
    /// See the [example](ModelConfig#example).
    pub fn tau_init(&self) -> f64 {
        self.as_family().tau_init()
    }

    /// How the residual branches are scaled ([`Scaling::Tau`] for the theory network).
    /// See the [example](ModelConfig#example).
    pub fn scaling(&self) -> Scaling {
        self.as_family().scaling()
    }

    /// Whether τ is a learnable parameter named `tau`.
    /// See the [example](ModelConfig#example).
    pub fn learnable_tau(&self) -> bool {
        self.as_family().learnable_tau()
    }

    /// The channels of the input images (`None` for the theory network, which takes
    /// vectors).
    /// See the [example](ModelConfig#example).
    pub fn in_channels(&self) -> Option<usize> {
        self.as_family().input().channels()
    }

    /// The number of outputs: classes for the ResNets, `output_dim` for the theory network.
    /// See the [example](ModelConfig#example).
    pub fn num_outputs(&self) -> usize {
        self.as_family().num_outputs()
    }

    /// The family's name as in the `family` tag.
    /// See the [example](ModelConfig#example).
    pub fn family(&self) -> &'static str {
        self.as_family().name()
    }

    /// Checks every setting (depth, widths, τ, variances, total size).
    /// See the [example](ModelConfig#example).
    ///
    /// # Errors
    /// One message naming the bad setting.
    pub fn validate(&self) -> candle::Result<()> {
        self.as_family().validate()?;
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
    /// See the [example](ModelConfig#example).
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        self.as_family().param_specs()
    }

    /// Number of parameter scalars (everything but the BN running statistics), as PyTorch
    /// counts `sum(p.numel() for p in model.parameters())`.
    /// See the [example](ModelConfig#example).
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
    /// See the [example](ModelConfig#example).
    pub fn param_kind(&self, name: &str) -> ParamKind {
        if name.ends_with(".num_batches_tracked") {
            return ParamKind::Buffer;
        }
        self.as_family().param_kind(name)
    }
}
