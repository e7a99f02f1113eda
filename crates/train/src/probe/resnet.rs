//! The probe of the ResNets: hidden-state norms through the model's own hooked forward
//! pass, gradient norms per residual block.

use crate::error::bail;

use super::*;

/// Per-sample ln‖x‖ of a batch (N, ...), in f64.
fn sample_log_norms(xs: &Tensor) -> candle::Result<Vec<f64>> {
    let n = xs.dim(0)?;
    let flat = xs.reshape((n, ()))?.to_dtype(DType::F64)?;
    let sq = flat.sqr()?.sum(1)?.to_vec1::<f64>()?;
    Ok(sq.into_iter().map(|s| 0.5 * s.ln()).collect())
}

/// The number of residual blocks one after another, which the per-block values are
/// reported over: L, except in a bottleneck ResNet, whose L is its longest stage.
pub fn chain_len(cfg: &ModelConfig) -> usize {
    cfg.stage_blocks().iter().sum()
}

/// The smallest image side a probe of the ResNet `cfg` takes: its total stride, where the
/// last stage works on 1×1 maps (4 for a CIFAR ResNet: two stride-2 stages; 32 for a
/// bottleneck ResNet: the stem's stride-2 convolution and max-pool, three stride-2
/// stages). Below it the stride-2 layers no longer halve anything, and the 3×3
/// convolutions of the later stages see one pixel amid their padding. `None` for the theory
/// network, which takes vectors.
pub fn min_image_size(cfg: &ModelConfig) -> Option<usize> {
    match cfg {
        ModelConfig::Theory(_) => None,
        ModelConfig::CifarResnet(_) => Some(4),
        ModelConfig::BottleneckResnet(_) => Some(32),
    }
}

/// The ResNets: per-sample ‖h_l‖/‖h_0‖ after each block (h_0: the stem's output), and
/// the gradient norm of each block's parameters for the cross-entropy of random labels,
/// relative to the last block's. BatchNorm uses batch statistics, as in training.
///
/// The weights are each seed's initialization, or the `trained` checkpoint's for every
/// seed (then only the inputs and labels change with the seed, and τ is the model's own:
/// `rules` holds its rule alone).
///
/// # Errors
/// The theory network (it has a probe of its own), or shape and device errors.
pub fn probe_resnet(
    cfg: &ModelConfig,
    rules: &[ProbeTauRule],
    seeds: &[u64],
    n: usize,
    image: usize,
    trained: Option<&Trained>,
) -> crate::Result<Vec<ProbeTau>> {
    let n_blocks = cfg.n_blocks();
    // The residual chain: L blocks in a CIFAR ResNet, more in a bottleneck ResNet (whose
    // L is its longest stage).
    let chain = chain_len(cfg);
    let blocks = sample_blocks(chain);
    let mut out = Vec::new();
    for rule in rules {
        if cfg.as_theory().is_some() {
            bail!("the theory network takes the fast path")
        }
        let mut c = cfg.clone();
        c.as_family_mut().set_tau_rule(rule.rule);
        let batch = Batch {
            n,
            image,
            chain,
            blocks: &blocks,
        };
        let mut ratios = Vec::new();
        let mut grad_ratio = Vec::new();
        let mut block_ratio: Vec<Vec<f64>> = vec![Vec::new(); blocks.len()];
        let mut block_grad: Vec<Vec<f64>> = vec![Vec::new(); blocks.len()];
        // A trained checkpoint's learnable τ, as trained (a fixed τ is the rule's).
        let mut tau_used = None;
        for &seed in seeds {
            let m = probe_seed(&c, seed, &batch, trained)?;
            tau_used = m.tau.or(tau_used);
            ratios.extend(m.ratios.into_iter().filter(|v| v.is_finite()));
            for (dst, src) in block_ratio.iter_mut().zip(&m.block_ratios) {
                dst.extend(src.iter().copied().filter(|v| v.is_finite()));
            }
            let rel = m.grad_rel;
            if rel[0].is_finite() {
                grad_ratio.push(rel[0]);
            }
            for (k, &b) in blocks.iter().enumerate() {
                if rel[b - 1].is_finite() {
                    block_grad[k].push(rel[b - 1]);
                }
            }
        }
        // Another scheme than τ: the row is named after it, and τ (unused) counts as 1.
        let scaling = c.scaling();
        let (text, tau) = match scaling {
            Scaling::Tau => (
                rule.text.clone(),
                tau_used.unwrap_or_else(|| rule.rule.resolve(n_blocks)),
            ),
            _ => (scaling.name().to_string(), c.tau_init()),
        };
        out.push(ProbeTau {
            rule: text,
            alpha: rule_alpha(&rule.rule),
            tau,
            log10_ratio: ratios,
            log10_grad_ratio: grad_ratio,
            block_log10_ratio_median: block_ratio.iter().map(|v| median(v)).collect(),
            block_log10_grad_median: block_grad.iter().map(|v| median(v)).collect(),
        });
    }
    Ok(out)
}

/// The inputs of one seed's probe and where it measures.
struct Batch<'a> {
    /// Inputs.
    n: usize,
    /// Their height and width.
    image: usize,
    /// The residual chain's length.
    chain: usize,
    /// The sampled blocks (1-based).
    blocks: &'a [usize],
}

