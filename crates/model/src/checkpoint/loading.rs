//! Loading a checkpoint (see [`super`]): [`load_config`] reads any of the `config.json`
//! forms, [`load_weights`] reads `model.safetensors` checked against it, and [`load`],
//! [`load_checkpoint`] and [`load_files`] do both.
//!
//! # Example
//!
//! A bare model config, as a PyTorch export may write it, reads as a
//! [`CheckpointConfig`] with nothing else recorded; a weights file that is not
//! safetensors is an error naming it.
//!
//! ```
//! use candle::{DType, Device};
//! use tau_model::checkpoint::{self, CONFIG_FILE, CheckpointConfig, WEIGHTS_FILE};
//! use tau_model::{CheckpointError, ModelConfig, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let (dir, dev) = (tmp.path(), Device::Cpu);
//! let json = r#"{"family": "theory", "input_dim": 2, "width": 4, "depth": 2}"#;
//! let cfg: ModelConfig = serde_json::from_str(json)?;
//! checkpoint::save(dir, &cfg, &init_varmap(&cfg, 0, DType::F32, &dev)?)?;
//! std::fs::write(dir.join(CONFIG_FILE), json)?;
//! let config = checkpoint::load_config(&dir.join(CONFIG_FILE))?;
//! assert_eq!(config, CheckpointConfig::new(cfg.clone()));
//! assert_eq!(checkpoint::load(dir, &dev)?.0, cfg);
//!
//! std::fs::write(dir.join(WEIGHTS_FILE), b"not safetensors")?;
//! let err = checkpoint::load(dir, &dev).err().unwrap();
//! let CheckpointError::Safetensors { path, .. } = &err else { panic!("{err}") };
//! assert!(path.ends_with(WEIGHTS_FILE));
//! # Ok(()) }
//! ```

use super::*;

fn st_dtype_name(dtype: safetensors::Dtype) -> String {
    format!("{dtype:?}").to_lowercase()
}

