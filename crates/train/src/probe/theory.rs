//! The theory network's fast probe: every τ at once on one f32 draw of the weights,
//! rescaled at each block (see the module docs of [`crate::probe`]).

use tau_kernels::matmul::block_matmul_f32;
use tau_kernels::probe::{apply_mask, linear_step, relu_step, set_mask};

use super::*;

/// Per-seed output of the theory fast path for one τ column (natural logs).
#[derive(Debug, Clone, Default)]
pub struct TheorySeedResult {
    /// ln ‖h_L‖/‖h_0‖ per input (−∞ for a hidden state that died; NaN if h_0 is zero).
    pub log_ratio: Vec<f64>,
    /// ln ‖∂W_1‖/‖∂W_L‖ per input.
    pub log_grad_ratio: Vec<f64>,
    /// ln ‖h_l‖/‖h_0‖ per sampled block, per input.
    pub block_log_ratio: Vec<Vec<f64>>,
    /// ln ‖∂W_l‖/‖∂W_L‖ per sampled block, per input.
    pub block_log_grad: Vec<Vec<f64>>,
}

fn cpu_f32(t: &Tensor) -> candle::Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The theory network's weights as row-major f32 arrays, the input of the fast probe.
#[derive(Debug, Clone)]
pub struct TheoryWeights {
    /// p, the input dimension.
    pub input_dim: usize,
    /// m, the width.
    pub width: usize,
    /// d, the output dimension.
    pub output_dim: usize,
    /// A, m × p.
    pub input: Vec<f32>,
    /// W_1..W_L, each m × m.
    pub blocks: Vec<Vec<f32>>,
    /// B, d × m.
    pub output: Vec<f32>,
}

impl TheoryWeights {
    /// The weights `tau_model::init_varmap(cfg, seed, DType::F32, cpu)` gives, bit for bit
    /// (drawn with [`tau_model::init::init_values_f32`], without building tensors).
    ///
    /// # Errors
    /// An invalid config.
    pub fn draw(cfg: &TheoryConfig, seed: u64) -> candle::Result<Self> {
        let mut values = tau_model::init::init_values_f32(&ModelConfig::Theory(cfg.clone()), seed)?;
        // param_specs order: A, W_1..W_L, B.
        let output = values.pop().unwrap_or_default();
        let mut rest = values.into_iter();
        let input = rest.next().unwrap_or_default();
        let blocks: Vec<Vec<f32>> = rest.collect();
        let w = Self {
            input_dim: cfg.input_dim,
            width: cfg.width,
            output_dim: cfg.output_dim,
            input,
            blocks,
            output,
        };
        w.check()?;
        Ok(w)
    }

    /// The weights of `net`, as f32.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn from_net(net: &TheoryNet) -> candle::Result<Self> {
        let cfg = net.config();
        let w = Self {
            input_dim: cfg.input_dim,
            width: cfg.width,
            output_dim: cfg.output_dim,
            input: cpu_f32(net.input_weight())?,
            blocks: net
                .weights()
                .iter()
                .map(cpu_f32)
                .collect::<candle::Result<_>>()?,
            output: cpu_f32(net.output_weight())?,
        };
        w.check()?;
        Ok(w)
    }

    fn check(&self) -> candle::Result<()> {
        let (p, m, d) = (self.input_dim, self.width, self.output_dim);
        if self.input.len() != m * p
            || self.output.len() != d * m
            || self.blocks.iter().any(|w| w.len() != m * m)
        {
            candle::bail!("probe: weights do not match width {m}, input dim {p}, output dim {d}")
        }
        Ok(())
    }
}

/// ln of the norm whose square is `n2`, and the factor that scales the row to unit norm:
/// a zero row gives (−∞, 0), a non-finite one (NaN, 0).
fn log_norm(n2: f64) -> (f64, f32) {
    if n2 > 0.0 && n2.is_finite() {
        (0.5 * n2.ln(), (1.0 / n2.sqrt()) as f32)
    } else if n2 == 0.0 {
        (f64::NEG_INFINITY, 0.0)
    } else {
        (f64::NAN, 0.0)
    }
}

