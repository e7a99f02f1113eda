//! What the loop does around each step: its plan (steps, epochs, when to record,
//! evaluate and checkpoint), the step's gradient, the metrics records, and the summary.

use super::*;

/// What a session of the loop derives from the config and the training set once.
pub(super) struct Plan {
    /// Training examples.
    pub(super) n: usize,
    /// Steps per epoch.
    pub(super) spe: u64,
    /// Steps of the whole run.
    pub(super) total: u64,
    /// Whether the run is counted in epochs (evaluation and checkpoints at epoch ends).
    pub(super) by_epochs: bool,
    pub(super) schedule: Schedule,
    /// The trained parameters' names, in the optimizer's order.
    pub(super) names: Vec<String>,
    /// Record every this many steps (0: only at the end and at epoch ends).
    pub(super) every: u64,
    /// Evaluate every this many units (steps, or epochs when `by_epochs`).
    pub(super) eval_every: u64,
    /// Checkpoint every this many units.
    pub(super) ckpt_every: u64,
}

impl Plan {
    pub(super) fn new(sess: &Session<'_>) -> crate::Result<Plan> {
        let cfg = sess.cfg;
        let n = sess.train.len();
        crate::error::ensure!(n > 0, "the training set is empty");
        let spe = steps_per_epoch(cfg, n);
        crate::error::ensure!(
            spe > 0,
            "no full batch of {} in {n} training examples (drop_last)",
            cfg.data.batch_size
        );
        let total = total_steps(cfg, n);
        let by_epochs = cfg.epochs.is_some();
        let unit = if by_epochs { spe } else { 1 };
        let warmup_steps = cfg.optim.warmup * unit as f64;
        if warmup_steps > total as f64 {
            tracing::warn!(
                "optim.warmup ({} {}) is longer than the run ({total} steps): the learning \
                 rate never reaches optim.lr",
                cfg.optim.warmup,
                if by_epochs { "epochs" } else { "steps" }
            );
        }
        Ok(Plan {
            n,
            spe,
            total,
            by_epochs,
            schedule: Schedule::new(
                cfg.optim.lr,
                &cfg.optim.schedule,
                cfg.optim.warmup,
                unit,
                total,
            ),
            names: sess
                .optimizer
                .params()
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            every: cfg.log.every,
            eval_every: cfg.log.eval_every(by_epochs),
            ckpt_every: cfg.log.checkpoint_every(by_epochs),
        })
    }
}

/// The wall-clock time of the run: earlier sessions plus this one.
pub(super) struct Clock {
    pub(super) before: f64,
    pub(super) start: Instant,
}

impl Clock {
    pub(super) fn wall(&self) -> f64 {
        self.before + self.start.elapsed().as_secs_f64()
    }
}

/// The session's `train` span (the observer told of the start) and its first progress;
/// logs where the session starts.
pub(super) fn begin(
    sess: &Session<'_>,
    plan: &Plan,
    state: &TrainState,
    opts: &RunOptions,
) -> (tracing::Span, Progress) {
    let (n, spe, total) = (plan.n, plan.spe, plan.total);
    let span = tracing::info_span!("train", run = %sess.cfg.name);
    let progress = Progress {
        step: state.step,
        total,
        steps_per_epoch: spe,
        loss: f64::NAN,
        lr: f64::NAN,
    };
    if let Some(o) = &opts.observer {
        o.started(&span, &progress);
    }
    let _enter = span.enter();
    tracing::info!(
        "{} from step {} of {total} ({spe} per epoch, {n} training examples)",
        if state.step == 0 {
            "training"
        } else {
            "resuming"
        },
        state.step
    );

    drop(_enter);
    (span, progress)
}

/// Why a step with this loss and gradient norm diverged.
pub(super) fn divergence_reason(loss: f64, grad_norm: f64) -> String {
    if !loss.is_finite() {
        format!("non-finite training loss ({loss})")
    } else {
        format!("non-finite gradient norm ({grad_norm})")
    }
}

/// What to do after a step.
pub(super) struct When {
    /// The run is over (all steps done, or the target loss reached).
    pub(super) done: bool,
    /// The step ended an epoch.
    pub(super) epoch_end: bool,
    /// Write a metrics record.
    pub(super) log: bool,
    /// Evaluate on the test set (and write a record).
    pub(super) eval: bool,
    /// Write a checkpoint (besides the final one).
    pub(super) checkpoint: bool,
}

