//! `cargo xtask sweep CONFIG --slurm` and `--status`: a sweep as one Slurm job array.
//!
//! `runs/<sweep>/slurm/` holds the job script (`sweep.sbatch`, array task i runs the point
//! of line i of `index.tsv`; the deepest points have the lowest ids, so they start first),
//! the submitted jobs with the point of each of their array ids (`jobs.json`), the
//! settings of the last submission (`settings.json`), the copies of `tau-resnet` the tasks
//! run (`bin/`, one per binary content, never overwritten) and Slurm's own logs (`logs/`).
//! Each task runs `tau-resnet` into the same point folder a local sweep uses, so
//! `cargo xtask report` and a later local run read the same records.
//!
//! Nothing finished runs twice: a task whose point already holds a result exits at once,
//! and a resubmission submits only points without a result that are not queued. A task
//! warned of its time limit (`--signal=B:USR1@…`) has `tau-resnet` checkpoint (SIGTERM)
//! and requeues itself; preemption and `scancel` send SIGTERM, which checkpoints too; a
//! task killed before its first checkpoint starts over (`tau-resnet train --resume`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::records::{self, FAILURE_RECORD, PointState, Status, write_atomic};
use crate::spec::{Point, RunCommand, SweepSpec, display_value};

/// The job script under `runs/<sweep>/slurm/`.
pub const SCRIPT_FILE: &str = "sweep.sbatch";
/// The index of array ids to points under `runs/<sweep>/slurm/`.
pub const INDEX_FILE: &str = "index.tsv";
/// The submitted jobs under `runs/<sweep>/slurm/`.
pub const JOBS_FILE: &str = "jobs.json";
/// The settings of the last submission under `runs/<sweep>/slurm/`.
pub const SETTINGS_FILE: &str = "settings.json";
/// The folder of the binaries the tasks run, under `runs/<sweep>/slurm/`.
pub const BIN_DIR: &str = "bin";
/// The largest `signal_before_s` sbatch takes (`--signal=…@time`, 0 to 65535).
pub const MAX_SIGNAL_BEFORE_S: u32 = 65535;
/// Seconds before the time limit at which a task is told to checkpoint, by default.
pub const DEFAULT_SIGNAL_BEFORE_S: u32 = 120;

/// Slurm settings: the `[slurm]` table of a sweep config, overridden by the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    /// `--partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// `--account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// `--qos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// `--time` per task, e.g. `"04:00:00"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `--mem` per task, e.g. `"8G"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// `--cpus-per-task` (also the task's compute threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_per_task: Option<u32>,
    /// `--gpus-per-task`, e.g. `"1"` or `"a100:1"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus_per_task: Option<String>,
    /// At most this many array tasks run at once (`--array=…%N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<u32>,
    /// Seconds before the time limit at which a task checkpoints and requeues itself
    /// (default 120).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_before_s: Option<u32>,
    /// Further `#SBATCH` options, e.g. `"--constraint=a100"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch: Vec<String>,
    /// Shell lines run before `tau-resnet` in every task, e.g. `"module load cuda/12.4"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<String>,
}

/// The Slurm options of `cargo xtask sweep` (they override the config's `[slurm]`).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Slurm (with --slurm; override the config's [slurm] table)")]
pub struct SlurmArgs {
    /// Partition to submit to.
    #[arg(long)]
    pub partition: Option<String>,
    /// Account to charge.
    #[arg(long)]
    pub account: Option<String>,
    /// Quality of service.
    #[arg(long)]
    pub qos: Option<String>,
    /// Time limit per point, e.g. 04:00:00.
    #[arg(long)]
    pub time: Option<String>,
    /// Memory per point, e.g. 8G.
    #[arg(long)]
    pub mem: Option<String>,
    /// CPUs per point (also its compute threads).
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// GPUs per point, e.g. 1 or a100:1.
    #[arg(long)]
    pub gpus_per_task: Option<String>,
    /// At most N points run at once (the array's %N).
    #[arg(long, value_name = "N")]
    pub throttle: Option<u32>,
    /// Seconds before the time limit at which a point checkpoints and requeues itself.
    #[arg(long, value_name = "SECONDS")]
    pub signal_before: Option<u32>,
    /// A further #SBATCH option, e.g. --sbatch=--constraint=a100 (repeatable).
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
}