/// The theory network's forward and backward probe for many τ at once, on the weights
/// `wts` and the inputs `xs` (n × p, row-major, f64).
///
/// The backward pass runs only for the τ with `backward[t]` true (its rows are a
/// separate, smaller matrix); the others get empty gradient fields.
///
/// Every row is kept at about unit norm: each block's product is computed from the rows
/// as the previous block left them, and the scaling to unit norm is folded into the next
/// block's element-wise step (exact: the block is positively homogeneous).
///
/// Returns one [`TheorySeedResult`] per entry of `taus`.
///
/// # Errors
/// Inputs that do not match the weights, or `backward` not of the length of `taus`.
pub fn theory_probe_seed(
    wts: &TheoryWeights,
    xs: &[f64],
    n: usize,
    taus: &[f64],
    backward: &[bool],
    blocks: &[usize],
) -> candle::Result<Vec<TheorySeedResult>> {
    wts.check()?;
    let kernel_set = tau_kernels::select::kernels().set();
    let p = wts.input_dim;
    if xs.len() != n * p {
        candle::bail!(
            "probe: {} input values for {n} inputs of dimension {p}",
            xs.len()
        )
    }
    let n_tau = taus.len();
    if backward.len() != n_tau {
        candle::bail!(
            "probe: {} backward flags for {n_tau} tau values",
            backward.len()
        )
    }
    // Backward rows: the τ columns with `backward`, in order; grad_col[t] is the index of
    // column t among them.
    let grad_taus: Vec<usize> = (0..n_tau).filter(|&t| backward[t]).collect();
    let mut grad_col = vec![None; n_tau];
    for (k, &t) in grad_taus.iter().enumerate() {
        grad_col[t] = Some(k);
    }
    let (h0, log0) = unit_stem(wts, xs, n);
    let fwd = forward_pass(wts, &h0, &log0, n, taus, &grad_col, blocks, kernel_set)?;
    let bwd = backward_pass(wts, &fwd, n, taus, &grad_taus, blocks)?;
    Ok(seed_results(n, &grad_col, &fwd, &bwd))
}

/// h_0 = φ(A x) of every input in f64, scaled to unit rows, and ln‖h_0‖ of each.
fn unit_stem(wts: &TheoryWeights, xs: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let (p, m) = (wts.input_dim, wts.width);
    let a = &wts.input;
    let mut h0 = vec![0f64; n * m];
    for i in 0..n {
        for j in 0..m {
            let s: f64 = (0..p)
                .map(|k| f64::from(a[j * p + k]) * xs[i * p + k])
                .sum();
            h0[i * m + j] = s.max(0.0);
        }
    }
    let mut log0 = vec![0f64; n];
    for i in 0..n {
        let n2: f64 = h0[i * m..(i + 1) * m].iter().map(|v| v * v).sum();
        log0[i] = if n2 > 0.0 {
            0.5 * n2.ln()
        } else {
            f64::NEG_INFINITY
        };
        let inv = if n2 > 0.0 { 1.0 / n2.sqrt() } else { 0.0 };
        h0[i * m..(i + 1) * m].iter_mut().for_each(|v| *v *= inv);
    }
    (h0, log0)
}

/// The forward pass of every (τ, input) row: log-norms, and for the backward rows the
/// ReLU masks and the log-norms at each block's input.
struct Forward {
    /// ln‖h_L‖/‖h_0‖ of each row (τ-major).
    logn: Vec<f64>,
    /// The ReLU masks of the backward rows, block-major, `words` u64 per row.
    masks: Vec<u64>,
    /// ln‖h_{l}‖/‖h_0‖ at the input of block l of the backward rows, block-major.
    prev_log: Vec<f64>,
    /// `logn` after each sampled block.
    block_fwd: Vec<Vec<f64>>,
}

