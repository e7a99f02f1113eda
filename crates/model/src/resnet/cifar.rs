//! The CIFAR ResNets of He et al. (2016): depth 6n+2, three stages of basic blocks at
//! 16/32/64 channels, option-A shortcut (or, with BatchNorm, one of the [`Shortcut`]s others
//! trained with), with BatchNorm or Fixup-style scalar biases, the branches scaled by τ or
//! by one of the schemes of [`Scaling`] (Fixup, SkipInit, ReZero).
//!
//! # Example
//!
//! Fixup's initialization zeroes the classifier, so a Fixup ResNet-8 starts with all
//! logits exactly 0; with τ they are not.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use tau_model::{Model, ModelConfig, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let xs = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
//! for (scaling, zero) in [("fixup", true), ("tau", false)] {
//!     let cfg: ModelConfig = serde_json::from_str(&format!(
//!         r#"{{"family": "cifar_resnet", "depth": 8, "norm": "none", "scaling": "{scaling}"}}"#
//!     ))?;
//!     let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 1, DType::F32, &dev)?, &dev)?;
//!     let largest = model.forward_t(&xs, true)?.abs()?.max_all()?.to_scalar::<f32>()?;
//!     assert_eq!(largest == 0.0, zero, "{scaling}: {largest}");
//! }
//! # Ok(()) }
//! ```

use super::*;

mod network;

pub use network::{BasicBlock, CifarResNet, ScalarBiases};

/// A CIFAR ResNet of depth 6n+2: a 3×3 stem with 16 channels, three stages of n basic
/// blocks at 16/32/64 channels (stride 2 entering stages 2 and 3), global average pool,
/// a linear head. L = 3n.
///
/// # Example
///
/// ```
/// use tau_model::{CifarResNetConfig, Norm, Scaling, Shortcut};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = CifarResNetConfig::default(); // ResNet-20 for CIFAR-10, BatchNorm, option A
/// assert_eq!((cfg.depth, cfg.norm, cfg.shortcut), (20, Norm::BatchNorm, Shortcut::ZeroPad));
/// assert_eq!((cfg.in_channels, cfg.num_classes, cfg.scaling), (3, 10, Scaling::Tau));
/// assert_eq!((cfg.blocks_per_stage(), cfg.n_blocks()), (3, 9));
/// cfg.validate()?;
/// assert_eq!(cfg.tau_init(), 1.0 / 3.0); // the default rule 1/√L at L = 9
/// // Fixup: no τ, its first convolutions drawn at He × 1/√L.
/// let fixup = CifarResNetConfig { norm: Norm::None, scaling: Scaling::Fixup, ..cfg.clone() };
/// assert_eq!((fixup.tau_init(), fixup.fixup_std_factor()), (1.0, 1.0 / 3.0));
/// let bad = CifarResNetConfig { depth: 21, ..cfg };
/// assert!(bad.validate().unwrap_err().to_string().contains("6n+2 with n >= 1"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CifarResNetConfig {
    /// 6n+2 (20, 32, 44, 56, 110, 1202, …); default 20.
    pub depth: usize,
    /// `batch_norm` (default) or `none`.
    pub norm: Norm,
    /// The τ rule (default `1/sqrt(L)`).
    pub tau: TauRule,
    /// One shared learnable τ named `tau`, initialized at the rule's value (default false).
    pub learnable_tau: bool,
    /// How the residual branches are scaled: `tau` (default), `fixup`, `skipinit` or
    /// `rezero` (see [`Scaling`]). With any scheme but `tau` the τ rule is not used.
    #[serde(skip_serializing_if = "Scaling::is_tau")]
    pub scaling: Scaling,
    /// The shortcut of the two blocks that halve the resolution: `zero_pad` (option A,
    /// default), `subsample_bn` or `conv_bn` (see [`Shortcut`]; those two need BatchNorm).
    #[serde(skip_serializing_if = "Shortcut::is_zero_pad")]
    pub shortcut: Shortcut,
    /// Input channels: 3 for CIFAR (default), 1 for MNIST.
    pub in_channels: usize,
    /// Number of classes (default 10).
    pub num_classes: usize,
}

