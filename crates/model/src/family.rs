//! The two traits every model family implements, and through which everything else
//! reaches it: [`Family`], implemented by a family's config type (what the network is:
//! its blocks, τ, inputs and outputs, named tensors, how to build it), and [`Network`],
//! implemented by the built network (its forward passes and τ).
//! [`ModelConfig`](crate::ModelConfig) and [`Model`] are enums over the families with one
//! dispatch point each ([`ModelConfig::as_family`](crate::ModelConfig::as_family),
//! [`Model::network`]); their methods, and the code downstream, ask the traits.
//!
//! A family is one file: its config type with `impl Family`, its network with
//! `impl Network` (a candle [`ModuleT`]), registered by one variant and one dispatch arm
//! for each of [`ModelConfig`](crate::ModelConfig) and [`Model`] in
//! [`registry`](crate::registry), and declared by its `mod` line in `lib.rs`: three files
//! in all. Nothing downstream (training, the probe, the CLI) names the families; the
//! doc-example rule of `tests/doc_examples.rs` finds the new file by itself.
//!
//! # Example
//!
//! The same questions of every family, through the traits.
//!
//! ```
//! use candle::{DType, Device, ModuleT, Tensor};
//! use tau_model::family::{Family, Input, LossBackward, LossFn};
//! use tau_model::{Model, ModelConfig, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cases = [
//!     (r#"{"family": "theory", "input_dim": 5, "width": 16, "depth": 9}"#, vec![2, 5]),
//!     (r#"{"family": "cifar_resnet", "depth": 14, "norm": "none"}"#, vec![2, 3, 8, 8]),
//! ];
//! for (json, shape) in cases {
//!     let cfg: ModelConfig = serde_json::from_str(json)?;
//!     let family: &dyn Family = cfg.as_family();
//!     assert_eq!(family.name(), cfg.family());
//!     // What the inputs are: vectors of input_dim features, or images of C channels.
//!     match family.input() {
//!         Input::Vectors { dim } => assert_eq!([dim], shape[1..]),
//!         Input::Images { channels } => assert_eq!(channels, shape[1]),
//!     }
//!     // Built through the family, run through the network.
//!     let varmap = init_varmap(&cfg, 0, DType::F32, &dev)?;
//!     let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//!     let model: Model = family.build(vb)?;
//!     let xs = Tensor::ones(shape, DType::F32, &dev)?;
//!     let ys = model.network().forward_t(&xs, false)?;
//!     assert_eq!(ys.dims(), [2, family.num_outputs()]);
//!     assert_eq!(model.network().n_blocks(), family.n_blocks());
//!     // Only the theory network has a backward pass of its own; the ResNets use autograd.
//!     let loss: LossFn = Box::new(|ys: &Tensor| ys.sqr()?.sum_all());
//!     let own: Option<LossBackward> = model.network().loss_backward(&xs, loss)?;
//!     assert_eq!(own.is_some(), !family.is_classifier());
//! }
//! // A family's own settings change through the trait too.
//! let mut cfg: ModelConfig =
//!     serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 20}"#)?;
//! cfg.as_family_mut().set_tau_rule("1/L".parse()?);
//! assert_eq!(cfg.tau_init(), 1.0 / 9.0);
//! assert_eq!(cfg.as_family().summary(), "CIFAR ResNet-20 (BatchNorm)");
//! # Ok(()) }
//! ```

use std::any::Any;
use std::fmt::Debug;

use candle::backprop::GradStore;
use candle::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::Model;
use crate::params::{ParamKind, ParamSpec};
use crate::preprocess::Preprocessing;
use crate::resnet::Scaling;
use crate::tau::TauRule;

/// What a family's network takes as input.
///
/// # Example
///
/// ```
/// use tau_model::ModelConfig;
/// use tau_model::family::Input;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let theory: ModelConfig = serde_json::from_str(r#"{"family": "theory", "input_dim": 7}"#)?;
/// assert_eq!(theory.as_family().input(), Input::Vectors { dim: 7 });
/// assert_eq!(theory.in_channels(), None);
/// let resnet: ModelConfig = serde_json::from_str(r#"{"family": "bottleneck_resnet"}"#)?;
/// assert_eq!(resnet.as_family().input(), Input::Images { channels: 3 });
/// assert_eq!(Input::Images { channels: 3 }.channels(), Some(3));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// Batches of vectors, shape (n, dim).
    Vectors {
        /// The features per example.
        dim: usize,
    },
    /// Batches of images, shape (N, channels, H, W), of any height and width.
    Images {
        /// The channels per image.
        channels: usize,
    },
}

impl Input {
    /// The channels of image inputs; `None` for vectors. See the [example](Input#example).
    pub fn channels(self) -> Option<usize> {
        match self {
            Input::Vectors { .. } => None,
            Input::Images { channels } => Some(channels),
        }
    }
}

/// A model family, implemented by its config type: every per-family property that
/// [`ModelConfig`](crate::ModelConfig)'s methods and the code downstream ask of a config.
/// See the [module example](self#example).
pub trait Family: Any + Debug {
    /// The family's name, as in the `family` tag (`cifar_resnet`).
    fn name(&self) -> &'static str;

