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

    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
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

/// The Fixup-style scalar biases of a block without normalization.
/// See the [example](CifarResNet#example).
#[derive(Debug, Clone)]
pub struct ScalarBiases {
    /// Added to the block input before conv1.
    pub bias1a: Tensor,
    /// Added after conv1, before the ReLU.
    pub bias1b: Tensor,
    /// Added before conv2.
    pub bias2a: Tensor,
    /// Added after conv2 (before τ).
    pub bias2b: Tensor,
}

/// The parameters of a shortcut other than option A (see [`Shortcut`]).
#[derive(Debug, Clone)]
enum Downsample {
    /// Every other pixel, BatchNorm over the input channels, zero channels appended.
    SubsampleBn(BatchNorm),
    /// A 1×1 strided convolution and BatchNorm.
    ConvBn(Tensor, BatchNorm),
}

/// A basic block: two 3×3 convolutions on the residual branch, scaled by the branch's
/// multiplier (τ, Fixup's `scale` or SkipInit's / ReZero's `alpha`, see [`Scaling`]).
/// A [`CifarResNet`] holds them ([`CifarResNet::blocks`]); see its [example](CifarResNet#example).
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Tensor,
    conv2: Tensor,
    /// `Some((bn1, bn2))` with BatchNorm.
    bns: Option<(BatchNorm, BatchNorm)>,
    /// `Some` without normalization (but ReZero).
    biases: Option<ScalarBiases>,
    /// The branch's one-element multiplier: τ (shared with every block; the `tau`
    /// parameter if learnable), or this block's `scale` / `alpha`.
    multiplier: Tensor,
    scaling: Scaling,
    /// `Some` for a shape-changing block whose shortcut is not option A.
    downsample: Option<Downsample>,
    stride: usize,
}

impl BasicBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        (norm, scaling, shortcut): (Norm, Scaling, Shortcut),
        tau: Tensor,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv1 = vb.get((c_out, c_in, 3, 3), "conv1.weight")?;
        let conv2 = vb.get((c_out, c_out, 3, 3), "conv2.weight")?;
        let multiplier = match scaling {
            Scaling::Tau => tau,
            Scaling::Fixup => vb.get(1, "scale")?,
            Scaling::SkipInit | Scaling::ReZero => vb.get(1, "alpha")?,
        };
        let (bns, biases) = match norm {
            Norm::BatchNorm => (
                Some((
                    candle_nn::batch_norm(c_out, bn_config(), vb.pp("bn1"))?,
                    candle_nn::batch_norm(c_out, bn_config(), vb.pp("bn2"))?,
                )),
                None,
            ),
            Norm::None if scaling == Scaling::ReZero => (None, None),
            Norm::None => (
                None,
                Some(ScalarBiases {
                    bias1a: vb.get(1, "bias1a")?,
                    bias1b: vb.get(1, "bias1b")?,
                    bias2a: vb.get(1, "bias2a")?,
                    bias2b: vb.get(1, "bias2b")?,
                }),
            ),
        };
        let downsample = match shortcut {
            _ if c_in == c_out => None,
            Shortcut::ZeroPad => None,
            Shortcut::SubsampleBn => Some(Downsample::SubsampleBn(candle_nn::batch_norm(
                c_in,
                bn_config(),
                vb.pp("downsample.1"),
            )?)),
            Shortcut::ConvBn => Some(Downsample::ConvBn(
                vb.get((c_out, c_in, 1, 1), "downsample.0.weight")?,
                candle_nn::batch_norm(c_out, bn_config(), vb.pp("downsample.1"))?,
            )),
        };
        Ok(Self {
            conv1,
            conv2,
            bns,
            biases,
            multiplier,
            scaling,
            downsample,
            stride,
        })
    }

    /// The shortcut of a block with a [`Shortcut`] other than option A:
    /// `subsample_bn`: BN(x[:, :, ::s, ::s]) with zero channels appended; `conv_bn`:
    /// BN(conv1×1(x, stride s)).
    fn shortcut(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let c_out = self.conv1.dim(0)?;
        match &self.downsample {
            None => option_a_shortcut(xs, self.stride, c_out),
            Some(Downsample::SubsampleBn(bn)) => {
                let sub = if self.stride == 2 {
                    subsample2(xs)?
                } else {
                    xs.clone()
                };
                let sub = batch_norm_t(bn, &sub, train, false)?;
                let c_in = sub.dim(1)?;
                sub.pad_with_zeros(1, 0, c_out.saturating_sub(c_in))
            }
            Some(Downsample::ConvBn(w, bn)) => {
                batch_norm_t(bn, &conv2d(xs, w, self.stride, 0)?, train, false)
            }
        }
    }

    /// The scalar biases (without normalization, but ReZero's blocks have none).
    /// See the [example](CifarResNet#example).
    pub fn scalar_biases(&self) -> Option<&ScalarBiases> {
        self.biases.as_ref()
    }

    /// The branch's one-element multiplier: the shared τ, Fixup's `scale` or
    /// SkipInit's / ReZero's `alpha`.
    /// See the [example](CifarResNet#example).
    pub fn multiplier(&self) -> &Tensor {
        &self.multiplier
    }
}