impl Default for CifarResNetConfig {
    fn default() -> Self {
        Self {
            depth: 20,
            norm: Norm::BatchNorm,
            tau: TauRule::default(),
            learnable_tau: false,
            scaling: Scaling::Tau,
            shortcut: Shortcut::ZeroPad,
            in_channels: 3,
            num_classes: 10,
        }
    }
}

pub(super) const CIFAR_WIDTHS: [usize; 3] = [16, 32, 64];

/// The shortcut of the blocks that change the shape (the first block of stages 2 and 3:
/// stride 2, twice the channels); every other block's shortcut is the identity.
///
/// # Example
///
/// ```
/// # use tau_model::{ModelConfig, resnet::Shortcut};
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "cifar_resnet", "depth": 20, "tau": "1", "shortcut": "conv_bn"}"#,
/// ).unwrap();
/// assert_eq!(cfg.num_parameters(), 272_474); // chenyaofo/pytorch-cifar-models' resnet20
/// assert!(cfg.param_specs().iter().any(|s| s.name == "layer3.0.downsample.0.weight"));
/// assert_eq!((Shortcut::ConvBn.name(), Shortcut::SubsampleBn.to_string()), ("conv_bn", "subsample_bn".into()));
/// assert!(Shortcut::default().is_zero_pad() && !Shortcut::ConvBn.is_zero_pad());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shortcut {
    /// Option A (He et al. 2016): every other pixel, zero channels appended; no
    /// parameters. The paper's description and this crate's default.
    #[default]
    ZeroPad,
    /// The paper authors' BN model: 1×1 average-pool subsampling with stride 2 (every
    /// other pixel), BatchNorm over the input channels, zero channels appended;
    /// `layer{s}.0.downsample.1.*` (`downsample.0` is the parameterless pool).
    SubsampleBn,
    /// Option B: a 1×1 stride-2 convolution and BatchNorm, as in
    /// chenyaofo/pytorch-cifar-models; `layer{s}.0.downsample.0.weight` and
    /// `layer{s}.0.downsample.1.*`.
    ConvBn,
}

impl Shortcut {
    /// The name in configs: `zero_pad`, `subsample_bn`, `conv_bn`.
    /// See the [example](Shortcut#example).
    pub fn name(self) -> &'static str {
        match self {
            Shortcut::ZeroPad => "zero_pad",
            Shortcut::SubsampleBn => "subsample_bn",
            Shortcut::ConvBn => "conv_bn",
        }
    }

    /// Whether this is [`Shortcut::ZeroPad`], the default (which configs and checkpoints
    /// leave out, so files written before the option read and write unchanged).
    /// See the [example](Shortcut#example).
    pub fn is_zero_pad(&self) -> bool {
        *self == Shortcut::ZeroPad
    }
}

impl std::fmt::Display for Shortcut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// m, the layers of a basic block's branch, in Fixup's L^(−1/(2m−2)).
const FIXUP_BRANCH_LAYERS: f64 = 2.0;

impl CifarResNetConfig {
    /// n, the number of blocks per stage.
    /// See the [example](CifarResNetConfig#example).
    pub fn blocks_per_stage(&self) -> usize {
        self.depth.saturating_sub(2) / 6
    }

    /// L = 3n. See the [example](CifarResNetConfig#example).
    pub fn n_blocks(&self) -> usize {
        3 * self.blocks_per_stage()
    }