/// One seed's measurements of a ResNet.
struct SeedProbe {
    /// log10 ‖h_chain‖/‖h_0‖ per input.
    ratios: Vec<f64>,
    /// log10 ‖h_l‖/‖h_0‖ per sampled block, per input.
    block_ratios: Vec<Vec<f64>>,
    /// log10 of each block's gradient norm relative to the last block's, blocks 1..=chain.
    grad_rel: Vec<f64>,
    /// The model's learnable τ, from a trained checkpoint.
    tau: Option<f64>,
}

/// Draws seed `seed`'s inputs (and weights, without `trained`), runs the model's own
/// forward pass measuring the stem's and the sampled blocks' outputs, and back-propagates
/// the cross-entropy of random labels.
fn probe_seed(
    c: &ModelConfig,
    seed: u64,
    batch: &Batch<'_>,
    trained: Option<&Trained>,
) -> crate::Result<SeedProbe> {
    let dev = Device::Cpu;
    let ln10 = std::f64::consts::LN_10;
    let Batch {
        n,
        image,
        chain,
        blocks,
    } = *batch;
    // The theory network never comes here (it has a probe of its own).
    let (in_ch, classes) = (c.in_channels().unwrap_or(1), c.num_outputs());
    let (varmap, dtype) = match trained {
        Some(t) => (
            t.varmap.clone(),
            tau_model::checkpoint::varmap_dtype(&t.varmap).unwrap_or(DType::F32),
        ),
        None => (
            tau_model::init_varmap(c, seed, DType::F32, &dev)?,
            DType::F32,
        ),
    };
    let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
    let model = Model::new(c, vb.clone())?;
    let tau = if trained.is_some() && c.learnable_tau() {
        Some(model.tau()?)
    } else {
        None
    };
    let dim = in_ch * image * image;
    let data = tau_data::synthetic::sphere(n, dim, 1, tau_data::synthetic::Targets::Gaussian, seed);
    let xs = (Tensor::from_slice(&data.xs, (n, in_ch, image, image), &dev)?.to_dtype(dtype)?
        * (dim as f64).sqrt())?;
    // One forward pass of the model itself, the stem's output and the sampled blocks'
    // outputs measured on the way; its logits feed the backward pass.
    let mut log0 = Vec::new();
    let mut last = Vec::new();
    let mut block_ratios: Vec<Vec<f64>> = Vec::new();
    let logits = model.forward_hooked(&xs, true, |l, h| {
        if l == 0 {
            log0 = sample_log_norms(h)?;
            last = log0.clone();
        } else if blocks.contains(&l) || l == chain {
            last = sample_log_norms(h)?;
            if blocks.contains(&l) {
                block_ratios.push(
                    last.iter()
                        .zip(&log0)
                        .map(|(a, b)| (a - b) / ln10)
                        .collect(),
                );
            }
        }
        Ok(())
    })?;
    let ratios = last
        .iter()
        .zip(&log0)
        .map(|(a, b)| (a - b) / ln10)
        .collect();
    // Backward: cross-entropy of random labels.
    let labels: Vec<u32> = (0..n)
        .map(|i| ((seed as usize + 7 * i) % classes) as u32)
        .collect();
    let labels = Tensor::from_vec(labels, n, &dev)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
    let grads = loss.backward()?;
    let grad_rel = block_grad_log_ratios(c, &varmap, &grads, chain)?;
    Ok(SeedProbe {
        ratios,
        block_ratios,
        grad_rel,
        tau,
    })
}

/// log10 of each block's gradient norm (its parameters' together) relative to the last
/// block's, blocks 1..=chain in order.
fn block_grad_log_ratios(
    c: &ModelConfig,
    varmap: &candle_nn::VarMap,
    grads: &candle::backprop::GradStore,
    chain: usize,
) -> crate::Result<Vec<f64>> {
    let ln10 = std::f64::consts::LN_10;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| crate::error::err!("varmap lock poisoned"))?;
    let mut per_block = vec![0f64; chain];
    // In name order, so that the sums (and the record) repeat bit for bit.
    let mut named: Vec<_> = data.iter().collect();
    named.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (name, var) in named {
        let Some(b) = c.block_index(name) else {
            continue;
        };
        if let Some(g) = grads.get(var.as_tensor()) {
            let s = g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            per_block[b] += s;
        }
    }
    let log_last = 0.5 * per_block[chain - 1].ln();
    let rel: Vec<f64> = per_block
        .iter()
        .map(|s| (0.5 * s.ln() - log_last) / ln10)
        .collect();
    Ok(rel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: &str) -> ModelConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn minimum_image_size_is_the_total_stride() {
        let r8 = model(r#"{"family": "cifar_resnet", "depth": 8}"#);
        let r50 = model(r#"{"family": "bottleneck_resnet", "depth": 50}"#);
        let theory = model(r#"{"family": "theory", "depth": 4}"#);
        assert_eq!(min_image_size(&r8), Some(4));
        assert_eq!(min_image_size(&r50), Some(32));
        assert_eq!(min_image_size(&theory), None);
        // The last stage's maps are 1×1 at the minimum.
        let last = |cfg: &ModelConfig| crate::memory::kept_maps(cfg).last().unwrap().2;
        assert_eq!(last(&r8), 4);
        assert_eq!(last(&r50), 32);
    }
}
