//! Checkpoints of a run: writing one atomically, finding the last, reading the optimizer
//! and loop state back for an exact resume.

use super::*;

/// The checkpoint directory `checkpoints/last` points to, if any.
pub fn last_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let last = run_dir.join(tau_records::CHECKPOINTS_DIR).join("last");
    if last.is_dir() {
        return Some(last);
    }
    // Where symbolic links are unavailable, `last` is a file holding the directory name.
    let name = std::fs::read_to_string(&last).ok()?;
    let dir = run_dir.join(tau_records::CHECKPOINTS_DIR).join(name.trim());
    dir.is_dir().then_some(dir)
}

/// Writes a checkpoint of the current step: model, optimizer state and [`TrainState`] into
/// a temporary directory that is renamed to `checkpoints/step-NNNNNNNN` when complete;
/// then `checkpoints/last` is pointed at it (a new link renamed over the old one) and older
/// checkpoints are removed.
pub(super) fn checkpoint(
    sess: &Session<'_>,
    run_dir: &Path,
    state: &mut TrainState,
    metrics: &mut MetricsWriter,
) -> crate::Result<()> {
    metrics.sync()?;
    state.metrics_len = metrics.len();
    let dir = run_dir.join(tau_records::CHECKPOINTS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("step-{:08}", state.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    sess.store.save(&tmp)?;
    let opt_path = tmp.join("optimizer.safetensors");
    let opt_state = sess.optimizer.state()?;
    candle::safetensors::save(&opt_state, &opt_path)
        .with_context(|| format!("writing {}", opt_path.display()))?;
    write_json_atomic(&tmp.join("state.json"), state)?;
    for entry in std::fs::read_dir(&tmp)? {
        let p = entry?.path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", p.display()))?;
        }
    }
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    sync_dir(&dir);
    point_last(&dir, &name)?;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let fname = entry.file_name();
        let fname = fname.to_string_lossy();
        if fname.starts_with("step-") && fname != name {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

#[cfg(unix)]
fn point_last(dir: &Path, name: &str) -> crate::Result<()> {
    let tmp = dir.join(".last.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("last"))
        .with_context(|| format!("updating {}", dir.join("last").display()))?;
    sync_dir(dir);
    Ok(())
}

#[cfg(not(unix))]
fn point_last(dir: &Path, name: &str) -> crate::Result<()> {
    Ok(write_atomic(&dir.join("last"), name.as_bytes())?)
}

/// Reads the optimizer state and the [`TrainState`] of a checkpoint into `optimizer`.
///
/// # Errors
/// Missing or corrupt files, or optimizer state that does not fit the model.
pub fn load_checkpoint_state(ckpt: &Path, optimizer: &mut Sgd) -> crate::Result<TrainState> {
    let state_path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: TrainState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", state_path.display()))?;
    let opt_path = ckpt.join("optimizer.safetensors");
    let device = optimizer
        .params()
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(candle::Device::Cpu);
    let tensors = candle::safetensors::load(&opt_path, &device)
        .with_context(|| format!("reading {}", opt_path.display()))?;
    optimizer
        .load_state(tensors)
        .with_context(|| format!("{}", opt_path.display()))?;
    Ok(state)
}

/// Writes `text` as the run's `config.toml`, atomically.
///
/// # Errors
/// I/O errors.
pub fn write_config(run_dir: &Path, text: &str) -> crate::Result<()> {
    Ok(write_atomic(
        &run_dir.join(tau_records::CONFIG_FILE),
        text.as_bytes(),
    )?)
}
