//! The vocabulary every model family describes its tensors with: a name's kind (how an
//! optimizer treats it), how it is initialized, its shape; the one parser of the names
//! ([`ParamName`]); and the size guard. A leaf module: the families and [`crate::config`]
//! depend on it, it depends on none of them.
//!
//! # Example
//!
//! Every tensor of a CIFAR ResNet-8 without normalization and with a learnable τ, as its
//! config lists them: name, shape, initialization and kind.
//!
//! ```
//! use tau_model::params::{ParamInit, ParamKind, ParamName};
//! use tau_model::ModelConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg: ModelConfig = serde_json::from_str(
//!     r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "learnable_tau": true}"#,
//! )?;
//! let specs = cfg.param_specs();
//! let tau = specs.iter().find(|s| s.name == "tau").unwrap();
//! // τ starts at the rule's value, 1/√3 for L = 3, and trains at lr/10.
//! assert_eq!((tau.shape.as_slice(), tau.init), (&[1][..], ParamInit::Const(1.0 / 3f64.sqrt())));
//! assert_eq!(tau.kind, ParamKind::Tau);
//! // Four scalar biases per block, three blocks.
//! let biases = specs.iter().filter(|s| ParamName::parse(&s.name).is_scalar_bias()).count();
//! assert_eq!(biases, 12);
//! assert!(specs.iter().all(|s| s.kind.is_trainable()));
//! # Ok(()) }
//! ```

use serde::{Deserialize, Serialize};

/// The most scalar elements a configuration may ask for (2^36, 256 GiB in f32): a
/// guard against configs that would allocate without bound, far above any real model.
///
/// # Example
///
/// ```
/// use tau_model::{ModelConfig, TheoryConfig, params::MAX_ELEMENTS};
///
/// // 2^13 blocks of 2^12 × 2^12 weights: 2^37 elements.
/// let huge = TheoryConfig { width: 1 << 12, depth: 1 << 13, ..Default::default() };
/// let cfg = ModelConfig::Theory(huge);
/// assert!(8192 * 4096 * 4096 > MAX_ELEMENTS);
/// assert!(cfg.validate().unwrap_err().to_string().contains("beyond the supported maximum"));
/// ```
pub const MAX_ELEMENTS: u128 = 1 << 36;

/// How the optimizer treats one named tensor of a model.
///
/// # Example
///
/// ```
/// use tau_model::{ModelConfig, ParamKind};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "learnable_tau": true}"#,
/// )?;
/// assert_eq!(cfg.param_kind("layer1.0.conv1.weight"), ParamKind::Weight);
/// assert_eq!(cfg.param_kind("layer1.0.bias1a"), ParamKind::ScalarBias);
/// assert_eq!(cfg.param_kind("tau"), ParamKind::Tau);
/// // The theory network's A and B stay at their initial values unless asked.
/// let theory: ModelConfig = serde_json::from_str(r#"{"family": "theory"}"#)?;
/// assert_eq!(theory.param_kind("input.weight"), ParamKind::Frozen);
/// assert!(!ParamKind::Frozen.is_trainable() && !ParamKind::Buffer.is_trainable());
/// assert!(ParamKind::Tau.is_trainable());
/// assert_eq!(serde_json::to_string(&ParamKind::ScalarBias)?, r#""scalar_bias""#);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// Convolution and linear weights (and the linear bias): SGD with weight decay.
    Weight,
    /// BatchNorm γ and β.
    BnAffine,
    /// The no-BN (Fixup-style) scalar biases: learning rate / 10.
    ScalarBias,
    /// The shared learnable τ: learning rate / 10, gradient divided by L.
    Tau,
    /// Fixup's per-branch scalar multiplier (`layer1.0.scale`, init 1): learning rate / 10
    /// with the scalar biases, as the Fixup authors' code groups them.
    BranchScale,
    /// SkipInit's and ReZero's per-branch α (`layer1.0.alpha`, init 0): the main learning
    /// rate (ReZero trains α with the other weights), no weight decay.
    Alpha,
    /// BatchNorm running statistics (and `num_batches_tracked`): never optimized.
    Buffer,
    /// Parameters held at their initial value (theory A and B by default): never optimized.
    Frozen,
}

