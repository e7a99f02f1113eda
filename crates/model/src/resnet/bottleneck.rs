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

    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
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
}

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
