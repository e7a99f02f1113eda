//! In-memory image datasets (u8 pixels, (N, C, H, W) row-major) and their subsets.

use crate::rng::{bounded, stream_rng};

/// A labelled image dataset held in memory as raw bytes.
///
/// `images` holds `len() * C * H * W` pixels, image after image, each image in (C, H, W)
/// row-major order (channel planes, rows top to bottom, pixels left to right), exactly the
/// layout of a PyTorch `(N, C, H, W)` tensor. Labels are in `0..num_classes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDataset {
    /// Pixels, `len() * shape.iter().product()` bytes, (N, C, H, W) row-major.
    pub images: Vec<u8>,
    /// One label per image, each below `num_classes`.
    pub labels: Vec<u32>,
    /// The shape of one image: (C, H, W).
    pub shape: [usize; 3],
    /// Number of classes (labels are below it).
    pub num_classes: usize,
    /// Name of each class, `num_classes` entries, indexed by label.
    pub class_names: Vec<String>,
}

/// A train/test pair, as datasets ship.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The training split (empty, with the test split's shape and classes, when only the
    /// test split was loaded: [`Splits::TestOnly`](crate::Splits::TestOnly)).
    pub train: ImageDataset,
    /// The test split.
    pub test: ImageDataset,
}

impl Split {
    /// A split of `test` alone: the training split holds no image but has the test split's
    /// shape, classes and class names.
    pub(crate) fn test_only(test: ImageDataset) -> Split {
        Split {
            train: ImageDataset {
                images: Vec::new(),
                labels: Vec::new(),
                shape: test.shape,
                num_classes: test.num_classes,
                class_names: test.class_names.clone(),
            },
            test,
        }
    }
}

