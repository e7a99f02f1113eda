//! Batching: seeded epoch orders, per-channel normalization, CIFAR augmentation (pad 4,
//! random crop, horizontal flip; He et al. 2016) and assembly of batches as candle tensors.
//!
//! Every random choice is a pure function of its key: the order of an epoch of `(seed,
//! epoch)`, the augmentation of example `index` of `(seed, epoch, index)`. Resuming a run at
//! any epoch, or changing the batch size, sees the same orders and the same augmented images.

use candle::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::ImageDataset;
use crate::rng::{Domain, bounded, stream_rng, stream_rng2};

/// The order in which epoch `epoch` visits the `n` examples: a seeded permutation of `0..n`
/// (Fisher–Yates on a ChaCha8 stream keyed by `(seed, epoch)`), independent of the batch size.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = stream_rng(seed, Domain::EpochOrder, epoch);
    for i in (1..n).rev() {
        let j = bounded(&mut rng, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// The batches of an epoch: [`epoch_order`] cut into consecutive runs of `batch_size`.
///
/// The last, shorter batch is dropped when `drop_last` is set. A `batch_size` of 0 gives no
/// batches (validate batch sizes where they are configured).
#[derive(Debug, Clone)]
pub struct Batches {
    order: Vec<usize>,
    batch_size: usize,
    drop_last: bool,
    pos: usize,
}

impl Batches {
    /// The batches of epoch `epoch` over `n` examples.
    pub fn new(n: usize, batch_size: usize, drop_last: bool, seed: u64, epoch: u64) -> Self {
        Batches {
            order: epoch_order(n, seed, epoch),
            batch_size,
            drop_last,
            pos: 0,
        }
    }

    fn remaining(&self) -> usize {
        if self.batch_size == 0 {
            return 0;
        }
        let left = self.order.len() - self.pos;
        if self.drop_last {
            left / self.batch_size
        } else {
            left.div_ceil(self.batch_size)
        }
    }
}

impl Iterator for Batches {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.remaining() == 0 {
            return None;
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let batch = self.order[self.pos..end].to_vec();
        self.pos = end;
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let r = self.remaining();
        (r, Some(r))
    }
}

impl ExactSizeIterator for Batches {}

/// All batches of an epoch at once; see [`Batches`].
pub fn batches(
    n: usize,
    batch_size: usize,
    drop_last: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    Batches::new(n, batch_size, drop_last, seed, epoch).collect()
}

/// Per-channel normalization applied after scaling pixels to `[0, 1]`:
/// `x = (pixel / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

impl Normalize {
    /// MNIST's mean 0.1307 and std 0.3081 (the values of the PyTorch MNIST example).
    pub fn mnist() -> Self {
        Normalize {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }

    /// CIFAR-10's per-channel mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010),
    /// as in the reference training setup of PAPER.md.
    pub fn cifar10() -> Self {
        Normalize {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2023, 0.1994, 0.2010],
        }
    }

    /// CIFAR-100's per-channel mean (0.5071, 0.4865, 0.4409) and std (0.2673, 0.2564, 0.2762),
    /// the values computed over its training set and commonly used.
    pub fn cifar100() -> Self {
        Normalize {
            mean: vec![0.5071, 0.4865, 0.4409],
            std: vec![0.2673, 0.2564, 0.2762],
        }
    }

    /// No normalization for `channels` channels: pixels / 255 only.
    pub fn identity(channels: usize) -> Self {
        Normalize {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// The per-channel mean and std measured on `ds` (pixels / 255), in float64.
    pub fn measured(ds: &ImageDataset) -> Self {
        let [c, h, w] = ds.shape;
        let hw = h * w;
        let mut sum = vec![0f64; c];
        let mut sum2 = vec![0f64; c];
        for img in ds.images.chunks_exact(c * hw) {
            for ch in 0..c {
                for &p in &img[ch * hw..(ch + 1) * hw] {
                    let v = p as f64 / 255.0;
                    sum[ch] += v;
                    sum2[ch] += v * v;
                }
            }
        }
        let count = (ds.len() * hw).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let std = sum2
            .iter()
            .zip(&mean)
            .map(|(s2, m)| ((s2 / count - m * m).max(0.0)).sqrt() as f32)
            .collect();
        Normalize {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            std,
        }
    }

    /// The value of each pixel byte per channel: 256 entries per channel.
    fn table(&self) -> Vec<[f32; 256]> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(&m, &s)| std::array::from_fn(|p| (p as f32 / 255.0 - m) / s))
            .collect()
    }
}

/// Data augmentation applied when assembling a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    /// Images as they are.
    #[default]
    None,
    /// The standard CIFAR augmentation: zero-pad 4 pixels on each side, crop a random window
    /// of the original size, then flip horizontally with probability 1/2 (torchvision's
    /// `RandomCrop(32, padding=4)` then `RandomHorizontalFlip()`), drawn per
    /// `(seed, epoch, index)`. Padding is a zero pixel, before normalization.
    CifarStandard,
}

/// The crop offsets `(dy, dx)` in `0..=8` and the flip of example `index` in `epoch`.
pub fn cifar_augment_params(seed: u64, epoch: u64, index: usize) -> (usize, usize, bool) {
    let mut rng = stream_rng2(seed, Domain::Augment, epoch, index as u64);
    let dy = bounded(&mut rng, 9) as usize;
    let dx = bounded(&mut rng, 9) as usize;
    let flip = bounded(&mut rng, 2) == 1;
    (dy, dx, flip)
}

/// Writes image `src` ((C, H, W) bytes) into `out` as normalized f32, augmented.
fn write_image(
    src: &[u8],
    shape: [usize; 3],
    table: &[[f32; 256]],
    crop: Option<(usize, usize, bool)>,
    out: &mut [f32],
) {
    let [c, h, w] = shape;
    match crop {
        None => {
            for (ch, t) in table.iter().enumerate().take(c) {
                let plane = ch * h * w..(ch + 1) * h * w;
                for (o, &p) in out[plane.clone()].iter_mut().zip(&src[plane]) {
                    *o = t[p as usize];
                }
            }
        }
        Some((dy, dx, flip)) => {
            const PAD: isize = 4;
            for (ch, t) in table.iter().enumerate().take(c) {
                for y in 0..h {
                    let sy = y as isize + dy as isize - PAD;
                    let row = &mut out[(ch * h + y) * w..(ch * h + y + 1) * w];
                    for (x, o) in row.iter_mut().enumerate() {
                        let xc = if flip { w - 1 - x } else { x };
                        let sx = xc as isize + dx as isize - PAD;
                        let p = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                            src[(ch * h + sy as usize) * w + sx as usize]
                        } else {
                            0
                        };
                        *o = t[p as usize];
                    }
                }
            }
        }
    }
}

