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

use candle::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::params::{ParamInit, ParamKind, ParamName, ParamSpec, check_size};
use crate::tau::TauRule;

mod trace;

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

    pub(crate) fn param_specs(&self) -> Vec<ParamSpec> {
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

    pub(crate) fn param_kind(&self, name: &str) -> ParamKind {
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
}

/// The theory network: A (m×p), W_1..W_L (m×m), B (d×m), and τ.
///
/// Parameter names: `input.weight` (A), `blocks.{l−1}.weight` (W_l), `output.weight` (B).
///
/// # Example
///
/// A scalar network (p = m = d = 1) with every weight 1 at L = 4, τ = 1/√4: each block
/// multiplies the hidden state by 1 + τ = 1.5, so y = 1.5⁴ x. For the squared loss
/// ½ (y − y*)² with y* = 0 and x = 1, ∂loss/∂W_l = y · τ · 1.5³ in every layer
/// (1.5^(L−l) above the block, 1.5^(l−1) below it): 5.0625 · 0.5 · 3.375 = 8.54296875.
///
/// ```
/// use std::collections::HashMap;
///
/// use candle::{DType, Device, Tensor};
/// use candle_nn::VarBuilder;
/// use tau_model::{TheoryConfig, TheoryNet};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = Device::Cpu;
/// let cfg =
///     TheoryConfig { input_dim: 1, width: 1, depth: 4, output_dim: 1, ..Default::default() };
/// let one = Tensor::ones((1, 1), DType::F32, &dev)?;
/// let names = ["input.weight", "blocks.0.weight", "blocks.1.weight", "blocks.2.weight",
///     "blocks.3.weight", "output.weight"];
/// let tensors: HashMap<String, Tensor> =
///     names.iter().map(|n| (n.to_string(), one.clone())).collect();
/// let net = TheoryNet::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &dev))?;
/// assert_eq!((net.n_blocks(), net.tau(), net.config().depth), (4, 0.5, 4));
/// assert_eq!(net.weights().len(), 4);
/// assert_eq!(net.input_weight().dims(), [1, 1]); // A: m × p
/// assert_eq!(net.output_weight().dims(), [1, 1]); // B: d × m
///
/// let xs = Tensor::new(&[[1f32]], &dev)?;
/// assert_eq!(net.forward(&xs)?.to_vec2::<f32>()?, [[5.0625]]);
/// let mut hidden = Vec::new();
/// net.forward_hooked(&xs, |l, h| {
///     hidden.push((l, h.to_vec2::<f32>()?[0][0]));
///     Ok(())
/// })?;
/// assert_eq!(hidden, [(0, 1.0), (1, 1.5), (2, 2.25), (3, 3.375), (4, 5.0625)]);
/// let trace = net.forward_traced(&xs)?;
/// assert!((trace.log_ratio(0).unwrap() - 4.0 * 1.5f64.ln()).abs() < 1e-6);
///
/// let ys = Tensor::zeros((1, 1), DType::F32, &dev)?;
/// for g in net.layer_grad_norms(&xs, &ys)? {
///     assert!((g - 8.54296875).abs() < 1e-5, "{g}");
/// }
/// let logs = net.layer_grad_log_norms(&xs, &ys)?;
/// assert!(logs.iter().all(|l| (l - 8.54296875f64.ln()).abs() < 1e-6));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TheoryNet {
    cfg: TheoryConfig,
    a: Tensor,
    ws: Vec<Tensor>,
    b: Tensor,
    tau: f64,
}
impl TheoryNet {
    /// Builds the network from `vb` (names as in the type docs).
    /// See the [example](TheoryNet#example).
    ///
    /// # Errors
    /// An invalid config, or a tensor missing from `vb` / of the wrong shape.
    pub fn new(cfg: &TheoryConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (p, m, d) = (cfg.input_dim, cfg.width, cfg.output_dim);
        let a = vb.get((m, p), "input.weight")?;
        let ws = (0..cfg.depth)
            .map(|l| vb.pp("blocks").pp(l).get((m, m), "weight"))
            .collect::<Result<Vec<_>>>()?;
        let b = vb.get((d, m), "output.weight")?;
        Ok(Self {
            cfg: cfg.clone(),
            a,
            ws,
            b,
            tau: cfg.tau_value(),
        })
    }

    /// The configuration.
    /// See the [example](TheoryNet#example).
    pub fn config(&self) -> &TheoryConfig {
        &self.cfg
    }

    /// The resolved τ.
    /// See the [example](TheoryNet#example).
    pub fn tau(&self) -> f64 {
        self.tau
    }

    /// L.
    /// See the [example](TheoryNet#example).
    pub fn n_blocks(&self) -> usize {
        self.ws.len()
    }

    /// The block weights W_1..W_L, each (m, m).
    /// See the [example](TheoryNet#example).
    pub fn weights(&self) -> &[Tensor] {
        &self.ws
    }

    /// The input layer A, (m, p).
    /// See the [example](TheoryNet#example).
    pub fn input_weight(&self) -> &Tensor {
        &self.a
    }

    /// The output layer B, (d, m).
    /// See the [example](TheoryNet#example).
    pub fn output_weight(&self) -> &Tensor {
        &self.b
    }

    fn check_input(&self, xs: &Tensor) -> Result<usize> {
        let (n, p) = xs.dims2()?;
        if p != self.cfg.input_dim {
            candle::bail!(
                "theory network: input has {p} features, the network expects {}",
                self.cfg.input_dim
            )
        }
        if xs.dtype() != self.a.dtype() {
            candle::bail!(
                "theory network: input dtype {:?} differs from the weights' {:?}",
                xs.dtype(),
                self.a.dtype()
            )
        }
        Ok(n)
    }