impl ImageDataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Pixels in one image: C * H * W.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The pixels of image `i`, (C, H, W) row-major.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let l = self.image_len();
        &self.images[i * l..(i + 1) * l]
    }

    /// The images at `indices`, in that order (repeats allowed).
    ///
    /// # Panics
    /// If an index is `>= len()`; the other subset helpers never panic.
    pub fn subset(&self, indices: &[usize]) -> ImageDataset {
        let l = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * l);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        ImageDataset {
            images,
            labels,
            shape: self.shape,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
        }
    }

    /// The data set in RGB: a grayscale one (1, H, W) with its plane replicated to
    /// (3, H, W); any other returned as it is.
    ///
    /// ```
    /// use tau_data::ImageDataset;
    ///
    /// let gray = ImageDataset {
    ///     images: vec![1, 2, 3, 4],
    ///     labels: vec![0, 1],
    ///     shape: [1, 1, 2],
    ///     num_classes: 2,
    ///     class_names: vec!["a".into(), "b".into()],
    /// };
    /// let rgb = gray.to_rgb();
    /// assert_eq!(rgb.shape, [3, 1, 2]);
    /// assert_eq!(rgb.images, [1, 2, 1, 2, 1, 2, 3, 4, 3, 4, 3, 4]);
    /// assert_eq!(rgb.to_rgb(), rgb);
    /// ```
    pub fn to_rgb(&self) -> ImageDataset {
        let [c, h, w] = self.shape;
        if c != 1 {
            return self.clone();
        }
        let plane = h * w;
        let mut images = vec![0u8; self.len() * 3 * plane];
        for (out, src) in images
            .chunks_mut(3 * plane.max(1))
            .zip(self.images.chunks(plane.max(1)))
        {
            crate::folder::hwc_to_chw(src, 1, 3, out);
        }
        ImageDataset {
            images,
            labels: self.labels.clone(),
            shape: [3, h, w],
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
        }
    }

    /// The first `n` images (all of them if `n >= len()`).
    pub fn first_n(&self, n: usize) -> ImageDataset {
        let n = n.min(self.len());
        let idx: Vec<usize> = (0..n).collect();
        self.subset(&idx)
    }

    /// The first `k` images of each class, in dataset order (a class with fewer than `k`
    /// images contributes all it has): the balanced subsets of full-batch experiments.
    pub fn balanced_first_k(&self, k: usize) -> ImageDataset {
        let mut taken = vec![0usize; self.num_classes];
        let mut idx = Vec::new();
        for (i, &label) in self.labels.iter().enumerate() {
            if let Some(t) = taken.get_mut(label as usize)
                && *t < k
            {
                *t += 1;
                idx.push(i);
            }
        }
        self.subset(&idx)
    }

    /// `n` distinct images drawn at random (seeded), returned in dataset order
    /// (all of them if `n >= len()`).
    pub fn random_n(&self, n: usize, seed: u64) -> ImageDataset {
        let mut idx = self.partial_shuffle(n, seed, 0);
        idx.sort_unstable();
        self.subset(&idx)
    }

    /// A seeded train/validation split: `n_val` images drawn at random become the validation
    /// set, the rest the training set; both keep dataset order. `n_val` is clamped to `len()`.
    pub fn split_validation(&self, n_val: usize, seed: u64) -> (ImageDataset, ImageDataset) {
        let n_val = n_val.min(self.len());
        let mut val = self.partial_shuffle(n_val, seed, 1);
        val.sort_unstable();
        let mut is_val = vec![false; self.len()];
        for &i in &val {
            is_val[i] = true;
        }
        let train: Vec<usize> = (0..self.len()).filter(|&i| !is_val[i]).collect();
        (self.subset(&train), self.subset(&val))
    }

    /// Number of images of each class, `num_classes` entries.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0usize; self.num_classes];
        for &label in &self.labels {
            if let Some(c) = counts.get_mut(label as usize) {
                *c += 1;
            }
        }
        counts
    }

    /// The first `n` entries of a seeded Fisher–Yates shuffle of `0..len()`.
    fn partial_shuffle(&self, n: usize, seed: u64, purpose: u64) -> Vec<usize> {
        let len = self.len();
        let n = n.min(len);
        let mut idx: Vec<usize> = (0..len).collect();
        let mut rng = stream_rng(seed, crate::rng::Domain::Subset, purpose);
        for i in 0..n {
            let j = i + bounded(&mut rng, (len - i) as u64) as usize;
            idx.swap(i, j);
        }
        idx.truncate(n);
        idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(labels: &[u32]) -> ImageDataset {
        ImageDataset {
            images: (0..labels.len() * 2).map(|i| i as u8).collect(),
            labels: labels.to_vec(),
            shape: [1, 1, 2],
            num_classes: 3,
            class_names: vec!["a".into(), "b".into(), "c".into()],
        }
    }

    #[test]
    fn subset_copies_images_and_labels_in_order() {
        let ds = toy(&[0, 1, 2, 1]);
        let s = ds.subset(&[3, 0, 3]);
        assert_eq!(s.labels, vec![1, 0, 1]);
        assert_eq!(s.images, vec![6, 7, 0, 1, 6, 7]);
        assert_eq!(s.shape, ds.shape);
    }

    #[test]
    fn balanced_first_k_takes_first_k_of_each_class() {
        let ds = toy(&[0, 1, 1, 0, 1, 2, 0]);
        let b = ds.balanced_first_k(2);
        assert_eq!(b.labels, vec![0, 1, 1, 0, 2]);
        assert_eq!(b.class_counts(), vec![2, 2, 1]);
        assert_eq!(b.image(4), ds.image(5));
    }

    #[test]
    fn first_n_clamps() {
        let ds = toy(&[0, 1, 2]);
        assert_eq!(ds.first_n(2).labels, vec![0, 1]);
        assert_eq!(ds.first_n(10).len(), 3);
    }

    #[test]
    fn random_n_is_seeded_distinct_and_sorted() {
        let ds = toy(&(0..50).map(|i| i % 3).collect::<Vec<_>>());
        let a = ds.random_n(10, 7);
        assert_eq!(a, ds.random_n(10, 7));
        assert_ne!(a, ds.random_n(10, 8));
        assert_eq!(a.len(), 10);
        // Every drawn image is a distinct original image (images are unique byte pairs).
        let mut firsts: Vec<u8> = (0..10).map(|i| a.image(i)[0]).collect();
        let sorted = firsts.clone();
        firsts.dedup();
        assert_eq!(firsts, sorted);
        assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ds.random_n(100, 1).len(), 50);
    }

    #[test]
    fn split_validation_partitions_the_dataset() {
        let ds = toy(&(0..40).map(|i| i % 3).collect::<Vec<_>>());
        let (train, val) = ds.split_validation(10, 3);
        assert_eq!((train.len(), val.len()), (30, 10));
        let mut all: Vec<u8> = (0..train.len())
            .map(|i| train.image(i)[0])
            .chain((0..val.len()).map(|i| val.image(i)[0]))
            .collect();
        all.sort_unstable();
        let expected: Vec<u8> = (0..40).map(|i| (2 * i) as u8).collect();
        assert_eq!(all, expected);
        assert_eq!((train, val), ds.split_validation(10, 3));
    }
}
