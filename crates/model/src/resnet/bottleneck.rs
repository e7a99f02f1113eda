//! The ImageNet bottleneck ResNets 50/101/152 (torchvision's layout), scaled by τ, with
//! BatchNorm or Fixup-style scalar biases.
//!
//! # Example
//!
//! ```
//! use tau_model::BottleneckResNetConfig;
//!
//! let depths = [(50, [3, 4, 6, 3], 6), (101, [3, 4, 23, 3], 23), (152, [3, 8, 36, 3], 36)];
//! for (depth, stages, l) in depths {
//!     let cfg = BottleneckResNetConfig { depth, ..Default::default() };
//!     assert_eq!((cfg.stage_blocks(), cfg.n_blocks()), (&stages[..], l));
//! }
//! ```

use super::*;

mod network;

pub use network::{BottleneckBlock, BottleneckResNet};

/// An ImageNet bottleneck ResNet (torchvision v1.5 layout: stride on the 3×3 convolution,
/// projection shortcut conv1×1 + BN when the shape changes). L = the largest number of
/// blocks in one stage (ResNet-101: 23).
///
/// # Example
///
/// ```
/// use tau_model::{BottleneckResNetConfig, ModelConfig, Norm};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let model: ModelConfig =
///     serde_json::from_str(r#"{"family": "bottleneck_resnet", "depth": 101, "tau": "1/L"}"#)?;
/// let ModelConfig::BottleneckResnet(cfg) = model else { unreachable!() };
/// assert_eq!((cfg.norm, cfg.in_channels, cfg.num_classes), (Norm::BatchNorm, 3, 1000));
/// assert_eq!(cfg.stage_blocks(), [3, 4, 23, 3]);
/// assert_eq!(cfg.n_blocks(), 23); // the largest stage: τ = 1/23
/// cfg.validate()?;
/// let resnet34 = BottleneckResNetConfig { depth: 34, ..cfg };
/// assert!(resnet34.validate().unwrap_err().to_string().contains("50, 101 or 152, got 34"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BottleneckResNetConfig {
    /// 50, 101 or 152 (default 50).
    pub depth: usize,
    /// `batch_norm` (default) or `none`.
    pub norm: Norm,
    /// The τ rule (default `1/sqrt(L)`).
    pub tau: TauRule,
    /// One shared learnable τ named `tau` (default false).
    pub learnable_tau: bool,
    /// How the residual branches are scaled: `tau` (default) only, for now; the other
    /// [`Scaling`] schemes are CIFAR ResNet options.
    #[serde(skip_serializing_if = "Scaling::is_tau")]
    pub scaling: Scaling,
    /// Input channels (default 3).
    pub in_channels: usize,
    /// Number of classes (default 1000).
    pub num_classes: usize,
}

impl Default for BottleneckResNetConfig {
    fn default() -> Self {
        Self {
            depth: 50,
            norm: Norm::BatchNorm,
            tau: TauRule::default(),
            learnable_tau: false,
            scaling: Scaling::Tau,
            in_channels: 3,
            num_classes: 1000,
        }
    }
}

pub(super) const BOTTLENECK_PLANES: [usize; 4] = [64, 128, 256, 512];
pub(super) const EXPANSION: usize = 4;

impl BottleneckResNetConfig {
    /// Blocks per stage: [3, 4, 6, 3], [3, 4, 23, 3] or [3, 8, 36, 3]; empty for other depths.
    /// See the [example](BottleneckResNetConfig#example).
    pub fn stage_blocks(&self) -> &'static [usize] {
        match self.depth {
            50 => &[3, 4, 6, 3],
            101 => &[3, 4, 23, 3],
            152 => &[3, 8, 36, 3],
            _ => &[],
        }
    }

    /// L, the largest number of blocks in one stage.
    /// See the [example](BottleneckResNetConfig#example).
    pub fn n_blocks(&self) -> usize {
        self.stage_blocks().iter().copied().max().unwrap_or(0)
    }

    /// Checks depth, channels, classes and τ.
    /// See the [example](BottleneckResNetConfig#example).
    ///
    /// # Errors
    /// Names the bad setting.
    pub fn validate(&self) -> Result<()> {
        if self.stage_blocks().is_empty() {
            candle::bail!(
                "bottleneck_resnet: depth must be 50, 101 or 152, got {}",
                self.depth
            )
        }
        check_common(
            "bottleneck_resnet",
            &self.tau,
            self.in_channels,
            self.num_classes,
        )?;
        if self.scaling != Scaling::Tau {
            candle::bail!(
                "bottleneck_resnet: scaling = \"{}\" is not supported for the bottleneck ResNets yet (only \"tau\"); the cifar_resnet family takes every scheme",
                self.scaling
            )
        }
        check_size(
            "bottleneck_resnet",
            70_000_000 + self.num_classes as u128 * 2049 + self.in_channels as u128 * 64 * 49,
        )
    }
}