#[allow(clippy::too_many_arguments)]
fn forward_pass(
    wts: &TheoryWeights,
    h0: &[f64],
    log0: &[f64],
    n: usize,
    taus: &[f64],
    grad_col: &[Option<usize>],
    blocks: &[usize],
    kernel_set: tau_kernels::select::KernelSet,
) -> candle::Result<Forward> {
    let (m, n_blocks, n_tau) = (wts.width, wts.blocks.len(), taus.len());
    let rows = n_tau * n;
    let grows = grad_col.iter().flatten().count() * n;
    let mut h = vec![0f32; rows * m];
    for t in 0..n_tau {
        for i in 0..n {
            let dst = &mut h[(t * n + i) * m..(t * n + i + 1) * m];
            for (d, s) in dst.iter_mut().zip(&h0[i * m..(i + 1) * m]) {
                *d = *s as f32;
            }
        }
    }
    let tau_of_row: Vec<f32> = (0..rows).map(|r| taus[r / n] as f32).collect();
    let words = m.div_ceil(64);
    // ReLU masks and prev_log[l][g] = ln‖h_l‖/‖h_0‖ at the input of block l (0-based),
    // kept for the backward rows only.
    let mut masks = vec![0u64; n_blocks * grows * words];
    let mut prev_log = vec![0f64; n_blocks * grows];
    // logn[r]: ln‖h_l‖/‖h_0‖ of row r; the stored row is h_l / exp(logn[r] − ln‖row‖),
    // and inv[r] = 1/‖row‖ scales it to unit norm (folded into the next block's step).
    let mut logn = vec![0f64; rows];
    let mut inv = vec![1f32; rows];
    for (r, log) in logn.iter_mut().enumerate() {
        if !log0[r % n].is_finite() {
            *log = f64::NAN;
            inv[r] = 0.0;
        }
    }
    let mut block_fwd: Vec<Vec<f64>> = Vec::with_capacity(blocks.len());
    let mut next_sample = blocks.iter().peekable();
    let mut pw = vec![0f32; rows * m];
    for (l, w) in wts.blocks.iter().enumerate() {
        for (t, gc) in grad_col.iter().enumerate() {
            if let Some(k) = gc {
                prev_log[l * grows + k * n..l * grows + (k + 1) * n]
                    .copy_from_slice(&logn[t * n..(t + 1) * n]);
            }
        }
        block_matmul_f32(&h, w, &mut pw, rows, m, true)?;
        let mask = &mut masks[l * grows * words..(l + 1) * grows * words];
        for r in 0..rows {
            let zr = &mut h[r * m..(r + 1) * m];
            let n2 = relu_step(
                kernel_set,
                zr,
                &pw[r * m..(r + 1) * m],
                inv[r],
                tau_of_row[r],
            );
            let (ln_norm, s) = log_norm(n2);
            // The stored row had norm 1/inv[r] before the step: h_l's log-norm is the old
            // one plus ln ‖row after the step‖ (the step divided by that norm).
            logn[r] += ln_norm;
            inv[r] = s;
            if let Some(k) = grad_col[r / n] {
                let g = k * n + r % n;
                set_mask(zr, &mut mask[g * words..(g + 1) * words]);
            }
        }
        if next_sample.peek() == Some(&&(l + 1)) {
            next_sample.next();
            block_fwd.push(logn.clone());
        }
    }
    Ok(Forward {
        logn,
        masks,
        prev_log,
        block_fwd,
    })
}

/// The backward pass's log gradient norms: at the first and last block, and at each
/// sampled block, per backward row.
struct Backward {
    grad_first: Vec<f64>,
    grad_last: Vec<f64>,
    grad_at: Vec<Vec<f64>>,
}