impl ModuleT for BasicBlock {
    /// relu(τ · branch(x) + shortcut(x)), the multiplier in τ's place; Fixup's
    /// relu(s · conv2(…) + b2b + shortcut(x)); ReZero's shortcut(x) + α · branch(x).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // The whole block is one op (one graph node) where the CPU kernels apply, the
        // composition of the per-layer ops elsewhere (and for ReZero).
        let m = &self.multiplier;
        match (&self.bns, &self.biases) {
            (Some((bn1, bn2)), _) if self.downsample.is_some() => {
                // The two blocks with a shortcut of their own: the per-layer ops (each fused
                // on the CPU), as batch_norm_block composes them, with that shortcut.
                let h = batch_norm_t(bn1, &conv2d(xs, &self.conv1, self.stride, 1)?, train, true)?;
                let ys = conv2d(&h, &self.conv2, 1, 1)?;
                let shortcut = self.shortcut(xs, train)?;
                batch_norm_residual_relu(bn2, &ys, train, m, &shortcut)
            }
            (Some((bn1, bn2)), _) => batch_norm_block(
                xs,
                (&self.conv1, bn1),
                (&self.conv2, bn2),
                m,
                self.stride,
                train,
            ),
            (None, Some(b)) => {
                let block = match self.scaling {
                    Scaling::Fixup => fixup_block,
                    _ => scalar_bias_block,
                };
                block(
                    xs,
                    &self.conv1,
                    &self.conv2,
                    [&b.bias1a, &b.bias1b, &b.bias2a, &b.bias2b],
                    m,
                    self.stride,
                )
            }
            (None, None) => {
                let h = relu(&conv2d(xs, &self.conv1, self.stride, 1)?)?;
                let branch = conv2d(&h, &self.conv2, 1, 1)?;
                let shortcut = option_a_shortcut(xs, self.stride, self.conv1.dim(0)?)?;
                branch.broadcast_mul(m)? + shortcut
            }
        }
    }
}

/// A CIFAR ResNet (see [`CifarResNetConfig`]).
///
/// # Example
///
/// A ResNet-8 without normalization (L = 3) on a seeded VarMap: the hook sees h_0 and the
/// output of each block, one per stage, and the head of the last gives the logits.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::VarBuilder;
/// use tau_model::{CifarResNet, CifarResNetConfig, ModelConfig, Norm, init_varmap};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let cfg = CifarResNetConfig { depth: 8, norm: Norm::None, ..Default::default() };
/// let varmap = init_varmap(&ModelConfig::CifarResnet(cfg.clone()), 3, DType::F32, &dev)?;
/// let net = CifarResNet::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
/// assert_eq!((net.config().depth, net.n_blocks(), net.blocks().len()), (8, 3, 3));
/// assert!((net.tau()? - 1.0 / 3f64.sqrt()).abs() < 1e-7);
/// let block = &net.blocks()[0];
/// assert_eq!(block.multiplier().to_vec1::<f32>()?, [net.tau()? as f32]); // the shared τ
/// let biases = block.scalar_biases().unwrap(); // they start at 0
/// assert_eq!(biases.bias1a.to_vec1::<f32>()?, [0.0]);
///
/// let xs = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
/// assert_eq!(net.stem(&xs, false)?.dims(), [2, 16, 32, 32]);
/// let mut states = Vec::new();
/// let mut last = None;
/// let logits = net.forward_hooked(&xs, false, |l, h| {
///     states.push((l, h.dims().to_vec()));
///     last = Some(h.clone());
///     Ok(())
/// })?;
/// let dims: Vec<(usize, Vec<usize>)> = [(0, 16, 32), (1, 16, 32), (2, 32, 16), (3, 64, 8)]
///     .into_iter().map(|(l, c, hw)| (l, vec![2, c, hw, hw])).collect();
/// assert_eq!(states, dims);
/// assert_eq!(logits.dims(), [2, 10]);
/// let head = net.head(&last.unwrap())?;
/// assert_eq!(head.to_vec2::<f32>()?, logits.to_vec2::<f32>()?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CifarResNet {
    cfg: CifarResNetConfig,
    conv1: Tensor,
    bn1: Option<BatchNorm>,
    /// Fixup's scalar biases of the stem (`bias1`) and before the classifier (`bias2`).
    fixup_biases: Option<(Tensor, Tensor)>,
    blocks: Vec<BasicBlock>,
    fc: Linear,
    tau: Tensor,
}