impl Plan {
    /// What follows the step that left `step` steps done.
    pub(super) fn when(
        &self,
        step: u64,
        reached_target: bool,
        has_test: bool,
        kind: OptimKind,
    ) -> When {
        let done = step >= self.total || reached_target;
        let epoch_end = step.is_multiple_of(self.spe) && !reached_target;
        let units_done = if self.by_epochs {
            step / self.spe
        } else {
            step
        };
        let unit_end = !self.by_epochs || epoch_end;
        let every = |n: u64| n > 0 && units_done.is_multiple_of(n);
        When {
            done,
            epoch_end,
            log: done
                || (self.every > 0 && step.is_multiple_of(self.every))
                || (self.by_epochs && epoch_end && kind == OptimKind::Sgd),
            eval: has_test && (done || (unit_end && every(self.eval_every))),
            checkpoint: !done && unit_end && every(self.ckpt_every),
        }
    }
}

/// The record of a step whose loss or gradient is not finite (its wall time left at 0).
pub(super) fn diverged_record(
    sess: &Session<'_>,
    (step, epoch): (u64, u64),
    lr: f64,
    loss: f64,
    norms: grads::GradNorms,
) -> crate::Result<MetricsRecord> {
    Ok(MetricsRecord {
        step,
        epoch,
        epoch_end: false,
        lr,
        train_loss: Some(loss),
        train_acc: None,
        test_loss: None,
        test_acc: None,
        grad_norm: Some(norms.global),
        layer_grad_norms: norms.layers,
        tau: sess.model.learnable_tau()?,
        branch_scales: branch_scales(sess)?,
        h_ratio: None,
        examples_per_s: 0.0,
        wall_s: 0.0,
    })
}

/// The current values of the per-block scalars among the optimizer's parameters (by the
/// model's [`tau_model::ParamKind`]: SkipInit's and ReZero's α, Fixup's branch
/// multipliers), by name; `None` when the model has none (τ models, the theory network).
/// Read at the parameters' stored values, so a resumed run records the same numbers.
pub(super) fn branch_scales(
    sess: &Session<'_>,
) -> crate::Result<Option<std::collections::BTreeMap<String, f32>>> {
    use tau_model::ParamKind;
    let scalars: Vec<&crate::optim::Param> = sess
        .optimizer
        .params()
        .iter()
        .filter(|p| {
            matches!(
                sess.cfg.model.param_kind(&p.name),
                ParamKind::Alpha | ParamKind::BranchScale
            )
        })
        .collect();
    if scalars.is_empty() {
        return Ok(None);
    }
    // One read of all of them (one transfer from an accelerator).
    let flat = scalars
        .iter()
        .map(|p| p.var.as_tensor().flatten_all())
        .collect::<candle::Result<Vec<_>>>()?;
    let values = Tensor::cat(&flat, 0)?
        .to_dtype(candle::DType::F32)?
        .to_vec1::<f32>()
        .context("reading the per-block scalars")?;
    crate::error::ensure!(
        values.len() == scalars.len(),
        "a per-block scalar with {} elements in all for {} parameters",
        values.len(),
        scalars.len()
    );
    Ok(Some(
        scalars
            .iter()
            .zip(values)
            .map(|(p, v)| (p.name.clone(), v))
            .collect(),
    ))
}

/// The run's summary after this session.
pub(super) fn summarize(
    sess: &Session<'_>,
    state: &TrainState,
    status: RunStatus,
    diverged: Option<(u64, String)>,
    spe: u64,
) -> Summary {
    Summary {
        name: sess.cfg.name.clone(),
        status,
        diverged_at_step: diverged.as_ref().map(|(s, _)| *s),
        divergence_reason: diverged.map(|(_, r)| r),
        steps: state.step,
        epochs_completed: state.step / spe,
        reached_target_at_step: state.reached_target_at_step,
        final_metrics: state.last_record.clone(),
        best_train_loss: state.best_train_loss,
        best_test_loss: state.best_test_loss,
        best_test_acc: state.best_test_acc,
        wall_s: state.wall_s,
        device: sess.device_name.clone(),
        version: current_code_version(),
    }
}

/// The gradient of step `s`: over the whole training set (GD), or over the step's batch
/// of the epoch's order (SGD; `order` caches the current epoch's batches).
pub(super) fn step_grads(
    sess: &Session<'_>,
    plan: &Plan,
    s: u64,
    order: &mut Option<(u64, Vec<Vec<usize>>)>,
) -> crate::Result<StepGrads> {
    let cfg = sess.cfg;
    let epoch = s / plan.spe;
    match cfg.optim.kind {
        OptimKind::Gd => gd_grads(sess, plan.n, epoch),
        OptimKind::Sgd => {
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let bs = tau_batches(
                    plan.n,
                    cfg.data.batch_size,
                    cfg.data.drop_last,
                    cfg.seed,
                    epoch,
                );
                *order = Some((epoch, bs));
            }
            let b = (s % plan.spe) as usize;
            let indices = order
                .as_ref()
                .and_then(|(_, bs)| bs.get(b))
                .context("batch index beyond the epoch")?
                .clone();
            sgd_grads(sess, &indices, epoch)
        }
    }
}

