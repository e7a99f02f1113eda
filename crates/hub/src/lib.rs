//! Files from the Hugging Face hub, cache first: a file already in the local hub cache is
//! returned without any network access, and only a miss is downloaded (unless
//! [`HubOptions::offline`]). The cache is the one Python's `huggingface_hub` writes and
//! reads — `{models,datasets}--{owner}--{name}/refs/<revision>` names a commit,
//! `snapshots/<commit>/<file>` holds the file — so a repo downloaded by either is found by
//! the other.
//!
//! Downloads go through hf-hub's blocking client (ureq, rustls). What this crate adds to it
//! is the settings resolution of `huggingface_hub` (the cache directory from
//! `HF_HUB_CACHE`, `HUGGINGFACE_HUB_CACHE`, `HF_HOME` or `XDG_CACHE_HOME`; the endpoint
//! from `HF_ENDPOINT`; the token from `HF_TOKEN` or `$HF_HOME/token`), a cache lookup that
//! also finds a file pinned by its commit hash, file names checked before they become
//! paths, and one error type.
//!
//! # Example
//!
//! ```
//! use tau_hub::{HubError, HubOptions, RepoKind, fetch};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let tmp = tempfile::tempdir()?;
//! // A model repo `owner/name` in a hub cache: `refs/main` names the commit whose
//! // snapshot holds the file.
//! let (cache, commit) = (tmp.path().join("hub"), "0123456789abcdef0123456789abcdef01234567");
//! let repo = cache.join("models--owner--name");
//! std::fs::create_dir_all(repo.join("refs"))?;
//! std::fs::write(repo.join("refs/main"), commit)?;
//! let snapshot = repo.join("snapshots").join(commit);
//! std::fs::create_dir_all(&snapshot)?;
//! std::fs::write(snapshot.join("config.json"), "{}")?;
//!
//! let options = HubOptions {
//!     cache_dir: Some(cache.clone()),
//!     offline: true,
//!     ..Default::default()
//! };
//! // Found by branch and by commit, with no network access.
//! let path = fetch(RepoKind::Model, "owner/name", None, "config.json", &options)?;
//! assert_eq!(path, snapshot.join("config.json"));
//! let pinned = fetch(RepoKind::Model, "owner/name", Some(commit), "config.json", &options)?;
//! assert_eq!(pinned, path);
//!
//! // A miss while offline is an error naming the cache, not a download.
//! let err = fetch(RepoKind::Model, "owner/name", None, "model.safetensors", &options).unwrap_err();
//! assert!(matches!(err, HubError::NotCached { .. }), "{err}");
//! # Ok(()) }
//! ```

use std::path::{Component, Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// The hub's address when neither [`HubOptions::endpoint`] nor `HF_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The revision read when none is given.
pub const DEFAULT_REVISION: &str = "main";

/// The kind of a hub repository (its URL and its cache folder differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    /// A model repository: `models--owner--name` in the cache.
    Model,
    /// A dataset repository: `datasets--owner--name` in the cache.
    Dataset,
}

impl RepoKind {
    fn repo_type(self) -> RepoType {
        match self {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        }
    }
}

/// Where and how to reach the hub; every `None` is resolved from the environment as
/// `huggingface_hub` resolves it (see the [crate docs](crate)).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache directory (the `…/huggingface/hub` folder).
    pub cache_dir: Option<PathBuf>,
    /// The hub's URL.
    pub endpoint: Option<String>,
    /// An access token (for gated or private repositories).
    pub token: Option<String>,
    /// How many times an interrupted download is resumed (`None`: hf-hub's default, 0).
    pub retries: Option<usize>,
    /// Never download: a cache miss is [`HubError::NotCached`].
    pub offline: bool,
}

/// Why the hub could not provide a file.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The file name would leave the repository's folder (absolute, or with `..`), or is
    /// empty.
    #[error("{file:?} is not a file name inside a repository")]
    BadFileName {
        /// The file name as given.
        file: String,
    },
    /// The repository id is not `name` or `owner/name`.
    #[error("{id:?} is not a hub repository id (`name` or `owner/name`)")]
    BadRepoId {
        /// The id as given.
        id: String,
    },
    /// Offline, and the cache does not hold the file.
    #[error("not in the hub cache {} (offline: no download)", cache.display())]
    NotCached {
        /// The cache directory that was searched.
        cache: PathBuf,
    },
    /// The download failed: network, HTTP status (a missing file is a 404), or writing
    /// into the cache.
    #[error("downloading {url}: {message}")]
    Download {
        /// The file's URL.
        url: String,
        /// What hf-hub's client reported.
        message: String,
    },
}

