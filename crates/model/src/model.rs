//! [`Model`]: any τ-ResNet family behind one type, built from a [`ModelConfig`].
//!
//! # Example
//!
//! The same code builds and runs every family; [`Model`] is a candle [`ModuleT`].
//!
//! ```
//! use candle::{DType, Device, ModuleT, Tensor};
//! use tau_model::{Model, ModelConfig, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cases = [
//!     (r#"{"family": "theory", "input_dim": 5, "width": 16, "depth": 9}"#, vec![2, 5], [2, 1]),
//!     (r#"{"family": "cifar_resnet", "depth": 14}"#, vec![2, 3, 8, 8], [2, 10]),
//! ];
//! for (json, input, output) in cases {
//!     let cfg: ModelConfig = serde_json::from_str(json)?;
//!     let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 7, DType::F32, &dev)?, &dev)?;
//!     let ys = ModuleT::forward_t(&model, &Tensor::ones(input, DType::F32, &dev)?, false)?;
//!     assert_eq!(ys.dims(), output);
//!     // Depth 9 for the theory network and 6·2 + 2 for the CIFAR ResNet: L = 9 and 6.
//!     assert_eq!(model.n_blocks(), cfg.n_blocks());
//!     // τ = 1/√L (a ResNet holds it as an f32 tensor).
//!     assert!((model.tau()? - 1.0 / (cfg.n_blocks() as f64).sqrt()).abs() < 1e-7);
//! }
//! # Ok(()) }
//! ```

use std::any::Any;

use candle::{Device, ModuleT, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::ModelConfig;
use crate::family::LossBackward;
pub use crate::registry::Model;
use crate::theory::TheoryNet;

impl Model {
    /// Builds the model `cfg` describes from the tensors in `vb` (device and dtype are
    /// `vb`'s). See the [example](Model#example).
    ///
    /// A `vb` made by `VarBuilder::from_varmap` *creates* any tensor the `VarMap` lacks
    /// (candle's `get_or_init`), so a partial map silently gets default tensors; use
    /// [`Model::from_varmap`], which checks the map first.
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        cfg.as_family().build(vb)
    }

    /// Builds the model `cfg` describes on the tensors of `varmap`, after checking that the
    /// map holds exactly the config's tensors (names, shapes, one float dtype, which is the
    /// model's dtype). The model shares the map's variables: training them trains it.
    /// See the [example](Model#example).
    ///
    /// # Errors
    /// An invalid config, or a missing, unexpected, misshapen or mistyped tensor, named.
    pub fn from_varmap(cfg: &ModelConfig, varmap: &VarMap, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let dtype = crate::checkpoint::check_varmap(cfg, varmap).map_err(candle::Error::wrap)?;
        Self::new(cfg, VarBuilder::from_varmap(varmap, dtype, device))
    }

    /// The model `cfg` describes on detached views of the tensors of `varmap` (the same
    /// storage, so later training shows in it; BatchNorm's running statistics are the
    /// exception, copied as they are now): its forward pass in evaluation mode builds no
    /// autograd graph on the CPU's fused kernels, so each activation is freed once the next
    /// is computed, where the graph of [`Model::from_varmap`]'s model (whose weights are
    /// variables) keeps them all until the output is dropped. (candle-nn's own BatchNorm,
    /// which runs on other devices and under `TAU_KERNELS=candle`, keeps its running
    /// statistics as variables, and with them a graph.) The same outputs, bit for bit; no
    /// gradients for the weights. For evaluation and prediction.
    ///
    /// ```
    /// # use candle::{DType, Device, ModuleT, Tensor};
    /// # use tau_model::{Model, ModelConfig, init_varmap};
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
    /// let varmap = init_varmap(&cfg, 0, DType::F32, &Device::Cpu)?;
    /// let xs = Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
    /// let trained = Model::from_varmap(&cfg, &varmap, &Device::Cpu)?.forward_t(&xs, false)?;
    /// let inference = Model::inference(&cfg, &varmap, &Device::Cpu)?.forward_t(&xs, false)?;
    /// assert_eq!((trained - &inference)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`Model::from_varmap`].
    pub fn inference(cfg: &ModelConfig, varmap: &VarMap, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let dtype = crate::checkpoint::check_varmap(cfg, varmap).map_err(candle::Error::wrap)?;
        let tensors = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("the VarMap's lock is poisoned".into()))?
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
            .collect();
        Self::new(cfg, VarBuilder::from_tensors(tensors, dtype, device))
    }

    /// The output for a batch: BatchNorm uses batch statistics and updates its running
    /// statistics (in the VarMap) when `train`, and the running statistics otherwise.
    /// See the [example](Model#example).
    ///
    /// # Shapes
    /// Theory: (n, p) → (n, d). ResNets: (N, C, H, W) → (N, num_classes).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.network().forward_t(xs, train)
    }

    /// A training step's forward and backward pass in one call, where the model has a
    /// faster way than `loss(forward_t(xs, true)).backward()`: the output, the loss and its
    /// gradients (the same values). `None` where it has none (the ResNets: use autograd).
    /// The theory network's is [`TheoryNet::loss_backward`], whose doc-test compares it
    /// with autograd; the network itself is built as in its [example](TheoryNet#example).
    ///
    /// # Errors
    /// Wrong input shape or dtype, the loss closure's error, or a device error.
    pub fn loss_backward<F>(&self, xs: &Tensor, loss: F) -> Result<Option<LossBackward>>
    where
        F: FnOnce(&Tensor) -> Result<Tensor>,
    {
        self.network().loss_backward(xs, Box::new(loss))
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
    pub fn forward_hooked<F>(&self, xs: &Tensor, train: bool, mut hook: F) -> Result<Tensor>
    where
        F: FnMut(usize, &Tensor) -> Result<()>,
    {
        self.network().forward_hooked(xs, train, &mut hook)
    }

    /// The current τ (a learnable τ's present value). See the [example](Model#example).
    ///
    /// # Errors
    /// A device error reading a learnable τ back.
    pub fn tau(&self) -> Result<f64> {
        self.network().tau()
    }

    /// L, the number of residual blocks τ is resolved against. See the
    /// [example](Model#example).
    pub fn n_blocks(&self) -> usize {
        self.network().n_blocks()
    }

    /// The theory network, if this is one. See the [example](Model#example).
    pub fn as_theory(&self) -> Option<&TheoryNet> {
        (self.network() as &dyn Any).downcast_ref()
    }
}

impl ModuleT for Model {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        Model::forward_t(self, xs, train)
    }
}