impl ParamKind {
    /// Whether an optimizer should update tensors of this kind. See the
    /// [example](ParamKind#example).
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamKind::Buffer | ParamKind::Frozen)
    }
}

/// How a parameter is drawn at initialization.
///
/// # Example
///
/// ```
/// use tau_model::{ModelConfig, ParamInit};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
/// let init = |name: &str| cfg.param_specs().into_iter().find(|s| s.name == name).unwrap().init;
/// // PyTorch's nn.Linear default: U(−1/√fan_in, 1/√fan_in), fan_in = 64.
/// assert_eq!(init("fc.bias"), ParamInit::Uniform { bound: 0.125 });
/// assert_eq!(init("bn1.weight"), ParamInit::Const(1.0));
/// // The theory network's A: N(0, a_var/m) with a_var = 2 and m = 8.
/// let theory: ModelConfig = serde_json::from_str(r#"{"family": "theory", "width": 8}"#)?;
/// assert_eq!(theory.param_specs()[0].init, ParamInit::Normal { std: 0.5 });
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    /// Independent N(0, std²) entries.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// Independent U(−bound, bound) entries (PyTorch's default for linear layers).
    Uniform {
        /// Half-width of the interval.
        bound: f64,
    },
    /// Every entry equal to this value.
    Const(f64),
}

/// One named tensor a model owns: name (PyTorch `state_dict` key), shape, initialization.
///
/// # Example
///
/// ```
/// use tau_model::{ModelConfig, ParamKind};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg: ModelConfig = serde_json::from_str(r#"{"family": "cifar_resnet", "depth": 8}"#)?;
/// let specs = cfg.param_specs();
/// let conv = specs.iter().find(|s| s.name == "layer3.0.conv1.weight").unwrap();
/// // Stage 3's first convolution takes stage 2's 32 channels to 64.
/// assert_eq!((conv.shape.as_slice(), conv.elem_count()), (&[64, 32, 3, 3][..], 64 * 32 * 9));
/// assert_eq!(conv.kind, ParamKind::Weight);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// PyTorch-style dotted name, e.g. `layer1.0.conv1.weight`.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
    /// How [`crate::init_varmap`] fills it.
    pub init: ParamInit,
    /// How an optimizer treats it.
    pub kind: ParamKind,
}

impl ParamSpec {
    pub(crate) fn new(name: String, shape: Vec<usize>, init: ParamInit, kind: ParamKind) -> Self {
        Self {
            name,
            shape,
            init,
            kind,
        }
    }

    /// Number of scalar elements. See the [example](ParamSpec#example).
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Where a residual block sits, from the first two segments of a parameter name
/// (`layer{s}.{b}.…` in the ResNets, `blocks.{l}.…` in the theory network). Part of a
/// [`ParamName`].
///
/// # Example
///
/// ```
/// use tau_model::params::{BlockPos, ParamName};
///
/// let block = ParamName::parse("layer3.1.conv2.weight").block;
/// assert_eq!(block, Some(BlockPos { group: "layer3", stage: Some(3), index: 1 }));
/// let block = ParamName::parse("blocks.7.weight").block;
/// assert_eq!(block, Some(BlockPos { group: "blocks", stage: None, index: 7 }));
/// assert_eq!(ParamName::parse("fc.weight").block, None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockPos<'a> {
    /// The name's first segment: `layer2`, `blocks`.
    pub group: &'a str,
    /// The stage s of a `layer{s}` group (1-based); `None` for any other group (the
    /// theory network's `blocks`).
    pub stage: Option<usize>,
    /// The second segment: the block's index within its stage (0-based), or within the
    /// network for a group without a stage.
    pub index: usize,
}

