//! The bottleneck ResNet built from its config (see [`super`]): the convolution units,
//! the [`BottleneckBlock`]s with their projection shortcuts, and the [`BottleneckResNet`]
//! that chains them between the stem and the head; as a [`Network`], what
//! [`crate::Model::BottleneckResNet`] runs.
//!
//! # Example
//!
//! A ResNet-50 without normalization on a 32×32 image: the hook sees the stem's output
//! (stride 4) and the 16 blocks of the residual chain, the last at stride 32.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use tau_model::{Model, ModelConfig, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg: ModelConfig = serde_json::from_str(
//!     r#"{"family": "bottleneck_resnet", "depth": 50, "norm": "none", "num_classes": 4}"#,
//! )?;
//! let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?, &dev)?;
//! let xs = Tensor::ones((1, 3, 32, 32), DType::F32, &dev)?;
//! let mut dims = Vec::new();
//! let logits = model.forward_hooked(&xs, false, |_, h| {
//!     dims.push(h.dims().to_vec());
//!     Ok(())
//! })?;
//! assert_eq!(dims.len(), 1 + 16);
//! assert_eq!((dims[0].clone(), dims[16].clone()), (vec![1, 64, 8, 8], vec![1, 2048, 1, 1]));
//! assert_eq!(logits.dims(), [1, 4]);
//! # Ok(()) }
//! ```

use super::*;

/// One normalized or bias-shifted convolution of a bottleneck block.
#[derive(Debug, Clone)]
struct ConvUnit {
    weight: Tensor,
    stride: usize,
    padding: usize,
    bn: Option<BatchNorm>,
    /// (before, after) scalar biases without normalization.
    biases: Option<(Tensor, Tensor)>,
}

impl ConvUnit {
    #[allow(clippy::too_many_arguments)]
    fn new(
        idx: usize,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        norm: Norm,
        vb: &VarBuilder,
    ) -> Result<Self> {
        let weight = vb.get((c_out, c_in, k, k), &format!("conv{idx}.weight"))?;
        let (bn, biases) = match norm {
            Norm::BatchNorm => (
                Some(candle_nn::batch_norm(
                    c_out,
                    bn_config(),
                    vb.pp(format!("bn{idx}")),
                )?),
                None,
            ),
            Norm::None => (
                None,
                Some((
                    vb.get(1, &format!("bias{idx}a"))?,
                    vb.get(1, &format!("bias{idx}b"))?,
                )),
            ),
        };
        Ok(Self {
            weight,
            stride,
            padding: k / 2,
            bn,
            biases,
        })
    }

    /// BN(conv(x)), or conv(x + a) + b; followed by ReLU when `relu` is set.
    fn forward_t(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        match (&self.bn, &self.biases) {
            (Some(bn), _) => batch_norm_t(
                bn,
                &conv2d(xs, &self.weight, self.stride, self.padding)?,
                train,
                relu,
            ),
            (None, Some((a, b))) => add_scalar(
                &conv2d_shifted(xs, a, &self.weight, self.stride, self.padding)?,
                b,
                relu,
            ),
            (None, None) => candle::bail!("convolution unit without BatchNorm or scalar biases"),
        }
    }
}

/// A bottleneck block: 1×1, 3×3 (with the stride), 1×1 ×4 channels, scaled by τ. A
/// [`BottleneckResNet`] holds them ([`BottleneckResNet::blocks`]); see its
/// [example](BottleneckResNet#example).
#[derive(Debug, Clone)]
pub struct BottleneckBlock {
    units: [ConvUnit; 3],
    /// Projection shortcut: conv1×1 (stride) and, with BatchNorm, a BN.
    downsample: Option<(Tensor, Option<BatchNorm>)>,
    stride: usize,
    /// τ, a one-element tensor shared with every block.
    tau: Tensor,
}

