//! Seeded initialization of every parameter and buffer of a model (PAPER.md,
//! "Initialization"): values are drawn on the CPU with ChaCha8 and copied to the device,
//! so the same seed gives bit-identical weights on every machine and thread count.
//!
//! Order and streams: the tensors are those of [`ModelConfig::param_specs`], in that
//! order; tensor number `k` (0-based) is drawn from `ChaCha8Rng::seed_from_u64(seed)`
//! switched to stream `k`, element by element in row-major order, as f64 (normals from
//! `rand_distr::StandardNormal` times the standard deviation, uniforms from
//! `Uniform(−b, b)`), then rounded to the requested dtype. Each tensor owns its stream,
//! so tensors are drawn in parallel without changing any value.
//!
//! # Example
//!
//! The same seed gives the same bits, whichever way a tensor is drawn.
//!
//! ```
//! use std::collections::HashMap;
//!
//! use candle::{DType, Device, Var};
//! use tau_model::init::{draw_param_f32, init_values_f32};
//! use tau_model::{ModelConfig, init_varmap, named_vars};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg: ModelConfig = serde_json::from_str(
//!     r#"{"family": "theory", "input_dim": 3, "width": 8, "depth": 2}"#,
//! )?;
//! // Every tensor of init_varmap's VarMap, flattened, in the order of the specs.
//! let values = |seed| -> candle::Result<Vec<Vec<f32>>> {
//!     let varmap = init_varmap(&cfg, seed, DType::F32, &Device::Cpu)?;
//!     let vars: HashMap<String, Var> = named_vars(&varmap).into_iter().collect();
//!     cfg.param_specs().iter().map(|s| vars[&s.name].flatten_all()?.to_vec1::<f32>()).collect()
//! };
//! assert_eq!(values(7)?, values(7)?);
//! assert_ne!(values(7)?, values(8)?);
//! // The same values as plain arrays in the order of the specs, and one tensor alone.
//! let arrays = init_values_f32(&cfg, 7)?;
//! assert_eq!(arrays, values(7)?);
//! let spec = &cfg.param_specs()[2]; // blocks.1.weight
//! let mut one = vec![0f32; spec.elem_count()];
//! draw_param_f32(spec, 7, 2, &mut one)?;
//! assert_eq!(one, arrays[2]);
//! # Ok(()) }
//! ```

use candle::{DType, Device, Result, Tensor, Var};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use rayon::prelude::*;

use crate::config::{ModelConfig, ParamInit, ParamSpec};

/// Draws the values of one tensor, as f64, from its own stream, element by element in
/// row-major order, passing each to `put`.
fn draw_each(spec: &ParamSpec, seed: u64, stream: u64, mut put: impl FnMut(f64)) -> Result<()> {
    let n = spec.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    match spec.init {
        ParamInit::Const(v) => (0..n).for_each(|_| put(v)),
        ParamInit::Normal { std } => (0..n).for_each(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            put(z * std)
        }),
        ParamInit::Uniform { bound } => {
            let dist = Uniform::new(-bound, bound).map_err(|e| {
                candle::Error::Msg(format!("{}: bad uniform bound {bound}: {e}", spec.name))
            })?;
            (0..n).for_each(|_| put(rng.sample(dist)))
        }
    }
    Ok(())
}

/// Draws the values of one tensor, as f64, from its own stream.
fn draw(spec: &ParamSpec, seed: u64, stream: u64) -> Result<Vec<f64>> {
    let mut values = Vec::with_capacity(spec.elem_count());
    draw_each(spec, seed, stream, |v| values.push(v))?;
    Ok(values)
}

/// Writes into `out` (row-major) the values that [`init_varmap`] with `DType::F32` and
/// the same `seed` gives the tensor `spec`, when `spec` is entry `index` (0-based) of the
/// config's [`ModelConfig::param_specs`]: the same stream, the same f64 draws, rounded
/// to f32. One tensor can be drawn without drawing the others ([`init_values_f32`]
/// draws every tensor this way). See the [module example](self#example).
///
/// # Errors
/// `out` not of `spec`'s element count, or a bad uniform bound.
pub fn draw_param_f32(spec: &ParamSpec, seed: u64, index: usize, out: &mut [f32]) -> Result<()> {
    if out.len() != spec.elem_count() {
        candle::bail!(
            "init: {} has {} elements, the buffer {}",
            spec.name,
            spec.elem_count(),
            out.len()
        )
    }
    let mut slots = out.iter_mut();
    draw_each(spec, seed, index as u64, |v| {
        if let Some(slot) = slots.next() {
            *slot = v as f32;
        }
    })
}