/// The bottleneck ResNets as a [`Family`]: images in, class logits out, L the largest
/// stage. See the [module example](crate::family#example).
impl Family for BottleneckResNetConfig {
    fn name(&self) -> &'static str {
        "bottleneck_resnet"
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn n_blocks(&self) -> usize {
        BottleneckResNetConfig::n_blocks(self)
    }

    fn stage_blocks(&self) -> Vec<usize> {
        BottleneckResNetConfig::stage_blocks(self).to_vec()
    }

    fn tau_rule(&self) -> TauRule {
        self.tau
    }

    fn set_tau_rule(&mut self, rule: TauRule) {
        self.tau = rule;
    }

    fn scaling(&self) -> Scaling {
        self.scaling
    }

    fn learnable_tau(&self) -> bool {
        self.learnable_tau
    }

    fn input(&self) -> Input {
        Input::Images {
            channels: self.in_channels,
        }
    }

    fn num_outputs(&self) -> usize {
        self.num_classes
    }

    fn validate(&self) -> Result<()> {
        BottleneckResNetConfig::validate(self)
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let bn = self.norm == Norm::BatchNorm;
        let mut specs = Vec::new();
        conv_spec(&mut specs, "conv1.weight".into(), 64, self.in_channels, 7);
        if bn {
            bn_specs(&mut specs, "bn1", 64);
        }
        let mut c_in = 64;
        for (s, (&planes, &n)) in BOTTLENECK_PLANES
            .iter()
            .zip(self.stage_blocks())
            .enumerate()
        {
            let c_out = planes * EXPANSION;
            for b in 0..n {
                let p = format!("layer{}.{b}", s + 1);
                let block_in = if b == 0 { c_in } else { c_out };
                for (i, (co, ci, k)) in [
                    (planes, block_in, 1),
                    (planes, planes, 3),
                    (c_out, planes, 1),
                ]
                .into_iter()
                .enumerate()
                {
                    let i = i + 1;
                    if !bn {
                        scalar_bias_spec(&mut specs, format!("{p}.bias{i}a"));
                    }
                    conv_spec(&mut specs, format!("{p}.conv{i}.weight"), co, ci, k);
                    if bn {
                        bn_specs(&mut specs, &format!("{p}.bn{i}"), co);
                    } else {
                        scalar_bias_spec(&mut specs, format!("{p}.bias{i}b"));
                    }
                }
                if b == 0 {
                    conv_spec(
                        &mut specs,
                        format!("{p}.downsample.0.weight"),
                        c_out,
                        block_in,
                        1,
                    );
                    if bn {
                        bn_specs(&mut specs, &format!("{p}.downsample.1"), c_out);
                    }
                }
            }
            c_in = c_out;
        }
        fc_specs(&mut specs, 512 * EXPANSION, self.num_classes);
        tau_spec(
            &mut specs,
            self.learnable_tau,
            self.tau.resolve(self.n_blocks()),
        );
        specs
    }

    fn param_kind(&self, name: &str) -> ParamKind {
        param_kind(name)
    }

    fn summary(&self) -> String {
        format!("bottleneck ResNet-{} ({:?})", self.depth, self.norm)
    }

    fn description(&self) -> String {
        format!(
            "a bottleneck ResNet-{} ({}, {} input channels, {} classes)",
            self.depth,
            describe_branch(self.norm, self.scaling),
            self.in_channels,
            self.num_classes
        )
    }

    fn probe_image_size(&self) -> Option<usize> {
        Some(64)
    }

    fn default_preprocessing(&self) -> Option<Preprocessing> {
        Some(match self.in_channels {
            3 => Preprocessing::imagenet(),
            c => guess_preprocessing(c),
        })
    }

    fn build(&self, vb: VarBuilder) -> Result<Model> {
        Ok(Model::BottleneckResNet(BottleneckResNet::new(self, vb)?))
    }
}
