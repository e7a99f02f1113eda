//! The training report's sections read from each run's `metrics.jsonl`: the final
//! training accuracy and the steps to 95% and 98% accuracy, the divergences, and the
//! trajectories of the learnable per-block scalars (SkipInit's and ReZero's α, Fixup's
//! multipliers) and of a learnable τ.

use tau_records::MetricsRecord;

use super::*;

/// The accuracy levels whose first step the report gives.
pub(super) const ACC_LEVELS: [f64; 2] = [0.95, 0.98];

/// What a run's `metrics.jsonl` says, as the report uses it: `(step, value)` curves in
/// record order.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Curves {
    /// Training accuracy (0–1) at each record that has one.
    pub(super) train_acc: Vec<(f64, f64)>,
    /// Test accuracy (0–1) at each evaluation.
    pub(super) test_acc: Vec<(f64, f64)>,
    /// Mean and largest |value| over the blocks' scalars, `(step, mean, max)`, at each
    /// record with at least one finite value.
    pub(super) scales: Vec<(f64, f64, f64)>,
    /// Which scalar the blocks carry: `alpha` (SkipInit, ReZero) or `scale` (Fixup).
    pub(super) scale_kind: Option<String>,
    /// A learnable τ at each record.
    pub(super) tau: Vec<(f64, f64)>,
}

impl Curves {
    /// The curves of the run in `dir` (empty when it has no readable records; unreadable
    /// lines are skipped).
    pub(super) fn read(dir: &Path) -> Curves {
        let text = std::fs::read_to_string(dir.join(tau_records::METRICS_FILE)).unwrap_or_default();
        let records: Vec<MetricsRecord> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        Curves::of(&records)
    }

    /// The curves of these records.
    pub(super) fn of(records: &[MetricsRecord]) -> Curves {
        let mut c = Curves::default();
        for r in records {
            let step = r.step as f64;
            if let Some(a) = r.train_acc {
                c.train_acc.push((step, a));
            }
            if let Some(a) = r.test_acc {
                c.test_acc.push((step, a));
            }
            if let Some(t) = r.tau {
                c.tau.push((step, t));
            }
            if let Some(m) = &r.branch_scales {
                if c.scale_kind.is_none() {
                    c.scale_kind = m
                        .keys()
                        .next()
                        .and_then(|k| k.rsplit('.').next())
                        .map(str::to_string);
                }
                if let Some((mean, max)) = abs_mean_max(m.values().map(|v| f64::from(*v))) {
                    c.scales.push((step, mean, max));
                }
            }
        }
        c
    }

    /// The last record's (mean, max) |scalar|.
    fn final_scales(&self) -> Option<(f64, f64)> {
        self.scales.last().map(|&(_, mean, max)| (mean, max))
    }
}

/// Mean and largest absolute value of the finite values (`None` when there is none).
pub(super) fn abs_mean_max(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut sum, mut max, mut n) = (0.0, 0.0f64, 0usize);
    for v in values.filter(|v| v.is_finite()) {
        sum += v.abs();
        max = max.max(v.abs());
        n += 1;
    }
    (n > 0).then(|| (sum / n as f64, max))
}

/// `95%`, `98%`, `99.5%`.
fn pct(level: f64) -> String {
    format!("{}%", 100.0 * level)
}

