//! Convolutional τ-ResNets: the CIFAR ResNets of He et al. (2016) (depth 6n+2, basic
//! blocks, option-A shortcut) and the ImageNet bottleneck ResNets 50/101/152, each with
//! BatchNorm (τ × the last BN's output) or without normalization (Fixup-style scalar
//! biases and one shared τ), as in PAPER.md and the paper's companion code.
//!
//! Every convolution goes through [`tau_kernels::conv2d`]. Parameter names are PyTorch's
//! (`state_dict` keys of torchvision and of the companion code); see the crate docs.

use candle::{DType, Device, Module, ModuleT, Result, Tensor};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::config::{ParamInit, ParamKind, ParamSpec, check_size};
use crate::tau::TauRule;
use tau_kernels::{
    add_scalar, batch_norm_block, batch_norm_residual_relu, batch_norm_t, conv2d, conv2d_shifted,
    global_avg_pool, relu, residual_relu, scalar_bias_block,
};
pub use tau_kernels::{max_pool_3x3_s2, subsample2};

/// Normalization inside the residual blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Norm {
    /// BatchNorm after every convolution; τ multiplies the last BN's output.
    #[default]
    BatchNorm,
    /// No normalization: Fixup-style scalar biases around the convolutions.
    None,
}

/// Largest CIFAR ResNet depth accepted (ResNet-1202 is the largest in the paper).
const MAX_CIFAR_DEPTH: usize = 60_002;
/// Largest input-channel and class counts accepted.
const MAX_CHANNELS: usize = 1 << 16;
const MAX_CLASSES: usize = 1 << 20;

/// BatchNorm settings of PyTorch's `BatchNorm2d` defaults.
fn bn_config() -> BatchNormConfig {
    BatchNormConfig {
        eps: 1e-5,
        remove_mean: true,
        affine: true,
        momentum: 0.1,
    }
}

fn check_common(what: &str, tau: &TauRule, in_channels: usize, num_classes: usize) -> Result<()> {
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
fn bn_specs(specs: &mut Vec<ParamSpec>, prefix: &str, c: usize) {
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
fn conv_spec(specs: &mut Vec<ParamSpec>, name: String, c_out: usize, c_in: usize, k: usize) {
    let std = (2.0 / (k * k * c_out) as f64).sqrt();
    specs.push(ParamSpec::new(
        name,
        vec![c_out, c_in, k, k],
        ParamInit::Normal { std },
        ParamKind::Weight,
    ));
}

fn scalar_bias_spec(specs: &mut Vec<ParamSpec>, name: String) {
    specs.push(ParamSpec::new(
        name,
        vec![1],
        ParamInit::Const(0.0),
        ParamKind::ScalarBias,
    ));
}

/// The linear head, PyTorch's default `nn.Linear` init: U(−1/√fan_in, 1/√fan_in).
fn fc_specs(specs: &mut Vec<ParamSpec>, c_in: usize, classes: usize) {
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

fn tau_spec(specs: &mut Vec<ParamSpec>, learnable: bool, tau: f64) {
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
fn tau_tensor(learnable: bool, tau: f64, vb: &VarBuilder) -> Result<Tensor> {
    if learnable {
        vb.get(1, "tau")
    } else {
        Tensor::new(&[tau], &Device::Cpu)?
            .to_dtype(vb.dtype())?
            .to_device(vb.device())
    }
}

fn tau_value(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?
        .flatten_all()?
        .get(0)?
        .to_scalar::<f64>()
}

fn linear(c_in: usize, classes: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((classes, c_in), "weight")?;
    let b = vb.get(classes, "bias")?;
    Ok(Linear::new(w, Some(b)))
}

// ---------------------------------------------------------------------------------------
// CIFAR ResNets
// ---------------------------------------------------------------------------------------

/// A CIFAR ResNet of depth 6n+2: a 3×3 stem with 16 channels, three stages of n basic
/// blocks at 16/32/64 channels (stride 2 entering stages 2 and 3), global average pool,
/// a linear head. L = 3n.
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
            in_channels: 3,
            num_classes: 10,
        }
    }
}

const CIFAR_WIDTHS: [usize; 3] = [16, 32, 64];

impl CifarResNetConfig {
    /// n, the number of blocks per stage.
    pub fn blocks_per_stage(&self) -> usize {
        self.depth.saturating_sub(2) / 6
    }

    /// L = 3n.
    pub fn n_blocks(&self) -> usize {
        3 * self.blocks_per_stage()
    }

    /// Checks the depth (6n+2, n ≥ 1), channels, classes and τ.
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
        let per_block = 2 * 9 * 64 * 64 + 4 * 64;
        check_size(
            "cifar_resnet",
            (self.n_blocks() as u128) * per_block
                + (self.num_classes as u128 + 1) * 64
                + self.in_channels as u128 * 16 * 9,
        )
    }

    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
        let n = self.blocks_per_stage();
        let bn = self.norm == Norm::BatchNorm;
        let mut specs = Vec::new();
        conv_spec(&mut specs, "conv1.weight".into(), 16, self.in_channels, 3);
        if bn {
            bn_specs(&mut specs, "bn1", 16);
        }
        let mut c_in = 16;
        for (s, &c_out) in CIFAR_WIDTHS.iter().enumerate() {
            for b in 0..n {
                let p = format!("layer{}.{b}", s + 1);
                let block_in = if b == 0 { c_in } else { c_out };
                if !bn {
                    scalar_bias_spec(&mut specs, format!("{p}.bias1a"));
                }
                conv_spec(&mut specs, format!("{p}.conv1.weight"), c_out, block_in, 3);
                if bn {
                    bn_specs(&mut specs, &format!("{p}.bn1"), c_out);
                } else {
                    scalar_bias_spec(&mut specs, format!("{p}.bias1b"));
                    scalar_bias_spec(&mut specs, format!("{p}.bias2a"));
                }
                conv_spec(&mut specs, format!("{p}.conv2.weight"), c_out, c_out, 3);
                if bn {
                    bn_specs(&mut specs, &format!("{p}.bn2"), c_out);
                } else {
                    scalar_bias_spec(&mut specs, format!("{p}.bias2b"));
                }
            }
            c_in = c_out;
        }
        fc_specs(&mut specs, 64, self.num_classes);
        tau_spec(
            &mut specs,
            self.learnable_tau,
            self.tau.resolve(self.n_blocks()),
        );
        specs
    }
}