/// The hub cache directory the environment names: `HF_HUB_CACHE`, else
/// `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
/// else `~/.cache/huggingface/hub` (empty variables count as unset).
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(env_var)
}

fn env_var(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

fn hf_home_from(get: &impl Fn(&str) -> Option<String>) -> PathBuf {
    if let Some(home) = get("HF_HOME") {
        return home.into();
    }
    let cache = get("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| get("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface")
}

fn cache_dir_from(get: impl Fn(&str) -> Option<String>) -> PathBuf {
    get("HF_HUB_CACHE")
        .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home_from(&get).join("hub"))
}

fn token_from(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    get("HF_TOKEN").or_else(|| {
        let text = std::fs::read_to_string(hf_home_from(&get).join("token")).ok()?;
        Some(text.trim().to_string()).filter(|t| !t.is_empty())
    })
}

/// A repository id: `name` or `owner/name`, each part of ASCII letters, digits, `-`, `_`
/// and `.`, not starting with `.` or `-`, at most 96 characters.
pub fn is_repo_id(id: &str) -> bool {
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

/// A relative path of normal components only: it stays inside the folder it is joined to.
fn check_file_name(file: &str) -> Result<(), HubError> {
    let path = Path::new(file);
    let inside = !file.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)));
    if inside {
        Ok(())
    } else {
        Err(HubError::BadFileName { file: file.into() })
    }
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached copy of `file` of repository `id` at `revision` in the cache at `cache`:
/// `refs/<revision>` names the commit whose snapshot holds it, or `revision` is that
/// commit. `None` when the cache does not hold it (or the names are not valid).
pub fn cached(
    cache: &Path,
    kind: RepoKind,
    id: &str,
    revision: Option<&str>,
    file: &str,
) -> Option<PathBuf> {
    if !is_repo_id(id) || check_file_name(file).is_err() {
        return None;
    }
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    let repo = cache.join(Repo::new(id.to_string(), kind.repo_type()).folder_name());
    let in_snapshot = |commit: &str| {
        let path = repo.join("snapshots").join(commit).join(file);
        path.is_file().then_some(path)
    };
    // A revision that is a branch or tag name (possibly with `/`, as
    // `refs/convert/parquet`) has a ref file; its name must stay inside `refs/` too.
    let from_ref = check_file_name(revision).ok().and_then(|()| {
        let commit = std::fs::read_to_string(repo.join("refs").join(revision)).ok()?;
        let commit = commit.trim();
        is_commit_hash(commit)
            .then(|| in_snapshot(commit))
            .flatten()
    });
    from_ref.or_else(|| {
        is_commit_hash(revision)
            .then(|| in_snapshot(revision))
            .flatten()
    })
}

/// The local path of `file` of hub repository `id` at `revision` (`None`: `main`): from
/// the cache, else downloaded into it (unless [`HubOptions::offline`]). See the
/// [crate example](crate#example).
///
/// # Errors
/// [`HubError::BadRepoId`] or [`HubError::BadFileName`] for names that are not a
/// repository's, [`HubError::NotCached`] for an offline miss, [`HubError::Download`] when
/// the hub cannot provide the file.
pub fn fetch(
    kind: RepoKind,
    id: &str,
    revision: Option<&str>,
    file: &str,
    options: &HubOptions,
) -> Result<PathBuf, HubError> {
    if !is_repo_id(id) {
        return Err(HubError::BadRepoId { id: id.into() });
    }
    check_file_name(file)?;
    let cache = options.cache_dir.clone().unwrap_or_else(default_cache_dir);
    if let Some(path) = cached(&cache, kind, id, revision, file) {
        return Ok(path);
    }
    if options.offline {
        return Err(HubError::NotCached { cache });
    }
    let revision = revision.unwrap_or(DEFAULT_REVISION).to_string();
    let endpoint = options
        .endpoint
        .clone()
        .or_else(|| env_var("HF_ENDPOINT"))
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
    let endpoint = endpoint.trim_end_matches('/').to_string();
    let token = options.token.clone().or_else(|| token_from(env_var));
    let repo = Repo::with_revision(id.to_string(), kind.repo_type(), revision);
    let api = ApiBuilder::from_cache(Cache::new(cache))
        .with_endpoint(endpoint.clone())
        .with_token(token)
        .with_retries(options.retries.unwrap_or(0))
        .with_progress(false)
        .build()
        .map_err(|e| HubError::Download {
            url: endpoint,
            message: e.to_string(),
        })?;
    let repo = api.repo(repo);
    let url = repo.url(file);
    tracing::info!(repo = id, file, url, "downloading from the hub");
    repo.download(file).map_err(|e| HubError::Download {
        url,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;