/// A parameter name of any family split into its parts: the residual block it belongs
/// to (if any), the module inside that block (or at the top level), and the leaf. Every
/// family's names follow one scheme (see the crate docs' table), and this is its one
/// parser: the optimizer's [`ParamKind`]s, the trainer's per-layer gradient norms
/// ([`ParamName::layer`]) and the probe's per-block gradients
/// ([`ParamName::block_index`], [`crate::ModelConfig::block_index`]) all read names
/// through it.
///
/// Any string parses; a name the scheme does not describe simply has no block.
///
/// # Example
///
/// ```
/// use tau_model::params::{BlockPos, ParamName};
///
/// let p = ParamName::parse("layer2.0.downsample.1.running_var");
/// assert_eq!(p.block, Some(BlockPos { group: "layer2", stage: Some(2), index: 0 }));
/// assert_eq!((p.module, p.leaf), ("downsample.1", "running_var"));
/// assert_eq!(p.layer(), "layer2.0");
/// // Stage 2 of a CIFAR ResNet-20 (3 blocks per stage) starts at block 3.
/// assert_eq!(p.block_index(&[3, 3, 3]), Some(3));
///
/// let p = ParamName::parse("bn1.weight");
/// assert_eq!((p.block, p.module, p.leaf, p.layer()), (None, "bn1", "weight", "bn1"));
/// assert_eq!(ParamName::parse("blocks.7.weight").layer(), "blocks.7");
/// assert_eq!(ParamName::parse("tau").layer(), "tau");
/// assert_eq!(ParamName::parse("tau").as_str(), "tau");
///
/// // What the leaf and the module say about the tensor.
/// assert!(ParamName::parse("layer1.0.bn2.running_mean").is_bn_buffer());
/// assert!(ParamName::parse("layer1.0.bias2b").is_scalar_bias());
/// assert!(!ParamName::parse("fc.bias").is_scalar_bias());
/// assert!(ParamName::parse("layer2.0.downsample.1.weight").in_batch_norm());
/// assert!(!ParamName::parse("layer2.0.downsample.0.weight").in_batch_norm());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ParamName<'a> {
    name: &'a str,
    /// The residual block, when the second segment is an index (`layer1.2.…`,
    /// `blocks.7.…`).
    pub block: Option<BlockPos<'a>>,
    /// The module owning the leaf, after the block if there is one: `conv1`, `bn2`,
    /// `downsample.1`, `fc`; empty for a leaf directly in a block (`layer1.0.bias1a`) or
    /// at the top level (`tau`).
    pub module: &'a str,
    /// The last segment: `weight`, `bias`, `running_mean`, `bias1a`, `tau`.
    pub leaf: &'a str,
}

impl<'a> ParamName<'a> {
    /// Splits `name` at its dots. Never fails: every string is some name.
    /// See the [example](ParamName#example).
    pub fn parse(name: &'a str) -> Self {
        let mut parts = name.splitn(3, '.');
        let first = parts.next().unwrap_or(name);
        let second = parts.next();
        let block = second
            .and_then(|s| s.parse::<usize>().ok())
            .map(|index| BlockPos {
                group: first,
                stage: first
                    .strip_prefix("layer")
                    .and_then(|s| s.parse::<usize>().ok()),
                index,
            });
        let leaf = name.rsplit('.').next().unwrap_or(name);
        // What lies between the block (or the start) and the leaf.
        let body = match (block, second) {
            (Some(_), Some(second)) => name.get(first.len() + second.len() + 2..).unwrap_or(""),
            _ => name,
        };
        let module = body.rsplit_once('.').map_or("", |(m, _)| m);
        Self {
            name,
            block,
            module,
            leaf,
        }
    }

