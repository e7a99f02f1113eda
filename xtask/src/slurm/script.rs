//! The job script and the array index: which array id runs which point, and how.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, bail};

use super::*;
use crate::records::FAILURE_RECORD;
use crate::spec::{Point, RunCommand, SweepSpec, display_value};

/// A string as one single-quoted shell word.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Array ids as Slurm's `--array` list: runs of consecutive ids become ranges (`0-3,5,7-8`).
pub fn array_ranges(ids: &[usize]) -> String {
    let mut sorted: Vec<usize> = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if end == start {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Parses an `--array` list or the bracketed task list of squeue/sacct (`0-3,5,7-9%2`).
///
/// # Errors
/// Text that is not such a list.
pub fn parse_ranges(text: &str) -> anyhow::Result<Vec<usize>> {
    let text = text.trim().trim_start_matches('[').trim_end_matches(']');
    let text = text.split('%').next().unwrap_or("");
    let mut out = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("`{part}` in array list `{text}`");
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.parse().with_context(bad)?;
                let b: usize = b.parse().with_context(bad)?;
                if b < a {
                    bail!("{}: descending range", bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().with_context(bad)?),
        }
    }
    Ok(out)
}

/// A point's depth: the integer value of its axis whose key ends in `depth`, 0 without one.
pub(super) fn point_depth(p: &Point) -> i64 {
    p.values
        .iter()
        .find(|(k, _)| k.rsplit('.').next() == Some("depth"))
        .and_then(|(_, v)| v.as_integer())
        .unwrap_or(0)
}

/// The points in array order, array id i being the i-th: the deepest first, as a local
/// sweep starts them (Slurm starts the pending tasks of an array lowest id first, so with
/// a throttle the longest runs start early), in grid order among equal depths.
pub fn array_order(points: &[Point]) -> Vec<Point> {
    let mut out = points.to_vec();
    out.sort_by_key(|p| std::cmp::Reverse(point_depth(p)));
    out
}

/// `index.tsv`: one line per point of `points` (in array order, [`array_order`]), its
/// array id, its folder name and its axis values.
pub fn index_tsv(spec: &SweepSpec, points: &[Point]) -> String {
    let mut out = String::from("array_id\tpoint");
    for a in &spec.axes {
        out.push('\t');
        out.push_str(&a.key);
    }
    out.push('\n');
    for (i, p) in points.iter().enumerate() {
        let _ = write!(out, "{i}\t{}", p.name);
        for (_, v) in &p.values {
            out.push('\t');
            out.push_str(&display_value(v).replace(['\t', '\n'], " "));
        }
        out.push('\n');
    }
    out
}

/// The job array script: task i runs point i of `points` (in array order) into
/// `root/<point>` with `bin`, as a local sweep would.
///
/// # Errors
/// Invalid settings ([`SlurmSettings::sbatch_options`]) or paths that are not UTF-8.
pub fn job_script(
    spec: &SweepSpec,
    settings: &SlurmSettings,
    root: &Path,
    bin: &Path,
    points: &[Point],
) -> anyhow::Result<String> {
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .with_context(|| format!("path {} is not UTF-8", p.display()))
    };
    let root_s = utf8(root)?;
    let bin_s = utf8(bin)?;
    let logs = root.join("slurm").join("logs");
    let logs_s = utf8(&logs)?;
    if logs_s.contains(['%', '\n']) || logs_s.chars().any(char::is_whitespace) {
        bail!(
            "the sweep folder {root_s} contains `%`, a space or a line break, which #SBATCH \
             --output cannot take: choose a --runs-dir without them"
        );
    }
    let mut s = script_header(spec, settings, &logs_s)?;
    let done_check = match spec.command {
        RunCommand::Train => {
            r#"grep -Eq '"status"[[:space:]]*:[[:space:]]*"(finished|diverged)"' "$dir/summary.json" 2>/dev/null"#
        }
        RunCommand::Probe => r#"[ -s "$dir/probe.json" ]"#,
    };
    let _ = write!(
        s,
        r#"
set -u
root={root}
bin={bin}
task="${{SLURM_ARRAY_TASK_ID:?submit with sbatch --array (cargo xtask sweep CONFIG --slurm)}}"
case "$task" in
"#,
        root = sh_quote(&root_s),
        bin = sh_quote(&bin_s),
    );
    for (i, p) in points.iter().enumerate() {
        let sets: Vec<String> = p
            .set_args()
            .iter()
            .map(|a| format!("--set {}", sh_quote(a)))
            .collect();
        let _ = writeln!(
            s,
            "  {i}) point={}; sets=({}) ;;",
            sh_quote(&p.name),
            sets.join(" ")
        );
    }
    let _ = write!(
        s,
        r#"  *) echo "error: array task $task is not a point of this sweep (see $root/slurm/{INDEX_FILE})" >&2; exit 2 ;;
esac
dir="$root/$point"
echo "task $task: point $point on $(hostname), job ${{SLURM_JOB_ID:-?}}, restart ${{SLURM_RESTART_COUNT:-0}}, $(date -u +%FT%TZ)"
if {done_check}; then
  echo "point $point already has a result: nothing to run"
  exit 0
fi
"#
    );
    for line in &settings.setup {
        let _ = writeln!(s, "{line}");
    }
    let resume = match spec.command {
        RunCommand::Train => {
            r#"if [ -f "$dir/config.toml" ]; then
  args=(train --resume "$dir")
else
  args=(train --config "$root/base.toml" "${sets[@]}" --out "$dir")
fi"#
        }
        RunCommand::Probe => r#"args=(probe --config "$root/base.toml" "${sets[@]}" --out "$dir")"#,
    };
    run_section(&mut s, resume);
    Ok(s)
}