impl SlurmSettings {
    /// These settings with every option given on the command line replacing the config's.
    pub fn overridden_by(&self, args: &SlurmArgs) -> SlurmSettings {
        let mut s = self.clone();
        let pick = |cli: &Option<String>, cfg: &mut Option<String>| {
            if cli.is_some() {
                cfg.clone_from(cli);
            }
        };
        pick(&args.partition, &mut s.partition);
        pick(&args.account, &mut s.account);
        pick(&args.qos, &mut s.qos);
        pick(&args.time, &mut s.time);
        pick(&args.mem, &mut s.mem);
        pick(&args.gpus_per_task, &mut s.gpus_per_task);
        s.cpus_per_task = args.cpus_per_task.or(s.cpus_per_task);
        s.throttle = args.throttle.or(s.throttle);
        s.signal_before_s = args.signal_before.or(s.signal_before_s);
        s.sbatch.extend(args.sbatch.iter().cloned());
        s
    }

    /// The `#SBATCH` options these settings add (besides the array, name, log and requeue
    /// options every sweep script has).
    ///
    /// # Errors
    /// A value with a line break or an empty one, or an extra option not starting with `-`.
    pub fn sbatch_options(&self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut opt = |flag: &str, value: Option<String>| -> anyhow::Result<()> {
            if let Some(v) = value {
                check_value(flag, &v)?;
                out.push(format!("--{flag}={v}"));
            }
            Ok(())
        };
        opt("partition", self.partition.clone())?;
        opt("account", self.account.clone())?;
        opt("qos", self.qos.clone())?;
        opt("time", self.time.clone())?;
        opt("mem", self.mem.clone())?;
        opt("cpus-per-task", self.cpus_per_task.map(|n| n.to_string()))?;
        opt("gpus-per-task", self.gpus_per_task.clone())?;
        for extra in &self.sbatch {
            let line = extra.trim().trim_start_matches("#SBATCH").trim();
            check_value("sbatch", line)?;
            if !line.starts_with('-') {
                bail!(
                    "slurm option `{extra}`: an #SBATCH option starts with `-`, e.g. --constraint=a100"
                );
            }
            // Every script has `--ntasks=1` (one tau-resnet process per array task).
            match ntasks_value(line) {
                Some("1") => continue,
                Some(_) => bail!(
                    "slurm option `{extra}`: each array task runs one tau-resnet process, and the \
                     job script always sets --ntasks=1; leave the task count out"
                ),
                None => {}
            }
            out.push(line.to_string());
        }
        if let Some(s) = self.signal_before_s
            && s > MAX_SIGNAL_BEFORE_S
        {
            bail!(
                "slurm signal_before_s {s}: sbatch's --signal takes 0 to {MAX_SIGNAL_BEFORE_S} seconds"
            );
        }
        if self.cpus_per_task == Some(0) {
            bail!("slurm cpus_per_task: must be at least 1");
        }
        if self.throttle == Some(0) {
            bail!("slurm throttle: must be at least 1");
        }
        for line in &self.setup {
            if line.contains(['\n', '\r']) {
                bail!("slurm setup line `{line}`: one shell line per entry");
            }
        }
        Ok(out)
    }
}

/// `settings.json`: the settings the last submission used and the config's `[slurm]`
/// table they were made from, so that a later `--slurm` call without options submits
/// with the same settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoredSettings {
    /// The effective settings of the last submission.
    pub settings: SlurmSettings,
    /// The config's `[slurm]` table at that submission.
    pub config: SlurmSettings,
}

