//! The probe's table on the terminal (the record itself is `--json`).

use crate::cmd::outln;
use tau_model::{ModelConfig, Scaling};
use tau_train::probe::{ProbeRecord, Trained, median};

fn fmt_log10(x: f64) -> String {
    // NaN: no finite value to summarize (a gradient of exactly 0, say), not an overflow.
    if x.is_nan() {
        return "-".into();
    }
    if !x.is_finite() {
        return "overflow".into();
    }
    if x.abs() < 3.0 {
        return format!("{:.3}", 10f64.powf(x));
    }
    let e = x.floor();
    format!("{:.2}e{e:.0}", 10f64.powf(x - e))
}

fn quantile(values: &[f64], q: f64) -> f64 {
    let mut xs: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let pos = q * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

fn log10_mean(values: &[f64]) -> f64 {
    let xs: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() || !m.is_finite() {
        return f64::NAN;
    }
    m + (xs.iter().map(|x| 10f64.powf(x - m)).sum::<f64>() / xs.len() as f64).log10()
}

/// What the probe's numbers mean for a model whose residual scaling scheme starts every
/// block as the identity, said rather than left for the reader to discover: `None` for τ.
/// For `trained` weights (a checkpoint), that the blocks no longer are the identity.
pub fn scheme_note(model: &ModelConfig, trained: bool) -> Option<String> {
    let scaling = model.scaling();
    if trained {
        return match scaling {
            Scaling::Tau => None,
            _ => Some(format!(
                "note: scaling = \"{scaling}\", trained weights: the blocks are the identity only \
                 at initialization; here training has moved their {}, so |h_l|/|h_0| and the \
                 gradient ratios measure the trained network.",
                match scaling {
                    Scaling::Fixup => "branches (last convolutions, multipliers)",
                    _ => "α",
                }
            )),
        };
    }
    let what = match scaling {
        Scaling::Tau => return None,
        Scaling::SkipInit | Scaling::ReZero => {
            "its α = 0 at initialization: every block passes its input through unchanged (the \
             option-A shortcut at a stage transition), so |h_l|/|h_0| is the same at every depth \
             by construction, and of each block's parameters only α has a gradient"
        }
        Scaling::Fixup => {
            "its branches' last convolutions (and biases) are 0 at initialization: every block \
             passes its input through unchanged (the option-A shortcut at a stage transition), \
             so |h_l|/|h_0| is the same at every depth by construction; and with the \
             classifier at 0 no gradient reaches the blocks at the first step (only `fc` has \
             one), hence no gradient ratios"
        }
    };
    Some(format!(
        "note: scaling = \"{scaling}\": {what}. These numbers say nothing about depth until \
         training has moved the branches (training runs show how the schemes then differ)."
    ))
}

pub(super) fn print_table(
    rec: &ProbeRecord,
    model: &ModelConfig,
    trained: Option<&Trained>,
) -> anyhow::Result<()> {
    let what = model.as_family().summary();
    outln!(
        "{what}: L = {} blocks, {} inputs x {} seeds ({}..={}), {:.2}s",
        rec.n_blocks,
        rec.n_inputs,
        rec.seeds.len(),
        rec.seeds.first().unwrap_or(&0),
        rec.seeds.last().unwrap_or(&0),
        rec.wall_s
    )?;
    if let Some(t) = trained {
        outln!(
            "trained weights of {}{}; random inputs (not the training data)",
            t.dir.display(),
            t.step
                .map_or_else(String::new, |s| format!(" (after {s} steps)"))
        )?;
    }
    if let Some(note) = scheme_note(model, trained.is_some()) {
        outln!("{note}")?;
    }
    outln!(
        "\n{:<14} {:>10}  {:>12} {:>10} {:>22}  {:>12} {:>22}",
        "tau rule",
        "tau",
        "mean |h_L|",
        "median",
        "[10%, 90%]",
        "|dW_1|/|dW_L|",
        "[10%, 90%]"
    )?;
    outln!("{:<14} {:>10}  {:>12}", "", "", "/ |h_0|")?;
    for t in &rec.taus {
        let g = &t.log10_grad_ratio;
        outln!(
            "{:<14} {:>10.4e}  {:>12} {:>10} {:>22}  {:>12} {:>22}",
            t.rule,
            t.tau,
            fmt_log10(log10_mean(&t.log10_ratio)),
            fmt_log10(median(&t.log10_ratio)),
            format!(
                "[{}, {}]",
                fmt_log10(quantile(&t.log10_ratio, 0.1)),
                fmt_log10(quantile(&t.log10_ratio, 0.9))
            ),
            if g.is_empty() {
                "-".into()
            } else {
                fmt_log10(median(g))
            },
            if g.is_empty() {
                "-".into()
            } else {
                format!(
                    "[{}, {}]",
                    fmt_log10(quantile(g, 0.1)),
                    fmt_log10(quantile(g, 0.9))
                )
            },
        )?;
    }
    for t in &rec.taus {
        outln!(
            "\nper block, tau = {} ({:.4e}): medians over inputs and seeds",
            t.rule,
            t.tau
        )?;
        outln!(
            "{:>8}  {:>14}  {:>16}",
            "block l",
            "|h_l|/|h_0|",
            "|dW_l|/|dW_L|"
        )?;
        for (k, b) in rec.blocks.iter().enumerate() {
            outln!(
                "{:>8}  {:>14}  {:>16}",
                b,
                fmt_log10(
                    t.block_log10_ratio_median
                        .get(k)
                        .copied()
                        .unwrap_or(f64::NAN)
                ),
                fmt_log10(
                    t.block_log10_grad_median
                        .get(k)
                        .copied()
                        .unwrap_or(f64::NAN)
                ),
            )?;
        }
        if rec.taus.len() > 4 {
            outln!("\n(per-block tables of the other rules: --json)")?;
            break;
        }
    }
    Ok(())
}
