//! Per-(depth, group) aggregates over seeds for training sweeps: mean, spread and
//! divergence counts of a final metric, the step at which the training loss first
//! reached a threshold (or an accuracy a level), and curves averaged over seeds. Pure functions over numbers, rendered as Markdown tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One point's outcome for a metric: a value, a divergence, or nothing recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The metric's value.
    Value(f64),
    /// The run diverged (a result: no value).
    Diverged,
    /// Finished, but the metric was not reached or not recorded (e.g. the loss never fell
    /// to the threshold within the run).
    NotReached,
}

/// The seeds of one (depth, group) cell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cell {
    /// Values of the runs that have one.
    pub values: Vec<f64>,
    /// Runs that diverged.
    pub diverged: usize,
    /// Runs that finished without the metric.
    pub not_reached: usize,
}

impl Cell {
    /// Adds one run's outcome.
    pub fn push(&mut self, o: Outcome) {
        match o {
            Outcome::Value(v) => self.values.push(v),
            Outcome::Diverged => self.diverged += 1,
            Outcome::NotReached => self.not_reached += 1,
        }
    }

    /// Runs in the cell.
    pub fn runs(&self) -> usize {
        self.values.len() + self.diverged + self.not_reached
    }

    /// Mean of the values (None when no run has one).
    pub fn mean(&self) -> Option<f64> {
        (!self.values.is_empty())
            .then(|| self.values.iter().sum::<f64>() / self.values.len() as f64)
    }

    /// Smallest and largest value.
    pub fn range(&self) -> Option<(f64, f64)> {
        let min = self.values.iter().copied().reduce(f64::min)?;
        let max = self.values.iter().copied().reduce(f64::max)?;
        Some((min, max))
    }

    /// Markdown text: `97.8 (97.5–98.1)` for several values, the value alone for one,
    /// followed by what the other runs did (`; 1 of 2 diverged`), or `diverged (2 of 2)`.
    pub fn render(&self, fmt_value: &dyn Fn(f64) -> String, not_reached: &str) -> String {
        let n = self.runs();
        if n == 0 {
            return "–".into();
        }
        let mut parts = Vec::new();
        if let (Some(mean), Some((lo, hi))) = (self.mean(), self.range()) {
            if self.values.len() > 1 {
                parts.push(format!(
                    "{} ({}–{})",
                    fmt_value(mean),
                    fmt_value(lo),
                    fmt_value(hi)
                ));
            } else {
                parts.push(fmt_value(mean));
            }
        }
        let mut others = Vec::new();
        if self.diverged > 0 {
            others.push(format!("{} of {n} diverged", self.diverged));
        }
        if self.not_reached > 0 {
            others.push(format!("{} of {n} {not_reached}", self.not_reached));
        }
        if parts.is_empty() {
            others.join("; ")
        } else if others.is_empty() {
            parts.remove(0)
        } else {
            format!("{}; {}", parts.remove(0), others.join("; "))
        }
    }
}

/// Cells keyed by (group, depth).
pub type Table = BTreeMap<(String, i64), Cell>;

/// Writes a depth × group table: one row per depth, one column per group.
pub fn write_table(
    md: &mut String,
    table: &Table,
    groups: &[String],
    group_label: &dyn Fn(&str) -> String,
    fmt_value: &dyn Fn(f64) -> String,
    not_reached: &str,
) {
    let mut depths: Vec<i64> = table.keys().map(|(_, d)| *d).collect();
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
            let text = table
                .get(&(g.clone(), d))
                .map_or_else(|| "–".to_string(), |c| c.render(fmt_value, not_reached));
            let _ = write!(md, " {text} |");
        }
        let _ = writeln!(md);
    }
}

/// The first logged step at which the training loss is at most `threshold`.
pub fn first_step_at_or_below(curve: &[(f64, f64)], threshold: f64) -> Option<f64> {
    curve
        .iter()
        .find(|(_, loss)| loss.is_finite() && *loss <= threshold)
        .map(|(step, _)| *step)
}

/// The first logged step at which an accuracy (or any rising metric) is at least `level`.
pub fn first_step_at_or_above(curve: &[(f64, f64)], level: f64) -> Option<f64> {
    curve
        .iter()
        .find(|(_, v)| v.is_finite() && *v >= level)
        .map(|(step, _)| *step)
}

/// The mean over several runs' curves at each step any of them logged: each step's mean is
/// over the runs with a finite value there (a diverged run's curve ends early), in step
/// order.
pub fn mean_curve(curves: &[Vec<(f64, f64)>]) -> Vec<(f64, f64)> {
    let mut at: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    for curve in curves {
        for &(step, v) in curve {
            if v.is_finite() && step.is_finite() && step >= 0.0 {
                // + 0.0: −0 becomes +0, one key.
                let e = at.entry((step + 0.0).to_bits()).or_default();
                e.0 += v;
                e.1 += 1;
            }
        }
    }
    // Non-negative finite f64s order as their bit patterns do.
    at.into_iter()
        .map(|(bits, (sum, n))| (f64::from_bits(bits), sum / n as f64))
        .collect()
}