    /// Checks the depth (6n+2, n ≥ 1), channels, classes and τ.
    /// See the [example](CifarResNetConfig#example).
    ///
    /// # Errors
    /// Names the bad setting.
    pub fn validate(&self) -> Result<()> {
        let d = self.depth;
        if d < 8 || !(d - 2).is_multiple_of(6) {
            candle::bail!(
                "cifar_resnet: depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202, ...), got {d}"
            )
        }
        if d > MAX_CIFAR_DEPTH {
            candle::bail!("cifar_resnet: depth {d} is beyond the maximum {MAX_CIFAR_DEPTH}")
        }
        check_common(
            "cifar_resnet",
            &self.tau,
            self.in_channels,
            self.num_classes,
        )?;
        let scaling = self.scaling;
        if scaling != Scaling::Tau && self.learnable_tau {
            candle::bail!(
                "cifar_resnet: learnable_tau applies to scaling = \"tau\" only; scaling = \"{scaling}\" learns its own per-block scalars"
            )
        }
        if matches!(scaling, Scaling::Fixup | Scaling::ReZero) && self.norm != Norm::None {
            candle::bail!(
                "cifar_resnet: scaling = \"{scaling}\" trains without normalization; set norm = \"none\" (got \"batch_norm\")"
            )
        }
        if self.shortcut != Shortcut::ZeroPad && self.norm != Norm::BatchNorm {
            candle::bail!(
                "cifar_resnet: shortcut = \"{}\" has a BatchNorm and needs norm = \"batch_norm\" (got \"none\")",
                self.shortcut
            )
        }
        let per_block = 2 * 9 * 64 * 64 + 4 * 64;
        check_size(
            "cifar_resnet",
            (self.n_blocks() as u128) * per_block
                + (self.num_classes as u128 + 1) * 64
                + self.in_channels as u128 * 16 * 9,
        )
    }

    /// Fixup's factor on the He standard deviation of a branch's first convolution,
    /// L^(−1/(2m−2)) with m = 2 layers per branch: 1/√L.
    /// See the [example](CifarResNetConfig#example).
    pub fn fixup_std_factor(&self) -> f64 {
        (self.n_blocks().max(1) as f64).powf(-1.0 / (2.0 * FIXUP_BRANCH_LAYERS - 2.0))
    }

    /// τ at initialization: the rule at L for `scaling = "tau"`, 1 for the other schemes
    /// (whose branches τ does not scale).
    /// See the [example](CifarResNetConfig#example).
    pub fn tau_init(&self) -> f64 {
        match self.scaling {
            Scaling::Tau => self.tau.resolve(self.n_blocks()),
            _ => 1.0,
        }
    }
}

/// The card's name of a branch-scaling scheme other than τ.
fn scheme_title(scaling: Scaling) -> Option<&'static str> {
    match scaling {
        Scaling::Tau => None,
        Scaling::Fixup => Some("Fixup"),
        Scaling::SkipInit => Some("SkipInit"),
        Scaling::ReZero => Some("ReZero"),
    }
}

/// The name of a shortcut of the two shape-changing blocks, for a description.
fn shortcut_title(shortcut: Shortcut) -> &'static str {
    match shortcut {
        Shortcut::ZeroPad => "option-A shortcut",
        Shortcut::SubsampleBn => "subsample-BatchNorm shortcut",
        Shortcut::ConvBn => "option-B conv-BatchNorm shortcut",
    }
}

/// The CIFAR ResNets as a [`Family`]: images in, class logits out, L = 3n, τ or another
/// [`Scaling`] scheme. See the [module example](crate::family#example).
impl Family for CifarResNetConfig {
    fn name(&self) -> &'static str {
        "cifar_resnet"
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn n_blocks(&self) -> usize {
        CifarResNetConfig::n_blocks(self)
    }

    fn stage_blocks(&self) -> Vec<usize> {
        vec![self.blocks_per_stage(); 3]
    }

    fn tau_rule(&self) -> TauRule {
        self.tau
    }

    fn set_tau_rule(&mut self, rule: TauRule) {
        self.tau = rule;
    }

