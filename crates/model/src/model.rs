//! [`Model`]: any τ-ResNet family behind one type, built from a [`ModelConfig`].

use candle::{Device, ModuleT, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::ModelConfig;
use crate::resnet::{BottleneckResNet, CifarResNet};
use crate::theory::TheoryNet;

/// A built τ-ResNet of any family.
#[derive(Debug, Clone)]
pub enum Model {
    /// The theory network.
    Theory(TheoryNet),
    /// A CIFAR ResNet.
    CifarResNet(CifarResNet),
    /// A bottleneck ResNet.
    BottleneckResNet(BottleneckResNet),
}

impl Model {
    /// Builds the model `cfg` describes from the tensors in `vb` (device and dtype are
    /// `vb`'s).
    ///
    /// A `vb` made by `VarBuilder::from_varmap` *creates* any tensor the `VarMap` lacks
    /// (candle's `get_or_init`), so a partial map silently gets default tensors; use
    /// [`Model::from_varmap`], which checks the map first.
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        Ok(match cfg {
            ModelConfig::Theory(c) => Model::Theory(TheoryNet::new(c, vb)?),
            ModelConfig::CifarResnet(c) => Model::CifarResNet(CifarResNet::new(c, vb)?),
            ModelConfig::BottleneckResnet(c) => {
                Model::BottleneckResNet(BottleneckResNet::new(c, vb)?)
            }
        })
    }

    /// Builds the model `cfg` describes on the tensors of `varmap`, after checking that the
    /// map holds exactly the config's tensors (names, shapes, one float dtype, which is the
    /// model's dtype). The model shares the map's variables: training them trains it.
    ///
    /// # Errors
    /// An invalid config, or a missing, unexpected, misshapen or mistyped tensor, named.
    pub fn from_varmap(cfg: &ModelConfig, varmap: &VarMap, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let dtype = crate::checkpoint::check_varmap(cfg, varmap).map_err(candle::Error::wrap)?;
        Self::new(cfg, VarBuilder::from_varmap(varmap, dtype, device))
    }

    /// The output for a batch: BatchNorm uses batch statistics and updates its running
    /// statistics (in the VarMap) when `train`, and the running statistics otherwise.
    ///
    /// # Shapes
    /// Theory: (n, p) → (n, d). ResNets: (N, C, H, W) → (N, num_classes).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match self {
            Model::Theory(m) => m.forward(xs),
            Model::CifarResNet(m) => m.forward_t(xs, train),
            Model::BottleneckResNet(m) => m.forward_t(xs, train),
        }
    }

    /// The output for a batch, as [`Self::forward_t`], calling `hook(l, h_l)` on the way
    /// with h_0, the stem's output (the first block's input), and then h_l, the output of
    /// the l-th residual block, l = 1, 2, … through the residual chain (its length is the
    /// sum of [`ModelConfig::stage_blocks`]). The hook sees the very tensors the model
    /// computes, so a probe of the hidden states measures the model itself.
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use tau_model::{Model, ModelConfig, init_varmap};
    ///
    /// # fn main() -> candle::Result<()> {
    /// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)
    ///     .map_err(candle::Error::wrap)?;
    /// let dev = Device::Cpu;
    /// let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?, &dev)?;
    /// let xs = Tensor::ones((2, 3, 8, 8), DType::F32, &dev)?;
    /// let mut shapes = Vec::new();
    /// let logits = model.forward_hooked(&xs, false, |l, h| {
    ///     shapes.push((l, h.dims().to_vec()));
    ///     Ok(())
    /// })?;
    /// assert_eq!(shapes[0], (0, vec![2, 16, 8, 8])); // the stem
    /// assert_eq!(shapes[3], (3, vec![2, 64, 2, 2])); // the last of 3 blocks
    /// let same = model.forward_t(&xs, false)?;
    /// assert_eq!(logits.to_vec2::<f32>()?, same.to_vec2::<f32>()?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype, or the hook's error (which stops the pass).
    pub fn forward_hooked<F>(&self, xs: &Tensor, train: bool, hook: F) -> Result<Tensor>
    where
        F: FnMut(usize, &Tensor) -> Result<()>,
    {
        match self {
            Model::Theory(m) => m.forward_hooked(xs, hook),
            Model::CifarResNet(m) => m.forward_hooked(xs, train, hook),
            Model::BottleneckResNet(m) => m.forward_hooked(xs, train, hook),
        }
    }

    /// The current τ (a learnable τ's present value).
    ///
    /// # Errors
    /// A device error reading a learnable τ back.
    pub fn tau(&self) -> Result<f64> {
        match self {
            Model::Theory(m) => Ok(m.tau()),
            Model::CifarResNet(m) => m.tau(),
            Model::BottleneckResNet(m) => m.tau(),
        }
    }

    /// L, the number of residual blocks τ is resolved against.
    pub fn n_blocks(&self) -> usize {
        match self {
            Model::Theory(m) => m.n_blocks(),
            Model::CifarResNet(m) => m.n_blocks(),
            Model::BottleneckResNet(m) => m.n_blocks(),
        }
    }

    /// The theory network, if this is one.
    pub fn as_theory(&self) -> Option<&TheoryNet> {
        match self {
            Model::Theory(m) => Some(m),
            _ => None,
        }
    }
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        Model::forward_t(self, xs, train)
    }
}
