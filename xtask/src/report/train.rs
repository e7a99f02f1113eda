//! The report of a training sweep: the results table, loss-vs-step figures, test accuracy
//! and steps to a loss threshold by depth with their spread over seeds; from the runs'
//! metrics ([`curves`]): training accuracy and the steps to 95% and 98%, divergences, and
//! the trajectories of the per-block scalars and of a learnable τ.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use super::{axis_role, sanitize_file};
use crate::aggregate;
use crate::figures::{Chart, Series, YAxis};
use crate::records::{self, PointState, Status};
use crate::spec::{SweepSpec, display_value};

mod curves;

use curves::Curves;

/// Reads `(step, train loss)` pairs from a run's `metrics.jsonl`.
fn loss_curve(dir: &Path) -> (Vec<(f64, f64)>, usize) {
    let Ok(text) = std::fs::read_to_string(dir.join(tau_records::METRICS_FILE)) else {
        return (Vec::new(), 0);
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut unreadable = 0;
    let curve = lines
        .iter()
        .enumerate()
        .filter_map(|(i, line)| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                // A torn last line is what a killed run leaves (resume cuts it off);
                // anything else is damage worth a note.
                if i + 1 < lines.len() || text.ends_with('\n') {
                    unreadable += 1;
                }
                return None;
            };
            let step = v.get("step")?.as_f64()?;
            let loss = ["train_loss", "loss"]
                .iter()
                .find_map(|k| v.get(*k).and_then(|x| x.as_f64()))?;
            Some((step, loss))
        })
        .collect();
    (curve, unreadable)
}

/// Picks a test-accuracy number out of a flattened summary.
fn accuracy(flat: &BTreeMap<String, String>, preferred: Option<&str>) -> Option<(String, f64)> {
    let keys: Vec<&str> = match preferred {
        Some(k) => vec![k],
        // tau-resnet train's summary.json: the last metrics record, then the best test
        // accuracy over the run.
        None => vec!["final_metrics.test_acc", "best_test_acc"],
    };
    keys.iter()
        .find_map(|k| {
            flat.get(*k)
                .and_then(|v| v.parse::<f64>().ok())
                .map(|v| (k.to_string(), v))
        })
        .or_else(|| {
            flat.iter()
                .filter(|(k, _)| k.contains("test") && k.contains("acc"))
                .find_map(|(k, v)| v.parse::<f64>().ok().map(|x| (k.clone(), x)))
        })
}

pub(super) fn train_report(
    spec: &SweepSpec,
    states: &[PointState],
    _fig_dir: &Path,
    md: &mut String,
) -> Vec<(String, Chart)> {
    let flat: Vec<BTreeMap<String, String>> = states
        .iter()
        .map(|s| {
            s.summary
                .as_ref()
                .map(records::summary_scalars)
                .unwrap_or_default()
        })
        .collect();
    results_table(md, spec, states, &flat);
    let mut groups: Vec<String> = states.iter().map(group_of).collect();
    groups.sort();
    groups.dedup();
    let mut figs = loss_figures(md, states, &groups);
    figs.extend(accuracy_section(md, spec, states, &flat, &groups));
    if let Some(threshold) = spec.report.loss_threshold {
        figs.extend(steps_section(md, states, &groups, threshold));
    }
    let runs: Vec<Curves> = states.iter().map(|s| Curves::read(&s.dir)).collect();
    figs.extend(curves::accuracy_steps_section(md, states, &runs, &groups));
    curves::divergence_section(md, states, &groups);
    figs.extend(curves::branch_scale_section(md, states, &runs, &groups));
    figs
}

