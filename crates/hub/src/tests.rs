use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use super::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A hub on loopback answering as huggingface.co's `resolve` endpoint does for hf-hub's
/// client: a ranged GET of `bytes=0-0` gives the commit (`x-repo-commit`), the etag and the
/// size (`content-range`), a ranged GET of `bytes=N-` the rest; an unknown path is a 404.
/// Returns the endpoint URL; the server thread ends with the test process.
fn serve(files: HashMap<String, Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap();
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            // The requested range `bytes=S-` or `bytes=S-E` (inclusive end).
            let mut range: (usize, Option<usize>) = (0, None);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    let (s, e) = r.trim().split_once('-').unwrap();
                    range = (s.parse().unwrap(), e.parse().ok());
                }
            }
            let response = match files.get(&path) {
                Some(body) => {
                    let start = range.0.min(body.len());
                    let end = range.1.map_or(body.len(), |e| (e + 1).min(body.len()));
                    let part = &body[start..end];
                    let mut head = format!(
                        "HTTP/1.1 206 Partial Content\r\nx-repo-commit: {COMMIT}\r\netag: \"e{}\"\r\ncontent-range: bytes {start}-{}/{}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len(),
                        end - 1,
                        body.len(),
                        part.len()
                    )
                    .into_bytes();
                    head.extend_from_slice(part);
                    head
                }
                None => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    url
}

fn options(cache: &Path, endpoint: &str) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some(endpoint.to_string()),
        ..Default::default()
    }
}

#[test]
fn a_download_lands_in_the_cache_and_is_then_read_offline() {
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let files = HashMap::from([
        (
            "/owner/name/resolve/main/weights.bin".to_string(),
            body.clone(),
        ),
        (
            "/datasets/owner/data/resolve/refs%2Fconvert%2Fparquet/train/0000.parquet".to_string(),
            b"PAR1".to_vec(),
        ),
    ]);
    let endpoint = serve(files);
    let tmp = tempfile::tempdir().unwrap();
    let opts = options(tmp.path(), &endpoint);

    let path = fetch(RepoKind::Model, "owner/name", None, "weights.bin", &opts).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let repo = tmp.path().join("models--owner--name");
    assert_eq!(
        path,
        repo.join("snapshots").join(COMMIT).join("weights.bin")
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );

    // Now cached: found offline, by branch and by commit.
    let offline = HubOptions {
        offline: true,
        endpoint: Some("http://127.0.0.1:9".into()),
        ..opts.clone()
    };
    assert_eq!(
        fetch(RepoKind::Model, "owner/name", None, "weights.bin", &offline).unwrap(),
        path
    );
    assert_eq!(
        fetch(
            RepoKind::Model,
            "owner/name",
            Some(COMMIT),
            "weights.bin",
            &offline
        )
        .unwrap(),
        path
    );

    // A dataset at a revision with slashes (the parquet conversion's branch).
    let rev = Some("refs/convert/parquet");
    let p = fetch(
        RepoKind::Dataset,
        "owner/data",
        rev,
        "train/0000.parquet",
        &opts,
    )
    .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"PAR1");
    assert_eq!(
        cached(
            tmp.path(),
            RepoKind::Dataset,
            "owner/data",
            rev,
            "train/0000.parquet"
        ),
        Some(p)
    );
}

#[test]
fn a_missing_file_or_an_unreachable_hub_is_a_download_error() {
    let endpoint = serve(HashMap::new());
    let tmp = tempfile::tempdir().unwrap();
    let err = fetch(
        RepoKind::Model,
        "owner/name",
        None,
        "absent.bin",
        &options(tmp.path(), &endpoint),
    )
    .unwrap_err();
    let HubError::Download { url, message } = &err else {
        panic!("{err}")
    };
    assert_eq!(
        url,
        &format!("{endpoint}/owner/name/resolve/main/absent.bin")
    );
    assert!(message.contains("404"), "{message}");
    assert!(!tmp.path().join("models--owner--name/snapshots").exists());

    // Nothing listens on port 9 of loopback.
    let err = fetch(
        RepoKind::Model,
        "owner/name",
        None,
        "absent.bin",
        &options(tmp.path(), "http://127.0.0.1:9"),
    )
    .unwrap_err();
    assert!(matches!(err, HubError::Download { .. }), "{err}");
}

