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
/// safetensors file, and any missing, unexpected, misshapen or mistyped tensor, by name.
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

/// Loads the safetensors file `weights_path` as the tensors of `config`'s model, checked
/// by name, shape and dtype (the config's `dtype`, when it has one). See the
/// [module example](super#example).
///
/// # Errors
/// As [`load`].
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
    let views = st.tensors();
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
            let t = candle::safetensors::Load::load(view, device)?;
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    Ok(varmap)
}