    /// The whole name.
    /// See the [example](ParamName#example).
    pub fn as_str(&self) -> &'a str {
        self.name
    }

    /// The layer the name is grouped under in per-layer gradient norms: the block
    /// (`layer2.3`, `blocks.7`) when there is one, else the first segment (`conv1`, `bn1`,
    /// `fc`, `tau`).
    /// See the [example](ParamName#example).
    pub fn layer(&self) -> &'a str {
        let first = self.name.split('.').next().unwrap_or(self.name);
        match self.name[first.len()..].strip_prefix('.') {
            Some(rest) if self.block.is_some() => {
                let second = rest.split('.').next().unwrap_or(rest);
                &self.name[..first.len() + 1 + second.len()]
            }
            _ => first,
        }
    }

    /// The 0-based index of the residual block over the whole network, for a network
    /// with `stage_blocks[s − 1]` blocks in stage s: `layer{s}.{b}` is block b after the
    /// blocks of the stages before s; `blocks.{l}` (one stage) is block l. `None` for a
    /// name outside the blocks (the stem, the head, τ) or a block the network lacks.
    /// See the [example](ParamName#example).
    pub fn block_index(&self, stage_blocks: &[usize]) -> Option<usize> {
        let block = self.block?;
        match block.stage {
            Some(s) => {
                let in_stage = *stage_blocks.get(s.checked_sub(1)?)?;
                (block.index < in_stage)
                    .then(|| stage_blocks[..s - 1].iter().sum::<usize>() + block.index)
            }
            None => (block.group == "blocks"
                && stage_blocks.len() == 1
                && block.index < stage_blocks[0])
                .then_some(block.index),
        }
    }

    /// Whether the leaf is a BatchNorm buffer: `running_mean`, `running_var`,
    /// `num_batches_tracked`.
    /// See the [example](ParamName#example).
    pub fn is_bn_buffer(&self) -> bool {
        matches!(
            self.leaf,
            "running_mean" | "running_var" | "num_batches_tracked"
        )
    }

    /// Whether the leaf is a no-BN scalar bias: `bias` followed by a digit and one more
    /// character (`bias1a`, `bias3b`).
    /// See the [example](ParamName#example).
    pub fn is_scalar_bias(&self) -> bool {
        let l = self.leaf.as_bytes();
        l.len() == 6 && self.leaf.starts_with("bias") && l[4].is_ascii_digit()
    }

    /// Whether the module is a BatchNorm: `bn…` (`bn1`, `layer1.0.bn2`) or a shortcut's
    /// `downsample.1`.
    /// See the [example](ParamName#example).
    pub fn in_batch_norm(&self) -> bool {
        let last = self.module.rsplit('.').next().unwrap_or("");
        last.starts_with("bn") || self.module.ends_with("downsample.1")
    }
}