fn backward_pass(
    wts: &TheoryWeights,
    fwd: &Forward,
    n: usize,
    taus: &[f64],
    grad_taus: &[usize],
    blocks: &[usize],
) -> candle::Result<Backward> {
    let (m, n_blocks) = (wts.width, wts.blocks.len());
    let grows = grad_taus.len() * n;
    let words = m.div_ceil(64);
    let (masks, prev_log) = (&fwd.masks, &fwd.prev_log);
    // From g_L = Bᵀ1 for every backward row.
    let b = &wts.output;
    let d = wts.output_dim;
    let mut g_dir = vec![0f32; m];
    for k in 0..d {
        for j in 0..m {
            g_dir[j] += b[k * m + j];
        }
    }
    let tau_of_grow: Vec<f32> = (0..grows).map(|g| taus[grad_taus[g / n]] as f32).collect();
    let mut g = Vec::with_capacity(grows * m);
    for _ in 0..grows {
        g.extend_from_slice(&g_dir);
    }
    // gamma[r]: the log-scale of the stored row r of g (true gradient = exp(gamma)·row).
    let mut gamma = vec![0f64; grows];
    let mut ginv = vec![0f32; grows];
    // grad_log[r] at sampled blocks, ln‖∂W_l‖ up to the common factor |r_i|.
    let mut grad_at: Vec<Vec<f64>> = vec![Vec::new(); blocks.len()];
    let mut grad_first = vec![0f64; grows];
    let mut grad_last = vec![0f64; grows];
    let backward_blocks = if grows == 0 { 0 } else { n_blocks };
    let mut q = vec![0f32; grows * m];
    for l in (0..backward_blocks).rev() {
        let mask = &masks[l * grows * words..(l + 1) * grows * words];
        let mut grad = vec![0f64; grows];
        for r in 0..grows {
            let n2 = apply_mask(
                &mut g[r * m..(r + 1) * m],
                &mask[r * words..(r + 1) * words],
            );
            let (ln_norm, s) = log_norm(n2);
            // The true gradient is exp(gamma)·row: ‖D_l g_l‖ = exp(gamma)·‖masked row‖.
            gamma[r] += ln_norm;
            ginv[r] = s;
            grad[r] = f64::from(tau_of_grow[r]).ln() + gamma[r] + prev_log[l * grows + r];
        }
        if l + 1 == n_blocks {
            grad_last.clone_from(&grad);
        }
        if l == 0 {
            grad_first.clone_from(&grad);
        }
        if let Some(k) = blocks.iter().position(|&bk| bk == l + 1) {
            grad_at[k] = grad;
        }
        if l == 0 {
            break;
        }
        block_matmul_f32(&g, &wts.blocks[l], &mut q, grows, m, false)?;
        // g_{l−1} = D_l g_l + τ W_lᵀ D_l g_l, from the masked rows scaled to unit norm
        // (gamma already holds their log-norm).
        for r in 0..grows {
            linear_step(
                &mut g[r * m..(r + 1) * m],
                &q[r * m..(r + 1) * m],
                ginv[r],
                tau_of_grow[r],
            );
        }
    }
    Ok(Backward {
        grad_first,
        grad_last,
        grad_at,
    })
}

/// One result per τ column from the passes' per-row numbers.
fn seed_results(
    n: usize,
    grad_col: &[Option<usize>],
    fwd: &Forward,
    bwd: &Backward,
) -> Vec<TheorySeedResult> {
    let (logn, block_fwd) = (&fwd.logn, &fwd.block_fwd);
    let (grad_first, grad_last, grad_at) = (&bwd.grad_first, &bwd.grad_last, &bwd.grad_at);
    let n_tau = grad_col.len();
    let mut out = Vec::with_capacity(n_tau);
    for (t, gc) in grad_col.iter().enumerate() {
        let range = t * n..(t + 1) * n;
        let Some(k) = *gc else {
            out.push(TheorySeedResult {
                log_ratio: logn[range.clone()].to_vec(),
                log_grad_ratio: Vec::new(),
                block_log_ratio: block_fwd
                    .iter()
                    .map(|v| v[range.clone()].to_vec())
                    .collect(),
                block_log_grad: Vec::new(),
            });
            continue;
        };
        let grange = k * n..(k + 1) * n;
        out.push(TheorySeedResult {
            log_ratio: logn[range.clone()].to_vec(),
            log_grad_ratio: grange
                .clone()
                .map(|r| grad_first[r] - grad_last[r])
                .collect(),
            block_log_ratio: block_fwd
                .iter()
                .map(|v| v[range.clone()].to_vec())
                .collect(),
            block_log_grad: grad_at
                .iter()
                .map(|v| {
                    grange
                        .clone()
                        .map(|r| v.get(r).copied().unwrap_or(f64::NAN) - grad_last[r])
                        .collect()
                })
                .collect(),
        });
    }
    out
}