/// The values of every parameter and buffer of `cfg` that [`init_varmap`] with
/// `DType::F32` gives for `seed`, bit for bit, as plain row-major arrays in the order of
/// `cfg.param_specs()`, drawn in parallel on rayon's pool (for code that runs its own
/// kernels on the weights, such as the theory network's stability probe). See the
/// [module example](self#example).
///
/// # Errors
/// An invalid config.
pub fn init_values_f32(cfg: &ModelConfig, seed: u64) -> Result<Vec<Vec<f32>>> {
    cfg.validate()?;
    cfg.param_specs()
        .par_iter()
        .enumerate()
        .map(|(k, spec)| {
            let mut values = vec![0f32; spec.elem_count()];
            draw_param_f32(spec, seed, k, &mut values)?;
            Ok(values)
        })
        .collect()
}

/// A variable of `dtype` on `device` holding `values`, copied once where possible.
fn to_var(values: Vec<f64>, shape: &[usize], dtype: DType, device: &Device) -> Result<Var> {
    match dtype {
        DType::F64 => Var::from_vec(values, shape, device),
        DType::F32 => {
            let v: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
            Var::from_vec(v, shape, device)
        }
        DType::F16 | DType::BF16 => {
            let v: Vec<f32> = values.into_iter().map(|x| x as f32).collect();
            let t = Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?;
            Var::from_tensor(&t.to_device(device)?)
        }
        other => candle::bail!("init: parameters must be a float dtype, got {other:?}"),
    }
}