/// The Fixup-style scalar biases of a block without normalization.
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

/// A basic block: two 3×3 convolutions on the residual branch, scaled by τ.
#[derive(Debug, Clone)]
pub struct BasicBlock {
    conv1: Tensor,
    conv2: Tensor,
    /// `Some((bn1, bn2))` with BatchNorm.
    bns: Option<(BatchNorm, BatchNorm)>,
    /// `Some` without normalization.
    biases: Option<ScalarBiases>,
    /// τ, a one-element tensor (shared with every block; the `tau` parameter if learnable).
    tau: Tensor,
    stride: usize,
}

impl BasicBlock {
    fn new(
        c_in: usize,
        c_out: usize,
        stride: usize,
        norm: Norm,
        tau: Tensor,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv1 = vb.get((c_out, c_in, 3, 3), "conv1.weight")?;
        let conv2 = vb.get((c_out, c_out, 3, 3), "conv2.weight")?;
        let (bns, biases) = match norm {
            Norm::BatchNorm => (
                Some((
                    candle_nn::batch_norm(c_out, bn_config(), vb.pp("bn1"))?,
                    candle_nn::batch_norm(c_out, bn_config(), vb.pp("bn2"))?,
                )),
                None,
            ),
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
        Ok(Self {
            conv1,
            conv2,
            bns,
            biases,
            tau,
            stride,
        })
    }

    /// The scalar biases (without normalization).
    pub fn scalar_biases(&self) -> Option<&ScalarBiases> {
        self.biases.as_ref()
    }
}

impl ModuleT for BasicBlock {
    /// relu(τ · branch(x) + shortcut(x)).
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        // The whole block is one op (one graph node) where the CPU kernels apply, the
        // composition of the per-layer ops elsewhere.
        match (&self.bns, &self.biases) {
            (Some((bn1, bn2)), _) => batch_norm_block(
                xs,
                (&self.conv1, bn1),
                (&self.conv2, bn2),
                &self.tau,
                self.stride,
                train,
            ),
            (None, Some(b)) => scalar_bias_block(
                xs,
                &self.conv1,
                &self.conv2,
                [&b.bias1a, &b.bias1b, &b.bias2a, &b.bias2b],
                &self.tau,
                self.stride,
            ),
            (None, None) => candle::bail!("basic block without BatchNorm or scalar biases"),
        }
    }
}