    /// The `depth` setting (layers for the ResNets, residual blocks for the theory
    /// network).
    fn depth(&self) -> usize;

    /// L, the number of residual blocks τ is resolved against.
    fn n_blocks(&self) -> usize;

    /// The number of residual blocks in each stage, in order (see
    /// [`ModelConfig::stage_blocks`](crate::ModelConfig::stage_blocks)).
    fn stage_blocks(&self) -> Vec<usize>;

    /// The τ rule.
    fn tau_rule(&self) -> TauRule;

    /// Replaces the τ rule (what a probe of several rules does to one config).
    fn set_tau_rule(&mut self, rule: TauRule);

    /// τ at initialization: by default the rule resolved at L = [`Self::n_blocks`].
    fn tau_init(&self) -> f64 {
        self.tau_rule().resolve(self.n_blocks())
    }

    /// How the residual branches are scaled (by default [`Scaling::Tau`]).
    fn scaling(&self) -> Scaling {
        Scaling::Tau
    }

    /// Whether τ is a learnable parameter named `tau` (by default not).
    fn learnable_tau(&self) -> bool {
        false
    }

    /// What the network takes as input.
    fn input(&self) -> Input;

    /// The number of outputs (classes, or target dimensions).
    fn num_outputs(&self) -> usize;

    /// Whether the outputs are class logits (by default yes); `false` for a network that
    /// regresses real-valued targets, whose default loss is the squared error.
    fn is_classifier(&self) -> bool {
        true
    }

    /// Checks the family's own settings
    /// ([`ModelConfig::validate`](crate::ModelConfig::validate) adds the checks common to
    /// every family).
    ///
    /// # Errors
    /// One message naming the bad setting.
    fn validate(&self) -> Result<()>;

    /// Every named tensor, in the order [`crate::init_varmap`] draws them. Assumes a
    /// validated config.
    fn param_specs(&self) -> Vec<ParamSpec>;

    /// How an optimizer treats the tensor `name`
    /// ([`ModelConfig::param_kind`](crate::ModelConfig::param_kind) has already answered
    /// for `*.num_batches_tracked`); names the model does not own are
    /// [`ParamKind::Buffer`].
    fn param_kind(&self, name: &str) -> ParamKind;

    /// A short name for tables (`CIFAR ResNet-20 (BatchNorm)`).
    fn summary(&self) -> String;

    /// A one-line description for a model card, starting lower case (`a CIFAR ResNet-20
    /// (BatchNorm, option-A shortcut, 3 input channels, 10 classes)`).
    fn description(&self) -> String;

    /// The image side a probe of the family uses when none is given; `None` for a family
    /// that takes vectors.
    fn probe_image_size(&self) -> Option<usize>;

    /// The preprocessing a checkpoint that records none is assumed to have been trained
    /// with; `None` for a family that takes vectors.
    fn default_preprocessing(&self) -> Option<Preprocessing>;

    /// Builds the network from the tensors in `vb` (see [`Model::new`], which validates
    /// the config first).
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    fn build(&self, vb: VarBuilder) -> Result<Model>;
}

/// The output, the loss and its gradients of one forward and backward pass
/// ([`Network::loss_backward`]).
///
/// # Example
///
/// See [`crate::TheoryNet::loss_backward`]'s, and the [module example](self#example).
pub type LossBackward = (Tensor, Tensor, GradStore);

/// A loss of the network's output, as [`Network::loss_backward`] takes it (a boxed
/// closure, so that the trait can be a `dyn Network`).
///
/// # Example
///
/// See the [module example](self#example).
pub type LossFn<'a> = Box<dyn FnOnce(&Tensor) -> Result<Tensor> + 'a>;

/// A built network of any family, a candle [`ModuleT`]: what [`Model`]'s methods run.
/// See the [module example](self#example).
pub trait Network: ModuleT + Any + Debug {
    /// The output for a batch, calling `hook(l, h_l)` with the stem's output (l = 0) and
    /// each residual block's (see [`Model::forward_hooked`]).
    ///
    /// # Errors
    /// Inputs of the wrong shape or dtype, or the hook's error (which stops the pass).
    fn forward_hooked(
        &self,
        xs: &Tensor,
        train: bool,
        hook: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor>;

    /// The current τ (a learnable τ's present value).
    ///
    /// # Errors
    /// A device error reading a learnable τ back.
    fn tau(&self) -> Result<f64>;

    /// L, the number of residual blocks τ is resolved against.
    fn n_blocks(&self) -> usize;

    /// The output, the loss and its gradients in one call where the network has a faster
    /// way than autograd (see [`Model::loss_backward`]); by default `None`.
    ///
    /// # Errors
    /// Wrong input shape or dtype, the loss closure's error, or a device error.
    fn loss_backward(&self, xs: &Tensor, loss: LossFn<'_>) -> Result<Option<LossBackward>> {
        let _ = (xs, loss);
        Ok(None)
    }
}
