//! Seeded orders, batches, normalization and augmentation: determinism and exact values.

mod common;

use candle::{DType, Device};
use common::asym_image;
use tau_data::batch::cifar_augment_params;
use tau_data::{
    Augment, Batches, ImageDataset, Normalize, batches, epoch_order, flatten_unit_norm, make_batch,
};

fn cifar_like(n: usize) -> ImageDataset {
    ImageDataset {
        images: (0..n).flat_map(|i| asym_image(3, 32, 32, i)).collect(),
        labels: (0..n).map(|i| (i % 10) as u32).collect(),
        shape: [3, 32, 32],
        num_classes: 10,
        class_names: (0..10).map(|i| i.to_string()).collect(),
    }
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let a = epoch_order(1000, 7, 3);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_eq!(a, epoch_order(1000, 7, 3));
    assert_ne!(a, epoch_order(1000, 7, 4));
    assert_ne!(a, epoch_order(1000, 8, 3));
    assert_ne!(a, sorted);
    assert!(epoch_order(0, 1, 1).is_empty());
}

#[test]
fn batches_cut_the_epoch_order_whatever_the_batch_size() {
    let order = epoch_order(103, 5, 2);
    for bs in [1, 10, 32, 103, 200] {
        let b = batches(103, bs, false, 5, 2);
        assert_eq!(b.concat(), order, "batch size {bs}");
        assert!(b.iter().rev().skip(1).all(|x| x.len() == bs));
        let dropped = batches(103, bs, true, 5, 2);
        assert_eq!(dropped.len(), 103 / bs);
        assert!(dropped.iter().all(|x| x.len() == bs));
        assert_eq!(dropped.concat(), order[..(103 / bs) * bs]);
        assert_eq!(
            Batches::new(103, bs, false, 5, 2).len(),
            103usize.div_ceil(bs)
        );
    }
    assert!(batches(10, 0, false, 0, 0).is_empty());
}

#[test]
fn make_batch_normalizes_exactly() -> candle::Result<()> {
    let ds = cifar_like(4);
    let norm = Normalize::cifar10();
    let (xs, ys) = make_batch(&ds, &[2, 0], &norm, Augment::None, 0, 0, &Device::Cpu)?;
    assert_eq!(xs.dims(), &[2, 3, 32, 32]);
    assert_eq!(xs.dtype(), DType::F32);
    assert_eq!(ys.to_vec1::<u32>()?, vec![2, 0]);
    let flat = xs.flatten_all()?.to_vec1::<f32>()?;
    for (b, &i) in [2usize, 0].iter().enumerate() {
        for (k, &p) in ds.image(i).iter().enumerate() {
            let c = k / 1024;
            let expected = (p as f64 / 255.0 - norm.mean[c] as f64) / norm.std[c] as f64;
            assert!((flat[b * 3072 + k] as f64 - expected).abs() < 1e-5);
        }
    }
    // Wrong channel count and bad index are errors, not panics.
    assert!(
        make_batch(
            &ds,
            &[0],
            &Normalize::mnist(),
            Augment::None,
            0,
            0,
            &Device::Cpu
        )
        .is_err()
    );
    assert!(make_batch(&ds, &[4], &norm, Augment::None, 0, 0, &Device::Cpu).is_err());
    Ok(())
}

/// The augmented image computed the slow, obvious way: zero-pad by 4, crop at (dy, dx),
/// then flip.
fn reference_augment(img: &[u8], dy: usize, dx: usize, flip: bool) -> Vec<u8> {
    let mut padded = vec![0u8; 3 * 40 * 40];
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                padded[(c * 40 + y + 4) * 40 + x + 4] = img[(c * 32 + y) * 32 + x];
            }
        }
    }
    let mut out = vec![0u8; 3072];
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                let cropped = padded[(c * 40 + y + dy) * 40 + x + dx];
                let xo = if flip { 31 - x } else { x };
                out[(c * 32 + y) * 32 + xo] = cropped;
            }
        }
    }
    out
}

#[test]
fn cifar_augmentation_matches_pad_crop_flip_and_is_seeded_per_example() -> candle::Result<()> {
    let ds = cifar_like(64);
    let id = Normalize::identity(3);
    let all: Vec<usize> = (0..64).collect();
    let (xs, _) = make_batch(&ds, &all, &id, Augment::CifarStandard, 11, 2, &Device::Cpu)?;
    let flat = xs.flatten_all()?.to_vec1::<f32>()?;
    let (mut flips, mut offsets) = (0, std::collections::BTreeSet::new());
    for i in 0..64 {
        let (dy, dx, flip) = cifar_augment_params(11, 2, i);
        assert!(dy <= 8 && dx <= 8);
        flips += flip as usize;
        offsets.insert(dy);
        let expected = reference_augment(ds.image(i), dy, dx, flip);
        let got: Vec<u8> = flat[i * 3072..(i + 1) * 3072]
            .iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        assert_eq!(got, expected, "example {i}");
    }
    // 64 fair coin flips: 6 sigma band; offsets cover most of 0..=8.
    assert!((8..=56).contains(&flips), "{flips} flips");
    assert!(offsets.len() >= 6, "{offsets:?}");
    // The same example gets the same augmentation in any batch, and another one next epoch.
    let (one, _) = make_batch(&ds, &[5], &id, Augment::CifarStandard, 11, 2, &Device::Cpu)?;
    let one = one.flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(one, flat[5 * 3072..6 * 3072]);
    let params: Vec<_> = (0..64).map(|i| cifar_augment_params(11, 2, i)).collect();
    let next: Vec<_> = (0..64).map(|i| cifar_augment_params(11, 3, i)).collect();
    let other_seed: Vec<_> = (0..64).map(|i| cifar_augment_params(12, 2, i)).collect();
    assert_ne!(params, next);
    assert_ne!(params, other_seed);
    Ok(())
}

#[test]
fn flatten_unit_norm_gives_unit_rows_and_one_hot_targets() -> candle::Result<()> {
    let mut ds = cifar_like(3);
    ds.images[3072..6144].fill(0);
    let (xs, ys) = flatten_unit_norm(&ds, DType::F64, &Device::Cpu)?;
    assert_eq!(xs.dims(), &[3, 3072]);
    assert_eq!(ys.dims(), &[3, 10]);
    let norms = xs.sqr()?.sum(1)?.sqrt()?.to_vec1::<f64>()?;
    assert!((norms[0] - 1.0).abs() < 1e-12 && norms[1] == 0.0 && (norms[2] - 1.0).abs() < 1e-12);
    let rows = xs.to_vec2::<f64>()?;
    let img = ds.image(2);
    let n: f64 = img.iter().map(|&p| (p as f64).powi(2)).sum::<f64>().sqrt();
    assert!((rows[2][100] - img[100] as f64 / n).abs() < 1e-12);
    let ys = ys.to_vec2::<f64>()?;
    assert_eq!(ys[2], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    Ok(())
}

#[test]
fn measured_normalization_matches_a_direct_computation() {
    let ds = cifar_like(5);
    let m = Normalize::measured(&ds);
    let vals: Vec<f64> = (0..5)
        .flat_map(|i| ds.image(i)[..1024].to_vec())
        .map(|p| p as f64 / 255.0)
        .collect();
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
    assert!((m.mean[0] as f64 - mean).abs() < 1e-6);
    assert!((m.std[0] as f64 - var.sqrt()).abs() < 1e-6);
}