/// The group of a point: its values on the axes other than depth and seed.
fn group_of(s: &PointState) -> String {
    s.point
        .values
        .iter()
        .filter(|(k, _)| axis_role(k).is_none())
        .map(|(k, v)| format!("{}={}", k.rsplit('.').next().unwrap_or(k), display_value(v)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A point's value on the depth axis.
fn depth_of(s: &PointState) -> Option<i64> {
    s.point
        .values
        .iter()
        .find(|(k, _)| axis_role(k) == Some("depth"))
        .and_then(|(_, v)| v.as_integer())
}

/// A point's value on the seed axis.
fn seed_of(s: &PointState) -> Option<String> {
    s.point
        .values
        .iter()
        .find(|(k, _)| axis_role(k) == Some("seed"))
        .map(|(_, v)| display_value(v))
}

/// The results table: each point's axes, status and loss/accuracy numbers.
fn results_table(
    md: &mut String,
    spec: &SweepSpec,
    states: &[PointState],
    flat: &[BTreeMap<String, String>],
) {
    let mut cols: Vec<String> = flat
        .iter()
        .flat_map(|m| m.keys())
        .filter(|k| {
            (k.contains("loss") || k.contains("acc") || k.contains("diverged")) && !k.contains("lr")
        })
        .cloned()
        .collect();
    cols.sort();
    cols.dedup();
    cols.truncate(8);
    let _ = writeln!(md, "## Results\n");
    let _ = write!(md, "| point |");
    for a in &spec.axes {
        let _ = write!(md, " {} |", a.key);
    }
    let _ = write!(md, " status |");
    for c in &cols {
        let _ = write!(md, " {c} |");
    }
    let _ = write!(md, "\n| --- |");
    for _ in 0..spec.axes.len() + 1 + cols.len() {
        let _ = write!(md, " --- |");
    }
    let _ = writeln!(md);
    for (s, m) in states.iter().zip(flat) {
        let _ = write!(md, "| `{}` |", s.point.name);
        for (_, v) in &s.point.values {
            let _ = write!(md, " {} |", display_value(v));
        }
        let _ = write!(md, " {} |", s.status);
        for c in &cols {
            let v = m.get(c).map(String::as_str).unwrap_or("");
            let short = if v.parse::<i64>().is_ok() {
                v.to_string()
            } else {
                v.parse::<f64>()
                    .map_or(v.to_string(), |x| format!("{x:.4}"))
            };
            let _ = write!(md, " {short} |");
        }
        let _ = writeln!(md);
    }
}

/// Loss vs step: one figure per group, one line per depth (first seed).
fn loss_figures(md: &mut String, states: &[PointState], groups: &[String]) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    let mut damaged = Vec::new();
    for g in groups {
        let mut series = Vec::new();
        let first_seed = states
            .iter()
            .filter(|s| &group_of(s) == g)
            .find_map(seed_of);
        for s in states
            .iter()
            .filter(|s| &group_of(s) == g && seed_of(s) == first_seed && s.status != Status::Failed)
        {
            let (curve, unreadable) = loss_curve(&s.dir);
            if unreadable > 0 {
                damaged.push(format!("`{}` ({unreadable})", s.point.name));
            }
            let curve: Vec<(f64, f64)> = curve
                .into_iter()
                .filter(|(_, l)| l.is_finite() && *l > 0.0)
                .map(|(st, l)| (st.max(1.0), l.log10()))
                .collect();
            if curve.is_empty() {
                continue;
            }
            let label = match depth_of(s) {
                Some(d) => format!(
                    "depth {d}{}",
                    if s.status == Status::Diverged {
                        " (diverged)"
                    } else {
                        ""
                    }
                ),
                None => s.point.name.clone(),
            };
            series.push(Series::new(label, curve));
        }
        if series.is_empty() {
            continue;
        }
        let stem = if g.is_empty() {
            "loss_vs_step".to_string()
        } else {
            format!("loss_vs_step_{}", sanitize_file(g))
        };
        let _ = writeln!(md, "\n![training loss vs step {g}](figures/{stem}.png)\n");
        figs.push((
            stem,
            Chart {
                title: if g.is_empty() {
                    "Training loss vs step".into()
                } else {
                    format!("Training loss vs step ({})", group_display(g))
                },
                x_desc: "step (log scale)".into(),
                y_desc: "training loss (log scale)".into(),
                x_log: true,
                y_axis: YAxis::Log10Values,
                y_range: None,
                series,
                vlines: Vec::new(),
                hlines: Vec::new(),
            },
        ));
    }
    if !damaged.is_empty() {
        let _ = writeln!(
            md,
            "\nUnreadable lines of `metrics.jsonl`, left out of the figures: {}.\n",
            damaged.join(", ")
        );
    }
    figs
}

/// Test accuracy vs depth: a table and one line per group, mean over seeds, the band
/// spanning the seeds' range.
fn accuracy_section(
    md: &mut String,
    spec: &SweepSpec,
    states: &[PointState],
    flat: &[BTreeMap<String, String>],
    groups: &[String],
) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    let mut acc_table = aggregate::Table::new();
    let mut metric_name = None;
    for (s, m) in states.iter().zip(flat) {
        let Some(d) = depth_of(s) else { continue };
        let outcome = match (
            s.status,
            accuracy(m, spec.report.accuracy_metric.as_deref()),
        ) {
            (Status::Diverged, _) => aggregate::Outcome::Diverged,
            (Status::Finished, Some((k, a))) => {
                metric_name.get_or_insert(k);
                aggregate::Outcome::Value(if a <= 1.0 { 100.0 * a } else { a })
            }
            (Status::Finished, None) => aggregate::Outcome::NotReached,
            _ => continue,
        };
        acc_table.entry((group_of(s), d)).or_default().push(outcome);
    }
    let acc_series = table_series(&acc_table, groups, true);
    // No run with an accuracy (a sweep without a test set, such as full-batch GD on
    // synthetic data): no section, rather than a table of "without an accuracy".
    if !acc_table.is_empty() && metric_name.is_some() {
        let metric = metric_name.clone().unwrap_or_default();
        let n_seeds = states
            .iter()
            .filter_map(seed_of)
            .collect::<BTreeSet<_>>()
            .len();
        let _ = writeln!(md, "\n## Test accuracy by depth\n");
        let _ = writeln!(
            md,
            "`{metric}` (%) from each run's summary: the mean over the runs of each cell ({n_seeds} seed(s) in the grid), \
             the lowest and highest run in parentheses; diverged runs have no accuracy and are counted.\n"
        );
        aggregate::write_table(
            md,
            &acc_table,
            groups,
            &group_label,
            &|v| format!("{v:.2}"),
            "without an accuracy",
        );
        within_spread_notes(md, &acc_table, groups, "points");
    }
    if !acc_series.is_empty() {
        let metric = metric_name.unwrap_or_default();
        let _ = writeln!(
            md,
            "\n![test accuracy vs depth](figures/accuracy_vs_depth.png)\n"
        );
        let _ = writeln!(
            md,
            "Accuracy: `{metric}` from each run's summary, mean over seeds (shaded: the seeds' range); diverged runs have no accuracy.\n"
        );
        figs.push((
            "accuracy_vs_depth".to_string(),
            Chart {
                title: "Test accuracy vs depth".into(),
                x_desc: "network depth (log scale)".into(),
                y_desc: format!("test accuracy (%) [{metric}]"),
                x_log: true,
                y_axis: YAxis::Linear,
                y_range: None,
                series: acc_series,
                vlines: Vec::new(),
                hlines: Vec::new(),
            },
        ));
    }
    figs
}

/// Steps until the training loss first falls to the threshold: a table and a figure.
fn steps_section(
    md: &mut String,
    states: &[PointState],
    groups: &[String],
    threshold: f64,
) -> Vec<(String, Chart)> {
    let mut figs = Vec::new();
    let mut steps_table = aggregate::Table::new();
    for s in states {
        let Some(d) = depth_of(s) else { continue };
        let outcome = match s.status {
            Status::Diverged => aggregate::Outcome::Diverged,
            Status::Finished => {
                match aggregate::first_step_at_or_below(&loss_curve(&s.dir).0, threshold) {
                    Some(step) => aggregate::Outcome::Value(step),
                    None => aggregate::Outcome::NotReached,
                }
            }
            _ => continue,
        };
        steps_table
            .entry((group_of(s), d))
            .or_default()
            .push(outcome);
    }
    let _ = writeln!(md, "\n## Steps to training loss ≤ {threshold:e}\n");
    let _ = writeln!(
        md,
        "The first logged step (records every `log.every` steps) at which the training loss \
         is at most {threshold:e}; the mean over seeds, the lowest and highest in parentheses.\n"
    );
    aggregate::write_table(
        md,
        &steps_table,
        groups,
        &group_label,
        &|v| format!("{v:.0}"),
        "did not reach it in the run",
    );
    within_spread_notes(md, &steps_table, groups, "steps");
    let series = table_series(&steps_table, groups, false);
    if !series.is_empty() {
        let _ = writeln!(
            md,
            "\n![steps to the loss threshold vs depth](figures/steps_to_threshold_vs_depth.png)\n\n\
             Groups whose runs never reached the threshold have no line.\n"
        );
        figs.push((
            "steps_to_threshold_vs_depth".to_string(),
            Chart {
                title: format!("Steps to training loss ≤ {threshold:e}"),
                x_desc: "network depth (log scale)".into(),
                y_desc: "steps".into(),
                x_log: true,
                y_axis: YAxis::Linear,
                y_range: None,
                series,
                vlines: Vec::new(),
                hlines: Vec::new(),
            },
        ));
    }
    figs
}

/// Notes, per depth, the pairs of groups whose difference lies within the seeds' spread
/// (their ranges over seeds overlap), so that such a difference is not read as an effect.
fn within_spread_notes(md: &mut String, table: &aggregate::Table, groups: &[String], unit: &str) {
    let mut depths: Vec<i64> = table.keys().map(|(_, d)| *d).collect();
    depths.sort_unstable();
    depths.dedup();
    let mut notes = Vec::new();
    for d in depths {
        for (i, a) in groups.iter().enumerate() {
            for b in &groups[i + 1..] {
                let (Some(ca), Some(cb)) = (table.get(&(a.clone(), d)), table.get(&(b.clone(), d)))
                else {
                    continue;
                };
                if ca.values.len() < 2 || cb.values.len() < 2 {
                    continue;
                }
                if aggregate::ranges_overlap(ca, cb) == Some(true) {
                    let diff = (ca.mean().unwrap_or(0.0) - cb.mean().unwrap_or(0.0)).abs();
                    notes.push(format!(
                        "depth {d}: {} vs {}: the difference of the means ({diff:.2} {unit}) is within the seeds' spread",
                        group_display(a),
                        group_display(b)
                    ));
                }
            }
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(md, "\nNot separated by these seeds:\n");
        for n in notes {
            let _ = writeln!(md, "- {n}");
        }
    }
}

/// A group's name in tables and legends: its grid values, or `all` for a sweep without
/// axes besides depth and seed.
fn group_label(g: &str) -> String {
    if g.is_empty() {
        "all".to_string()
    } else {
        group_display(g)
    }
}

/// One line per group through the mean of each depth's cell (groups without any value
/// have no line); with `band`, the cells of several runs are shaded from lowest to highest.
fn table_series(table: &aggregate::Table, groups: &[String], band: bool) -> Vec<Series> {
    groups
        .iter()
        .filter_map(|g| {
            let cells: Vec<(f64, &aggregate::Cell)> = table
                .iter()
                .filter(|((gg, _), c)| gg == g && !c.values.is_empty())
                .map(|((_, d), c)| (*d as f64, c))
                .collect();
            if cells.is_empty() {
                return None;
            }
            let mut series = Series::new(
                group_label(g),
                cells
                    .iter()
                    .filter_map(|(d, c)| c.mean().map(|m| (*d, m)))
                    .collect(),
            );
            if band {
                series.band = cells
                    .iter()
                    .filter(|(_, c)| c.values.len() > 1)
                    .filter_map(|(d, c)| c.range().map(|(lo, hi)| (*d, lo, hi)))
                    .collect();
            }
            Some(series)
        })
        .collect()
}

/// A group of grid values (`tau=1/sqrt(L), lr=0.1`) as figure text:
/// `τ = 1/sqrt(L), lr = 0.1`.
fn group_display(g: &str) -> String {
    g.split(", ")
        .map(|kv| match kv.split_once('=') {
            Some(("tau", v)) => format!("τ = {v}"),
            Some((k, v)) => format!("{k} = {v}"),
            None => kv.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
