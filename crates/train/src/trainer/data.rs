//! The data side of the loop: [`TrainData`], what it draws batches from, and
//! [`TensorData`], a set held as tensors.

use super::*;

/// A training or test set the loop can draw batches from.
pub trait TrainData {
    /// Number of examples.
    fn len(&self) -> usize;

    /// Whether the set is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inputs and targets of the examples `indices`, in the run's dtype on its device.
    /// `augment` is `Some(epoch)` for training batches (augmentation of that epoch, if the
    /// set augments), `None` for evaluation.
    ///
    /// # Errors
    /// Indices out of range, device errors.
    fn batch(&self, indices: &[usize], augment: Option<u64>) -> crate::Result<(Tensor, Targets)>;
}

/// A data set held as tensors (synthetic data, small full-batch sets, tests).
pub struct TensorData {
    xs: Tensor,
    targets: Targets,
}

impl TensorData {
    /// Wraps inputs `(N, ...)` and targets with `N` rows.
    ///
    /// # Errors
    /// Row counts that differ.
    pub fn new(xs: Tensor, targets: Targets) -> crate::Result<TensorData> {
        let n = xs.dim(0)?;
        let m = targets.len()?;
        crate::error::ensure!(n == m, "{n} inputs but {m} targets");
        Ok(TensorData { xs, targets })
    }
}

impl TrainData for TensorData {
    fn len(&self) -> usize {
        self.xs.dims().first().copied().unwrap_or(0)
    }

    fn batch(&self, indices: &[usize], _augment: Option<u64>) -> crate::Result<(Tensor, Targets)> {
        let n = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            crate::error::bail!("index {bad} out of range for {n} examples");
        }
        let all_in_order = indices.len() == n && indices.iter().enumerate().all(|(k, &i)| k == i);
        if all_in_order {
            return Ok((self.xs.clone(), self.targets.clone()));
        }
        let ids: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let ids = Tensor::new(ids.as_slice(), self.xs.device())?;
        let xs = self.xs.index_select(&ids, 0)?;
        let targets = match &self.targets {
            Targets::Classes(t, k) => Targets::Classes(t.index_select(&ids, 0)?, *k),
            Targets::Values(t) => Targets::Values(t.index_select(&ids, 0)?),
        };
        Ok((xs, targets))
    }
}