#[test]
fn offline_misses_and_bad_names_are_refused_before_any_network() {
    let tmp = tempfile::tempdir().unwrap();
    let offline = HubOptions {
        cache_dir: Some(tmp.path().into()),
        offline: true,
        ..Default::default()
    };
    let err = fetch(RepoKind::Model, "owner/name", None, "x.bin", &offline).unwrap_err();
    let HubError::NotCached { cache } = &err else {
        panic!("{err}")
    };
    assert_eq!(cache, tmp.path());
    assert!(err.to_string().contains("offline"), "{err}");

    for file in ["", "../x", "a/../../b", "/etc/passwd", "./x"] {
        let err = fetch(RepoKind::Model, "owner/name", None, file, &offline).unwrap_err();
        assert!(
            matches!(err, HubError::BadFileName { .. }),
            "{file:?}: {err}"
        );
    }
    for id in ["", "a/b/c", "../x", "/abs", "owner/", ".hidden", "a b"] {
        let err = fetch(RepoKind::Model, id, None, "x.bin", &offline).unwrap_err();
        assert!(matches!(err, HubError::BadRepoId { .. }), "{id:?}: {err}");
    }
}

#[test]
fn the_cache_lookup_follows_refs_and_commits_and_stays_inside_the_repo() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("datasets--owner--data");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(snapshot.join("sub")).unwrap();
    std::fs::write(snapshot.join("sub/f.txt"), "x").unwrap();
    std::fs::create_dir_all(repo.join("refs/refs/convert")).unwrap();
    // A trailing newline, as an editor or `echo` leaves it.
    std::fs::write(
        repo.join("refs/refs/convert/parquet"),
        format!("{COMMIT}\n"),
    )
    .unwrap();
    let look = |rev: Option<&str>, file: &str| {
        cached(tmp.path(), RepoKind::Dataset, "owner/data", rev, file)
    };
    let want = Some(snapshot.join("sub/f.txt"));
    assert_eq!(look(Some("refs/convert/parquet"), "sub/f.txt"), want);
    assert_eq!(look(Some(COMMIT), "sub/f.txt"), want);
    // No refs/main; a model repo of the same name is another folder.
    assert_eq!(look(None, "sub/f.txt"), None);
    assert_eq!(
        cached(
            tmp.path(),
            RepoKind::Model,
            "owner/data",
            Some(COMMIT),
            "sub/f.txt"
        ),
        None
    );
    assert_eq!(look(Some(COMMIT), "sub/absent.txt"), None);
    assert_eq!(look(Some(COMMIT), "sub"), None, "a directory is not a file");
    assert_eq!(
        look(
            Some("../../datasets--owner--data/refs/refs/convert/parquet"),
            "sub/f.txt"
        ),
        None
    );
    assert_eq!(look(Some(COMMIT), "../../x"), None);
    // A ref naming something that is not a commit hash.
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "../../../etc").unwrap();
    assert_eq!(look(None, "sub/f.txt"), None);
}

/// An environment of `pairs`, as `std::env::var` would read it.
fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn settings_resolve_as_huggingface_hub_resolves_them() {
    let all = [
        ("HF_HUB_CACHE", "/a"),
        ("HUGGINGFACE_HUB_CACHE", "/b"),
        ("HF_HOME", "/c"),
        ("XDG_CACHE_HOME", "/d"),
        ("HOME", "/e"),
    ];
    let want = [
        "/a",
        "/b",
        "/c/hub",
        "/d/huggingface/hub",
        "/e/.cache/huggingface/hub",
    ];
    for skip in 0..all.len() {
        assert_eq!(cache_dir_from(env(&all[skip..])), PathBuf::from(want[skip]));
    }

    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
    let home = tmp.path().to_str().unwrap();
    assert_eq!(
        token_from(env(&[("HF_HOME", home)])).as_deref(),
        Some("hf_file")
    );
    assert_eq!(
        token_from(env(&[("HF_TOKEN", "hf_env"), ("HF_HOME", home)])).as_deref(),
        Some("hf_env")
    );
    assert_eq!(token_from(env(&[("HF_HOME", "/nonexistent-dir")])), None);
}

/// The repo-id rule tau-model's loader also uses to tell a hub id from a local path.
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
