//! Every point's config checked by the tau-resnet binary before a sweep starts (or submits)
//! any, so that a bad grid key or value stops the sweep at once, with the points it
//! concerns named, instead of failing in every process (or array task) that has it.
//! One `tau-resnet check-points` process checks them all ([`tau_records::CheckRequest`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::bail;
use tau_records::{CHECK_COMMAND, CheckReply, CheckRequest};

use crate::spec::{Point, SweepSpec};

/// How many distinct errors the refusal lists.
const SHOWN: usize = 5;

/// Checks the configs of `points` (those about to start from the base config) as `bin`
/// reads them. Returns `Ok(None)` when every point is accepted, `Ok(Some(why))` when the
/// binary could not check them (it does not start here, as a CUDA build on a machine
/// without the driver; or it predates `check-points`), for the caller to warn about.
///
/// # Errors
/// Points the binary refuses: each distinct error with the first point that has it and
/// how many more do.
pub(crate) fn check_points(
    spec: &SweepSpec,
    points: &[&Point],
    bin: &Path,
) -> anyhow::Result<Option<String>> {
    if points.is_empty() {
        return Ok(None);
    }
    let request = CheckRequest {
        command: spec.command.as_str().to_string(),
        base: toml::to_string(&spec.base)?,
        points: points.iter().map(|p| p.set_args()).collect(),
    };
    let reply = match ask(bin, &request) {
        Ok(reply) => reply,
        Err(why) => return Ok(Some(why)),
    };
    refuse(spec, points, &reply)?;
    Ok(None)
}

/// Runs `bin check-points` on `request`; the reason as text when it gives no reply.
fn ask(bin: &Path, request: &CheckRequest) -> Result<CheckReply, String> {
    let mut child = Command::new(bin)
        .arg(CHECK_COMMAND)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{} did not start: {e}", bin.display()))?;
    let text = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A binary that stops without reading (an older one, or one whose libraries are
        // missing) closes the pipe: its exit status says why.
        let _ = stdin.write_all(&text);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!(
            "`{} {CHECK_COMMAND}` ended with {}{}{}",
            bin.display(),
            out.status,
            if last.is_empty() { "" } else { ": " },
            last.trim()
        ));
    }
    let reply: CheckReply = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("`{} {CHECK_COMMAND}` gave no reply: {e}", bin.display()))?;
    if reply.errors.len() != request.points.len() {
        return Err(format!(
            "`{} {CHECK_COMMAND}` answered for {} points, not {}",
            bin.display(),
            reply.errors.len(),
            request.points.len()
        ));
    }
    Ok(reply)
}