/// A CIFAR ResNet (see [`CifarResNetConfig`]).
#[derive(Debug, Clone)]
pub struct CifarResNet {
    cfg: CifarResNetConfig,
    conv1: Tensor,
    bn1: Option<BatchNorm>,
    blocks: Vec<BasicBlock>,
    fc: Linear,
    tau: Tensor,
}

impl CifarResNet {
    /// Builds the network from `vb` (PyTorch names, see the crate docs).
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    pub fn new(cfg: &CifarResNetConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let tau = tau_tensor(cfg.learnable_tau, cfg.tau.resolve(cfg.n_blocks()), &vb)?;
        let conv1 = vb.get((16, cfg.in_channels, 3, 3), "conv1.weight")?;
        let bn1 = match cfg.norm {
            Norm::BatchNorm => Some(candle_nn::batch_norm(16, bn_config(), vb.pp("bn1"))?),
            Norm::None => None,
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
                    cfg.norm,
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
            blocks,
            fc,
            tau,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &CifarResNetConfig {
        &self.cfg
    }

    /// The residual blocks, stage by stage.
    pub fn blocks(&self) -> &[BasicBlock] {
        &self.blocks
    }

    /// The current τ (the learnable parameter's value, or the resolved rule).
    ///
    /// # Errors
    /// A device error reading the value back.
    pub fn tau(&self) -> Result<f64> {
        tau_value(&self.tau)
    }

    /// L.
    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }
}

impl ModuleT for CifarResNet {
    /// # Shapes
    /// (N, in_channels, H, W) → (N, num_classes) logits.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = conv2d(xs, &self.conv1, 1, 1)?;
        h = match &self.bn1 {
            Some(bn) => batch_norm_t(bn, &h, train, true)?,
            None => relu(&h)?,
        };
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        self.fc.forward(&global_avg_pool(&h)?)
    }
}

// ---------------------------------------------------------------------------------------
// Bottleneck ResNets
// ---------------------------------------------------------------------------------------

/// An ImageNet bottleneck ResNet (torchvision v1.5 layout: stride on the 3×3 convolution,
/// projection shortcut conv1×1 + BN when the shape changes). L = the largest number of
/// blocks in one stage (ResNet-101: 23).
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
            in_channels: 3,
            num_classes: 1000,
        }
    }
}

const BOTTLENECK_PLANES: [usize; 4] = [64, 128, 256, 512];
const EXPANSION: usize = 4;

impl BottleneckResNetConfig {
    /// Blocks per stage: [3, 4, 6, 3], [3, 4, 23, 3] or [3, 8, 36, 3]; empty for other depths.
    pub fn stage_blocks(&self) -> &'static [usize] {
        match self.depth {
            50 => &[3, 4, 6, 3],
            101 => &[3, 4, 23, 3],
            152 => &[3, 8, 36, 3],
            _ => &[],
        }
    }

    /// L, the largest number of blocks in one stage.
    pub fn n_blocks(&self) -> usize {
        self.stage_blocks().iter().copied().max().unwrap_or(0)
    }

    /// Checks depth, channels, classes and τ.
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

/// A bottleneck block: 1×1, 3×3 (with the stride), 1×1 ×4 channels, scaled by τ.
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
    pub fn config(&self) -> &BottleneckResNetConfig {
        &self.cfg
    }

    /// The residual blocks, stage by stage.
    pub fn blocks(&self) -> &[BottleneckBlock] {
        &self.blocks
    }

    /// The current τ.
    ///
    /// # Errors
    /// A device error reading the value back.
    pub fn tau(&self) -> Result<f64> {
        tau_value(&self.tau)
    }

    /// L, the largest number of blocks in one stage.
    pub fn n_blocks(&self) -> usize {
        self.cfg.n_blocks()
    }
}

impl ModuleT for BottleneckResNet {
    /// # Shapes
    /// (N, in_channels, H, W) → (N, num_classes) logits.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = conv2d(xs, &self.conv1, 2, 3)?;
        if let Some(bn) = &self.bn1 {
            h = batch_norm_t(bn, &h, train, false)?;
        }
        h = max_pool_3x3_s2(&relu(&h)?)?;
        for block in &self.blocks {
            h = block.forward_t(&h, train)?;
        }
        self.fc.forward(&global_avg_pool(&h)?)
    }
}

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