impl CifarResNet {
    /// Builds the network from `vb` (PyTorch names, see the crate docs).
    /// See the [example](CifarResNet#example).
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    pub fn new(cfg: &CifarResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let tau = tau_tensor(
            cfg.learnable_tau && cfg.scaling == Scaling::Tau,
            cfg.tau_init(),
            &vb,
        )?;
        let conv1 = vb.get((16, cfg.in_channels, 3, 3), "conv1.weight")?;
        let bn1 = match cfg.norm {
            Norm::BatchNorm => Some(candle_nn::batch_norm(16, bn_config(), vb.pp("bn1"))?),
            Norm::None => None,
        };
        let fixup_biases = match cfg.scaling {
            Scaling::Fixup => Some((vb.get(1, "bias1")?, vb.get(1, "bias2")?)),
            _ => None,
        };
        let mut blocks = Vec::with_capacity(cfg.n_blocks());
        let mut c_in = 16;
        for (s, &c_out) in CIFAR_WIDTHS.iter().enumerate() {
            let vb_layer = vb.pp(format!("layer{}", s + 1));
            for b in 0..cfg.blocks_per_stage() {
                let (block_in, stride) = if b == 0 && s > 0 {
                    (c_in, 2)
                } else {
                    (c_out, 1)
                };
                blocks.push(BasicBlock::new(
                    block_in,
                    c_out,
                    stride,
                    (cfg.norm, cfg.scaling, cfg.shortcut),
                    tau.clone(),
                    vb_layer.pp(b),
                )?);
            }
            c_in = c_out;
        }
        let fc = linear(64, cfg.num_classes, vb.pp("fc"))?;
        Ok(Self {
            cfg: cfg.clone(),
            conv1,
            bn1,
            fixup_biases,
            blocks,
            fc,
            tau,
        })
    }

    /// The configuration.
    /// See the [example](CifarResNet#example).
    pub fn config(&self) -> &CifarResNetConfig {
        &self.cfg
    }

    /// The residual blocks, stage by stage.
    /// See the [example](CifarResNet#example).
    pub fn blocks(&self) -> &[BasicBlock] {
        &self.blocks
    }

    /// The current τ (the learnable parameter's value, or the resolved rule; 1 for the
    /// schemes other than `tau`, whose per-block multipliers are [`BasicBlock::multiplier`]).
    /// See the [example](CifarResNet#example).
    ///
    /// # Errors
    /// A device error reading the value back.
    pub fn tau(&self) -> Result<f64> {
        tau_value(&self.tau)
    }

    /// L. See the [example](CifarResNet#example).
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The stem: the 3×3 convolution `conv1`, then BatchNorm and ReLU (one fused op), the
    /// ReLU alone, or (Fixup) the scalar bias `bias1` and the ReLU. Its output h_0 is the
    /// first block's input.
    /// See the [example](CifarResNet#example).
    ///
    /// # Shapes
    /// (N, in_channels, H, W) → (N, 16, H, W).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype.
    pub fn stem(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let h = conv2d(xs, &self.conv1, 1, 1)?;
        match (&self.bn1, &self.fixup_biases) {
            (Some(bn), _) => batch_norm_t(bn, &h, train, true),
            (None, Some((bias1, _))) => add_scalar(&h, bias1, true),
            (None, None) => relu(&h),
        }
    }

    /// The head: global average pooling of the last block's output, (Fixup) plus the
    /// scalar bias `bias2`, then the linear layer `fc`: (N, 64, H, W) → (N, num_classes)
    /// logits.
    /// See the [example](CifarResNet#example).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        let pooled = global_avg_pool(h)?;
        match &self.fixup_biases {
            Some((_, bias2)) => self.fc.forward(&pooled.broadcast_add(bias2)?),
            None => self.fc.forward(&pooled),
        }
    }

    /// The forward pass ([`ModuleT::forward_t`] is this with a hook that does nothing),
    /// calling `hook(0, h_0)` with the stem's output and `hook(l, h_l)` with each block's
    /// output, l = 1..=L: a traced forward that sees exactly what the model computes.
    /// See [`crate::Model::forward_hooked`] for an example, and this type's
    /// [example](CifarResNet#example).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype, or the hook's error (which stops the pass).
    pub fn forward_hooked<F>(&self, xs: &Tensor, train: bool, mut hook: F) -> Result<Tensor>
    where
        F: FnMut(usize, &Tensor) -> Result<()>,
    {
        let mut h = self.stem(xs, train)?;
        hook(0, &h)?;
        for (l, block) in self.blocks.iter().enumerate() {
            h = block.forward_t(&h, train)?;
            hook(l + 1, &h)?;
        }
        self.head(&h)
    }
}

impl ModuleT for CifarResNet {
    /// # Shapes
    /// (N, in_channels, H, W) → (N, num_classes) logits.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_hooked(xs, train, |_, _| Ok(()))
    }
}
