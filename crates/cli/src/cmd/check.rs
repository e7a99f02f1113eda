//! `tau-resnet check-points` (hidden): checks many points' configs in one process, as
//! `tau-resnet train|probe --config BASE --set ...` would read each, without running any.
//! `cargo xtask sweep` runs it before it starts (or submits) a sweep, so that a bad grid
//! key or value stops the sweep at once instead of failing every point that has it.
//! The exchange is [`tau_records::CheckRequest`] on standard input and
//! [`tau_records::CheckReply`] on standard output, both JSON.

use std::io::Read;

use anyhow::{Context, bail};
use tau_records::{CheckReply, CheckRequest};

use super::{Outcome, outln};

/// Arguments of `tau-resnet check-points` (none: the request comes on standard input).
#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

/// Runs `tau-resnet check-points`.
///
/// # Errors
/// An unreadable request, an unknown command or a base config that is not TOML; a bad
/// point is not an error but its entry in the reply.
pub fn run(_args: CheckArgs) -> anyhow::Result<Outcome> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("reading the request from standard input")?;
    let request: CheckRequest =
        serde_json::from_str(&text).context("reading the request from standard input")?;
    let reply = check(&request)?;
    outln!("{}", serde_json::to_string(&reply)?)?;
    Ok(Outcome::Finished)
}

/// The verdict on each point of `request`.
///
/// # Errors
/// An unknown command or a base config that is not TOML.
pub fn check(request: &CheckRequest) -> anyhow::Result<CheckReply> {
    let base: toml::Table = request.base.parse().context("parsing the base config")?;
    let check_one: fn(&toml::Table, &[String]) -> anyhow::Result<()> =
        match request.command.as_str() {
            "train" => |base, sets| {
                tau_train::config::config_with_overrides(base.clone(), sets)?;
                Ok(())
            },
            "probe" => |base, sets| Ok(tau_train::probe::validate_config(base.clone(), sets)?),
            other => bail!("unknown command `{other}` (train or probe)"),
        };
    let errors = request
        .points
        .iter()
        .map(|sets| check_one(&base, sets).err().map(|e| super::error_line(&e)))
        .collect();
    Ok(CheckReply { errors })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"t\"\nseed = 0\nsteps = 2\n[model]\nfamily = \"theory\"\ninput_dim = 4\n\
        width = 8\ndepth = 2\noutput_dim = 1\n[data]\nsource = \"synthetic\"\nn = 8\np = 4\n\
        d = 1\nbatch_size = 8\n[loss]\nkind = \"squared\"\n[optim]\nkind = \"gd\"\nlr = 0.1\n";

    fn points(points: &[&[&str]]) -> Vec<Vec<String>> {
        points
            .iter()
            .map(|p| p.iter().map(|s| s.to_string()).collect())
            .collect()
    }

    #[test]
    fn each_point_gets_its_own_verdict() {
        for command in ["train", "probe"] {
            let request = CheckRequest {
                command: command.into(),
                base: BASE.into(),
                points: points(&[
                    &["model.depth=16", "model.tau=\"1/sqrt(L)\""],
                    &["model.depht=16"],
                    &["model.depth=4", "model.tau=\"1/K\""],
                    &[],
                ]),
            };
            let reply = check(&request).unwrap();
            assert_eq!(reply.errors.len(), 4, "{command}");
            assert_eq!(reply.errors[0], None, "{command}");
            let typo = reply.errors[1].as_deref().unwrap_or_default();
            assert!(typo.contains("model.depht"), "{command}: {typo}");
            let rule = reply.errors[2].as_deref().unwrap_or_default();
            assert!(rule.contains("1/K"), "{command}: {rule}");
            assert_eq!(reply.errors[3], None, "{command}");
        }
        // A run config key that only `train` reads: probe reads past it, train refuses it.
        let request = CheckRequest {
            command: "train".into(),
            base: BASE.into(),
            points: points(&[&["optim.lr=-1"]]),
        };
        let reply = check(&request).unwrap();
        assert!(
            reply.errors[0]
                .as_deref()
                .is_some_and(|e| e.contains("optim.lr"))
        );
    }

    #[test]
    fn a_bad_request_is_an_error() {
        let mut request = CheckRequest {
            command: "eval".into(),
            base: BASE.into(),
            points: Vec::new(),
        };
        let err = check(&request).unwrap_err().to_string();
        assert!(err.contains("unknown command `eval`"), "{err}");
        request.command = "train".into();
        request.base = "name = ".into();
        let err = format!("{:#}", check(&request).unwrap_err());
        assert!(err.contains("parsing the base config"), "{err}");
    }
}