/// The settings stored under `slurm_dir` by the last submission (none before the first).
///
/// # Errors
/// An unreadable or invalid `settings.json`.
pub fn read_stored_settings(slurm_dir: &Path) -> anyhow::Result<Option<StoredSettings>> {
    let path = slurm_dir.join(SETTINGS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).with_context(|| {
            format!(
                "parsing {} (delete it to start from the config's [slurm] table)",
                path.display()
            )
        }),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// The `[slurm]` keys given on the command line.
fn cli_keys(cli: &SlurmArgs) -> BTreeSet<&'static str> {
    [
        ("partition", cli.partition.is_some()),
        ("account", cli.account.is_some()),
        ("qos", cli.qos.is_some()),
        ("time", cli.time.is_some()),
        ("mem", cli.mem.is_some()),
        ("cpus_per_task", cli.cpus_per_task.is_some()),
        ("gpus_per_task", cli.gpus_per_task.is_some()),
        ("throttle", cli.throttle.is_some()),
        ("signal_before_s", cli.signal_before.is_some()),
        ("sbatch", !cli.sbatch.is_empty()),
    ]
    .into_iter()
    .filter_map(|(k, given)| given.then_some(k))
    .collect()
}

fn settings_map(s: &SlurmSettings) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// The settings of a `--slurm` call, and the `key = value` of each setting taken over
/// from the last submission (`stored`) that the config's table alone would not give.
///
/// Key by key: an option on the command line wins; otherwise, where the config's
/// `[slurm]` table still holds what it held at the last submission, the last
/// submission's value (which may have come from its command line); otherwise (the key
/// was changed in the table since) the table's. `--sbatch` options on the command line
/// replace the extra options of the last submission: the table's `sbatch` list followed
/// by the command line's, as in a first submission.
///
/// # Errors
/// Stored settings that do not read back (cannot happen with files xtask wrote).
pub fn effective_settings(
    config: &SlurmSettings,
    stored: Option<&StoredSettings>,
    cli: &SlurmArgs,
) -> anyhow::Result<(SlurmSettings, Vec<String>)> {
    let Some(stored) = stored else {
        return Ok((config.overridden_by(cli), Vec::new()));
    };
    let now = settings_map(config);
    let then = settings_map(&stored.config);
    let last = settings_map(&stored.settings);
    let given = cli_keys(cli);
    let mut merged = now.clone();
    let mut reused = Vec::new();
    let keys: BTreeSet<&String> = now.keys().chain(then.keys()).chain(last.keys()).collect();
    for key in keys {
        if now.get(key) != then.get(key) {
            continue;
        }
        match last.get(key) {
            Some(v) => merged.insert(key.clone(), v.clone()),
            None => merged.remove(key),
        };
        if last.get(key) != now.get(key) && !given.contains(key.as_str()) {
            reused.push(key.clone());
        }
    }
    let mut base: SlurmSettings = serde_json::from_value(serde_json::Value::Object(merged))
        .context("the stored settings of the last submission")?;
    if !cli.sbatch.is_empty() {
        base.sbatch.clone_from(&config.sbatch);
    }
    let settings = base.overridden_by(cli);
    let shown = settings_map(&settings);
    let reused = reused
        .into_iter()
        .map(|k| match shown.get(&k) {
            Some(v) => format!("{k} = {v}"),
            None => format!("{k} unset"),
        })
        .collect();
    Ok((settings, reused))
}

/// The task count an extra `#SBATCH` option sets (`--ntasks=N`, `--ntasks N`, `-n N`,
/// `-nN`), or `None` for other options.
fn ntasks_value(option: &str) -> Option<&str> {
    let value = if let Some(rest) = option.strip_prefix("--ntasks") {
        if let Some(v) = rest.strip_prefix('=') {
            v
        } else if rest.starts_with(char::is_whitespace) {
            rest
        } else {
            // --ntasks-per-node and the like.
            return None;
        }
    } else {
        option.strip_prefix("-n")?
    };
    Some(value.trim())
}

fn check_value(flag: &str, value: &str) -> anyhow::Result<()> {
    if value.trim().is_empty() {
        bail!("slurm {flag}: empty value");
    }
    if value.chars().any(char::is_control) {
        bail!("slurm {flag} `{value}`: line breaks and control characters are not allowed");
    }
    Ok(())
}

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
fn point_depth(p: &Point) -> i64 {
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
    if logs_s.contains(['%', '\n']) {
        bail!(
            "the sweep folder {root_s} contains `%` or a line break, which #SBATCH --output cannot take"
        );
    }
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
    Ok(s)
}