/// Adds a step's sums to the training metrics of the next record.
pub(super) fn accumulate(window: &mut Window, sg: &StepGrads, kind: OptimKind) {
    if kind == OptimKind::Gd {
        // Full batch: each record shows the last step's exact loss, not an average.
        *window = Window {
            examples: window.examples,
            ..Window::default()
        };
    }
    window.loss_sum += sg.loss_sum;
    window.count += sg.count;
    if let Some(c) = sg.correct {
        window.correct += c;
        window.has_acc = true;
    }
    window.examples += sg.count;
}

/// When and what a record is written for.
pub(super) struct RecordAt {
    pub(super) epoch: u64,
    pub(super) epoch_end: bool,
    pub(super) lr: f64,
    /// Whether to evaluate on the test set.
    pub(super) eval: bool,
}

/// The metrics record after a step: the training metrics since the last record (which it
/// resets), the test metrics when evaluating, the gradient norms, τ, the per-block
/// scalars and the theory network's norm ratio.
pub(super) fn make_record(
    sess: &Session<'_>,
    state: &mut TrainState,
    at: RecordAt,
    norms: grads::GradNorms,
    clock: &Clock,
    last_record_time: &mut Instant,
) -> crate::Result<MetricsRecord> {
    let cfg = sess.cfg;
    let (test_loss, test_acc) = match sess.test {
        Some(t) if at.eval => evaluate(sess.model, t, cfg.loss.kind, cfg.data.batch_size)?,
        _ => (None, None),
    };
    let h_ratio = {
        let k = sess.train.len().min(cfg.data.batch_size);
        let idx: Vec<usize> = (0..k).collect();
        let (xs, _) = sess.train.batch(&idx, None)?;
        sess.model.h_ratio(&xs)?
    };
    let w = std::mem::take(&mut state.window);
    let elapsed = last_record_time.elapsed().as_secs_f64();
    *last_record_time = Instant::now();
    Ok(MetricsRecord {
        step: state.step,
        epoch: at.epoch,
        epoch_end: at.epoch_end,
        lr: at.lr,
        train_loss: (w.count > 0).then(|| w.loss_sum / w.count as f64),
        train_acc: (w.has_acc && w.count > 0).then(|| w.correct as f64 / w.count as f64),
        test_loss,
        test_acc,
        grad_norm: Some(norms.global),
        layer_grad_norms: norms.layers,
        tau: sess.model.learnable_tau()?,
        branch_scales: branch_scales(sess)?,
        h_ratio,
        examples_per_s: if elapsed > 0.0 {
            w.examples as f64 / elapsed
        } else {
            0.0
        },
        wall_s: clock.wall(),
    })
}

/// Logs a record: test metrics at info level, the training loss alone at debug level.
pub(super) fn log_record(record: &MetricsRecord) {
    if let (Some(tl), Some(ta)) = (record.test_loss, record.test_acc) {
        tracing::info!(
            "step {} epoch {}: train loss {:.4e}, test loss {tl:.4}, test acc {:.2}%",
            record.step,
            record.epoch,
            record.train_loss.unwrap_or(f64::NAN),
            100.0 * ta
        );
    } else {
        tracing::debug!(
            "step {}: train loss {:.4e}",
            record.step,
            record.train_loss.unwrap_or(f64::NAN)
        );
    }
}

pub(super) fn update_bests(state: &mut TrainState, r: &MetricsRecord) {
    fn min(a: Option<f64>, b: Option<f64>) -> Option<f64> {
        match (a, b) {
            (Some(x), Some(y)) if y.is_finite() => Some(x.min(y)),
            (None, Some(y)) if y.is_finite() => Some(y),
            (a, _) => a,
        }
    }
    state.best_train_loss = min(state.best_train_loss, r.train_loss);
    state.best_test_loss = min(state.best_test_loss, r.test_loss);
    state.best_test_acc = match (state.best_test_acc, r.test_acc) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (None, y) => y,
        (x, None) => x,
    };
}

/// The shuffled batches of an epoch (the data crate's order).
pub(super) fn tau_batches(
    n: usize,
    batch_size: usize,
    drop_last: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    tau_data::batches(n, batch_size, drop_last, seed, epoch)
}