    /// One residual block: φ(h + τ W h), rows of `h` as hidden states.
    fn block(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        tau_kernels::matmul::residual_dense_relu(h, w, self.tau)
    }

    /// h_0 = φ(A x) for the rows of `xs`.
    fn stem(&self, xs: &Tensor) -> Result<Tensor> {
        xs.matmul(&self.a.t()?)?.relu()
    }

    /// The network output.
    /// See the [example](TheoryNet#example).
    ///
    /// # Shapes
    /// `xs` (n, p) → (n, d).
    ///
    /// # Errors
    /// Wrong input shape or dtype.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_hooked(xs, |_, _| Ok(()))
    }

    /// The network output ([`Self::forward`] is this with a hook that does nothing),
    /// calling `hook(0, h_0)` with φ(A x) and `hook(l, h_l)` with each block's output,
    /// l = 1..=L. The hidden states are the plain ones, which overflow at depths where
    /// [`Self::forward_traced`]'s log-norms do not. See the [example](TheoryNet#example)
    /// and [`crate::Model::forward_hooked`].
    ///
    /// # Errors
    /// Wrong input shape or dtype, or the hook's error (which stops the pass).
    pub fn forward_hooked<F>(&self, xs: &Tensor, mut hook: F) -> Result<Tensor>
    where
        F: FnMut(usize, &Tensor) -> Result<()>,
    {
        self.check_input(xs)?;
        let mut h = self.stem(xs)?;
        hook(0, &h)?;
        for (l, w) in self.ws.iter().enumerate() {
            h = self.block(&h, w)?;
            hook(l + 1, &h)?;
        }
        h.matmul(&self.b.t()?)
    }

    /// The output for `xs`, the loss `loss` computes from it, and the gradients of that
    /// loss with respect to every trained tensor of the network (W_1..W_L, and A or B
    /// when they are variables), as [`candle::backprop::GradStore`] keyed like the one of
    /// `loss.backward()`, which it equals value for value.
    ///
    /// The training step of full-batch gradient descent: the blocks' backward pass is
    /// [`tau_kernels::matmul::residual_dense_relu_chain_backward`], written out, instead of
    /// candle's autograd over L block ops, which zeroes and adds a fresh m × m buffer for
    /// every W_l's gradient; the stem and the head (small) go through autograd.
    ///
    /// # Example
    ///
    /// ```
    /// use candle::{DType, Device, Tensor};
    /// use candle_nn::{VarBuilder, VarMap};
    /// use tau_model::{TheoryConfig, TheoryNet};
    ///
    /// # fn main() -> candle::Result<()> {
    /// let cfg = TheoryConfig { input_dim: 3, width: 16, depth: 4, ..TheoryConfig::default() };
    /// let vm = VarMap::new();
    /// let net = TheoryNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    /// let xs = Tensor::randn(0f32, 1., (5, 3), &Device::Cpu)?;
    /// let (preds, loss, grads) = net.loss_backward(&xs, |p| p.sqr()?.sum_all())?;
    /// let autograd = net.forward(&xs)?.sqr()?.sum_all()?.backward()?;
    /// assert_eq!(loss.to_scalar::<f32>()?, preds.sqr()?.sum_all()?.to_scalar::<f32>()?);
    /// let w = &net.weights()[0];
    /// let diff = (grads.get(w).unwrap() - autograd.get(w).unwrap())?.abs()?.max_all()?;
    /// assert_eq!(diff.to_scalar::<f32>()?, 0.0);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Wrong input shape or dtype, the loss closure's error, or a device error.
    pub fn loss_backward<F>(
        &self,
        xs: &Tensor,
        loss: F,
    ) -> Result<(Tensor, Tensor, candle::backprop::GradStore)>
    where
        F: FnOnce(&Tensor) -> Result<Tensor>,
    {
        self.check_input(xs)?;
        let h0 = self.stem(xs)?;
        let ws: Vec<Tensor> = self.ws.iter().map(Tensor::detach).collect();
        let mut hs = Vec::with_capacity(ws.len() + 1);
        hs.push(h0.detach());
        for w in &ws {
            let h = self.block(&hs[hs.len() - 1], w)?;
            hs.push(h);
        }
        // The head through autograd, from a variable copy of h_L: ∂loss/∂h_L (and ∂/∂B).
        let h_last = candle::Var::from_tensor(&hs[ws.len()])?;
        let preds = h_last.as_tensor().matmul(&self.b.t()?)?;
        let value = loss(&preds)?;
        let mut grads = value.backward()?;
        let dh_last = match grads.remove(h_last.as_tensor()) {
            Some(g) => g,
            None => h_last.as_tensor().zeros_like()?,
        };
        let (dh0, dws) =
            tau_kernels::matmul::residual_dense_relu_chain_backward(&hs, &ws, &dh_last, self.tau)?;
        for (w, dw) in self.ws.iter().zip(dws) {
            if w.is_variable() {
                grads.insert(w, dw);
            }
        }
        if self.a.is_variable() {
            // ∂loss/∂A through the stem: the gradient of Σ h_0 ⊙ ∂loss/∂h_0.
            let stem = (&h0 * dh0)?.sum_all()?.backward()?;
            if let Some(da) = stem.get(&self.a) {
                grads.insert(&self.a, da.clone());
            }
        }
        Ok((preds, value, grads))
    }
}

impl Module for TheoryNet {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        TheoryNet::forward(self, xs)
    }
}
