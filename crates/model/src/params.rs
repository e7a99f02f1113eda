//! The vocabulary every model family describes its tensors with: a name's kind (how an
//! optimizer treats it), how it is initialized, its shape; and the size guard. A leaf
//! module: the families and [`crate::config`] depend on it, it depends on none of them.

use serde::{Deserialize, Serialize};

/// The most scalar elements a configuration may ask for (2^36, 256 GiB in f32): a
/// guard against configs that would allocate without bound, far above any real model.
pub const MAX_ELEMENTS: u128 = 1 << 36;

/// How the optimizer treats one named tensor of a model.
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
    /// BatchNorm running statistics (and `num_batches_tracked`): never optimized.
    Buffer,
    /// Parameters held at their initial value (theory A and B by default): never optimized.
    Frozen,
}

impl ParamKind {
    /// Whether an optimizer should update tensors of this kind.
    pub fn is_trainable(self) -> bool {
        !matches!(self, ParamKind::Buffer | ParamKind::Frozen)
    }
}

/// How a parameter is drawn at initialization.
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

    /// Number of scalar elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
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