    fn tau_init(&self) -> f64 {
        CifarResNetConfig::tau_init(self)
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
        CifarResNetConfig::validate(self)
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let n = self.blocks_per_stage();
        let bn = self.norm == Norm::BatchNorm;
        let scaling = self.scaling;
        let fixup = scaling == Scaling::Fixup;
        // ReZero's branch has no biases; every other no-BN branch has the scalar biases.
        let biases = !bn && scaling != Scaling::ReZero;
        let mut specs = Vec::new();
        conv_spec(&mut specs, "conv1.weight".into(), 16, self.in_channels, 3);
        if bn {
            bn_specs(&mut specs, "bn1", 16);
        }
        if fixup {
            scalar_bias_spec(&mut specs, "bias1".into());
        }
        let mut c_in = 16;
        for (s, &c_out) in CIFAR_WIDTHS.iter().enumerate() {
            for b in 0..n {
                let p = format!("layer{}.{b}", s + 1);
                let block_in = if b == 0 { c_in } else { c_out };
                if biases {
                    scalar_bias_spec(&mut specs, format!("{p}.bias1a"));
                }
                conv_spec(&mut specs, format!("{p}.conv1.weight"), c_out, block_in, 3);
                if fixup
                    && let Some(ParamSpec {
                        init: ParamInit::Normal { std },
                        ..
                    }) = specs.last_mut()
                {
                    *std *= self.fixup_std_factor();
                }
                if bn {
                    bn_specs(&mut specs, &format!("{p}.bn1"), c_out);
                } else if biases {
                    scalar_bias_spec(&mut specs, format!("{p}.bias1b"));
                    scalar_bias_spec(&mut specs, format!("{p}.bias2a"));
                }
                conv_spec(&mut specs, format!("{p}.conv2.weight"), c_out, c_out, 3);
                if fixup && let Some(spec) = specs.last_mut() {
                    spec.init = ParamInit::Const(0.0);
                }
                if bn {
                    bn_specs(&mut specs, &format!("{p}.bn2"), c_out);
                }
                if fixup {
                    scalar_spec(
                        &mut specs,
                        format!("{p}.scale"),
                        1.0,
                        ParamKind::BranchScale,
                    );
                }
                if biases {
                    scalar_bias_spec(&mut specs, format!("{p}.bias2b"));
                }
                if scaling.identity_at_init() {
                    scalar_spec(&mut specs, format!("{p}.alpha"), 0.0, ParamKind::Alpha);
                }
                if block_in != c_out {
                    match self.shortcut {
                        Shortcut::ZeroPad => {}
                        Shortcut::SubsampleBn => {
                            bn_specs(&mut specs, &format!("{p}.downsample.1"), block_in);
                        }
                        Shortcut::ConvBn => {
                            let w = format!("{p}.downsample.0.weight");
                            conv_spec(&mut specs, w, c_out, block_in, 1);
                            bn_specs(&mut specs, &format!("{p}.downsample.1"), c_out);
                        }
                    }
                }
            }
            c_in = c_out;
        }
        if fixup {
            scalar_bias_spec(&mut specs, "bias2".into());
        }
        fc_specs(&mut specs, 64, self.num_classes);
        if fixup {
            for spec in specs.iter_mut().filter(|s| s.name.starts_with("fc.")) {
                spec.init = ParamInit::Const(0.0);
            }
        }
        tau_spec(
            &mut specs,
            self.learnable_tau && scaling == Scaling::Tau,
            self.tau.resolve(self.n_blocks()),
        );
        specs
    }

    fn param_kind(&self, name: &str) -> ParamKind {
        param_kind(name)
    }

    fn summary(&self) -> String {
        match self.scaling {
            Scaling::Tau => format!("CIFAR ResNet-{} ({:?})", self.depth, self.norm),
            scaling => format!(
                "CIFAR ResNet-{} ({:?}, scaling = {scaling})",
                self.depth, self.norm
            ),
        }
    }

    fn description(&self) -> String {
        format!(
            "a CIFAR ResNet-{} ({}{}, {}, {} input channels, {} classes)",
            self.depth,
            describe_branch(self.norm, self.scaling),
            scheme_title(self.scaling)
                .map(|s| format!(", {s} branch scaling"))
                .unwrap_or_default(),
            shortcut_title(self.shortcut),
            self.in_channels,
            self.num_classes
        )
    }

    fn probe_image_size(&self) -> Option<usize> {
        Some(32)
    }

    fn default_preprocessing(&self) -> Option<Preprocessing> {
        Some(guess_preprocessing(self.in_channels))
    }

    fn build(&self, vb: VarBuilder) -> Result<Model> {
        Ok(Model::CifarResNet(CifarResNet::new(self, vb)?))
    }
}