/// The final training accuracy and the steps to each of [`ACC_LEVELS`] of the training
/// accuracy (and of the test accuracy where runs evaluated more than once): tables by
/// depth and group, and a figure of the steps to each training-accuracy level.
pub(super) fn accuracy_steps_section(
    md: &mut String,
    states: &[PointState],
    curves: &[Curves],
    groups: &[String],
) -> Vec<(String, Chart)> {
    if curves.iter().all(|c| c.train_acc.is_empty()) {
        return Vec::new();
    }
    let mut final_acc = aggregate::Table::new();
    for (s, c) in states.iter().zip(curves) {
        let Some(d) = depth_of(s) else { continue };
        let outcome = match (s.status, c.train_acc.last()) {
            (Status::Diverged, _) => aggregate::Outcome::Diverged,
            (Status::Finished, Some(&(_, a))) => aggregate::Outcome::Value(100.0 * a),
            (Status::Finished, None) => aggregate::Outcome::NotReached,
            _ => continue,
        };
        final_acc.entry((group_of(s), d)).or_default().push(outcome);
    }
    let _ = writeln!(md, "\n## Training accuracy by depth\n");
    let _ = writeln!(
        md,
        "The training accuracy (%) of each run's last record (over the batches since the record \
         before it), the mean over seeds, the lowest and highest in parentheses; diverged runs \
         are counted.\n"
    );
    aggregate::write_table(
        md,
        &final_acc,
        groups,
        &group_label,
        &|v| format!("{v:.2}"),
        "without a training accuracy",
    );
    within_spread_notes(md, &final_acc, groups, "points");

    let mut figs = Vec::new();
    let mut level_series = Vec::new();
    for level in ACC_LEVELS {
        let table = steps_to_level(states, curves, level, |c| &c.train_acc);
        let _ = writeln!(md, "\n## Steps to {} training accuracy\n", pct(level));
        let _ = writeln!(
            md,
            "The first logged step (records every `log.every` steps) whose training accuracy \
             is at least {}; the mean over seeds, the lowest and highest in parentheses. A \
             diverged run is counted as diverged even if it reached the level before.\n",
            pct(level)
        );
        aggregate::write_table(
            md,
            &table,
            groups,
            &group_label,
            &|v| format!("{v:.0}"),
            "not reached",
        );
        within_spread_notes(md, &table, groups, "steps");
        for mut s in table_series(&table, groups, false) {
            s.label = format!("{}, {}", s.label, pct(level));
            level_series.push(s);
        }
    }
    let evaluated_often = curves.iter().any(|c| c.test_acc.len() > 1);
    if evaluated_often {
        for level in ACC_LEVELS {
            let table = steps_to_level(states, curves, level, |c| &c.test_acc);
            let _ = writeln!(md, "\n## Steps to {} test accuracy\n", pct(level));
            let _ = writeln!(
                md,
                "As above, over the evaluations (every `log.eval_every`).\n"
            );
            aggregate::write_table(
                md,
                &table,
                groups,
                &group_label,
                &|v| format!("{v:.0}"),
                "not reached",
            );
        }
    } else if curves.iter().any(|c| !c.test_acc.is_empty()) {
        let _ = writeln!(
            md,
            "\nThe test accuracy was evaluated once per run (at the end), so there are no steps \
             to a test-accuracy level: see the test accuracy table.\n"
        );
    }
    if !level_series.is_empty() {
        let _ = writeln!(
            md,
            "\n![steps to a training accuracy vs depth](figures/steps_to_train_acc_vs_depth.png)\n\n\
             One line per group and level; groups whose runs never reached a level have no \
             line for it.\n"
        );
        figs.push((
            "steps_to_train_acc_vs_depth".to_string(),
            Chart {
                title: "Steps to a training accuracy".into(),
                x_desc: "network depth (log scale)".into(),
                y_desc: "steps".into(),
                x_log: true,
                y_axis: YAxis::Linear,
                y_range: None,
                series: level_series,
                vlines: Vec::new(),
                hlines: Vec::new(),
            },
        ));
    }
    figs
}

/// Per (group, depth): the first step each run's `curve` reached `level`.
fn steps_to_level(
    states: &[PointState],
    curves: &[Curves],
    level: f64,
    curve: impl Fn(&Curves) -> &Vec<(f64, f64)>,
) -> aggregate::Table {
    let mut table = aggregate::Table::new();
    for (s, c) in states.iter().zip(curves) {
        let Some(d) = depth_of(s) else { continue };
        let outcome = match s.status {
            Status::Diverged => aggregate::Outcome::Diverged,
            Status::Finished => match aggregate::first_step_at_or_above(curve(c), level) {
                Some(step) => aggregate::Outcome::Value(step),
                None => aggregate::Outcome::NotReached,
            },
            _ => continue,
        };
        table.entry((group_of(s), d)).or_default().push(outcome);
    }
    table
}