/// Total elements of a set of shapes, or an error when above [`MAX_ELEMENTS`]. Counts in
/// u128 so that absurd configs cannot overflow.
pub(crate) fn check_size(what: &str, elements: u128) -> candle::Result<()> {
    if elements > MAX_ELEMENTS {
        candle::bail!(
            "{what}: {elements} parameters is beyond the supported maximum of {MAX_ELEMENTS}"
        )
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(group: &str, stage: Option<usize>, index: usize) -> Option<BlockPos<'_>> {
        Some(BlockPos {
            group,
            stage,
            index,
        })
    }

    /// The real names of every family, taken apart.
    #[test]
    fn parses_the_names_of_every_family() {
        type Case<'a> = (&'a str, Option<BlockPos<'a>>, &'a str, &'a str, &'a str);
        let cases: &[Case] = &[
            // theory
            ("input.weight", None, "input", "weight", "input"),
            (
                "blocks.0.weight",
                block("blocks", None, 0),
                "",
                "weight",
                "blocks.0",
            ),
            (
                "blocks.63.weight",
                block("blocks", None, 63),
                "",
                "weight",
                "blocks.63",
            ),
            ("output.weight", None, "output", "weight", "output"),
            // CIFAR ResNet, with and without BatchNorm
            ("conv1.weight", None, "conv1", "weight", "conv1"),
            ("bn1.running_mean", None, "bn1", "running_mean", "bn1"),
            (
                "layer1.0.conv1.weight",
                block("layer1", Some(1), 0),
                "conv1",
                "weight",
                "layer1.0",
            ),
            (
                "layer3.17.bn2.bias",
                block("layer3", Some(3), 17),
                "bn2",
                "bias",
                "layer3.17",
            ),
            (
                "layer2.4.bias1a",
                block("layer2", Some(2), 4),
                "",
                "bias1a",
                "layer2.4",
            ),
            ("fc.weight", None, "fc", "weight", "fc"),
            ("fc.bias", None, "fc", "bias", "fc"),
            ("tau", None, "", "tau", "tau"),
            // bottleneck ResNet
            (
                "layer4.0.downsample.0.weight",
                block("layer4", Some(4), 0),
                "downsample.0",
                "weight",
                "layer4.0",
            ),
            (
                "layer4.0.downsample.1.num_batches_tracked",
                block("layer4", Some(4), 0),
                "downsample.1",
                "num_batches_tracked",
                "layer4.0",
            ),
            (
                "layer3.22.bias3b",
                block("layer3", Some(3), 22),
                "",
                "bias3b",
                "layer3.22",
            ),
        ];
        for &(name, blk, module, leaf, layer) in cases {
            let p = ParamName::parse(name);
            assert_eq!(p.as_str(), name);
            assert_eq!(p.block, blk, "{name}");
            assert_eq!(
                (p.module, p.leaf, p.layer()),
                (module, leaf, layer),
                "{name}"
            );
        }
    }

    #[test]
    fn odd_strings_parse_without_panicking() {
        for name in [
            "", ".", "..", "layer", "layer1", "layer1.", "layer1.0", "a..b", "é.1.ü",
        ] {
            let p = ParamName::parse(name);
            assert_eq!(p.as_str(), name);
            let _ = (p.layer(), p.block_index(&[1, 2]), p.in_batch_norm());
        }
        let p = ParamName::parse("layer1.0");
        assert_eq!((p.layer(), p.module, p.leaf), ("layer1.0", "", "0"));
        assert_eq!(ParamName::parse("").layer(), "");
        assert_eq!(ParamName::parse("layer1.x.weight").block, None);
        assert_eq!(ParamName::parse("layer1.x.weight").layer(), "layer1");
    }

    #[test]
    fn block_index_counts_the_stages_before() {
        let bottleneck50 = [3, 4, 6, 3];
        let at = |name: &str, stages: &[usize]| ParamName::parse(name).block_index(stages);
        assert_eq!(at("layer1.0.conv1.weight", &bottleneck50), Some(0));
        assert_eq!(at("layer2.3.bn3.bias", &bottleneck50), Some(6));
        assert_eq!(at("layer3.0.downsample.0.weight", &bottleneck50), Some(7));
        assert_eq!(at("layer4.2.conv3.weight", &bottleneck50), Some(15));
        // CIFAR ResNet-20: three stages of three blocks.
        assert_eq!(at("layer3.2.bias2b", &[3, 3, 3]), Some(8));
        // The theory network: one stage.
        assert_eq!(at("blocks.5.weight", &[8]), Some(5));
        // Outside the blocks, or beyond the network.
        for name in [
            "conv1.weight",
            "bn1.weight",
            "fc.bias",
            "tau",
            "input.weight",
        ] {
            assert_eq!(at(name, &bottleneck50), None, "{name}");
        }
        assert_eq!(at("layer1.3.conv1.weight", &bottleneck50), None);
        assert_eq!(at("layer5.0.conv1.weight", &bottleneck50), None);
        assert_eq!(at("layer0.0.conv1.weight", &bottleneck50), None);
        assert_eq!(at("blocks.8.weight", &[8]), None);
        assert_eq!(at("blocks.0.weight", &[3, 3, 3]), None);
    }

    #[test]
    fn leaf_and_module_classes() {
        let p = ParamName::parse;
        assert!(p("layer1.0.bias1a").is_scalar_bias());
        assert!(p("layer3.5.bias3b").is_scalar_bias());
        assert!(!p("fc.bias").is_scalar_bias());
        assert!(!p("layer1.0.biasxa").is_scalar_bias());
        assert!(p("bn1.running_var").is_bn_buffer());
        assert!(p("layer1.0.bn1.num_batches_tracked").is_bn_buffer());
        assert!(!p("bn1.weight").is_bn_buffer());
        assert!(p("bn1.weight").in_batch_norm());
        assert!(p("layer2.0.bn2.bias").in_batch_norm());
        assert!(p("layer4.0.downsample.1.weight").in_batch_norm());
        assert!(!p("layer4.0.downsample.0.weight").in_batch_norm());
        assert!(!p("conv1.weight").in_batch_norm());
        assert!(!p("layer1.0.bias1a").in_batch_norm());
    }
}
