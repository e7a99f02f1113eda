//! Slurm settings: the `[slurm]` table, the command line, the last submission's
//! `settings.json`, and the sbatch options they make.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use super::*;

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
    /// Time limit per task (one point each; a point that needs longer is checkpointed and
    /// requeued as another task), e.g. 04:00:00.
    #[arg(long)]
    pub time: Option<String>,
    /// Memory per task (one point each), e.g. 8G.
    #[arg(long)]
    pub mem: Option<String>,
    /// CPUs per task (one point each; also its compute threads).
    #[arg(long)]
    pub cpus_per_task: Option<u32>,
    /// GPUs per task (one point each), e.g. 1 or a100:1.
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
                if v.chars().any(char::is_whitespace) {
                    bail!("slurm {flag} `{v}`: a value without spaces (one #SBATCH word)");
                }
                if flag == "time" && !is_slurm_time(&v) {
                    bail!(
                        "slurm time `{v}`: Slurm takes minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM \
                         or D-HH:MM:SS (e.g. 04:00:00, 2-00:00:00)"
                    );
                }
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
            if let Some((option, why)) = reserved_option(line) {
                bail!("slurm option `{extra}`: the job script sets {option} itself ({why})");
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
pub(super) fn cli_keys(cli: &SlurmArgs) -> BTreeSet<&'static str> {
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

pub(super) fn settings_map(s: &SlurmSettings) -> serde_json::Map<String, serde_json::Value> {
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
/// The options every job script sets for the sweep to work, with their short forms and
/// why an extra one would break it.
const RESERVED: &[(&str, Option<char>, &str)] = &[
    (
        "array",
        Some('a'),
        "xtask passes the points without a result as --array",
    ),
    (
        "output",
        Some('o'),
        "every task's log goes to slurm/logs/, where --status and the docs look",
    ),
    (
        "error",
        Some('e'),
        "stderr shares the task's log in slurm/logs/",
    ),
    ("open-mode", None, "a requeued task appends to its log"),
    (
        "requeue",
        None,
        "a task that reaches its time limit is requeued to resume",
    ),
    (
        "no-requeue",
        None,
        "a task that reaches its time limit is requeued to resume; use a longer `time` instead",
    ),
    (
        "signal",
        None,
        "set the warning time with `signal_before_s`",
    ),
    ("parsable", None, "xtask reads the job id from it"),
    ("wrap", None, "the job script is the command"),
];

/// The reserved option (as `--name`) an extra `#SBATCH` option sets, and why it is reserved.
fn reserved_option(option: &str) -> Option<(String, &'static str)> {
    if let Some(long) = option.strip_prefix("--") {
        let name = long
            .split(|c: char| c == '=' || c.is_whitespace())
            .next()
            .unwrap_or("");
        RESERVED
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(n, _, why)| (format!("--{n}"), *why))
    } else {
        // A short option, its value attached or not: `-o file`, `-ofile`.
        let c = option.strip_prefix('-')?.chars().next()?;
        RESERVED
            .iter()
            .find(|(_, short, _)| *short == Some(c))
            .map(|(n, _, why)| (format!("--{n} (-{c})"), *why))
    }
}

pub(super) fn ntasks_value(option: &str) -> Option<&str> {
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

/// Whether `t` is one of sbatch's `--time` forms: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`,
/// `D-H:M:S` (digits), or `UNLIMITED` / `infinite`.
fn is_slurm_time(t: &str) -> bool {
    if t.eq_ignore_ascii_case("unlimited") || t.eq_ignore_ascii_case("infinite") {
        return true;
    }
    let numbers = |s: &str, most: usize| {
        let parts: Vec<&str> = s.split(':').collect();
        parts.len() <= most
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    };
    match t.split_once('-') {
        Some((days, rest)) => numbers(days, 1) && numbers(rest, 3),
        None => numbers(t, 3),
    }
}

pub(super) fn check_value(flag: &str, value: &str) -> anyhow::Result<()> {
    if value.trim().is_empty() {
        bail!("slurm {flag}: empty value");
    }
    if value.chars().any(char::is_control) {
        bail!("slurm {flag} `{value}`: line breaks and control characters are not allowed");
    }
    Ok(())
}