impl BottleneckBlock {
    fn new(
        c_in: usize,
        planes: usize,
        stride: usize,
        norm: Norm,
        tau: Tensor,
        vb: VarBuilder,
    ) -> Result<Self> {
        let c_out = planes * EXPANSION;
        let units = [
            ConvUnit::new(1, c_in, planes, 1, 1, norm, &vb)?,
            ConvUnit::new(2, planes, planes, 3, stride, norm, &vb)?,
            ConvUnit::new(3, planes, c_out, 1, 1, norm, &vb)?,
        ];
        let downsample = if stride != 1 || c_in != c_out {
            let w = vb.get((c_out, c_in, 1, 1), "downsample.0.weight")?;
            let bn = match norm {
                Norm::BatchNorm => Some(candle_nn::batch_norm(
                    c_out,
                    bn_config(),
                    vb.pp("downsample.1"),
                )?),
                Norm::None => None,
            };
            Some((w, bn))
        } else {
            None
        };
        Ok(Self {
            units,
            downsample,
            stride,
            tau,
        })
    }
}

impl ModuleT for BottleneckBlock {
    /// relu(τ · branch(x) + shortcut(x)).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let out = self.units[0].forward_t(xs, train, true)?;
        let out = self.units[1].forward_t(&out, train, true)?;
        let shortcut = match &self.downsample {
            None => xs.clone(),
            Some((w, bn)) => {
                let s = conv2d(xs, w, self.stride, 0)?;
                match bn {
                    Some(bn) => batch_norm_t(bn, &s, train, false)?,
                    None => s,
                }
            }
        };
        // The last unit's normalization (BN3, or the bias b3b) joins the residual end: one
        // fused op for BN3 / + b3b, τ, the shortcut and the ReLU.
        let last = &self.units[2];
        match (&last.bn, &last.biases) {
            (Some(bn), _) => batch_norm_residual_relu(
                bn,
                &conv2d(&out, &last.weight, last.stride, last.padding)?,
                train,
                &self.tau,
                &shortcut,
            ),
            (None, Some((a, b))) => residual_relu(
                &conv2d_shifted(&out, a, &last.weight, last.stride, last.padding)?,
                &self.tau,
                Some(b),
                &shortcut,
            ),
            (None, None) => candle::bail!("convolution unit without BatchNorm or scalar biases"),
        }
    }
}

/// A bottleneck ResNet (see [`BottleneckResNetConfig`]).
///
/// # Example
///
/// ResNet-50 on a 32×32 image, with every weight zero (`VarBuilder::zeros`): the shapes
/// are the network's, the logits zero.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::VarBuilder;
/// use tau_model::{BottleneckResNet, BottleneckResNetConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let cfg = BottleneckResNetConfig::default(); // ResNet-50, BatchNorm, τ = 1/√L
/// let net = BottleneckResNet::new(&cfg, VarBuilder::zeros(DType::F32, &dev))?;
/// assert_eq!((net.config().depth, net.n_blocks(), net.blocks().len()), (50, 6, 16));
/// assert!((net.tau()? - 1.0 / 6f64.sqrt()).abs() < 1e-7);
///
/// let xs = Tensor::ones((1, 3, 32, 32), DType::F32, &dev)?;
/// let h0 = net.stem(&xs, false)?; // 7×7 stride 2, then the 3×3 stride-2 max-pool
/// assert_eq!(h0.dims(), [1, 64, 8, 8]);
/// let mut last = Vec::new();
/// let logits = net.forward_hooked(&xs, false, |l, h| {
///     last = vec![l, h.dims()[1], h.dims()[2]];
///     Ok(())
/// })?;
/// assert_eq!(last, [16, 2048, 1]); // block 16 of the chain: 2048 channels at 1×1
/// assert_eq!(logits.dims(), [1, 1000]);
/// let head = net.head(&Tensor::zeros((1, 2048, 1, 1), DType::F32, &dev)?)?;
/// assert_eq!(head.to_vec2::<f32>()?, logits.to_vec2::<f32>()?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct BottleneckResNet {
    cfg: BottleneckResNetConfig,
    conv1: Tensor,
    bn1: Option<BatchNorm>,
    blocks: Vec<BottleneckBlock>,
    fc: Linear,
    tau: Tensor,
}