/// Whether two cells' value ranges overlap (their difference is within the seed spread).
pub fn ranges_overlap(a: &Cell, b: &Cell) -> Option<bool> {
    let (alo, ahi) = a.range()?;
    let (blo, bhi) = b.range()?;
    Some(alo <= bhi && blo <= ahi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pct(v: f64) -> String {
        format!("{v:.1}%")
    }

    #[test]
    fn cell_renders_mean_range_and_what_the_other_runs_did() {
        let mut c = Cell::default();
        c.push(Outcome::Value(97.5));
        c.push(Outcome::Value(98.1));
        assert_eq!(c.render(&pct, "not reached"), "97.8% (97.5%–98.1%)");
        c.push(Outcome::Diverged);
        assert_eq!(
            c.render(&pct, "not reached"),
            "97.8% (97.5%–98.1%); 1 of 3 diverged"
        );
        let mut d = Cell::default();
        d.push(Outcome::Diverged);
        d.push(Outcome::Diverged);
        assert_eq!(d.render(&pct, "not reached"), "2 of 2 diverged");
        let mut e = Cell::default();
        e.push(Outcome::Value(120.0));
        e.push(Outcome::NotReached);
        assert_eq!(
            e.render(&|v| format!("{v:.0}"), "not reached in the run"),
            "120; 1 of 2 not reached in the run"
        );
        assert_eq!(Cell::default().render(&pct, "x"), "–");
    }

    #[test]
    fn table_has_one_row_per_depth_and_one_column_per_group() {
        let mut t = Table::new();
        for (g, d, v) in [
            ("tau=1", 20, 10.0),
            ("tau=1/sqrt(L)", 20, 97.0),
            ("tau=1/sqrt(L)", 56, 98.0),
        ] {
            t.entry((g.to_string(), d))
                .or_default()
                .push(Outcome::Value(v));
        }
        let mut md = String::new();
        let groups = vec!["tau=1".to_string(), "tau=1/sqrt(L)".to_string()];
        write_table(&mut md, &t, &groups, &|g| g.to_string(), &pct, "n/r");
        assert_eq!(
            md,
            "| depth | tau=1 | tau=1/sqrt(L) |\n| --- | --- | --- |\n| 20 | 10.0% | 97.0% |\n| 56 | – | 98.0% |\n"
        );
    }

    #[test]
    fn threshold_step_is_the_first_logged_step_at_or_below() {
        let curve = [(10.0, 1.0), (20.0, f64::NAN), (30.0, 1e-3), (40.0, 1e-4)];
        assert_eq!(first_step_at_or_below(&curve, 1e-3), Some(30.0));
        assert_eq!(first_step_at_or_below(&curve, 1e-5), None);
    }

    #[test]
    fn accuracy_step_is_the_first_logged_step_at_or_above() {
        let curve = [(25.0, 0.9), (50.0, f64::NAN), (75.0, 0.95), (100.0, 0.97)];
        assert_eq!(first_step_at_or_above(&curve, 0.95), Some(75.0));
        assert_eq!(first_step_at_or_above(&curve, 0.98), None);
        assert_eq!(first_step_at_or_above(&[], 0.5), None);
    }

    /// Seeds' curves are averaged step by step; a step only one run reached (the other
    /// diverged earlier) is that run's value, and non-finite values are left out.
    #[test]
    fn mean_curve_averages_the_runs_present_at_each_step() {
        let a = vec![(10.0, 1.0), (20.0, 2.0), (30.0, 4.0)];
        let b = vec![(10.0, 3.0), (20.0, f64::NAN)];
        assert_eq!(
            mean_curve(&[a, b]),
            vec![(10.0, 2.0), (20.0, 2.0), (30.0, 4.0)]
        );
        assert!(mean_curve(&[]).is_empty());
    }

    #[test]
    fn overlap_compares_seed_ranges() {
        let cell = |v: &[f64]| {
            let mut c = Cell::default();
            v.iter().for_each(|x| c.push(Outcome::Value(*x)));
            c
        };
        assert_eq!(
            ranges_overlap(&cell(&[1.0, 2.0]), &cell(&[1.5, 3.0])),
            Some(true)
        );
        assert_eq!(
            ranges_overlap(&cell(&[1.0, 2.0]), &cell(&[2.5, 3.0])),
            Some(false)
        );
        assert_eq!(ranges_overlap(&cell(&[]), &cell(&[2.5])), None);
    }
}