/// Probes the theory network `cfg` for every τ in `rules`, over `seeds`, with `n_inputs`
/// unit-norm synthetic inputs per seed (tau-data's sphere data for that seed).
///
/// # Errors
/// An invalid config or tensor errors.
pub fn probe_theory(
    cfg: &TheoryConfig,
    rules: &[ProbeTauRule],
    seeds: &[u64],
    n_inputs: usize,
) -> crate::Result<Vec<ProbeTau>> {
    probe_theory_weights(cfg, rules, seeds, n_inputs, None)
}

/// [`probe_theory`] on the given weights (a trained checkpoint's) for every seed, where
/// the seeds then draw only the inputs; `None`: each seed's initialization.
///
/// # Errors
/// An invalid config, weights that do not fit it, or tensor errors.
#[allow(clippy::type_complexity)]
pub fn probe_theory_weights(
    cfg: &TheoryConfig,
    rules: &[ProbeTauRule],
    seeds: &[u64],
    n_inputs: usize,
    fixed: Option<&TheoryWeights>,
) -> crate::Result<Vec<ProbeTau>> {
    let l = cfg.depth;
    let blocks = sample_blocks(l);
    let resolved: Vec<f64> = rules.iter().map(|r| r.rule.resolve(l)).collect();
    // Distinct τ values are computed once (at L = 1 every L^-α is 1).
    let mut distinct: Vec<f64> = Vec::new();
    let column: Vec<usize> = resolved
        .iter()
        .map(|&t| match distinct.iter().position(|&d| d == t) {
            Some(k) => k,
            None => {
                distinct.push(t);
                distinct.len() - 1
            }
        })
        .collect();
    // A distinct τ gets the backward pass when any rule resolving to it asks for it.
    let mut backward = vec![false; distinct.len()];
    for (rule, &c) in rules.iter().zip(&column) {
        backward[c] |= rule.backward;
    }
    let mut acc: Vec<(Vec<f64>, Vec<f64>, Vec<Vec<f64>>, Vec<Vec<f64>>)> = (0..distinct.len())
        .map(|_| {
            (
                Vec::new(),
                Vec::new(),
                vec![Vec::new(); blocks.len()],
                vec![Vec::new(); blocks.len()],
            )
        })
        .collect();
    let ln10 = std::f64::consts::LN_10;
    for &seed in seeds {
        let drawn;
        let weights = match fixed {
            Some(w) => w,
            None => {
                drawn = TheoryWeights::draw(cfg, seed)?;
                &drawn
            }
        };
        let data = tau_data::synthetic::sphere(
            n_inputs,
            cfg.input_dim,
            cfg.output_dim,
            tau_data::synthetic::Targets::Gaussian,
            seed,
        );
        let results =
            theory_probe_seed(weights, &data.xs, n_inputs, &distinct, &backward, &blocks)?;
        for (a, r) in acc.iter_mut().zip(results) {
            let keep: Vec<bool> = r.log_ratio.iter().map(|v| !v.is_nan()).collect();
            let pick = |v: &[f64]| -> Vec<f64> {
                v.iter()
                    .zip(&keep)
                    .filter(|(_, k)| **k)
                    .map(|(x, _)| x / ln10)
                    .collect()
            };
            a.0.extend(pick(&r.log_ratio));
            a.1.extend(pick(&r.log_grad_ratio));
            for (dst, src) in a.2.iter_mut().zip(&r.block_log_ratio) {
                dst.extend(pick(src));
            }
            for (dst, src) in a.3.iter_mut().zip(&r.block_log_grad) {
                dst.extend(pick(src));
            }
        }
    }
    Ok(rules
        .iter()
        .zip(&column)
        .map(|(rule, &c)| {
            let a = &acc[c];
            ProbeTau {
                rule: rule.text.clone(),
                alpha: rule_alpha(&rule.rule),
                tau: distinct[c],
                log10_ratio: a.0.clone(),
                log10_grad_ratio: a.1.clone(),
                block_log10_ratio_median: a.2.iter().map(|v| median(v)).collect(),
                block_log10_grad_median: if a.1.is_empty() {
                    Vec::new()
                } else {
                    a.3.iter().map(|v| median(v)).collect()
                },
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;
    use candle_nn::VarBuilder;

    fn net(
        width: usize,
        depth: usize,
        tau: &str,
        seed: u64,
    ) -> (TheoryNet, candle_nn::VarMap, TheoryConfig) {
        let cfg = TheoryConfig {
            input_dim: 8,
            width,
            depth,
            tau: tau.parse().unwrap(),
            ..Default::default()
        };
        let vm = tau_model::init_varmap(
            &ModelConfig::Theory(cfg.clone()),
            seed,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let net =
            TheoryNet::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        (net, vm, cfg)
    }

    #[test]
    fn fast_path_matches_the_library_trace_and_gradients() {
        let n = 5;
        for tau in ["1", "1/sqrt(L)", "1/L"] {
            let (net, _vm, cfg) = net(32, 12, tau, 3);
            let wts = TheoryWeights::from_net(&net).unwrap();
            let data =
                tau_data::synthetic::sphere(n, 8, 1, tau_data::synthetic::Targets::Gaussian, 3);
            let blocks = sample_blocks(12);
            let ours =
                theory_probe_seed(&wts, &data.xs, n, &[cfg.tau_value()], &[true], &blocks).unwrap();
            let (xs, ys) = data.to_tensors(DType::F32, &Device::Cpu).unwrap();
            let trace = net.forward_traced(&xs).unwrap();
            for i in 0..n {
                let want = trace.log_ratio(i).unwrap();
                let got = ours[0].log_ratio[i];
                assert!(
                    (want - got).abs() < 1e-4 * want.abs().max(1.0),
                    "{tau} input {i}: {want} vs {got}"
                );
                // Block 4's ratio.
                let want4 = trace.log_norms[4][i] - trace.log_norms[0][i];
                assert!(
                    (ours[0].block_log_ratio[2][i] - want4).abs() < 1e-4 * want4.abs().max(1.0)
                );
                // One input at a time, the library's gradient norms give the same ratio.
                let x = xs.narrow(0, i, 1).unwrap();
                let y = ys.narrow(0, i, 1).unwrap();
                let g = net.layer_grad_log_norms(&x, &y).unwrap();
                let want = g[0] - g[11];
                let got = ours[0].log_grad_ratio[i];
                assert!(
                    (want - got).abs() < 1e-3 * want.abs().max(1.0),
                    "{tau} grad {i}: {want} vs {got}"
                );
                let want8 = g[7] - g[11];
                assert!((ours[0].block_log_grad[3][i] - want8).abs() < 1e-3 * want8.abs().max(1.0));
            }
        }
    }

    #[test]
    fn log_norm_of_zero_and_non_finite_rows() {
        assert_eq!(log_norm(0.0), (f64::NEG_INFINITY, 0.0));
        assert!(log_norm(f64::NAN).0.is_nan());
        assert_eq!(log_norm(4.0).1, 0.5);
    }

    #[test]
    fn drawn_weights_are_the_varmap_weights() {
        let (net, _vm, cfg) = net(8, 5, "1", 4);
        let from_net = TheoryWeights::from_net(&net).unwrap();
        let drawn = TheoryWeights::draw(&cfg, 4).unwrap();
        assert_eq!(drawn.blocks.len(), 5);
        assert_eq!(drawn.input, from_net.input);
        assert_eq!(drawn.blocks, from_net.blocks);
        assert_eq!(drawn.output, from_net.output);
        let other = TheoryWeights::draw(&cfg, 5).unwrap();
        assert_ne!(other.blocks, from_net.blocks);
    }

    #[test]
    fn many_taus_on_shared_weights_equal_one_tau_at_a_time() {
        let n = 3;
        let (net, _vm, _) = net(16, 6, "1", 1);
        let wts = TheoryWeights::from_net(&net).unwrap();
        let data = tau_data::synthetic::sphere(n, 8, 1, tau_data::synthetic::Targets::Gaussian, 1);
        let taus = [1.0, 0.5, 0.1];
        let blocks = sample_blocks(6);
        let all = theory_probe_seed(&wts, &data.xs, n, &taus, &[true; 3], &blocks).unwrap();
        // The backward pass for the middle τ only: same values, the others without.
        let middle =
            theory_probe_seed(&wts, &data.xs, n, &taus, &[false, true, false], &blocks).unwrap();
        for (k, &t) in taus.iter().enumerate() {
            let one = theory_probe_seed(&wts, &data.xs, n, &[t], &[true], &blocks).unwrap();
            for i in 0..n {
                assert!((one[0].log_ratio[i] - all[k].log_ratio[i]).abs() < 1e-5);
                assert!((one[0].log_grad_ratio[i] - all[k].log_grad_ratio[i]).abs() < 1e-5);
                assert!((middle[k].log_ratio[i] - all[k].log_ratio[i]).abs() < 1e-5);
            }
            if k == 1 {
                assert_eq!(middle[k].block_log_grad.len(), blocks.len());
                for i in 0..n {
                    assert!((middle[k].log_grad_ratio[i] - all[k].log_grad_ratio[i]).abs() < 1e-5);
                    for b in 0..blocks.len() {
                        let (x, y) = (middle[k].block_log_grad[b][i], all[k].block_log_grad[b][i]);
                        assert!((x - y).abs() < 1e-5, "block {b} input {i}: {x} vs {y}");
                    }
                }
            } else {
                assert!(middle[k].log_grad_ratio.is_empty());
                assert!(middle[k].block_log_grad.is_empty());
            }
        }
    }

    /// PAPER.md's table (independent float64 simulation, width 256, 64 inputs): mean
    /// ‖h_L‖/‖h_0‖ at L = 64 is 6.3e7 (τ = 1), 30 (L^-1/4), 1.65 (1/√L), 1.01 (1/L).
    /// One seed of 64 inputs scatters around those; the bounds allow for that.
    #[test]
    fn mean_ratios_at_depth_64_match_the_paper_table() {
        let cfg = TheoryConfig {
            input_dim: 64,
            width: 256,
            depth: 64,
            ..Default::default()
        };
        let rules: Vec<ProbeTauRule> = ["1", "L^-0.25", "1/sqrt(L)", "1/L"]
            .iter()
            .map(|s| ProbeTauRule {
                text: s.to_string(),
                rule: s.parse().unwrap(),
                backward: true,
            })
            .collect();
        let out = probe_theory(&cfg, &rules, &[0], 64).unwrap();
        let mean = |t: &ProbeTau| {
            let m = t
                .log10_ratio
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            m + (t.log10_ratio.iter().map(|v| 10f64.powf(v - m)).sum::<f64>()
                / t.log10_ratio.len() as f64)
                .log10()
        };
        let got: Vec<f64> = out.iter().map(mean).collect();
        assert!((got[0] - 6.3e7f64.log10()).abs() < 0.5, "τ=1: 1e{}", got[0]);
        assert!(
            (got[1] - 30f64.log10()).abs() < 0.15,
            "L^-1/4: 1e{}",
            got[1]
        );
        assert!(
            (10f64.powf(got[2]) - 1.65).abs() < 0.15,
            "1/√L: {}",
            10f64.powf(got[2])
        );
        assert!(
            (10f64.powf(got[3]) - 1.01).abs() < 0.02,
            "1/L: {}",
            10f64.powf(got[3])
        );
        assert_eq!(out[2].alpha, Some(0.5));
        assert_eq!(out[0].alpha, None);
        assert_eq!(out[0].log10_ratio.len(), 64);
    }

    #[test]
    fn sampled_blocks_are_powers_of_two_and_the_last() {
        assert_eq!(sample_blocks(1), vec![1]);
        assert_eq!(sample_blocks(6), vec![1, 2, 4, 6]);
        assert_eq!(sample_blocks(8), vec![1, 2, 4, 8]);
    }
}