impl BottleneckResNet {
    /// Builds the network from `vb` (torchvision names).
    /// See the [example](BottleneckResNet#example).
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    pub fn new(cfg: &BottleneckResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let tau = tau_tensor(cfg.learnable_tau, cfg.tau.resolve(cfg.n_blocks()), &vb)?;
        let conv1 = vb.get((64, cfg.in_channels, 7, 7), "conv1.weight")?;
        let bn1 = match cfg.norm {
            Norm::BatchNorm => Some(candle_nn::batch_norm(64, bn_config(), vb.pp("bn1"))?),
            Norm::None => None,
        };
        let mut blocks = Vec::new();
        let mut c_in = 64;
        for (s, (&planes, &n)) in BOTTLENECK_PLANES.iter().zip(cfg.stage_blocks()).enumerate() {
            let vb_layer = vb.pp(format!("layer{}", s + 1));
            for b in 0..n {
                let stride = if b == 0 && s > 0 { 2 } else { 1 };
                let block_in = if b == 0 { c_in } else { planes * EXPANSION };
                blocks.push(BottleneckBlock::new(
                    block_in,
                    planes,
                    stride,
                    cfg.norm,
                    tau.clone(),
                    vb_layer.pp(b),
                )?);
            }
            c_in = planes * EXPANSION;
        }
        let fc = linear(512 * EXPANSION, cfg.num_classes, vb.pp("fc"))?;
        Ok(Self {
            cfg: cfg.clone(),
            conv1,
            bn1,
            blocks,
            fc,
            tau,
        })
    }

    /// The configuration.
    /// See the [example](BottleneckResNet#example).
    pub fn config(&self) -> &BottleneckResNetConfig {
        &self.cfg
    }

    /// The residual blocks, stage by stage.
    /// See the [example](BottleneckResNet#example).
    pub fn blocks(&self) -> &[BottleneckBlock] {
        &self.blocks
    }

    /// The current τ.
    /// See the [example](BottleneckResNet#example).
    ///
    /// # Errors
    /// A device error reading the value back.
    pub fn tau(&self) -> Result<f64> {
        tau_value(&self.tau)
    }

    /// L, the largest number of blocks in one stage.
    /// See the [example](BottleneckResNet#example).
    pub fn n_blocks(&self) -> usize {
        self.cfg.n_blocks()
    }

    /// The stem: the 7×7 stride-2 convolution `conv1`, BatchNorm (if any), ReLU and the
    /// 3×3 stride-2 max-pool. Its output h_0 is the first block's input.
    /// See the [example](BottleneckResNet#example).
    ///
    /// # Shapes
    /// (N, in_channels, H, W) → (N, 64, ⌈H/4⌉, ⌈W/4⌉) (for even H, W).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype.
    pub fn stem(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = conv2d(xs, &self.conv1, 2, 3)?;
        if let Some(bn) = &self.bn1 {
            h = batch_norm_t(bn, &h, train, false)?;
        }
        max_pool_3x3_s2(&relu(&h)?)
    }

    /// The head: global average pooling of the last block's output, then the linear
    /// layer `fc`: (N, 2048, H, W) → (N, num_classes) logits.
    /// See the [example](BottleneckResNet#example).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype.
    pub fn head(&self, h: &Tensor) -> Result<Tensor> {
        self.fc.forward(&global_avg_pool(h)?)
    }

    /// The forward pass ([`ModuleT::forward_t`] is this with a hook that does nothing),
    /// calling `hook(0, h_0)` with the stem's output and `hook(l, h_l)` with the output
    /// of each block of the residual chain, stage after stage: l = 1..=Σ
    /// [`BottleneckResNetConfig::stage_blocks`] (16 for ResNet-50, more than L). See
    /// [`crate::Model::forward_hooked`] for an example, and this type's
    /// [example](BottleneckResNet#example).
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

impl ModuleT for BottleneckResNet {
    /// # Shapes
    /// (N, in_channels, H, W) → (N, num_classes) logits.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_hooked(xs, train, |_, _| Ok(()))
    }
}

/// The bottleneck ResNets as a [`Network`]: [`BottleneckResNet::forward_hooked`] and
/// the shared τ. See the [module example](crate::family#example).
impl Network for BottleneckResNet {
    fn forward_hooked(
        &self,
        xs: &Tensor,
        train: bool,
        hook: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        BottleneckResNet::forward_hooked(self, xs, train, hook)
    }

    fn tau(&self) -> Result<f64> {
        BottleneckResNet::tau(self)
    }

    fn n_blocks(&self) -> usize {
        BottleneckResNet::n_blocks(self)
    }
}
