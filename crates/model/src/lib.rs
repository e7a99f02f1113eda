//! τ-ResNets in candle: the paper's theory network, CIFAR ResNets with and without
//! BatchNorm, and ImageNet bottleneck ResNets, each with its residual branch scaled by τ
//! (Zhang et al., "Stabilize Deep ResNet with A Sharp Scaling Factor τ", 2022).
//!
//! # The story in ten lines
//!
//! Build a τ-ResNet from a JSON config, run it on a batch, take one SGD step (τ and the
//! scalar biases at lr/10, as the paper trains them), save it, load it back with
//! [`hub::from_pretrained`] and get the same logits. The crate's
//! [`examples/use-tau-model`](https://github.com/tau-resnet/tau-resnet/tree/main/examples/use-tau-model)
//! is the same story at full length, including a load from a Hugging Face hub cache.
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use candle_nn::{Optimizer, SGD};
//! use tau_model::{Model, ModelConfig, ParamKind, init_varmap, named_vars};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let (dev, ckpt) = (Device::Cpu, dir.path().join("ckpt"));
//! let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8,
//!     "norm": "none", "tau": "1/sqrt(L)", "learnable_tau": true}"#)?;
//! let varmap = init_varmap(&cfg, /* seed */ 42, DType::F32, &dev)?;
//! let model = Model::from_varmap(&cfg, &varmap, &dev)?;
//! let (xs, ys) = (Tensor::randn(0f32, 1.0, (4, 3, 32, 32), &dev)?, Tensor::new(&[0u32, 1, 2, 3], &dev)?);
//! let (slow, main): (Vec<_>, Vec<_>) = named_vars(&varmap).into_iter()
//!     .filter(|(name, _)| cfg.param_kind(name).is_trainable())
//!     .partition(|(name, _)| matches!(cfg.param_kind(name), ParamKind::Tau | ParamKind::ScalarBias));
//! let grads = candle_nn::loss::cross_entropy(&model.forward_t(&xs, true)?, &ys)?.backward()?;
//! SGD::new(main.into_iter().map(|(_, v)| v).collect(), 0.1)?.step(&grads)?;
//! SGD::new(slow.into_iter().map(|(_, v)| v).collect(), 0.01)?.step(&grads)?;
//! tau_model::checkpoint::save(&ckpt, &cfg, &varmap)?;
//! let (cfg2, varmap2) = tau_model::hub::from_pretrained(ckpt.to_str().unwrap(), None, &dev)?;
//! let reloaded = Model::from_varmap(&cfg2, &varmap2, &dev)?;
//! let diff = (model.forward_t(&xs, false)? - reloaded.forward_t(&xs, false)?)?.abs()?.max_all()?;
//! assert_eq!(diff.to_scalar::<f32>()?, 0.0);
//! # Ok(()) }
//! ```
//!
//! # What is here
//!
//! - [`TauRule`]: τ as a function of the number of residual blocks L, parsed from strings
//!   such as `"1/sqrt(L)"`, `"0.5/sqrt(L)"`, `"L^-0.25"`, `"1/L"` or `"0.136"`.
//! - [`ModelConfig`]: the architecture, a serde enum tagged by `family` (`theory`,
//!   `cifar_resnet`, `bottleneck_resnet`); reads straight from a TOML `[model]` table.
//! - [`init_varmap`]: every parameter and buffer drawn from one seed, bit-identical for
//!   the same seed on any machine (see [`init`] for the exact order).
//! - [`Model`]: the built network, `forward_t(xs, train)`; [`TheoryNet`] adds a traced
//!   forward pass ([`TheoryNet::forward_traced`]) with log-norms of every hidden state
//!   and per-layer gradient norms ([`TheoryNet::layer_grad_norms`]), finite at any depth.
//! - [`checkpoint`]: `config.json` + `model.safetensors` directories, recording the
//!   input's [`preprocess::Preprocessing`], the data set and the class names; [`hub`]: the
//!   same from the Hugging Face hub, cache first, including timm's ResNet repos and bare
//!   torchvision weights ([`timm`]); [`pth`]: PyTorch `.pth` files (`torch.save`'s zip
//!   format) read as a model's tensors, checked name by name against its config.
//! - [`ParamKind`], [`named_vars`]: how an optimizer groups the tensors, by name.
//! - [`Family`], [`Network`]: what every family answers (a config) and runs (a network),
//!   through which everything else reaches it; [`registry`] lists the families.
//! - [`kernels`]: the CPU kernels the models run on (`tau-kernels`, re-exported), with
//!   the one switch between kernel sets.
//!
//! Device and dtype are the caller's (through the `VarBuilder` / `init_varmap`); the CPU
//! always works. Checkpoints and the hub return [`CheckpointError`], `.pth` imports
//! [`pth::PthError`], τ rules
//! [`TauRuleError`]; building and running a model returns `candle::Error`.
//!
//! # The theory network
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use tau_model::{Model, ModelConfig, init_varmap};
//!
//! # fn main() -> candle::Result<()> {
//! let dev = Device::Cpu;
//! // Its norms in log form: no overflow even where ‖h_L‖ would.
//! let cfg = ModelConfig::Theory(tau_model::TheoryConfig {
//!     input_dim: 4, width: 32, depth: 64, tau: "1".parse().map_err(candle::Error::wrap)?,
//!     ..Default::default()
//! });
//! let varmap = init_varmap(&cfg, 0, DType::F32, &dev)?;
//! let model = Model::from_varmap(&cfg, &varmap, &dev)?;
//! let xs = Tensor::ones((3, 4), DType::F32, &dev)?;
//! let trace = model.as_theory().unwrap().forward_traced(&xs)?;
//! assert!(trace.log_mean_ratio().unwrap().is_finite());
//! # Ok(()) }
//! ```
//!
//! # Parameter names
//!
//! Tensors are named like PyTorch `state_dict` keys, so a PyTorch model exported with
//! `safetensors.torch.save_file(model.state_dict(), "model.safetensors")` next to a
//! `config.json` such as `{"family": "cifar_resnet", "depth": 110, "norm": "batch_norm",
//! "tau": "1/sqrt(L)"}` loads with [`checkpoint::load`] (tensors must be float, all of one
//! dtype; integer `*.num_batches_tracked` buffers are accepted and dropped).
//!
//! | family | names |
//! | --- | --- |
//! | `theory` | `input.weight` (A, m×p), `blocks.{l}.weight` (W_{l+1}, m×m, l = 0..L−1), `output.weight` (B, d×m) |
//! | `cifar_resnet`, BN | `conv1.weight`, `bn1.{weight,bias,running_mean,running_var}`, `layer{s}.{b}.conv{1,2}.weight`, `layer{s}.{b}.bn{1,2}.{…}` (s = 1..3, b = 0..n−1), `fc.weight`, `fc.bias` |
//! | `cifar_resnet`, no norm | `conv1.weight`, `layer{s}.{b}.bias{1a,1b,2a,2b}` (shape `[1]`), `layer{s}.{b}.conv{1,2}.weight`, `fc.weight`, `fc.bias` |
//! | `bottleneck_resnet` | torchvision's: `conv1.weight`, `bn1.…`, `layer{s}.{b}.conv{1,2,3}.weight`, `layer{s}.{b}.bn{1,2,3}.…`, `layer{s}.0.downsample.0.weight` (1×1 conv), `layer{s}.0.downsample.1.…` (its BN), `fc.…`; without norm `bias{1,2,3}{a,b}` instead of the BNs and no `downsample.1` |
//! | any ResNet with `learnable_tau` | `tau` (shape `[1]`, shared by all blocks) |
//! | `cifar_resnet`, `"scaling": "fixup"` | the no-norm names, plus `layer{s}.{b}.scale`, `bias1` (stem) and `bias2` (before `fc`), all shape `[1]` |
//! | `cifar_resnet`, `"scaling": "skipinit"` | the BN or no-norm names, plus `layer{s}.{b}.alpha` (shape `[1]`) |
//! | `cifar_resnet`, `"scaling": "rezero"` | `conv1.weight`, `layer{s}.{b}.conv{1,2}.weight`, `layer{s}.{b}.alpha`, `fc.…` (no biases) |
//!
//! The CIFAR shortcut is option A by default (stride-2 subsample, zero channels
//! appended), which has no parameters. With BatchNorm, `"shortcut": "subsample_bn"` (the
//! paper authors' BN model: subsample, BatchNorm over the input channels, zero channels
//! appended) adds `layer{2,3}.0.downsample.1.…`, and `"shortcut": "conv_bn"` (option B: 1×1
//! stride-2 convolution and BatchNorm) adds `layer{2,3}.0.downsample.0.weight` and
//! `layer{2,3}.0.downsample.1.…` (see [`Shortcut`]). [`ModelConfig::param_specs`] lists
//! every name with its shape, and [`ModelConfig::param_kind`] says how an optimizer treats
//! it; [`params::ParamName`] is the one parser of the scheme (block, module, leaf).

pub mod checkpoint;
pub mod config;
pub mod family;
pub mod hub;
pub mod init;
pub mod model;
pub mod params;
pub mod preprocess;
pub mod pth;
pub mod registry;
pub mod resnet;
pub mod tau;
pub mod theory;
pub mod timm;

/// The CPU kernels the models run on (re-exported: [`tau_kernels`]).
pub use tau_kernels as kernels;
/// The allocator policy for CPU training ([`tau_kernels::alloc`]).
pub use tau_kernels::alloc;

pub use checkpoint::{CheckpointConfig, CheckpointError};
pub use config::{ModelConfig, ParamInit, ParamKind, ParamName, ParamSpec};
pub use family::{Family, Network};
pub use init::{init_varmap, named_vars};
pub use model::Model;
pub use preprocess::Preprocessing;
pub use resnet::{
    BottleneckResNet, BottleneckResNetConfig, CifarResNet, CifarResNetConfig, Norm, Scaling,
    Shortcut,
};
pub use tau::{TauRule, TauRuleError};
pub use theory::{TheoryConfig, TheoryNet, TheoryTrace};
