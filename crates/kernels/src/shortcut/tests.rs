//! ReLU, the global average pool and the option-A shortcut against candle's composed ops.

use candle::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::test_util::{compare, random, rel_err};

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// ReLU, global average pool and the option-A shortcut (stride 1 and 2, odd sizes,
    /// with and without appended channels) against candle's composed ops in `f64` (for
    /// `f64` input the public functions run the composed ops).
    #[test]
    fn relu_pool_and_shortcut_match_composed_ops(
        seed in proptest::prelude::any::<u64>(),
        n in 1usize..4,
        c in 1usize..6,
        extra in 0usize..4,
        h in 1usize..12,
        w in 1usize..12,
        stride in 1usize..3,
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let dims = [n, c, h, w];
        let x = random(&mut rng, &dims, -1.0, 1.0);
        compare(
            std::slice::from_ref(&x),
            |t| crate::relu(t[0]).unwrap(),
            |t, _| t[0].relu().unwrap(),
            &format!("relu {dims:?}"),
        );
        compare(
            std::slice::from_ref(&x),
            |t| crate::global_avg_pool(t[0]).unwrap(),
            |t, _| t[0].flatten_from(2).unwrap().mean(2).unwrap(),
            &format!("global_avg_pool {dims:?}"),
        );
        if stride == 1 && extra == 0 {
            return Ok(());
        }
        let c_out = c + extra;
        compare(
            std::slice::from_ref(&x),
            |t| crate::option_a_shortcut(t[0], stride, c_out).unwrap(),
            |t, _| {
                assert_eq!(t[0].dtype(), DType::F64);
                crate::option_a_shortcut(t[0], stride, c_out).unwrap()
            },
            &format!("option_a_shortcut {dims:?} stride {stride} -> {c_out}"),
        );
        // The kept values are copied exactly.
        let fused = crate::option_a_shortcut(&x, stride, c_out).unwrap();
        let composed = crate::option_a_shortcut(&x.to_dtype(DType::F64).unwrap(), stride, c_out)
            .unwrap();
        proptest::prop_assert_eq!(rel_err(&fused, &composed), 0.0);
    }
}

#[test]
fn shortcut_rejects_impossible_settings() {
    let x = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(crate::option_a_shortcut(&x, 3, 8).is_err());
    assert!(crate::option_a_shortcut(&x, 2, 2).is_err());
    assert!(crate::global_avg_pool(&x.flatten_all().unwrap()).is_err());
}