/// One submission of a sweep's job array, as recorded in `jobs.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    /// The array's job id.
    pub job_id: String,
    /// The array ids submitted, as an `--array` list.
    pub array: String,
    /// Seconds since the Unix epoch.
    pub submitted_unix: u64,
    /// The point (folder name) of each array id submitted. Array ids are read through
    /// this, never against the current grid, which may have changed since. Empty in a
    /// `jobs.json` from before it was recorded: then the ids are places in the grid.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub points: BTreeMap<usize, String>,
}

impl Submission {
    /// `(array id, point)` of every task of this submission; `grid` (the current grid's
    /// point names) only serves a submission recorded without its points.
    pub fn tasks(&self, grid: &[String]) -> Vec<(usize, String)> {
        if !self.points.is_empty() {
            return self.points.iter().map(|(id, p)| (*id, p.clone())).collect();
        }
        parse_ranges(&self.array)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|id| grid.get(id).map(|p| (id, p.clone())))
            .collect()
    }
}

/// The points of the given live tasks (squeue), through the submissions that hold them.
pub fn points_of_tasks(
    submissions: &[Submission],
    grid: &[String],
    tasks: &[TaskState],
) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for sub in submissions {
        let by_id: BTreeMap<usize, String> = sub.tasks(grid).into_iter().collect();
        for t in tasks.iter().filter(|t| t.job_id == sub.job_id) {
            if let Some(p) = by_id.get(&t.task) {
                out.insert(p.clone());
            }
        }
    }
    out
}

/// The submissions recorded under `slurm_dir` (none when there is no `jobs.json`).
///
/// # Errors
/// An unreadable or invalid `jobs.json`.
pub fn read_submissions(slurm_dir: &Path) -> anyhow::Result<Vec<Submission>> {
    let path = slurm_dir.join(JOBS_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

/// A Slurm array task's state, as squeue or sacct report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// The array's job id.
    pub job_id: String,
    /// The array task id (the point's index).
    pub task: usize,
    /// Slurm's state (`PENDING`, `RUNNING`, `COMPLETED`, `CANCELLED`, `OUT_OF_MEMORY`, …).
    pub state: String,
    /// squeue's reason (pending tasks) or sacct's `exit:signal` code.
    pub detail: String,
}

/// Parses `squeue --array --noheader --format=%i|%T|%r` (or sacct's
/// `--parsable2 --noheader --format=JobID,State,ExitCode`): `123_4|RUNNING|None`,
/// `123_[5-7%2]|PENDING|JobArrayTaskLimit`, `123_6|CANCELLED by 0|0:15`. Lines of
/// other jobs, job steps (`123_4.batch`) and unparsable lines are skipped.
pub fn parse_task_lines(text: &str) -> Vec<TaskState> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut fields = line.trim().split('|');
        let (Some(id), Some(state)) = (fields.next(), fields.next()) else {
            continue;
        };
        let detail = fields.next().unwrap_or("").trim().to_string();
        let Some((job, tasks)) = id.trim().split_once('_') else {
            continue;
        };
        if tasks.contains('.') {
            continue;
        }
        let state = state.split_whitespace().next().unwrap_or("").to_string();
        if state.is_empty() {
            continue;
        }
        let Ok(ids) = parse_ranges(tasks) else {
            continue;
        };
        for task in ids {
            out.push(TaskState {
                job_id: job.to_string(),
                task,
                state: state.clone(),
                detail: detail.clone(),
            });
        }
    }
    out
}

/// Parses `scontrol --oneliner show job ID` (Slurm's memory of jobs, kept for
/// `MinJobAge` after they end, where sacct has no accounting database to read):
/// `JobId=13 ArrayJobId=12 ArrayTaskId=1 JobName=… JobState=CANCELLED Reason=None … ExitCode=0:15 …`.
pub fn parse_scontrol(text: &str) -> Vec<TaskState> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: BTreeMap<&str, &str> = line
            .split_whitespace()
            .filter_map(|f| f.split_once('='))
            .collect();
        let (Some(job), Some(tasks), Some(state)) = (
            fields.get("ArrayJobId"),
            fields.get("ArrayTaskId"),
            fields.get("JobState"),
        ) else {
            continue;
        };
        let detail = if *state == "PENDING" {
            fields.get("Reason").copied().unwrap_or("")
        } else {
            fields.get("ExitCode").copied().unwrap_or("")
        };
        for task in parse_ranges(tasks).unwrap_or_default() {
            out.push(TaskState {
                job_id: (*job).to_string(),
                task,
                state: (*state).to_string(),
                detail: detail.to_string(),
            });
        }
    }
    out
}

