//! The paper's fully connected analysis network (PAPER.md, "The theory network"):
//! h_0 = φ(A x), h_l = φ(h_{l−1} + τ W_l h_{l−1}) for l = 1..L, y = B h_L, φ = ReLU.
//!
//! Besides the plain [`TheoryNet::forward`], it has a traced forward pass that reports
//! ln‖h_l‖ for every layer and input, and per-layer gradient norms of the squared loss.
//! Both stay finite where the norms themselves overflow f32 or even f64 (τ = 1 at
//! L = 1024 gives ‖h_L‖/‖h_0‖ ≈ 1e123): the blocks are positively homogeneous
//! (block(c·h) = c·block(h) for c > 0), so the hidden state of every input is rescaled
//! to unit norm after each block and the logarithm of the scale is accumulated in f64.
//!
//! # Example
//!
//! A scalar network (p = m = d = 1) with every weight 1 and τ = 1 doubles its hidden state
//! in each block: ‖h_L‖/‖h_0‖ = 2^L. At L = 1100 that is beyond f64 (and f32 overflows
//! after 128 blocks), yet the trace gives its logarithm, L ln 2.
//!
//! ```
//! use std::collections::HashMap;
//!
//! use candle::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use tau_model::{TheoryConfig, TheoryNet};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg = TheoryConfig {
//!     input_dim: 1, width: 1, depth: 1100, output_dim: 1, tau: "1".parse()?,
//!     ..Default::default()
//! };
//! let one = Tensor::ones((1, 1), DType::F32, &dev)?;
//! let mut tensors: HashMap<String, Tensor> = (0..cfg.depth)
//!     .map(|l| (format!("blocks.{l}.weight"), one.clone()))
//!     .collect();
//! tensors.insert("input.weight".into(), one.clone());
//! tensors.insert("output.weight".into(), one.clone());
//! let net = TheoryNet::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
//!
//! let xs = Tensor::new(&[[1f32]], &dev)?;
//! assert!(net.forward(&xs)?.to_vec2::<f32>()?[0][0].is_infinite());
//! let trace = net.forward_traced(&xs)?;
//! let want = 1100.0 * 2f64.ln(); // ≈ 762.5 > ln(f64::MAX) ≈ 709.8
//! assert!((trace.log_ratio(0).unwrap() - want).abs() < 1e-9);
//! assert!(trace.overflows(DType::F64));
//! # Ok(()) }
//! ```

use candle::Result;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::family::{Family, Input};
use crate::model::Model;
use crate::params::{ParamInit, ParamKind, ParamName, ParamSpec, check_size};
use crate::preprocess::Preprocessing;
use crate::tau::TauRule;

mod network;
mod trace;

pub use network::TheoryNet;
pub use trace::TheoryTrace;

/// Largest depth and width accepted (guards configs against unbounded allocation).
const MAX_DIM: usize = 1 << 24;

/// Hyper-parameters of the theory network.
///
/// The variances are multipliers of 1/m (A, W) and 1/d (B): `a_var = 2.0` means entries of
/// A are N(0, 2/m), PAPER.md's setting, which the defaults reproduce.
///
/// # Example
///
/// ```
/// use tau_model::{TauRule, TheoryConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The fields left out take their defaults (width 256, variances 2, 1, 1, τ = 1/√L).
/// let cfg: TheoryConfig = serde_json::from_str(r#"{"input_dim": 4, "depth": 64}"#)?;
/// assert_eq!(cfg, TheoryConfig { input_dim: 4, depth: 64, ..Default::default() });
/// assert_eq!((cfg.width, cfg.a_var), (256, 2.0));
/// assert_eq!(cfg.tau, TauRule::InvSqrtDepth { scale: 1.0 });
/// cfg.validate()?;
/// assert_eq!(cfg.tau_value(), 0.125); // 1/√64
///
/// let flat = TheoryConfig { width: 0, ..cfg };
/// let err = flat.validate().unwrap_err().to_string();
/// assert!(err.starts_with("theory network: width must be at least 1, got 0"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TheoryConfig {
    /// p, the input dimension (default 32).
    pub input_dim: usize,
    /// m, the width of every hidden layer (default 256).
    pub width: usize,
    /// L, the number of residual blocks (default 16).
    pub depth: usize,
    /// d, the output dimension (default 1).
    pub output_dim: usize,
    /// The τ rule (default `1/sqrt(L)`).
    pub tau: TauRule,
    /// A's entries are N(0, a_var / m) (default 2).
    pub a_var: f64,
    /// W_l's entries are N(0, w_var / m) (default 1).
    pub w_var: f64,
    /// B's entries are N(0, b_var / d) (default 1).
    pub b_var: f64,
    /// Whether A is trained (default false: it stays at its initial value).
    pub train_a: bool,
    /// Whether B is trained (default false).
    pub train_b: bool,
}