/// The runs of one (group, depth) with a result, and the steps at which the diverged ones
/// stopped (`None` where the summary does not say).
#[derive(Debug, Default)]
struct Diverged {
    runs: usize,
    steps: Vec<Option<u64>>,
}

/// How many runs of each (group, depth) diverged, and at which steps.
pub(super) fn divergence_section(md: &mut String, states: &[PointState], groups: &[String]) {
    let mut cells: BTreeMap<(String, i64), Diverged> = BTreeMap::new();
    for s in states {
        let Some(d) = depth_of(s) else { continue };
        if !s.status.is_done() {
            continue;
        }
        let cell = cells.entry((group_of(s), d)).or_default();
        cell.runs += 1;
        if s.status == Status::Diverged {
            cell.steps
                .push(s.summary.as_ref().and_then(|x| x.diverged_at_step));
        }
    }
    if cells.is_empty() {
        return;
    }
    let (runs, diverged) = cells
        .values()
        .fold((0, 0), |(r, d), c| (r + c.runs, d + c.steps.len()));
    let _ = writeln!(md, "\n## Divergences\n");
    let _ = writeln!(
        md,
        "{diverged} of {runs} runs diverged (a non-finite loss or gradient stopped them). Per \
         cell: diverged runs of the runs with a result, and the steps at which they stopped.\n"
    );
    let mut depths: Vec<i64> = cells.keys().map(|(_, d)| *d).collect();
    depths.sort_unstable();
    depths.dedup();
    let _ = write!(md, "| depth |");
    for g in groups {
        let _ = write!(md, " {} |", group_label(g));
    }
    let _ = write!(md, "\n| --- |");
    for _ in groups {
        let _ = write!(md, " --- |");
    }
    let _ = writeln!(md);
    for d in depths {
        let _ = write!(md, "| {d} |");
        for g in groups {
            let text = cells
                .get(&(g.clone(), d))
                .map_or_else(|| "–".to_string(), |c| divergence_cell(c.runs, &c.steps));
            let _ = write!(md, " {text} |");
        }
        let _ = writeln!(md);
    }
}

/// `0 of 2`, `1 of 2 (step 3)`, `2 of 2 (steps 1, 4)`.
fn divergence_cell(runs: usize, steps: &[Option<u64>]) -> String {
    let mut text = format!("{} of {runs}", steps.len());
    if !steps.is_empty() {
        let list: Vec<String> = steps
            .iter()
            .map(|s| s.map_or_else(|| "?".to_string(), |s| s.to_string()))
            .collect();
        let word = if list.len() == 1 { "step" } else { "steps" };
        let _ = write!(text, " ({word} {})", list.join(", "));
    }
    text
}

/// The per-block scalars: what they mean at initialization, figures of their mean and
/// largest |value| over the blocks against the step (one line per group and depth, the
/// mean over seeds), a learnable τ's trajectory likewise, and tables of the final values.
pub(super) fn branch_scale_section(
    md: &mut String,
    states: &[PointState],
    curves: &[Curves],
    groups: &[String],
) -> Vec<(String, Chart)> {
    let has = |kind: &str| curves.iter().any(|c| c.scale_kind.as_deref() == Some(kind));
    let has_tau = curves.iter().any(|c| !c.tau.is_empty());
    if !has("alpha") && !has("scale") && !has_tau {
        return Vec::new();
    }
    branch_scale_intro(md, has("alpha"), has("scale"));
    let series = ScaleSeries::of(states, curves, groups);
    let figs = series.figures(md);
    final_scale_tables(md, states, curves, groups);
    figs
}