/// Whether a Slurm state means the task is still in the queue or on a node.
fn is_live(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "REQUEUED"
            | "REQUEUE_HOLD"
            | "REQUEUE_FED"
            | "RESIZING"
            | "SUSPENDED"
            | "STOPPED"
            | "SIGNALING"
            | "STAGE_OUT"
    )
}

/// A point's state for `--status`: its records and what Slurm says of its last task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRow {
    /// The point's folder name.
    pub point: String,
    /// `finished`, `diverged`, `running`, `pending`, `interrupted`, `failed` or
    /// `not submitted`.
    pub state: String,
    /// The point's last array task and its Slurm state (`12_3 RUNNING`,
    /// `12_3 OUT_OF_MEMORY exit 0:125`), empty when never submitted.
    pub slurm: String,
    /// Why it failed, or squeue's reason for waiting.
    pub note: String,
}

/// Combines the records of every point with the last Slurm task that ran it.
/// `queue` comes from squeue (live tasks), `acct` from sacct (all tasks it knows);
/// squeue wins where both speak of a task.
pub fn status_rows(
    states: &[PointState],
    submissions: &[Submission],
    queue: &[TaskState],
    acct: &[TaskState],
) -> Vec<StatusRow> {
    // The last task of each point, by name: (job id, array id).
    let grid: Vec<String> = states.iter().map(|s| s.point.name.clone()).collect();
    let mut last_task: BTreeMap<String, (&str, usize)> = BTreeMap::new();
    for sub in submissions {
        for (id, point) in sub.tasks(&grid) {
            last_task.insert(point, (sub.job_id.as_str(), id));
        }
    }
    let find = |list: &[TaskState], job: &str, i: usize| {
        list.iter()
            .rev()
            .find(|t| t.job_id == job && t.task == i)
            .cloned()
    };
    states
        .iter()
        .map(|s| {
            let job = last_task.get(&s.point.name).copied();
            let live = job.and_then(|(j, i)| find(queue, j, i));
            let ended = job.and_then(|(j, i)| find(acct, j, i));
            let task = live.clone().or_else(|| ended.clone());
            let slurm = match (&task, job) {
                (Some(t), _) if t.state == "PENDING" || live.is_some() => {
                    format!("{}_{} {}", t.job_id, t.task, t.state)
                }
                (Some(t), _) => format!("{}_{} {} exit {}", t.job_id, t.task, t.state, t.detail),
                (None, Some((j, i))) => format!("{j}_{i}"),
                (None, None) => String::new(),
            };
            let (state, note) = if s.status.is_done() {
                (s.status.as_str().to_string(), String::new())
            } else if let Some(t) = live.as_ref().filter(|t| is_live(&t.state)) {
                let state = if t.state == "PENDING" || t.state.starts_with("REQUEUE") {
                    "pending"
                } else {
                    "running"
                };
                let note = if t.state == "PENDING" && t.detail != "None" {
                    t.detail.clone()
                } else {
                    String::new()
                };
                (state.to_string(), note)
            } else if let Some(t) = ended.as_ref().filter(|t| is_live(&t.state)) {
                // sacct still lists it as queued or running (squeue unavailable).
                let state = if t.state == "PENDING" {
                    "pending"
                } else {
                    "running"
                };
                (state.to_string(), String::new())
            } else {
                let why = s.message.clone().unwrap_or_default();
                match (s.status, &ended) {
                    (Status::Interrupted, _) => (
                        "interrupted".to_string(),
                        "checkpointed; resumes when resubmitted".to_string(),
                    ),
                    (Status::Failed, _) => ("failed".to_string(), why),
                    (_, Some(t)) if t.state == "COMPLETED" => (
                        "failed".to_string(),
                        "the task ended without a result".to_string(),
                    ),
                    (_, Some(t)) => (
                        "failed".to_string(),
                        format!("Slurm {} (exit {})", t.state, t.detail),
                    ),
                    (_, None) if job.is_some() => (
                        "pending".to_string(),
                        "submitted; Slurm has no record of it (yet)".to_string(),
                    ),
                    (_, None) => ("not submitted".to_string(), String::new()),
                }
            };
            StatusRow {
                point: s.point.name.clone(),
                state,
                slurm,
                note,
            }
        })
        .collect()
}

