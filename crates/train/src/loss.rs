//! Losses: the squared loss `½‖y − y*‖²` of the theory and softmax cross-entropy, summed
//! over a batch (the caller divides by the example count it averages over), and accuracy.

use candle::{D, DType, Tensor};

use crate::config::LossKind;

/// The targets of a batch.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Class labels, `u32` of shape `(B,)`, and the number of classes.
    Classes(Tensor, usize),
    /// Real-valued targets of shape `(B, d)`.
    Values(Tensor),
}

impl Targets {
    /// The number of examples.
    ///
    /// # Errors
    /// A target tensor without a first dimension.
    pub fn len(&self) -> candle::Result<usize> {
        match self {
            Targets::Classes(t, _) | Targets::Values(t) => t.dim(0),
        }
    }

    /// Whether the batch is empty.
    ///
    /// # Errors
    /// As [`Targets::len`].
    pub fn is_empty(&self) -> candle::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// The loss summed over the batch: `Σ_i ½‖y_i − y_i*‖²` (labels as one-hot vectors) or
/// `Σ_i −log softmax(y_i)[c_i]`, as a scalar tensor of the predictions' dtype.
///
/// # Errors
/// Shape mismatches (predictions `(B, d)` against targets), or cross-entropy with
/// real-valued targets.
pub fn loss_sum(kind: LossKind, preds: &Tensor, targets: &Targets) -> candle::Result<Tensor> {
    match (kind, targets) {
        (LossKind::Squared, Targets::Values(ys)) => {
            let ys = ys.to_dtype(preds.dtype())?;
            (preds - ys)?.sqr()?.sum_all()?.affine(0.5, 0.0)
        }
        (LossKind::Squared, Targets::Classes(labels, k)) => {
            let ys = one_hot(labels, *k, preds.dtype())?;
            (preds - ys)?.sqr()?.sum_all()?.affine(0.5, 0.0)
        }
        (LossKind::CrossEntropy, Targets::Classes(labels, _)) => {
            let logp = candle_nn::ops::log_softmax(preds, D::Minus1)?;
            logp.gather(&labels.unsqueeze(1)?, 1)?.sum_all()?.neg()
        }
        (LossKind::CrossEntropy, Targets::Values(_)) => {
            candle::bail!("cross-entropy needs class labels, the data has real-valued targets")
        }
    }
}

/// One-hot rows `(B, k)` of `dtype` from `u32` labels `(B,)`.
///
/// # Errors
/// A label ≥ k, or candle errors.
pub fn one_hot(labels: &Tensor, k: usize, dtype: DType) -> candle::Result<Tensor> {
    let ls = labels.to_vec1::<u32>()?;
    let b = ls.len();
    let mut v = vec![0f32; b * k];
    for (i, &l) in ls.iter().enumerate() {
        let l = l as usize;
        if l >= k {
            candle::bail!("label {l} out of range for {k} classes");
        }
        v[i * k + l] = 1.0;
    }
    Tensor::from_vec(v, (b, k), labels.device())?.to_dtype(dtype)
}

/// Number of rows of `preds` whose argmax is the label (`None` for real-valued targets).
///
/// # Errors
/// Shape mismatches.
pub fn correct(preds: &Tensor, targets: &Targets) -> candle::Result<Option<u64>> {
    match targets {
        Targets::Values(_) => Ok(None),
        Targets::Classes(labels, _) => {
            let hits = preds
                .argmax(D::Minus1)?
                .eq(labels)?
                .to_dtype(DType::U32)?
                .sum_all()?
                .to_scalar::<u32>()?;
            Ok(Some(u64::from(hits)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn squared_loss_is_half_the_squared_error() {
        let p = Tensor::new(&[[1.0f64, 2.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[[0.0f64, 0.0], [3.0, 0.0]], &Device::Cpu).unwrap();
        let l = loss_sum(LossKind::Squared, &p, &Targets::Values(y)).unwrap();
        // ½(1 + 4) + ½·9 = 7.
        assert_eq!(l.to_scalar::<f64>().unwrap(), 7.0);
    }

    #[test]
    fn cross_entropy_matches_closed_form() {
        let p = Tensor::new(&[[0.0f64, 0.0, 0.0], [1.0, 2.0, 3.0]], &Device::Cpu).unwrap();
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let t = Targets::Classes(labels, 3);
        let l = loss_sum(LossKind::CrossEntropy, &p, &t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let z: f64 = [1f64, 2., 3.].iter().map(|v| v.exp()).sum();
        let want = 3f64.ln() + (z.ln() - 3.0);
        assert!((l - want).abs() < 1e-12, "{l} vs {want}");
        assert_eq!(correct(&p, &t).unwrap(), Some(1));
        // Squared loss with labels uses one-hot targets: ½(0+1+0) + ½(1+4+4) = 5.
        let s = loss_sum(LossKind::Squared, &p, &t)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(s, 5.0);
    }

    #[test]
    fn out_of_range_label_is_an_error() {
        let labels = Tensor::new(&[5u32], &Device::Cpu).unwrap();
        assert!(one_hot(&labels, 3, DType::F32).is_err());
    }
}
