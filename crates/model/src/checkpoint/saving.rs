//! Saving a checkpoint (see [`super`]): [`save`] and [`save_with`] check the tensors
//! against the config, then write `model.safetensors` and `config.json`, each atomically.
//!
//! # Example
//!
//! A `VarMap` that does not fit the config is refused before anything is written; a save
//! leaves the two files and nothing else.
//!
//! ```
//! use candle::{DType, Device};
//! use tau_model::{ModelConfig, checkpoint, init_varmap};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! let dir = tmp.path().join("theory-l2");
//! let json = |depth| {
//!     format!(r#"{{"family": "theory", "input_dim": 2, "width": 4, "depth": {depth}}}"#)
//! };
//! let cfg: ModelConfig = serde_json::from_str(&json(2))?;
//! let varmap = init_varmap(&cfg, 0, DType::F32, &Device::Cpu)?;
//! let deeper: ModelConfig = serde_json::from_str(&json(3))?;
//! let err = checkpoint::save(&dir, &deeper, &varmap).unwrap_err();
//! assert!(err.to_string().contains(r#"missing tensor "blocks.2.weight""#), "{err}");
//! assert!(!dir.exists());
//!
//! checkpoint::save(&dir, &cfg, &varmap)?;
//! let mut names = std::fs::read_dir(&dir)?
//!     .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
//!     .collect::<std::io::Result<Vec<_>>>()?;
//! names.sort();
//! assert_eq!(names, [checkpoint::CONFIG_FILE, checkpoint::WEIGHTS_FILE]);
//! # Ok(()) }
//! ```

use std::io::Write;

use super::*;

/// Writes `bytes` (or what `write` produces) to `path` atomically: a temporary file in the
/// same directory, synced, then renamed over `path`.
fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .and_then(|f| f.to_str())
        .unwrap_or("checkpoint");
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Saves `varmap` as a checkpoint of `cfg` into `dir` (created if needed): `config.json`
/// and `model.safetensors`, each written atomically. [`save_with`] records the
/// preprocessing, data set and class names too. See the [module example](super#example).
///
/// # Errors
/// An invalid config, a `varmap` that does not match it (missing, unexpected or
/// misshapen tensor, mixed dtypes), or an I/O error; nothing is written then.
pub fn save(dir: &Path, cfg: &ModelConfig, varmap: &VarMap) -> Result<(), CheckpointError> {
    save_with(dir, &CheckpointConfig::new(cfg.clone()), varmap)
}

/// [`save`] with everything `config` records beside the model (preprocessing, data set,
/// class names); its `n_blocks`, `tau_resolved` and `dtype` are recomputed from the model
/// and the tensors. See the [example](CheckpointConfig#example).
///
/// # Errors
/// As [`save`], and metadata that does not fit the model (see [`CheckpointConfig::check`]).
pub fn save_with(
    dir: &Path,
    config: &CheckpointConfig,
    varmap: &VarMap,
) -> Result<(), CheckpointError> {
    let cfg = &config.model;
    let weights_path = dir.join(WEIGHTS_FILE);
    let mut config = CheckpointConfig {
        n_blocks: None,
        tau_resolved: None,
        dtype: None,
        ..config.clone()
    };
    config.check().map_err(|message| CheckpointError::Config {
        path: dir.join(CONFIG_FILE),
        message,
    })?;
    let tensors = varmap_tensors(varmap)?;
    let dtype = check_tensors(
        cfg,
        &weights_path,
        tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.dims().to_vec(), Ok(t.dtype()))),
        None,
    )?;
    config.n_blocks = Some(cfg.n_blocks());
    config.tau_resolved = Some(cfg.tau_init());
    config.dtype = Some(dtype_name(dtype));
    let json = serde_json::to_string_pretty(&config)
        .map_err(|e| candle::Error::Msg(format!("serializing config.json: {e}")))?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cpu: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle::Result<_>>()?;
    write_atomic(&weights_path, |tmp| {
        safetensors::tensor::serialize_to_file(cpu.iter().map(|(k, t)| (k, t)), None, tmp).map_err(
            |e| CheckpointError::Safetensors {
                path: tmp.to_path_buf(),
                message: e.to_string(),
            },
        )
    })?;
    let config_path = dir.join(CONFIG_FILE);
    write_atomic(&config_path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(io_err(tmp))?;
        f.write_all(json.as_bytes())
            .and_then(|()| f.write_all(b"\n"))
            .map_err(io_err(tmp))
    })
}
