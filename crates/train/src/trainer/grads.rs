//! One step's gradients (full batch or mini-batch), their norms (global and per layer)
//! and clipping.

use std::collections::HashMap;

use tau_kernels::sgd::sum_squares;
use tau_model::params::ParamName;

use super::*;

/// The name used for a parameter's layer in the per-layer gradient norms: the block
/// (`layer2.3`, `blocks.7`) when the second name segment is an index, else the first
/// segment (`conv1`, `fc`, `tau`). See [`tau_model::params::ParamName::layer`].
pub fn layer_of(name: &str) -> &str {
    ParamName::parse(name).layer()
}

/// Sorts names with numbers compared as numbers (`layer1.2` before `layer1.10`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let (na, nb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            na.len().cmp(&nb.len()).then(na.cmp(nb))
        } else {
            xa.cmp(xb)
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// One step's gradient, and the loss and accuracy sums measured on the way.
pub(super) struct StepGrads {
    pub(super) grads: Vec<Option<Tensor>>,
    pub(super) loss_sum: f64,
    pub(super) correct: Option<u64>,
    pub(super) count: u64,
}

/// The last step's gradient norms.
#[derive(Debug, Clone, Default)]
pub(super) struct GradNorms {
    pub(super) global: f64,
    pub(super) layers: Vec<LayerNorm>,
    /// Σ g² of each gradient, by parameter (0 where there is none).
    pub(super) param_sq: Vec<f64>,
}

pub(super) fn grad_norms(names: &[String], grads: &[Option<Tensor>]) -> crate::Result<GradNorms> {
    let which: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
    if which.is_empty() {
        return Ok(GradNorms::default());
    }
    let sq: Vec<f64> = if grads.iter().flatten().all(|g| g.device().is_cpu()) {
        // One pass over each gradient, no temporary (`tau_kernels::sgd::sum_squares`).
        grads
            .iter()
            .flatten()
            .map(sum_squares)
            .collect::<candle::Result<_>>()?
    } else {
        // On a GPU: the sums on the device, read back in one transfer.
        let sq = grads
            .iter()
            .flatten()
            .map(|g| g.sqr()?.sum_all()?.to_dtype(candle::DType::F64))
            .collect::<candle::Result<Vec<_>>>()?;
        Tensor::stack(&sq, 0)?
            .to_device(&candle::Device::Cpu)?
            .to_vec1()?
    };
    // Layers in order of first appearance; an index by name (the theory network has as
    // many layers as parameters, thousands).
    let mut layers: Vec<(String, f64)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut param_sq = vec![0.0; grads.len()];
    for (&i, v) in which.iter().zip(&sq) {
        param_sq[i] = *v;
        let layer = layer_of(&names[i]);
        match index.get(layer) {
            Some(&k) => layers[k].1 += v,
            None => {
                index.insert(layer, layers.len());
                layers.push((layer.to_string(), *v));
            }
        }
    }
    Ok(GradNorms {
        global: sq.iter().sum::<f64>().sqrt(),
        layers: layers
            .into_iter()
            .map(|(name, s)| LayerNorm {
                name,
                norm: s.sqrt(),
            })
            .collect(),
        param_sq,
    })
}

/// Scales the gradients so that their global L2 norm, as the optimizer sees them (each
/// times its parameter's `grad_scale`: τ's divided by L), is at most `max_norm`, exactly
/// as PyTorch's `clip_grad_norm_` (factor `max_norm / (norm + 1e-6)` when below 1).
/// Returns the norm before clipping.
///
/// # Errors
/// Device errors.
pub fn clip_grad_norm(
    opt: &Sgd,
    grads: &mut [Option<Tensor>],
    max_norm: f64,
) -> candle::Result<f64> {
    let param_sq = grads
        .iter()
        .map(|g| match g {
            Some(g) => sum_squares(g),
            None => Ok(0.0),
        })
        .collect::<candle::Result<Vec<f64>>>()?;
    clip_with_sums(opt, grads, &param_sq, max_norm)
}

/// [`clip_grad_norm`] given each gradient's Σ g² (`param_sq`, by parameter).
pub(super) fn clip_with_sums(
    opt: &Sgd,
    grads: &mut [Option<Tensor>],
    param_sq: &[f64],
    max_norm: f64,
) -> candle::Result<f64> {
    let sq: f64 = opt
        .params()
        .iter()
        .zip(param_sq)
        .map(|(p, s)| s * p.spec.grad_scale * p.spec.grad_scale)
        .sum();
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

pub(super) fn collect_grads(
    opt: &Sgd,
    store: &candle::backprop::GradStore,
    acc: &mut [Option<Tensor>],
) -> candle::Result<()> {
    for (p, a) in opt.params().iter().zip(acc.iter_mut()) {
        if let Some(g) = store.get(p.var.as_tensor()) {
            *a = Some(match a.take() {
                None => g.clone(),
                Some(prev) => (prev + g)?,
            });
        }
    }
    Ok(())
}

pub(super) fn scale_for(cfg: &RunConfig, count: usize) -> f64 {
    match cfg.loss.reduction {
        Reduction::Mean => 1.0 / count.max(1) as f64,
        Reduction::Sum => 1.0,
    }
}

/// One batch's output, loss sum, and the gradients of the loss sum times `scale`: the
/// model's own backward pass where it has one (the theory network's, the same values
/// faster: [`tau_model::Model::loss_backward`]), else candle's autograd.
fn forward_backward(
    sess: &Session<'_>,
    xs: &Tensor,
    ys: &Targets,
    scale: f64,
) -> candle::Result<(Tensor, Tensor, candle::backprop::GradStore)> {
    let kind = sess.cfg.loss.kind;
    let mut sum = None;
    let fast = sess.model.loss_backward(xs, &mut |preds| {
        let l = loss_sum(kind, preds, ys)?;
        let scaled = l.affine(scale, 0.0)?;
        sum = Some(l);
        Ok(scaled)
    })?;
    if let (Some((preds, _, grads)), Some(l)) = (fast, sum) {
        return Ok((preds, l, grads));
    }
    let preds = sess.model.forward_t(xs, true)?;
    let l = loss_sum(kind, &preds, ys)?;
    let grads = l.affine(scale, 0.0)?.backward()?;
    Ok((preds, l, grads))
}

/// Full batch: the gradient of the loss over all `n` examples, summed over chunks of
/// `batch_size` in index order (the sum of the chunks' gradients is the full gradient).
pub(super) fn gd_grads(sess: &Session<'_>, n: usize, epoch: u64) -> crate::Result<StepGrads> {
    let cfg = sess.cfg;
    let scale = scale_for(cfg, n);
    let mut acc: Vec<Option<Tensor>> = vec![None; sess.optimizer.params().len()];
    let (mut loss_total, mut hits, mut has_acc) = (0f64, 0u64, false);
    let bs = cfg.data.batch_size.max(1);
    for start in (0..n).step_by(bs) {
        let idx: Vec<usize> = (start..(start + bs).min(n)).collect();
        let (xs, ys) = sess.train.batch(&idx, Some(epoch))?;
        let (preds, l, grads) = forward_backward(sess, &xs, &ys, scale)?;
        loss_total += l.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?;
        if let Some(c) = correct(&preds, &ys)? {
            hits += c;
            has_acc = true;
        }
        collect_grads(sess.optimizer, &grads, &mut acc)?;
    }
    Ok(StepGrads {
        grads: acc,
        loss_sum: loss_total,
        correct: has_acc.then_some(hits),
        count: n as u64,
    })
}

pub(super) fn sgd_grads(
    sess: &Session<'_>,
    indices: &[usize],
    epoch: u64,
) -> crate::Result<StepGrads> {
    let cfg = sess.cfg;
    let (xs, ys) = sess.train.batch(indices, Some(epoch))?;
    let (preds, l, grads) = forward_backward(sess, &xs, &ys, scale_for(cfg, indices.len()))?;
    let loss_total = l.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?;
    let hits = correct(&preds, &ys)?;
    let mut acc: Vec<Option<Tensor>> = vec![None; sess.optimizer.params().len()];
    collect_grads(sess.optimizer, &grads, &mut acc)?;
    Ok(StepGrads {
        grads: acc,
        loss_sum: loss_total,
        correct: hits,
        count: indices.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WeightDecayMode;
    use crate::optim::{Param, ParamSpec, SgdConfig};
    use candle::{Device, Var};

    fn opt() -> Sgd {
        let var = |v: &[f64]| Var::from_slice(v, v.len(), &Device::Cpu).unwrap();
        let tau = ParamSpec {
            lr_mult: 0.1,
            grad_scale: 0.25,
            weight_decay: false,
        };
        Sgd::new(
            vec![
                Param {
                    name: "w".into(),
                    var: var(&[0.0, 0.0]),
                    spec: ParamSpec::WEIGHT,
                },
                Param {
                    name: "tau".into(),
                    var: var(&[0.0]),
                    spec: tau,
                },
            ],
            SgdConfig {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
                weight_decay_mode: WeightDecayMode::Coupled,
            },
        )
    }

    fn grads(w: [f64; 2], tau: f64) -> Vec<Option<Tensor>> {
        vec![
            Some(Tensor::new(&w, &Device::Cpu).unwrap()),
            Some(Tensor::new(&[tau], &Device::Cpu).unwrap()),
        ]
    }

    fn values(g: &[Option<Tensor>]) -> Vec<f64> {
        g.iter()
            .flat_map(|t| t.as_ref().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    }

    /// The norm is that of the gradients the optimizer applies (τ's ÷ 4 here):
    /// ‖(3, 0, 16/4)‖ = 5, so a limit of 1 scales every raw gradient by 1/(5 + 1e-6),
    /// and a limit above 5 leaves them as they are.
    #[test]
    fn clipping_scales_to_the_limit_like_pytorch() {
        let o = opt();
        let mut g = grads([3.0, 0.0], 16.0);
        let norm = clip_grad_norm(&o, &mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12, "{norm}");
        let c = 1.0 / (5.0 + 1e-6);
        for (got, want) in values(&g).iter().zip([3.0 * c, 0.0, 16.0 * c]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        let mut g = grads([3.0, 0.0], 16.0);
        clip_grad_norm(&o, &mut g, 6.0).unwrap();
        assert_eq!(values(&g), vec![3.0, 0.0, 16.0]);
    }

    /// Per-layer gradient norms group every family's parameters by block, the stem's and
    /// head's by module, and sum the squares within a group.
    #[test]
    fn gradient_norms_group_by_layer() {
        for (name, layer) in [
            ("input.weight", "input"),
            ("blocks.7.weight", "blocks.7"),
            ("conv1.weight", "conv1"),
            ("bn1.bias", "bn1"),
            ("layer2.3.conv1.weight", "layer2.3"),
            ("layer2.3.bias1a", "layer2.3"),
            ("layer3.0.downsample.0.weight", "layer3.0"),
            ("fc.bias", "fc"),
            ("tau", "tau"),
        ] {
            assert_eq!(layer_of(name), layer, "{name}");
        }
        let names: Vec<String> = [
            "layer1.0.conv1.weight",
            "fc.weight",
            "layer1.0.bias1a",
            "tau",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let g = |v: &[f64]| Some(Tensor::new(v, &Device::Cpu).unwrap());
        let grads = vec![g(&[3.0, 0.0]), g(&[1.0]), g(&[4.0]), None];
        let n = grad_norms(&names, &grads).unwrap();
        let layers: Vec<(&str, f64)> = n.layers.iter().map(|l| (l.name.as_str(), l.norm)).collect();
        assert_eq!(layers, vec![("layer1.0", 5.0), ("fc", 1.0)]);
        assert_eq!(n.param_sq, vec![9.0, 1.0, 16.0, 0.0]);
        assert!((n.global - 26f64.sqrt()).abs() < 1e-12);
    }
}