/// The section's heading and its prose: what SkipInit's and ReZero's α (`alpha`) and
/// Fixup's multipliers (`scale`) mean at initialization, for the schemes present, and how
/// the figures aggregate the scalars.
fn branch_scale_intro(md: &mut String, alpha: bool, scale: bool) {
    let _ = writeln!(md, "\n## Per-block scalars and τ during training\n");
    if alpha {
        let _ = writeln!(
            md,
            "SkipInit and ReZero start every block at α = 0: at initialization each block passes \
             its input through unchanged (the option-A shortcut where a stage changes \
             resolution), so the network is the identity through its residual chain whatever \
             its depth, and a probe at initialization measures |h_l|/|h_0| = 1 at every block \
             with an identity shortcut, by construction. The schemes differ only once training \
             has moved α: the trajectories below show how far it moves, and \
             `tau-resnet probe --checkpoint <point folder>` probes a run's trained weights.\n"
        );
    }
    if scale {
        let _ = writeln!(
            md,
            "Fixup's multipliers start at 1, but its branches' last convolutions at 0: at \
             initialization its blocks too pass their input through unchanged.\n"
        );
    }
    let _ = writeln!(
        md,
        "Per record: the mean and the largest |value| over the blocks' scalars (α for SkipInit \
         and ReZero, the branch multiplier for Fixup; a learnable τ is one scalar shared by \
         all blocks), then the mean over seeds.\n"
    );
}

/// The lines of the per-block scalar figures: α (with a learnable τ) and Fixup's
/// multipliers (near 1) in figures of their own, so that neither squeezes the other's
/// scale.
#[derive(Debug, Default)]
struct ScaleSeries {
    /// Mean |α| over the blocks, and a learnable τ's |τ|.
    alpha_mean: Vec<Series>,
    /// Largest |α| over the blocks, and a learnable τ's |τ|.
    alpha_max: Vec<Series>,
    /// Mean |multiplier| over Fixup's blocks.
    fixup_mean: Vec<Series>,
    /// Largest |multiplier| over Fixup's blocks.
    fixup_max: Vec<Series>,
}

impl ScaleSeries {
    /// One line per group and depth (in the order of `groups`, then by depth), each the
    /// mean over seeds of its runs' curves.
    fn of(states: &[PointState], curves: &[Curves], groups: &[String]) -> ScaleSeries {
        let mut out = ScaleSeries::default();
        let mut by_line: BTreeMap<(String, i64), Vec<&Curves>> = BTreeMap::new();
        for (s, c) in states.iter().zip(curves) {
            if let Some(d) = depth_of(s) {
                by_line.entry((group_of(s), d)).or_default().push(c);
            }
        }
        for g in groups {
            for ((_, d), cs) in by_line.range((g.clone(), i64::MIN)..=(g.clone(), i64::MAX)) {
                let label = format!("{}, depth {d}", group_label(g));
                let pick = |f: &dyn Fn(&Curves) -> Vec<(f64, f64)>| {
                    aggregate::mean_curve(&cs.iter().map(|c| f(c)).collect::<Vec<_>>())
                };
                let mean = pick(&|c: &Curves| c.scales.iter().map(|&(s, m, _)| (s, m)).collect());
                let max = pick(&|c: &Curves| c.scales.iter().map(|&(s, _, x)| (s, x)).collect());
                let tau = pick(&|c: &Curves| c.tau.iter().map(|&(s, t)| (s, t.abs())).collect());
                let is_fixup = cs.iter().any(|c| c.scale_kind.as_deref() == Some("scale"));
                if !mean.is_empty() {
                    let (to_mean, to_max) = if is_fixup {
                        (&mut out.fixup_mean, &mut out.fixup_max)
                    } else {
                        (&mut out.alpha_mean, &mut out.alpha_max)
                    };
                    to_mean.push(Series::new(label.clone(), mean));
                    to_max.push(Series::new(label.clone(), max));
                }
                if !tau.is_empty() {
                    let s = Series::new(format!("{label}: learnable τ"), tau);
                    out.alpha_mean.push(s.clone());
                    out.alpha_max.push(s);
                }
            }
        }
        out
    }