impl Default for TheoryConfig {
    fn default() -> Self {
        Self {
            input_dim: 32,
            width: 256,
            depth: 16,
            output_dim: 1,
            tau: TauRule::default(),
            a_var: 2.0,
            w_var: 1.0,
            b_var: 1.0,
            train_a: false,
            train_b: false,
        }
    }
}

impl TheoryConfig {
    /// Checks sizes, variances and τ. See the [example](TheoryConfig#example).
    ///
    /// # Errors
    /// Names the bad setting.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("input_dim", self.input_dim),
            ("width", self.width),
            ("depth", self.depth),
            ("output_dim", self.output_dim),
        ] {
            if v == 0 {
                candle::bail!("theory network: {name} must be at least 1, got 0")
            }
            if v > MAX_DIM {
                candle::bail!("theory network: {name} = {v} is beyond the maximum {MAX_DIM}")
            }
        }
        for (name, v) in [
            ("a_var", self.a_var),
            ("w_var", self.w_var),
            ("b_var", self.b_var),
        ] {
            if !v.is_finite() || v <= 0.0 {
                candle::bail!("theory network: {name} must be finite and > 0, got {v}")
            }
        }
        self.tau.validate().map_err(candle::Error::wrap)?;
        let (p, m, l, d) = (
            self.input_dim as u128,
            self.width as u128,
            self.depth as u128,
            self.output_dim as u128,
        );
        check_size("theory network", m * p + l * m * m + d * m)
    }

    /// τ resolved at L = depth. See the [example](TheoryConfig#example).
    pub fn tau_value(&self) -> f64 {
        self.tau.resolve(self.depth)
    }
}

/// The theory network as a [`Family`]: vectors in, `output_dim` real targets out, τ
/// fixed by the rule. See the [module example](crate::family#example).
impl Family for TheoryConfig {
    fn name(&self) -> &'static str {
        "theory"
    }

    fn depth(&self) -> usize {
        self.depth
    }

    fn n_blocks(&self) -> usize {
        self.depth
    }

    fn stage_blocks(&self) -> Vec<usize> {
        vec![self.depth]
    }

    fn tau_rule(&self) -> TauRule {
        self.tau
    }

    fn set_tau_rule(&mut self, rule: TauRule) {
        self.tau = rule;
    }

    fn input(&self) -> Input {
        Input::Vectors {
            dim: self.input_dim,
        }
    }

    fn num_outputs(&self) -> usize {
        self.output_dim
    }

    fn is_classifier(&self) -> bool {
        false
    }

    fn validate(&self) -> Result<()> {
        TheoryConfig::validate(self)
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let (p, m, d) = (self.input_dim, self.width, self.output_dim);
        let frozen = |train: bool| {
            if train {
                ParamKind::Weight
            } else {
                ParamKind::Frozen
            }
        };
        let mut specs = Vec::with_capacity(self.depth + 2);
        specs.push(ParamSpec::new(
            "input.weight".into(),
            vec![m, p],
            ParamInit::Normal {
                std: (self.a_var / m as f64).sqrt(),
            },
            frozen(self.train_a),
        ));
        for l in 0..self.depth {
            specs.push(ParamSpec::new(
                format!("blocks.{l}.weight"),
                vec![m, m],
                ParamInit::Normal {
                    std: (self.w_var / m as f64).sqrt(),
                },
                ParamKind::Weight,
            ));
        }
        specs.push(ParamSpec::new(
            "output.weight".into(),
            vec![d, m],
            ParamInit::Normal {
                std: (self.b_var / d as f64).sqrt(),
            },
            frozen(self.train_b),
        ));
        specs
    }

    fn param_kind(&self, name: &str) -> ParamKind {
        match name {
            "input.weight" if self.train_a => ParamKind::Weight,
            "output.weight" if self.train_b => ParamKind::Weight,
            "input.weight" | "output.weight" => ParamKind::Frozen,
            _ => {
                let p = ParamName::parse(name);
                if p.block.is_some_and(|b| b.group == "blocks") && p.leaf == "weight" {
                    ParamKind::Weight
                } else {
                    ParamKind::Buffer
                }
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "theory network, width {}, input dim {}",
            self.width, self.input_dim
        )
    }

    fn description(&self) -> String {
        format!(
            "the paper's fully connected theory network (width {}, depth {})",
            self.width, self.depth
        )
    }

    fn probe_image_size(&self) -> Option<usize> {
        None
    }

    fn default_preprocessing(&self) -> Option<Preprocessing> {
        None
    }

    fn build(&self, vb: VarBuilder) -> Result<Model> {
        Ok(Model::Theory(TheoryNet::new(self, vb)?))
    }
}