/// Reads and validates a `config.json` (any of the forms in the [module docs](super)).
/// See the [module example](super#example).
///
/// # Errors
/// [`CheckpointError::Io`] when unreadable, [`CheckpointError::Config`] when it does not
/// parse, is not a valid model, or its other fields do not fit the model (see
/// [`CheckpointConfig::check`]).
pub fn load_config(path: &Path) -> Result<CheckpointConfig, CheckpointError> {
    let cfg_err = |message: String| CheckpointError::Config {
        path: path.to_path_buf(),
        message,
    };
    let len = std::fs::metadata(path).map_err(io_err(path))?.len();
    if len > MAX_CONFIG_BYTES {
        return Err(cfg_err(format!(
            "{len} bytes is too large for a config (limit {MAX_CONFIG_BYTES})"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| cfg_err(format!("invalid JSON: {e}")))?;
    let config = if value.get("family").is_some() {
        let model: ModelConfig =
            serde_json::from_value(value).map_err(|e| cfg_err(format!("invalid model: {e}")))?;
        CheckpointConfig::new(model)
    } else if crate::timm::is_timm_config(&value) {
        crate::timm::checkpoint_config(&value).map_err(cfg_err)?
    } else {
        serde_json::from_value(value).map_err(|e| cfg_err(format!("invalid config: {e}")))?
    };
    config.check().map_err(cfg_err)?;
    Ok(config)
}

/// Loads a checkpoint directory onto `device`: the config and a `VarMap` holding every
/// tensor in the file's dtype (see [`varmap_dtype`]). `*.num_batches_tracked` tensors of
/// PyTorch exports are accepted and dropped. [`load_checkpoint`] returns the whole
/// [`CheckpointConfig`] (preprocessing, class names). See the
/// [module example](super#example).
///
/// # Errors
/// See [`CheckpointError`]: unreadable files, a bad config, a truncated or garbage
/// safetensors file, and any missing, unexpected, misshapen or mistyped tensor, or one
/// holding NaN or infinite values, by name.
pub fn load(dir: &Path, device: &Device) -> Result<(ModelConfig, VarMap), CheckpointError> {
    load_files(&dir.join(CONFIG_FILE), &dir.join(WEIGHTS_FILE), device)
}

/// [`load`], returning the whole [`CheckpointConfig`]. See the
/// [example](CheckpointConfig#example).
///
/// # Errors
/// As [`load`].
pub fn load_checkpoint(
    dir: &Path,
    device: &Device,
) -> Result<(CheckpointConfig, VarMap), CheckpointError> {
    let config = load_config(&dir.join(CONFIG_FILE))?;
    let varmap = load_weights(&config, &dir.join(WEIGHTS_FILE), device)?;
    Ok((config, varmap))
}

/// [`load`] from explicit file paths. See the [module example](super#example).
///
/// # Errors
/// As [`load`].
pub fn load_files(
    config_path: &Path,
    weights_path: &Path,
    device: &Device,
) -> Result<(ModelConfig, VarMap), CheckpointError> {
    let config = load_config(config_path)?;
    let varmap = load_weights(&config, weights_path, device)?;
    Ok((config.model, varmap))
}

/// How many of the values in `bytes`, a tensor of `dtype` as safetensors stores it
/// (little-endian), are NaN and how many infinite: one pass over the bit patterns (an
/// all-ones exponent), without building the tensor. Formats without NaN or infinities
/// (the 6- and 4-bit floats) and non-float ones count none.
fn count_non_finite(dtype: safetensors::Dtype, bytes: &[u8]) -> (usize, usize) {
    use safetensors::Dtype;
    // The exponent bits (all ones: NaN or ∞) and the mantissa bits (zero: ∞) of each
    // format; the 8-bit E4M3 and E8M0 floats have no ∞, only one NaN pattern each, which
    // the masks make count as NaN.
    match dtype {
        Dtype::F64 => count_special::<8>(bytes, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
        Dtype::F32 => count_special::<4>(bytes, 0x7f80_0000, 0x007f_ffff),
        Dtype::F16 => count_special::<2>(bytes, 0x7c00, 0x03ff),
        Dtype::BF16 => count_special::<2>(bytes, 0x7f80, 0x007f),
        Dtype::F8_E5M2 => count_special::<1>(bytes, 0x7c, 0x03),
        Dtype::F8_E4M3 => count_special::<1>(bytes, 0x7f, 0x7f),
        Dtype::F8_E8M0 => count_special::<1>(bytes, 0xff, 0xff),
        _ => (0, 0),
    }
}

/// (NaN, ∞) counts of the `N`-byte little-endian values in `bytes`, by their `exponent`
/// and `mantissa` bit masks.
fn count_special<const N: usize>(bytes: &[u8], exponent: u64, mantissa: u64) -> (usize, usize) {
    let (mut nan, mut inf) = (0, 0);
    for value in bytes.chunks_exact(N) {
        let mut le = [0u8; 8];
        le[..N].copy_from_slice(value);
        let bits = u64::from_le_bytes(le);
        if bits & exponent == exponent {
            if bits & mantissa == 0 {
                inf += 1;
            } else {
                nan += 1;
            }
        }
    }
    (nan, inf)
}

/// Loads the safetensors file `weights_path` as the tensors of `config`'s model, checked
/// by name, shape and dtype (the config's `dtype`, when it has one), and for finite
/// values: one pass over the bytes, which every consumer (evaluation, prediction, the
/// probe, resuming a run) gets. See the [module example](super#example).
///
/// # Errors
/// As [`load`]; of several tensors with NaN or infinite values
/// ([`CheckpointError::NonFinite`]), the first by name.
pub fn load_weights(
    config: &CheckpointConfig,
    weights_path: &Path,
    device: &Device,
) -> Result<VarMap, CheckpointError> {
    let cfg = &config.model;
    let expected_dtype = match &config.dtype {
        None => None,
        Some(s) => Some(s.parse::<DType>().map_err(|_| CheckpointError::Config {
            path: weights_path.to_path_buf(),
            message: format!("the config's dtype {s:?} is unknown"),
        })?),
    };
    let bytes = std::fs::read(weights_path).map_err(io_err(weights_path))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        CheckpointError::Safetensors {
            path: weights_path.to_path_buf(),
            message: e.to_string(),
        }
    })?;
    let mut views = st.tensors();
    views.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    check_tensors(
        cfg,
        weights_path,
        views.iter().map(|(name, view)| {
            let dt = DType::try_from(view.dtype()).map_err(|_| st_dtype_name(view.dtype()));
            (name.as_str(), view.shape().to_vec(), dt)
        }),
        expected_dtype,
    )?;
    let varmap = VarMap::new();
    {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| candle::Error::Msg("the VarMap lock is poisoned".into()))?;
        for (name, view) in &views {
            if name.ends_with(".num_batches_tracked") {
                continue;
            }
            let (nan, inf) = count_non_finite(view.dtype(), view.data());
            if nan + inf > 0 {
                return Err(CheckpointError::NonFinite {
                    path: weights_path.to_path_buf(),
                    name: name.clone(),
                    nan,
                    inf,
                });
            }
            let t = candle::safetensors::Load::load(view, device)?;
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}

#[cfg(test)]
mod tests {
    use safetensors::Dtype;

    use super::*;

    fn le_bytes<const N: usize>(values: &[[u8; N]]) -> Vec<u8> {
        values.concat()
    }

    /// NaN and ±∞ (and only they) are counted in every float format candle loads, from
    /// their bit patterns; subnormals, the largest finite values and zeros are finite.
    #[test]
    fn non_finite_values_are_counted_in_every_format() {
        let f64s = [0.0, -0.0, 1.5, f64::MAX, f64::MIN_POSITIVE / 2.0, f64::NAN]
            .into_iter()
            .chain([f64::INFINITY, f64::NEG_INFINITY, -f64::NAN])
            .map(f64::to_le_bytes)
            .collect::<Vec<_>>();
        assert_eq!(count_non_finite(Dtype::F64, &le_bytes(&f64s)), (2, 2));
        let f32s =
            [0.0, 1.5, f32::MAX, f32::MIN, 1e-45, f32::NAN, f32::INFINITY].map(f32::to_le_bytes);
        assert_eq!(count_non_finite(Dtype::F32, &le_bytes(&f32s)), (1, 1));
        let f16s = [0.5, 65504.0, -65504.0, 6e-8, f32::NAN, f32::NEG_INFINITY]
            .map(|v| half::f16::from_f32(v).to_le_bytes());
        assert_eq!(count_non_finite(Dtype::F16, &le_bytes(&f16s)), (1, 1));
        let bf16s = [0.5, 3.0e38, -1e-40, f32::NAN, f32::NAN, f32::INFINITY]
            .map(|v| half::bf16::from_f32(v).to_le_bytes());
        assert_eq!(count_non_finite(Dtype::BF16, &le_bytes(&bf16s)), (2, 1));
        // E4M3 (no ∞): 0x7f and 0xff are NaN, 0x7e (448) is finite; E8M0: 0xff is NaN.
        assert_eq!(
            count_non_finite(Dtype::F8_E4M3, &[0x7e, 0x7f, 0xff, 0]),
            (2, 0)
        );
        assert_eq!(count_non_finite(Dtype::F8_E8M0, &[0xfe, 0xff, 0]), (1, 0));
        assert_eq!(count_non_finite(Dtype::I64, &[0xff; 16]), (0, 0));
    }

    /// A checkpoint with NaN or ±∞ in its weights does not load: the error names the
    /// file, the first such tensor by name and what it holds.
    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let cfg: ModelConfig =
            serde_json::from_str(r#"{"family": "theory", "input_dim": 2, "width": 4, "depth": 3}"#)
                .unwrap();
        let set = |varmap: &VarMap, name: &str, values: &[f32]| {
            let data = varmap.data().lock().unwrap();
            let var = &data[name];
            let mut all = var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            all[..values.len()].copy_from_slice(values);
            var.set(&Tensor::from_vec(all, var.shape(), &dev).unwrap())
                .unwrap();
        };
        // Every tensor of `varmap` in `dtype`.
        let cast = |varmap: &VarMap, dtype: DType| {
            let cast = VarMap::new();
            let mut data = cast.data().lock().unwrap();
            for (name, t) in varmap_tensors(varmap).unwrap() {
                data.insert(name, Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
            }
            drop(data);
            cast
        };
        for dtype in [DType::F32, DType::F64, DType::BF16] {
            let varmap = crate::init_varmap(&cfg, 0, DType::F32, &dev).unwrap();
            set(
                &varmap,
                "blocks.2.weight",
                &[f32::INFINITY, f32::NEG_INFINITY],
            );
            set(
                &varmap,
                "output.weight",
                &[f32::NAN, 1.0, f32::NAN, f32::NAN],
            );
            save(tmp.path(), &cfg, &cast(&varmap, dtype)).unwrap();
            let err = load(tmp.path(), &dev).err().unwrap();
            let CheckpointError::NonFinite { name, nan, inf, .. } = &err else {
                panic!("{err}")
            };
            assert_eq!((name.as_str(), *nan, *inf), ("blocks.2.weight", 0, 2));
            assert!(
                err.to_string().ends_with(
                    "model.safetensors: tensor \"blocks.2.weight\" holds non-finite values \
                     (2 infinite)"
                ),
                "{dtype:?}: {err}"
            );
            set(&varmap, "blocks.2.weight", &[0.0, 0.0]);
            save(tmp.path(), &cfg, &cast(&varmap, dtype)).unwrap();
            let err = load_checkpoint(tmp.path(), &dev).err().unwrap().to_string();
            assert!(
                err.ends_with("tensor \"output.weight\" holds non-finite values (3 NaN)"),
                "{dtype:?}: {err}"
            );
            set(&varmap, "output.weight", &[0.0, 1.0, 0.0, 0.0]);
            save(tmp.path(), &cfg, &cast(&varmap, dtype)).unwrap();
            assert!(load(tmp.path(), &dev).is_ok());
        }
    }
}