/// Assembles the examples `indices` of `ds` into an f32 image tensor (B, C, H, W) (pixels /
/// 255, augmented, then normalized) and a u32 label tensor (B,), on `device`.
///
/// # Errors
/// An index out of range, or a normalization whose channel count differs from the images'.
pub fn make_batch(
    ds: &ImageDataset,
    indices: &[usize],
    normalize: &Normalize,
    augment: Augment,
    seed: u64,
    epoch: u64,
    device: &Device,
) -> candle::Result<(Tensor, Tensor)> {
    let [c, h, w] = ds.shape;
    if normalize.mean.len() != c || normalize.std.len() != c {
        candle::bail!(
            "normalization has {} means and {} stds, the images have {c} channels",
            normalize.mean.len(),
            normalize.std.len()
        );
    }
    if let Some(&bad) = indices.iter().find(|&&i| i >= ds.len()) {
        candle::bail!(
            "batch index {bad} out of range for a dataset of {} images",
            ds.len()
        );
    }
    let table = normalize.table();
    let l = c * h * w;
    let mut xs = vec![0f32; indices.len() * l];
    for (out, &i) in xs.chunks_exact_mut(l.max(1)).zip(indices) {
        let crop = match augment {
            Augment::None => None,
            Augment::CifarStandard => Some(cifar_augment_params(seed, epoch, i)),
        };
        write_image(ds.image(i), ds.shape, &table, crop, out);
    }
    let labels: Vec<u32> = indices.iter().map(|&i| ds.labels[i]).collect();
    let xs = Tensor::from_vec(xs, (indices.len(), c, h, w), device)?;
    let ys = Tensor::from_vec(labels, indices.len(), device)?;
    Ok((xs, ys))
}

/// The whole dataset for full-batch theory experiments: each image flattened to a vector of
/// pixels / 255 and scaled to unit Euclidean norm (an all-zero image stays zero), as an
/// (N, C·H·W) tensor, with one-hot targets (N, num_classes), both in `dtype` on `device`.
///
/// # Errors
/// As candle's tensor creation and dtype conversion.
pub fn flatten_unit_norm(
    ds: &ImageDataset,
    dtype: DType,
    device: &Device,
) -> candle::Result<(Tensor, Tensor)> {
    let l = ds.image_len();
    let mut xs = Vec::with_capacity(ds.len() * l);
    for i in 0..ds.len() {
        let img = ds.image(i);
        let norm = img
            .iter()
            .map(|&p| (p as f64) * (p as f64))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
        xs.extend(img.iter().map(|&p| p as f64 * scale));
    }
    let k = ds.num_classes;
    let mut ys = vec![0f64; ds.len() * k];
    for (row, &label) in ys.chunks_exact_mut(k.max(1)).zip(&ds.labels) {
        if let Some(v) = row.get_mut(label as usize) {
            *v = 1.0;
        }
    }
    let xs = Tensor::from_vec(xs, (ds.len(), l), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    let ys = Tensor::from_vec(ys, (ds.len(), k), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?;
    Ok((xs, ys))
}
