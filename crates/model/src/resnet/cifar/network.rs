//! The CIFAR ResNet built from its config (see [`super`]): the [`BasicBlock`]s, with their
//! shortcuts and branch multipliers, and the [`CifarResNet`] that chains them between the
//! stem and the head.
//!
//! # Example
//!
//! A ResNet-8 with BatchNorm and the `conv_bn` shortcut: its three blocks share τ, have
//! no scalar biases, and the two that enter a new stage halve the resolution.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use tau_model::{CifarResNet, CifarResNetConfig, ModelConfig, Shortcut, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg = CifarResNetConfig { depth: 8, shortcut: Shortcut::ConvBn, ..Default::default() };
//! let varmap = init_varmap(&ModelConfig::CifarResnet(cfg.clone()), 0, DType::F32, &dev)?;
//! let net = CifarResNet::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
//! let tau = net.tau()? as f32; // 1/√3
//! for block in net.blocks() {
//!     assert!(block.scalar_biases().is_none());
//!     assert_eq!(block.multiplier().to_vec1::<f32>()?, [tau]);
//! }
//! let xs = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
//! let mut dims = Vec::new();
//! let logits = net.forward_hooked(&xs, true, |_, h| {
//!     dims.push(h.dims()[1..].to_vec()); // channels, height, width
//!     Ok(())
//! })?;
//! assert_eq!(dims, [[16, 32, 32], [16, 32, 32], [32, 16, 16], [64, 8, 8]]);
//! assert_eq!(logits.dims(), [2, 10]);
//! # Ok(()) }
//! ```

use super::*;

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

/// The CIFAR ResNets as a [`Network`]: [`CifarResNet::forward_hooked`] and the shared
/// τ. See the [module example](crate::family#example).
impl Network for CifarResNet {
    fn forward_hooked(
        &self,
        xs: &Tensor,
        train: bool,
        hook: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        CifarResNet::forward_hooked(self, xs, train, hook)
    }

    fn tau(&self) -> Result<f64> {
        CifarResNet::tau(self)
    }

    fn n_blocks(&self) -> usize {
        CifarResNet::n_blocks(self)
    }
}