/// Every variable of `varmap` with its name, sorted by name: what an optimizer setup
/// iterates over, without reaching into the map's lock. [`ModelConfig::param_kind`] says
/// how each one is trained.
///
/// ```
/// use candle::{DType, Device};
/// use tau_model::{ModelConfig, ParamKind, init_varmap, named_vars};
///
/// # fn main() -> candle::Result<()> {
/// let cfg: ModelConfig = serde_json::from_str(
///     r#"{"family": "cifar_resnet", "depth": 8, "norm": "none", "learnable_tau": true}"#,
/// ).map_err(candle::Error::wrap)?;
/// let varmap = init_varmap(&cfg, 0, DType::F32, &Device::Cpu)?;
/// let slow: Vec<String> = named_vars(&varmap)
///     .into_iter()
///     .filter(|(name, _)| matches!(cfg.param_kind(name), ParamKind::Tau | ParamKind::ScalarBias))
///     .map(|(name, _)| name)
///     .collect();
/// assert_eq!(slow.len(), 3 * 4 + 1); // four scalar biases per block, one shared τ
/// # Ok(()) }
/// ```
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    // A poisoned lock only means another thread panicked while holding it; the map itself
    // is still whole.
    let data = varmap
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut vars: Vec<(String, Var)> = data.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// A [`VarMap`] holding every parameter and buffer of `cfg`, drawn from `seed` as PAPER.md
/// prescribes (see the module docs for the exact order), on `device` in `dtype`. See the
/// [module example](self#example).
///
/// # Errors
/// An invalid config, a non-float dtype, or a device error.
pub fn init_varmap(cfg: &ModelConfig, seed: u64, dtype: DType, device: &Device) -> Result<VarMap> {
    cfg.validate()?;
    if !dtype.is_float() {
        candle::bail!("init: parameters must be a float dtype, got {dtype:?}")
    }
    let specs = cfg.param_specs();
    // Drawn in parallel on the CPU, a chunk of tensors at a time so that the f64 draws
    // in flight stay bounded; variables for other devices are uploaded one at a time.
    const CHUNK: usize = 256;
    let on_cpu = device.is_cpu();
    let varmap = VarMap::new();
    for (c, chunk) in specs.chunks(CHUNK).enumerate() {
        let drawn: Vec<(Vec<f64>, Option<Var>)> = chunk
            .par_iter()
            .enumerate()
            .map(|(j, spec)| {
                let values = draw(spec, seed, (c * CHUNK + j) as u64)?;
                if on_cpu {
                    Ok((
                        Vec::new(),
                        Some(to_var(values, &spec.shape, dtype, device)?),
                    ))
                } else {
                    Ok((values, None))
                }
            })
            .collect::<Result<_>>()?;
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("init: the VarMap lock is poisoned".into()))?;
        for (spec, (values, var)) in chunk.iter().zip(drawn) {
            let var = match var {
                Some(var) => var,
                None => to_var(values, &spec.shape, dtype, device)?,
            };
            data.insert(spec.name.clone(), var);
        }
    }
    Ok(varmap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::theory::TheoryConfig;

    #[test]
    fn same_seed_same_bits_other_seed_other_values() {
        let cfg = ModelConfig::Theory(TheoryConfig {
            input_dim: 5,
            width: 7,
            depth: 3,
            ..Default::default()
        });
        let dump = |vm: &VarMap| {
            let data = vm.data().lock().unwrap();
            let mut names: Vec<_> = data.keys().cloned().collect();
            names.sort();
            names
                .into_iter()
                .map(|k| {
                    let v = data[&k].as_tensor().flatten_all().unwrap();
                    (
                        k,
                        v.to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_bits())
                            .collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = dump(&init_varmap(&cfg, 7, DType::F32, &Device::Cpu).unwrap());
        let b = dump(&init_varmap(&cfg, 7, DType::F32, &Device::Cpu).unwrap());
        let c = dump(&init_varmap(&cfg, 8, DType::F32, &Device::Cpu).unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 5);
        // Different tensors of the same shape draw different values (separate streams).
        assert_ne!(a[0].1, a[1].1);
    }

    /// The documented scheme, redone by hand: tensor k of `param_specs` comes from stream
    /// k of ChaCha8 seeded with the seed, element by element.
    #[test]
    fn values_follow_the_documented_streams() {
        let cfg = ModelConfig::Theory(TheoryConfig {
            input_dim: 3,
            width: 4,
            depth: 300, // more tensors than one parallel chunk
            ..Default::default()
        });
        let vm = init_varmap(&cfg, 7, DType::F64, &Device::Cpu).unwrap();
        let data = vm.data().lock().unwrap();
        for (k, name, std) in [
            (1u64, "blocks.0.weight", 0.5),
            (299, "blocks.298.weight", 0.5),
            (301, "output.weight", 1.0),
        ] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            rng.set_stream(k);
            let want: Vec<f64> = (0..4)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    z * std
                })
                .collect();
            let got = data[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert_eq!(&got[..4], &want[..], "{name}");
        }
    }

    #[test]
    fn draw_param_f32_and_init_values_f32_give_the_varmap_values_bit_for_bit() {
        let cfg = ModelConfig::Theory(TheoryConfig {
            input_dim: 3,
            width: 5,
            depth: 4,
            ..Default::default()
        });
        let vm = init_varmap(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
        let data = vm.data().lock().unwrap();
        for (k, spec) in cfg.param_specs().iter().enumerate() {
            let mut got = vec![0f32; spec.elem_count()];
            draw_param_f32(spec, 11, k, &mut got).unwrap();
            let want = data[&spec.name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{}", spec.name);
        }
        let all = init_values_f32(&cfg, 11).unwrap();
        assert_eq!(all.len(), cfg.param_specs().len());
        for (spec, got) in cfg.param_specs().iter().zip(&all) {
            let want = data[&spec.name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, &want, "{}", spec.name);
        }
        let spec = &cfg.param_specs()[1];
        let mut short = vec![0f32; 3];
        assert!(draw_param_f32(spec, 11, 1, &mut short).is_err());
    }

    #[test]
    fn normal_draws_have_the_configured_variance() {
        let cfg = ModelConfig::Theory(TheoryConfig {
            input_dim: 4,
            width: 400,
            depth: 1,
            ..Default::default()
        });
        let vm = init_varmap(&cfg, 1, DType::F64, &Device::Cpu).unwrap();
        let data = vm.data().lock().unwrap();
        let w = data["blocks.0.weight"].as_tensor().flatten_all().unwrap();
        let v = w.to_vec1::<f64>().unwrap();
        let var = v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
        // 160000 draws of N(0, 1/400): the sample variance is within 1.5% (≈4σ) of 1/400.
        assert!(
            (var * 400.0 - 1.0).abs() < 0.011,
            "variance × m = {}",
            var * 400.0
        );
    }
}
