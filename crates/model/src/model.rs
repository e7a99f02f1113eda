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
