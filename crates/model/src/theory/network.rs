//! The theory network built from its config (see [`super`]): A, the block weights
//! W_1..W_L and B, its forward passes and its training step's backward pass; as a
//! [`Network`], what [`crate::Model::Theory`] runs.
//!
//! # Example
//!
//! Through the [`Network`] trait, the network's hook sees h_0 and every block's output,
//! and its loss_backward is its own (the ResNets have none).
//!
//! ```
//! use candle::{DType, Device, Tensor};
//! use tau_model::{Model, ModelConfig, Network, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dev = Device::Cpu;
//! let cfg: ModelConfig =
//!     serde_json::from_str(r#"{"family": "theory", "input_dim": 3, "width": 8, "depth": 4}"#)?;
//! let model = Model::from_varmap(&cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?, &dev)?;
//! let net: &dyn Network = model.network();
//! let xs = Tensor::ones((2, 3), DType::F32, &dev)?;
//! let mut seen = Vec::new();
//! let ys = net.forward_hooked(&xs, false, &mut |l, h| {
//!     seen.push((l, h.dims().to_vec()));
//!     Ok(())
//! })?;
//! assert_eq!(seen.len(), 5); // h_0..h_4
//! assert_eq!(seen[4], (4, vec![2, 8]));
//! let loss = Box::new(|p: &Tensor| p.sqr()?.sum_all());
//! let (preds, _, _) = net.loss_backward(&xs, loss)?.unwrap();
//! assert_eq!(preds.to_vec2::<f32>()?, ys.to_vec2::<f32>()?);
//! assert_eq!((net.n_blocks(), net.tau()?), (4, 0.5));
//! # Ok(()) }
//! ```

use candle::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::TheoryConfig;
use crate::family::{LossBackward, LossFn, Network};

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
    pub(super) cfg: TheoryConfig,
    pub(super) a: Tensor,
    pub(super) ws: Vec<Tensor>,
    pub(super) b: Tensor,
    pub(super) tau: f64,
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

    pub(super) fn check_input(&self, xs: &Tensor) -> Result<usize> {
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
    pub(super) fn block(&self, h: &Tensor, w: &Tensor) -> Result<Tensor> {
        tau_kernels::matmul::residual_dense_relu(h, w, self.tau)
    }

    /// h_0 = φ(A x) for the rows of `xs`.
    pub(super) fn stem(&self, xs: &Tensor) -> Result<Tensor> {
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
        let mut hs = vec![h0.detach()];
        hs.extend(tau_kernels::matmul::residual_dense_relu_chain(
            &hs[0], &ws, self.tau,
        )?);
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

/// The theory network as a [`Network`]: one pass for every `train` (it has no
/// BatchNorm), and its own [`TheoryNet::loss_backward`].
/// See the [module example](crate::family#example).
impl Network for TheoryNet {
    fn forward_hooked(
        &self,
        xs: &Tensor,
        _train: bool,
        hook: &mut dyn FnMut(usize, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        TheoryNet::forward_hooked(self, xs, hook)
    }

    fn tau(&self) -> Result<f64> {
        Ok(TheoryNet::tau(self))
    }

    fn n_blocks(&self) -> usize {
        TheoryNet::n_blocks(self)
    }

    fn loss_backward(&self, xs: &Tensor, loss: LossFn<'_>) -> Result<Option<LossBackward>> {
        TheoryNet::loss_backward(self, xs, loss).map(Some)
    }
}