/// The script's first lines: what it is, and the #SBATCH options.
fn script_header(
    spec: &SweepSpec,
    settings: &SlurmSettings,
    logs_s: &str,
) -> anyhow::Result<String> {
    let warn = settings.signal_before_s.unwrap_or(DEFAULT_SIGNAL_BEFORE_S);
    let mut s = String::new();
    let _ = writeln!(s, "#!/bin/bash");
    let _ = writeln!(
        s,
        "# Sweep `{}` as a Slurm job array, written by `cargo xtask sweep --slurm`.",
        spec.name
    );
    let _ = writeln!(
        s,
        "# Array task i runs point i of {INDEX_FILE} with `tau-resnet {}` into the point's",
        spec.command
    );
    let _ = writeln!(
        s,
        "# folder, as a local sweep does. Submit with `cargo xtask sweep CONFIG --slurm`,"
    );
    let _ = writeln!(
        s,
        "# which passes --array with the points that have no result yet."
    );
    let _ = writeln!(s, "#SBATCH --job-name=tau-{}", spec.name);
    let _ = writeln!(s, "#SBATCH --output={logs_s}/%A_%a.out");
    let _ = writeln!(s, "#SBATCH --open-mode=append");
    let _ = writeln!(s, "#SBATCH --requeue");
    // One tau-resnet process per task; --gpus-per-task needs an explicit task count.
    let _ = writeln!(s, "#SBATCH --ntasks=1");
    let _ = writeln!(s, "#SBATCH --signal=B:USR1@{warn}");
    for o in settings.sbatch_options()? {
        let _ = writeln!(s, "#SBATCH {o}");
    }
    Ok(s)
}

/// The end of the script: run tau-resnet with `resume` (the shell lines that set its
/// arguments), forward the time-limit signal, requeue, and record a failure as a local
/// sweep does.
fn run_section(s: &mut String, resume: &str) {
    let _ = write!(
        s,
        r#"mkdir -p "$dir"
rm -f "$dir/{FAILURE_RECORD}"
{resume}
export RAYON_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-$(nproc)}}"

# USR1 (--signal=B:USR1, before the time limit) reaches this shell only: have tau-resnet
# checkpoint (SIGTERM) and requeue the task once it has. SIGTERM (scancel, preemption,
# the time limit itself) reaches every process, tau-resnet included, which checkpoints.
signalled=0
requeue=0
trap 'signalled=1; requeue=1; kill -TERM "$child" 2>/dev/null' USR1
trap 'signalled=1' TERM
"$bin" "${{args[@]}}" >>"$dir/stdout.log" 2>>"$dir/stderr.log" </dev/null &
child=$!
while :; do
  signalled=0
  wait "$child"
  code=$?
  [ "$signalled" = 1 ] || break
done
echo "tau-resnet exited with $code"
case "$code" in
  0|3) exit 0 ;;
  130)
    if [ "$requeue" = 1 ]; then
      echo "checkpoint written before the time limit: requeueing"
      scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    fi
    exit 130 ;;
esac
# A failure: the same record a local sweep writes, with the last error line.
if [ "$code" -gt 128 ]; then
  ec=null
  msg="killed by signal $((code - 128))"
else
  ec=$code
  line=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$dir/stderr.log" 2>/dev/null | grep -v '^$' | grep '^error' | tail -n 1)
  [ -n "$line" ] || line=$(sed -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$dir/stderr.log" 2>/dev/null | grep -v '^$' | tail -n 1)
  msg="exit code $code: ${{line:-no error message}}"
fi
msg=$(printf '%s' "$msg" | cut -c1-400 | tr -d '\000-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g')
printf '{{\n  "exit_code": %s,\n  "message": "%s"\n}}' "$ec" "$msg" >"$dir/{FAILURE_RECORD}.tmp" &&
  mv "$dir/{FAILURE_RECORD}.tmp" "$dir/{FAILURE_RECORD}"
exit "$code"
"#
    );
}
