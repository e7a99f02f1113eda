//! Loading checkpoints from a local directory or a Hugging Face hub model repo
//! (hf-hub 1.0): the local cache is tried first with no network access, and the files are
//! downloaded only on a cache miss, so a cached repo loads offline.

use std::path::{Path, PathBuf};

use candle::Device;
use candle_nn::VarMap;
use hf_hub::{HFClient, HFClientSync, HFError};

use crate::checkpoint::{self, CONFIG_FILE, CheckpointError, WEIGHTS_FILE};
use crate::config::ModelConfig;

/// Where and how to reach the hub. The defaults are hf-hub's: the cache directory and
/// endpoint from the environment (`HF_HUB_CACHE`, `HF_HOME`, `HF_ENDPOINT`, `HF_TOKEN`…).
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The hub cache directory (the `…/huggingface/hub` folder).
    pub cache_dir: Option<PathBuf>,
    /// The hub endpoint URL.
    pub endpoint: Option<String>,
    /// An access token.
    pub token: Option<String>,
    /// Retries for transient network errors (`Some(0)` fails fast).
    pub retry_max_attempts: Option<usize>,
    /// Never download: a cache miss is an error.
    pub local_files_only: bool,
}

impl HubOptions {
    fn client(&self, id: &str) -> Result<HFClientSync, CheckpointError> {
        let hub_err = |e: HFError| CheckpointError::Hub {
            id: id.to_string(),
            message: e.to_string(),
        };
        let mut builder = HFClient::builder();
        if let Some(dir) = &self.cache_dir {
            builder = builder.cache_dir(dir.clone());
        }
        if let Some(endpoint) = &self.endpoint {
            builder = builder.endpoint(endpoint.clone());
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(n) = self.retry_max_attempts {
            builder = builder.retry_max_attempts(n);
        }
        HFClientSync::from_inner(builder.build().map_err(hub_err)?).map_err(hub_err)
    }
}

/// Whether `id` has the form of a hub repo id: `name` or `owner/name`, each part made of
/// ASCII letters, digits, `-`, `_` and `.`, not starting with `.` or `-`.
fn is_repo_id(id: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match id.split_once('/') {
        Some((owner, name)) => part_ok(owner) && part_ok(name),
        None => part_ok(id),
    }
}

/// Loads a checkpoint (see [`checkpoint::load`]) from a local directory or a hub repo id,
/// with hf-hub's default settings.
///
/// # Errors
/// As [`from_pretrained_with`].
pub fn from_pretrained(
    id_or_path: &str,
    revision: Option<&str>,
    device: &Device,
) -> Result<(ModelConfig, VarMap), CheckpointError> {
    from_pretrained_with(id_or_path, revision, &HubOptions::default(), device)
}

/// Loads a checkpoint from `id_or_path`: an existing local directory is loaded directly;
/// otherwise it is a hub model repo id (`owner/name`), whose `config.json` and
/// `model.safetensors` at `revision` (default `main`) come from the local cache, else
/// from the hub.
///
/// # Errors
/// A path that is neither a directory nor a repo id, a repo or file the cache and the hub
/// cannot provide ([`CheckpointError::Hub`]), and every error of [`checkpoint::load`].
pub fn from_pretrained_with(
    id_or_path: &str,
    revision: Option<&str>,
    options: &HubOptions,
    device: &Device,
) -> Result<(ModelConfig, VarMap), CheckpointError> {
    let path = Path::new(id_or_path);
    if path.is_dir() {
        return checkpoint::load(path, device);
    }
    if path.exists() || !is_repo_id(id_or_path) {
        return Err(CheckpointError::Hub {
            id: id_or_path.to_string(),
            message: "neither a checkpoint directory nor a hub repo id (owner/name)".into(),
        });
    }
    let (config_path, weights_path) = fetch(id_or_path, revision, options)?;
    checkpoint::load_files(&config_path, &weights_path, device)
}

/// Paths of `config.json` and `model.safetensors` of a hub repo, cache first.
///
/// # Errors
/// [`CheckpointError::Hub`] naming the file the cache and the hub cannot provide.
pub fn fetch(
    id: &str,
    revision: Option<&str>,
    options: &HubOptions,
) -> Result<(PathBuf, PathBuf), CheckpointError> {
    let client = options.client(id)?;
    let (owner, name) = hf_hub::split_id(id);
    let repo = client.model(owner, name);
    let get = |file: &str| -> Result<PathBuf, CheckpointError> {
        let hub_err = |e: HFError| CheckpointError::Hub {
            id: id.to_string(),
            message: format!("{file}: {e}"),
        };
        let cached = repo
            .download_file()
            .filename(file)
            .maybe_revision(revision.map(str::to_string))
            .local_files_only(true)
            .send();
        match cached {
            Ok(p) => Ok(p),
            Err(HFError::LocalEntryNotFound { .. }) if !options.local_files_only => {
                tracing::info!(repo = id, file, "downloading from the hub");
                repo.download_file()
                    .filename(file)
                    .maybe_revision(revision.map(str::to_string))
                    .send()
                    .map_err(hub_err)
            }
            Err(e) => Err(hub_err(e)),
        }
    };
    Ok((get(CONFIG_FILE)?, get(WEIGHTS_FILE)?))
}

#[cfg(test)]
mod tests {
    use super::is_repo_id;

    #[test]
    fn repo_id_shapes() {
        for ok in [
            "gpt2",
            "owner/name",
            "tau-resnet/resnet110-cifar10",
            "a.b/c_d",
        ] {
            assert!(is_repo_id(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "./x",
            "a/b/c",
            "owner/",
            "../x",
            "a b",
            ".hidden",
        ] {
            assert!(!is_repo_id(bad), "{bad}");
        }
    }
}
