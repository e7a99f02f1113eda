//! Stability at initialization (PAPER.md, claims 1 and 2): ‖h_l‖/‖h_0‖ per block and
//! per-layer gradient norms for many τ values on the same seeded weights.
//!
//! The theory network takes a fast path that evaluates every τ at once on the weights
//! [`tau_model::init_varmap`] gives in f32, bit for bit (drawn as plain arrays with
//! [`tau_model::init::init_values_f32`]; common random numbers: the weights are drawn
//! once per seed, whatever the number of τ values): the hidden states of all (τ, input)
//! pairs are the rows of one matrix, each block is one f32 GEMM into a reused buffer
//! followed by one element-wise pass (residual, ReLU, sum of squares), and every row is
//! rescaled to unit norm at each block with its log-scale accumulated in f64. The blocks
//! are positively homogeneous (block(c·h) = c·block(h) for c > 0), so the rescaling is
//! exact and the ratios stay finite far beyond f64's range (τ = 1 at L = 4096 gives
//! about 1e490).
//!
//! The backward pass is linear once the ReLU masks are fixed, so it is rescaled the same
//! way. For input i the gradient of its squared loss with respect to W_l is the rank-one
//! matrix τ·r_i·(D_l g_l)(h_{l−1})ᵀ, whose norm is τ·|r_i|·‖D_l g_l‖·‖h_{l−1}‖, with g_l
//! back-propagated from g_L = Bᵀ1 (for one output, the residual r_i is a scalar that
//! cancels from every ratio between layers).

//!
//! The ResNets are probed through the model's own hooked forward pass
//! ([`probe_resnet`]). [`resolve_config`] reads a probe config (a run config's `[model]`
//! and `seed`, or a `[probe]` table; or a checkpoint's model), [`run_probe`] probes it and
//! [`write_probe`] writes `probe.json` beside the resolved config: the library side of
//! `tau-resnet probe`.

use std::path::{Path, PathBuf};

use candle::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;
use tau_model::{Model, ModelConfig, Scaling, TauRule, TheoryConfig, TheoryNet};

mod config;
mod resnet;
mod run;
mod theory;

pub use config::{ProbePlan, ProbeSettings, resolve_config, validate_config};
pub use resnet::{chain_len, min_image_size, probe_resnet};
pub use run::{ProbeRun, Trained, run_probe, write_probe};
pub use theory::{
    TheorySeedResult, TheoryWeights, probe_theory, probe_theory_weights, theory_probe_seed,
};

// The `probe.json` record, defined in tau-records (shared with xtask).
pub use tau_records::{PROBE_FORMAT, ProbeRecord, ProbeTau};

/// One τ rule to probe, as written and parsed.
#[derive(Debug, Clone)]
pub struct ProbeTauRule {
    /// The rule as written (`1/sqrt(L)`).
    pub text: String,
    /// The parsed rule.
    pub rule: TauRule,
    /// Whether the backward probe (gradient ratios) is computed for this rule (theory
    /// network; the ResNet probe always computes it).
    pub backward: bool,
}

/// α when the rule is exactly L^-α (1/√L: 0.5, 1/L: 1, `L^-0.3`: 0.3), else `None`.
pub fn rule_alpha(rule: &TauRule) -> Option<f64> {
    match *rule {
        TauRule::InvSqrtDepth { scale: 1.0 } => Some(0.5),
        TauRule::InvDepth { scale: 1.0 } => Some(1.0),
        TauRule::Power {
            scale: 1.0,
            exponent,
        } => Some(-exponent),
        _ => None,
    }
}

/// Blocks 1, 2, 4, …, and L (1-based).
pub fn sample_blocks(n_blocks: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..usize::BITS)
        .map(|k| 1usize << k)
        .take_while(|&b| b <= n_blocks)
        .collect();
    if n_blocks > 0 && v.last() != Some(&n_blocks) {
        v.push(n_blocks);
    }
    v
}

/// Median of the finite values (NaN when none).
pub fn median(values: &[f64]) -> f64 {
    let mut xs: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let k = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[k]
    } else {
        0.5 * (xs[k - 1] + xs[k])
    }
}