/// Runs a Slurm command and returns its stdout.
fn slurm_command(program: &str, args: &[String]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (is Slurm installed and on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The live tasks of the given jobs (squeue).
fn query_queue(job_ids: &[String]) -> anyhow::Result<Vec<TaskState>> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Listing the user's jobs rather than asking for these ids: squeue fails on ids it
    // no longer knows.
    let text = slurm_command(
        "squeue",
        &[
            "--me".into(),
            "--array".into(),
            "--noheader".into(),
            "--format=%i|%T|%r".into(),
        ],
    )?;
    let ids: BTreeSet<&String> = job_ids.iter().collect();
    Ok(parse_task_lines(&text)
        .into_iter()
        .filter(|t| ids.contains(&t.job_id))
        .collect())
}

/// Every task of the given jobs that Slurm's accounting knows (sacct).
fn query_acct(job_ids: &[String]) -> anyhow::Result<Vec<TaskState>> {
    if job_ids.is_empty() {
        return Ok(Vec::new());
    }
    let text = slurm_command(
        "sacct",
        &[
            "--noheader".into(),
            "--parsable2".into(),
            "--allocations".into(),
            format!("--jobs={}", job_ids.join(",")),
            "--format=JobID,State,ExitCode".into(),
        ],
    )?;
    Ok(parse_task_lines(&text))
}

/// The tasks of the given jobs that Slurm still remembers (scontrol).
fn query_scontrol(job_ids: &[String]) -> Vec<TaskState> {
    let mut out = Vec::new();
    for id in job_ids {
        // A job Slurm has forgotten is an error here; it has nothing to add then.
        if let Ok(text) = slurm_command(
            "scontrol",
            &["--oneliner".into(), "show".into(), "job".into(), id.clone()],
        ) {
            out.extend(parse_scontrol(&text));
        }
    }
    out
}

/// What `submit` did.
#[derive(Debug)]
pub struct Submitted {
    /// The job id, or `None` when nothing was submitted (dry run, nothing to run).
    pub job_id: Option<String>,
    /// The array ids submitted (or that would be).
    pub ids: Vec<usize>,
    /// The copy of `tau-resnet` the tasks run.
    pub bin: PathBuf,
}

/// Copies `bin` to `slurm_dir/bin/tau-resnet-<hash of its content>`, unless a copy of
/// that content is there already, and returns the copy. A copy is never overwritten, so
/// the tasks of an earlier submission keep running the binary they were submitted with
/// whatever is rebuilt or copied later.
///
/// # Errors
/// I/O errors.
pub fn stage_binary(bin: &Path, slurm_dir: &Path) -> anyhow::Result<PathBuf> {
    use std::hash::Hasher as _;
    let bytes = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    // SipHash with fixed keys: the same content gets the same name (a Rust release that
    // changed the hash would only make one more copy).
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&bytes);
    let dir = slurm_dir.join(BIN_DIR);
    let copy = dir.join(format!(
        "tau-resnet-{:016x}{}",
        h.finish(),
        std::env::consts::EXE_SUFFIX
    ));
    if std::fs::metadata(&copy).is_ok_and(|m| m.len() == bytes.len() as u64) {
        return Ok(copy);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".copy-{}", std::process::id()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    let perms = std::fs::metadata(bin)
        .with_context(|| format!("reading {}", bin.display()))?
        .permissions();
    std::fs::set_permissions(&tmp, perms)
        .with_context(|| format!("setting the permissions of {}", tmp.display()))?;
    std::fs::rename(&tmp, &copy).with_context(|| format!("creating {}", copy.display()))?;
    Ok(copy)
}

/// Which points to submit: the array ids (places in `order`, the array order) of the
/// points that have no result (or all, with `force`) and are not `queued`; and how many
/// were left out for having a result and for being queued.
pub fn select_points(
    order: &[Point],
    states: &[PointState],
    queued: &BTreeSet<String>,
    force: bool,
) -> (Vec<usize>, usize, usize) {
    let mut ids = Vec::new();
    let (mut done, mut in_queue) = (0, 0);
    for (id, p) in order.iter().enumerate() {
        let has_result = states
            .iter()
            .find(|s| s.point.name == p.name)
            .is_some_and(|s| s.status.is_done());
        if queued.contains(&p.name) {
            in_queue += 1;
        } else if has_result && !force {
            done += 1;
        } else {
            ids.push(id);
        }
    }
    (ids, done, in_queue)
}

/// Writes `root/slurm/` for the sweep (the script runs a copy of `bin` under
/// `slurm/bin/`) and submits the points that have no result and are not queued as one
/// job array (without `dry_run`); then records the submission in `jobs.json` and its
/// settings in `settings.json`.
///
/// # Errors
/// Invalid settings, I/O errors, squeue or sbatch failing.
pub fn submit(
    spec: &SweepSpec,
    settings: &SlurmSettings,
    root: &Path,
    bin: &Path,
    force: bool,
    dry_run: bool,
) -> anyhow::Result<Submitted> {
    let grid = spec.points()?;
    let grid_names: Vec<String> = grid.iter().map(|p| p.name.clone()).collect();
    let order = array_order(&grid);
    let slurm_dir = root.join("slurm");
    let states = records::read_sweep(spec, root)?;
    let submissions = read_submissions(&slurm_dir)?;
    let job_ids: Vec<String> = submissions.iter().map(|s| s.job_id.clone()).collect();
    let queued: BTreeSet<String> = if job_ids.is_empty() {
        BTreeSet::new()
    } else {
        match query_queue(&job_ids) {
            Ok(tasks) => {
                let live: Vec<TaskState> =
                    tasks.into_iter().filter(|t| is_live(&t.state)).collect();
                points_of_tasks(&submissions, &grid_names, &live)
            }
            Err(err) if dry_run => {
                eprintln!("note: cannot tell which points are queued: {err:#}");
                BTreeSet::new()
            }
            Err(err) => {
                return Err(err).context(
                    "asking squeue which points of the earlier submissions are still queued",
                );
            }
        }
    };
    let (ids, done, in_queue) = select_points(&order, &states, &queued, force);
    let staged = stage_binary(bin, &slurm_dir)?;
    let script = job_script(spec, settings, root, &staged, &order)?;
    crate::sweep::write_sweep_files(spec, root)?;
    write_atomic(&slurm_dir.join(SCRIPT_FILE), script.as_bytes())?;
    write_atomic(
        &slurm_dir.join(INDEX_FILE),
        index_tsv(spec, &order).as_bytes(),
    )?;
    let logs = slurm_dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    for &i in &ids {
        crate::sweep::prepare_point(spec, &order[i], &root.join(&order[i].name), force)?;
    }
    println!(
        "sweep `{}`: {} points ({done} with a result, {in_queue} queued or running), {} to submit",
        spec.name,
        order.len(),
        ids.len()
    );
    println!("wrote {}", slurm_dir.join(SCRIPT_FILE).display());
    println!("wrote {}", slurm_dir.join(INDEX_FILE).display());
    println!(
        "tasks run {} (a copy of {}, kept as is for queued tasks)",
        staged.display(),
        bin.display()
    );
    if ids.is_empty() {
        println!("nothing to submit");
        return Ok(Submitted {
            job_id: None,
            ids,
            bin: staged,
        });
    }
    let mut array = array_ranges(&ids);
    let submitted_array = array.clone();
    if let Some(n) = settings.throttle {
        let _ = write!(array, "%{n}");
    }
    let args = vec![
        "--parsable".to_string(),
        format!("--array={array}"),
        slurm_dir.join(SCRIPT_FILE).display().to_string(),
    ];
    println!("sbatch {}", args.join(" "));
    if dry_run {
        println!("dry run: not submitted");
        return Ok(Submitted {
            job_id: None,
            ids,
            bin: staged,
        });
    }
    let out = slurm_command("sbatch", &args).context("submitting the job array")?;
    // --parsable prints `jobid` or `jobid;cluster`.
    let job_id = out
        .trim()
        .split(';')
        .next()
        .filter(|j| !j.is_empty() && j.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("sbatch printed `{}`, not a job id", out.trim()))?
        .to_string();
    let mut all = submissions;
    all.push(Submission {
        job_id: job_id.clone(),
        array: submitted_array,
        submitted_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        points: ids.iter().map(|&i| (i, order[i].name.clone())).collect(),
    });
    write_atomic(
        &slurm_dir.join(JOBS_FILE),
        serde_json::to_string_pretty(&all)?.as_bytes(),
    )?;
    let stored = StoredSettings {
        settings: settings.clone(),
        config: spec.slurm.clone(),
    };
    write_atomic(
        &slurm_dir.join(SETTINGS_FILE),
        serde_json::to_string_pretty(&stored)?.as_bytes(),
    )?;
    Ok(Submitted {
        job_id: Some(job_id),
        ids,
        bin: staged,
    })
}

/// Prints every point's state: its records, and for a sweep submitted to Slurm, squeue's
/// and sacct's word on its last task.
///
/// # Errors
/// A bad grid or an unreadable `jobs.json`. A Slurm that does not answer is a note.
pub fn print_status(spec: &SweepSpec, root: &Path) -> anyhow::Result<Vec<StatusRow>> {
    let states = records::read_sweep(spec, root)?;
    let submissions = read_submissions(&root.join("slurm"))?;
    let job_ids: Vec<String> = submissions.iter().map(|s| s.job_id.clone()).collect();
    let mut notes = Vec::new();
    let queue = query_queue(&job_ids).unwrap_or_else(|err| {
        notes.push(format!("{err:#}"));
        Vec::new()
    });
    let acct = query_acct(&job_ids).unwrap_or_else(|err| {
        notes.push(format!(
            "{err:#}; the states of ended tasks come from scontrol, which forgets them MinJobAge after they end"
        ));
        query_scontrol(&job_ids)
    });
    let rows = status_rows(&states, &submissions, &queue, &acct);
    print!("{}", format_status(&spec.name, root, &submissions, &rows));
    for n in notes {
        println!("note: {n}");
    }
    Ok(rows)
}

/// The `--status` table and its summary line.
pub fn format_status(
    name: &str,
    root: &Path,
    submissions: &[Submission],
    rows: &[StatusRow],
) -> String {
    let mut s = String::new();
    let jobs: Vec<&str> = submissions.iter().map(|s| s.job_id.as_str()).collect();
    let _ = writeln!(
        s,
        "sweep `{name}` in {}{}",
        root.display(),
        if jobs.is_empty() {
            String::new()
        } else {
            format!(" (Slurm jobs {})", jobs.join(", "))
        }
    );
    let w = rows.iter().map(|r| r.point.len()).max().unwrap_or(5).max(5);
    let ws = rows.iter().map(|r| r.slurm.len()).max().unwrap_or(5).max(5);
    let _ = writeln!(s, "{:w$}  {:13}  {:ws$}  note", "point", "state", "slurm");
    for r in rows {
        let line = format!(
            "{:w$}  {:13}  {:ws$}  {}",
            r.point, r.state, r.slurm, r.note
        );
        let _ = writeln!(s, "{}", line.trim_end());
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *counts.entry(r.state.as_str()).or_default() += 1;
    }
    let order = [
        "finished",
        "diverged",
        "running",
        "pending",
        "interrupted",
        "failed",
        "not submitted",
    ];
    let parts: Vec<String> = order
        .iter()
        .filter_map(|k| counts.get(k).map(|n| format!("{n} {k}")))
        .collect();
    let _ = writeln!(s, "{} points: {}", rows.len(), parts.join(", "));
    let open = rows
        .iter()
        .filter(|r| matches!(r.state.as_str(), "interrupted" | "failed" | "not submitted"))
        .count();
    if open > 0 {
        let _ = writeln!(
            s,
            "{open} point(s) without a result and not queued: submit them with `cargo xtask sweep CONFIG --slurm`"
        );
    }
    s
}

#[cfg(all(test, unix))]
mod tests;