    /// The figures that have lines, each with its image link in `md`: `(file stem, chart)`.
    fn figures(self, md: &mut String) -> Vec<(String, Chart)> {
        let mut figs = Vec::new();
        for (stem, title, y_desc, series) in [
            (
                "alpha_mean_vs_step",
                "SkipInit / ReZero: mean |α| over the blocks",
                "mean |α| (a learnable τ: |τ|)",
                self.alpha_mean,
            ),
            (
                "alpha_max_vs_step",
                "SkipInit / ReZero: largest |α| over the blocks",
                "largest |α| (a learnable τ: |τ|)",
                self.alpha_max,
            ),
            (
                "fixup_scale_mean_vs_step",
                "Fixup: mean |multiplier| over the blocks",
                "mean |multiplier|",
                self.fixup_mean,
            ),
            (
                "fixup_scale_max_vs_step",
                "Fixup: largest |multiplier| over the blocks",
                "largest |multiplier|",
                self.fixup_max,
            ),
        ] {
            if series.is_empty() {
                continue;
            }
            let _ = writeln!(md, "![{title} vs step](figures/{stem}.png)\n");
            figs.push((
                stem.to_string(),
                Chart {
                    title: title.into(),
                    x_desc: "step".into(),
                    y_desc: y_desc.into(),
                    x_log: false,
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
}

/// Tables of the last record's mean and largest |scalar| over the blocks, by depth, for the
/// groups with per-block scalars.
fn final_scale_tables(
    md: &mut String,
    states: &[PointState],
    curves: &[Curves],
    groups: &[String],
) {
    let mut mean = aggregate::Table::new();
    let mut max = aggregate::Table::new();
    for (s, c) in states.iter().zip(curves) {
        let Some(d) = depth_of(s) else { continue };
        let (m, x) = match (s.status, c.final_scales()) {
            (Status::Diverged, _) => (aggregate::Outcome::Diverged, aggregate::Outcome::Diverged),
            (Status::Finished, Some((m, x))) => {
                (aggregate::Outcome::Value(m), aggregate::Outcome::Value(x))
            }
            _ => continue,
        };
        mean.entry((group_of(s), d)).or_default().push(m);
        max.entry((group_of(s), d)).or_default().push(x);
    }
    // Groups with a value somewhere: the schemes that have per-block scalars.
    let with: Vec<String> = groups
        .iter()
        .filter(|g| {
            mean.iter()
                .any(|((gg, _), c)| gg == *g && !c.values.is_empty())
        })
        .cloned()
        .collect();
    if with.is_empty() {
        return;
    }
    for (what, table) in [("mean", &mean), ("largest", &max)] {
        let _ = writeln!(
            md,
            "\nFinal {what} |α| over the blocks (Fixup: |multiplier|), the mean over seeds, the \
             lowest and highest in parentheses:\n"
        );
        let only: aggregate::Table = table
            .iter()
            .filter(|((g, _), _)| with.contains(g))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        aggregate::write_table(
            md,
            &only,
            &with,
            &group_label,
            &|v| format!("{v:.4}"),
            "without a value",
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn record(step: u64, acc: Option<f64>, scales: Option<&[f32]>) -> MetricsRecord {
        MetricsRecord {
            step,
            train_acc: acc,
            branch_scales: scales.map(|v| {
                v.iter()
                    .enumerate()
                    .map(|(i, x)| (format!("layer1.{i}.alpha"), *x))
                    .collect::<BTreeMap<_, _>>()
            }),
            ..Default::default()
        }
    }

    /// The curves of a run's records: accuracies where recorded, the blocks' mean and
    /// largest |α| (non-finite values left out), the kind of scalar from the names.
    #[test]
    fn curves_read_accuracy_and_the_blocks_scalars() {
        let recs = [
            record(25, Some(0.5), Some(&[0.1, -0.3])),
            record(50, None, Some(&[0.2, f32::NAN])),
            record(75, Some(0.96), None),
        ];
        let c = Curves::of(&recs);
        assert_eq!(c.train_acc, vec![(25.0, 0.5), (75.0, 0.96)]);
        assert_eq!(c.scale_kind.as_deref(), Some("alpha"));
        // (|0.1| + |−0.3|) / 2 in f32 → f64; the NaN is left out of step 50.
        let m0 = (f64::from(0.1f32) + f64::from(0.3f32)) / 2.0;
        assert_eq!(
            c.scales,
            vec![
                (25.0, m0, f64::from(0.3f32)),
                (50.0, f64::from(0.2f32), f64::from(0.2f32))
            ]
        );
        assert_eq!(
            c.final_scales(),
            Some((f64::from(0.2f32), f64::from(0.2f32)))
        );
        assert!(c.tau.is_empty() && c.test_acc.is_empty());
        assert_eq!(abs_mean_max([f64::NAN].into_iter()), None);
    }

    /// Planted records of a sweep over `model.scaling` (τ, Fixup, ReZero) × depth × two
    /// seeds: the report groups by scheme, gives the final training accuracy and the steps
    /// to 95% and 98% (mean, range, "not reached"), the divergences with their steps, the
    /// identity-at-initialization note, the α / multiplier figures and the final tables.
    #[test]
    fn a_scheme_sweep_report_shows_accuracy_steps_divergences_and_alphas() {
        use crate::records::SWEEP_COPY;
        use crate::report::{generate, load_stored_spec};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("planted-schemes");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(
            root.join(SWEEP_COPY),
            "name = \"planted-schemes\"\ncommand = \"train\"\n[grid]\n\"model.depth\" = [20, 56]\n\
             \"model.scaling\" = [\"tau\", \"fixup\", \"rezero\"]\nseed = [0, 1]\n",
        )
        .unwrap();
        let spec = load_stored_spec(&root).unwrap();
        for p in spec.points().unwrap() {
            let get = |k: &str| {
                p.values
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| display_value(v))
                    .unwrap()
            };
            let (depth, scheme) = (get("model.depth"), get("model.scaling"));
            let seed: u64 = get("seed").parse().unwrap();
            // τ and Fixup: seed 0 reaches 95% at step 75, seed 1 at 25, both 98% at 100;
            // ReZero never reaches 95%, and diverges at step 3 at depth 56, seed 1.
            let accs: [f64; 4] = match (scheme.as_str(), seed) {
                ("rezero", _) => [0.50, 0.80, 0.90, 0.94],
                (_, 0) => [0.92, 0.94, 0.96, 0.98],
                _ => [0.95, 0.96, 0.97, 0.99],
            };
            let diverged = scheme == "rezero" && depth == "56" && seed == 1;
            let dir = root.join(&p.name);
            std::fs::create_dir_all(&dir).unwrap();
            let mut lines = String::new();
            for (i, acc) in accs.iter().enumerate() {
                let k = (i + 1) as f32;
                let m = (1 + seed) as f32;
                // ReZero: α = (0.1·k·m, −0.2·k·m); Fixup: (1 + 0.01·k, 1 − 0.02·k).
                // The test set is evaluated at the last record only.
                let test = if i == 3 { ",\"test_acc\":0.9" } else { "" };
                let scales = match scheme.as_str() {
                    "rezero" => format!(
                        ",\"branch_scales\":{{\"layer1.0.alpha\":{},\"layer1.1.alpha\":{}}}",
                        0.1 * k * m,
                        -0.2 * k * m
                    ),
                    "fixup" => format!(
                        ",\"branch_scales\":{{\"layer1.0.scale\":{},\"layer1.1.scale\":{}}}",
                        1.0 + 0.01 * k,
                        1.0 - 0.02 * k
                    ),
                    _ => String::new(),
                };
                lines.push_str(&format!(
                    "{{\"step\":{},\"epoch\":0,\"epoch_end\":false,\"lr\":0.1,\"train_loss\":0.5,\
                     \"train_acc\":{acc}{test},\"grad_norm\":1.0,\"layer_grad_norms\":[]{scales},\
                     \"examples_per_s\":1.0,\"wall_s\":1.0}}\n",
                    25 * (i + 1)
                ));
            }
            std::fs::write(dir.join(tau_records::METRICS_FILE), lines).unwrap();
            let summary = serde_json::json!({
                "name": p.name, "status": if diverged { "diverged" } else { "finished" },
                "diverged_at_step": if diverged { Some(3) } else { None },
                "divergence_reason": null, "steps": 100, "epochs_completed": 0,
                "reached_target_at_step": null,
                "final_metrics": (!diverged).then(|| serde_json::json!({
                    "step": 100, "epoch": 0, "epoch_end": false, "lr": 0.0, "train_loss": 0.1,
                    "test_acc": 0.9, "grad_norm": 1.0, "layer_grad_norms": [],
                    "examples_per_s": 1.0, "wall_s": 1.0})),
                "best_train_loss": null, "best_test_loss": null, "best_test_acc": null,
                "wall_s": 1.0, "device": "cpu",
                "version": {"crate_version": "0.1.0", "git_commit": null}
            });
            std::fs::write(dir.join(tau_records::SUMMARY_FILE), summary.to_string()).unwrap();
        }
        let out = generate(&root).unwrap();
        assert_eq!(out.summary_line, "11 finished, 1 diverged");
        let md = std::fs::read_to_string(root.join("report.md")).unwrap();
        let head = "| depth | scaling = fixup | scaling = rezero | scaling = tau |\n| --- | --- | --- | --- |\n";
        let final_acc = format!(
            "{head}| 20 | 98.50 (98.00–99.00) | 94.00 (94.00–94.00) | 98.50 (98.00–99.00) |\n\
             | 56 | 98.50 (98.00–99.00) | 94.00; 1 of 2 diverged | 98.50 (98.00–99.00) |"
        );
        let to_95 = format!(
            "{head}| 20 | 50 (25–75) | 2 of 2 not reached | 50 (25–75) |\n\
             | 56 | 50 (25–75) | 1 of 2 diverged; 1 of 2 not reached | 50 (25–75) |"
        );
        let divergences = format!(
            "{head}| 20 | 0 of 2 | 0 of 2 | 0 of 2 |\n| 56 | 0 of 2 | 1 of 2 (step 3) | 0 of 2 |"
        );
        for want in [
            "## Test accuracy by depth",
            "## Training accuracy by depth",
            final_acc.as_str(),
            "## Steps to 95% training accuracy",
            to_95.as_str(),
            "## Steps to 98% training accuracy",
            "| 20 | 100 (100–100) | 2 of 2 not reached | 100 (100–100) |",
            "evaluated once per run",
            "## Divergences",
            "1 of 12 runs diverged",
            divergences.as_str(),
            "## Per-block scalars and τ during training",
            "SkipInit and ReZero start every block at α = 0",
            "Fixup's multipliers start at 1",
            // Final mean |α|: ReZero seed 0 (0.4 + 0.8) / 2, seed 1 (0.8 + 1.6) / 2; Fixup
            // (1.04 + 0.92) / 2 for both seeds; the diverged run counted.
            "| depth | scaling = fixup | scaling = rezero |\n| --- | --- | --- |\n\
             | 20 | 0.9800 (0.9800–0.9800) | 0.9000 (0.6000–1.2000) |\n\
             | 56 | 0.9800 (0.9800–0.9800) | 0.6000; 1 of 2 diverged |",
            // Final largest |α|: 0.8 and 1.6; Fixup 1.04.
            "| 20 | 1.0400 (1.0400–1.0400) | 1.2000 (0.8000–1.6000) |",
        ] {
            assert!(md.contains(want), "missing:\n{want}\n\nin:\n{md}");
        }
        assert!(!md.contains("## Steps to 95% test accuracy"), "{md}");
        for fig in [
            "steps_to_train_acc_vs_depth",
            "alpha_mean_vs_step",
            "alpha_max_vs_step",
            "fixup_scale_mean_vs_step",
            "fixup_scale_max_vs_step",
            "loss_vs_step_scaling_rezero",
        ] {
            assert!(
                root.join("figures").join(format!("{fig}.svg")).exists(),
                "{fig}"
            );
        }
        if let Ok(keep) = std::env::var("XTASK_KEEP_PLANTED_REPORT") {
            let _ = std::fs::remove_dir_all(&keep);
            std::fs::rename(&root, keep).unwrap();
        }
    }

    #[test]
    fn divergence_cells_list_the_steps() {
        assert_eq!(divergence_cell(2, &[]), "0 of 2");
        assert_eq!(divergence_cell(2, &[Some(3)]), "1 of 2 (step 3)");
        assert_eq!(divergence_cell(3, &[Some(1), None]), "2 of 3 (steps 1, ?)");
    }
}