/// The error naming the refused points of `reply`, if any.
fn refuse(spec: &SweepSpec, points: &[&Point], reply: &CheckReply) -> anyhow::Result<()> {
    // Each distinct error with the points that have it, in the points' order.
    let mut by_error: BTreeMap<&str, (usize, Vec<&str>)> = BTreeMap::new();
    for (i, (point, error)) in points.iter().zip(&reply.errors).enumerate() {
        if let Some(e) = error {
            by_error
                .entry(e)
                .or_insert((i, Vec::new()))
                .1
                .push(&point.name);
        }
    }
    if by_error.is_empty() {
        return Ok(());
    }
    let n_bad: usize = by_error.values().map(|(_, p)| p.len()).sum();
    let mut errors: Vec<_> = by_error.into_iter().collect();
    errors.sort_by_key(|(_, (first, _))| *first);
    let mut text = format!(
        "{n_bad} of {} points have a config `tau-resnet {}` refuses; nothing was started:",
        points.len(),
        spec.command
    );
    for (error, (_, names)) in errors.iter().take(SHOWN) {
        let more = match names.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        text.push_str(&format!("\n  {}{more}: {error}", names[0]));
    }
    if errors.len() > SHOWN {
        text.push_str(&format!(
            "\n  … {} more distinct errors",
            errors.len() - SHOWN
        ));
    }
    text.push_str("\nfix the [grid] values or the [base] config of the sweep");
    bail!(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn spec() -> SweepSpec {
        let text = "name = \"t\"\ncommand = \"train\"\n[base]\nseed = 0\n[grid]\n\
            \"model.depth\" = [8, 9, 10, 20]\n\"model.tau\" = [\"1\", \"1/L\"]\n";
        SweepSpec::from_str_in(text, Path::new(".")).unwrap()
    }

    /// A stand-in binary: its script body gets the request on stdin.
    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let path = dir.join("tau-resnet");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn refused_points_are_named_grouped_by_error() {
        let spec = spec();
        let points = spec.points().unwrap();
        let refs: Vec<&Point> = points.iter().collect();
        let errors: Vec<Option<String>> = points
            .iter()
            .map(|p| {
                let depth = p.values[0].1.as_integer().unwrap();
                (depth % 6 != 2).then(|| format!("depth {depth} is not 6n+2"))
            })
            .collect();
        let err = refuse(&spec, &refs, &CheckReply { errors })
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("4 of 8 points have a config `tau-resnet train` refuses"),
            "{err}"
        );
        assert!(
            err.contains("\n  depth-9_tau-1 (and 1 more): depth 9 is not 6n+2"),
            "{err}"
        );
        assert!(
            err.contains("\n  depth-10_tau-1 (and 1 more): depth 10 is not 6n+2"),
            "{err}"
        );
        assert!(
            !err.contains("depth-8") && !err.contains("depth-20"),
            "{err}"
        );
        let fine = CheckReply {
            errors: vec![None; points.len()],
        };
        refuse(&spec, &refs, &fine).unwrap();
    }

    #[test]
    fn the_binary_gets_every_point_and_its_reply_decides() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = spec();
        let points = spec.points().unwrap();
        let refs: Vec<&Point> = points.iter().collect();
        // Echoes the request's points back as errors when it holds depth 9.
        let request = tmp.path().join("request.json");
        let bin = script(
            tmp.path(),
            &format!(
                "cat > {0}\nif grep -q 'model.depth=9' {0}; then echo '{{\"errors\":[null,null,\"bad 9\",\"bad 9\",null,null,null,null]}}'; else echo '{{\"errors\":[null,null,null,null,null,null,null,null]}}'; fi",
                request.display()
            ),
        );
        let err = check_points(&spec, &refs, &bin).unwrap_err().to_string();
        assert!(err.contains("depth-9_tau-1 (and 1 more): bad 9"), "{err}");
        let sent: CheckRequest =
            serde_json::from_str(&std::fs::read_to_string(&request).unwrap()).unwrap();
        assert_eq!(sent.command, "train");
        assert_eq!(sent.points.len(), 8);
        assert_eq!(sent.points[0], ["model.depth=8", "model.tau=\"1\""]);
        assert!(sent.base.contains("seed = 0"), "{}", sent.base);
        let ok: Vec<&Point> = refs
            .iter()
            .copied()
            .filter(|p| !p.name.contains("-9_"))
            .collect();
        let why = check_points(&spec, &ok, &bin).unwrap().unwrap();
        assert!(why.contains("answered for 8 points, not 6"), "{why}");
        // Every point accepted: no error, no reason.
        let fine = script(
            tmp.path(),
            "cat > /dev/null; echo '{\"errors\":[null,null,null,null,null,null,null,null]}'",
        );
        assert_eq!(check_points(&spec, &refs, &fine).unwrap(), None);
    }

    #[test]
    fn a_binary_that_cannot_check_is_a_reason_not_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = spec();
        let points = spec.points().unwrap();
        let refs: Vec<&Point> = points.iter().collect();
        let old = script(
            tmp.path(),
            "echo \"error: unrecognized subcommand 'check-points'\" >&2; exit 2",
        );
        let why = check_points(&spec, &refs, &old).unwrap().unwrap();
        assert!(
            why.contains("exit status: 2: error: unrecognized subcommand"),
            "{why}"
        );
        let missing = tmp.path().join("absent");
        let why = check_points(&spec, &refs, &missing).unwrap().unwrap();
        assert!(why.contains("did not start"), "{why}");
        let garbled = script(tmp.path(), "cat > /dev/null; echo 'not json'");
        let why = check_points(&spec, &refs, &garbled).unwrap().unwrap();
        assert!(why.contains("gave no reply"), "{why}");
    }
}
