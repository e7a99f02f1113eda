//! The training loop: full-batch gradient descent (gradients summed over chunks of the
//! whole training set) and mini-batch SGD, with records, checkpoints, divergence
//! detection, interruption and exact resume.
//!
//! The loop is generic over a [`TrainModel`] and [`TrainData`], so it drives the τ-ResNets
//! of the model crate and, in tests, tiny hand-made models alike.
//!
//! Determinism: the data order of epoch `e` and the augmentation of every example are
//! functions of `(seed, e)`; the learning rate is a function of the step; everything else
//! that evolves (weights, BatchNorm statistics, momentum buffers, the running training
//! metrics since the last record, the bests) is in the checkpoint. A resumed run therefore
//! repeats the never-interrupted run's computation exactly, and on CPU its records are
//! bitwise equal (apart from the wall-clock fields).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use candle::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::{LossKind, OptimKind, Reduction, RunConfig};
use crate::loss::{Targets, correct, loss_sum};
use crate::optim::Sgd;
use crate::records::{
    LayerNorm, MetricsRecord, MetricsWriter, RunStatus, Summary, current_code_version, sync_dir,
    write_atomic, write_json_atomic,
};
use crate::schedule::Schedule;

mod checkpoints;
mod data;
mod grads;

use checkpoints::checkpoint;
pub use checkpoints::{last_checkpoint, load_checkpoint_state, write_config};
pub use data::{TensorData, TrainData};
use grads::{StepGrads, clip_with_sums, gd_grads, grad_norms, sgd_grads};
pub use grads::{clip_grad_norm, layer_of, natural_cmp};

/// A model the loop can train.
pub trait TrainModel {
    /// The model's output for a batch; BatchNorm in train mode when `train`.
    ///
    /// # Errors
    /// Shape or device errors.
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle::Result<Tensor>;

    /// The current value of a learnable τ, if the model has one.
    ///
    /// # Errors
    /// Device errors reading it back.
    fn learnable_tau(&self) -> candle::Result<Option<f64>> {
        Ok(None)
    }

    /// The mean over the rows of `xs` of ‖h_L(x)‖ / ‖h_0(x)‖ (theory network only).
    ///
    /// # Errors
    /// Shape or device errors.
    fn h_ratio(&self, _xs: &Tensor) -> candle::Result<Option<f64>> {
        Ok(None)
    }
}

/// Saves the model part of a checkpoint into a directory.
pub trait ModelStore {
    /// Writes the model's files (architecture and weights) into `dir`, which exists.
    ///
    /// # Errors
    /// I/O errors.
    fn save(&self, dir: &Path) -> anyhow::Result<()>;
}

/// How a session of the loop may be stopped early, and who hears of its progress.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Set (by a Ctrl-C handler) to stop after the current step with a checkpoint and
    /// status `interrupted`.
    pub interrupt: Arc<AtomicBool>,
    /// Act as if interrupted once this many steps (in total) are done (for tests and
    /// scripted stops).
    pub stop_after_steps: Option<u64>,
    /// Told of the loop's start and of every step (the `tau-resnet` binary draws its
    /// progress bar from it); none by default.
    pub observer: Option<Arc<dyn RunObserver>>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("interrupt", &self.interrupt)
            .field("stop_after_steps", &self.stop_after_steps)
            .field("observer", &self.observer.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Where the loop stands, as a [`RunObserver`] hears it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Steps done.
    pub step: u64,
    /// Steps of the whole run.
    pub total: u64,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// The last step's training loss (NaN before the first step of the session).
    pub loss: f64,
    /// The last step's learning rate (NaN before the first step of the session).
    pub lr: f64,
}

/// Hears the training loop's progress. The loop runs inside a `tracing` span named
/// `train`, which it passes along: a terminal front end can attach a progress bar to it
/// (as `tau-resnet` does with tracing-indicatif), a library user can ignore it. Records
/// and events also go to `tracing` and to the run directory; this is for live display.
pub trait RunObserver: Send + Sync {
    /// The session starts (or resumes) at `progress.step`.
    fn started(&self, _span: &tracing::Span, _progress: &Progress) {}
    /// A step is done.
    fn stepped(&self, _span: &tracing::Span, _progress: &Progress) {}
}

/// The running sums behind the training metrics of the next record.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Sum of per-example losses.
    pub loss_sum: f64,
    /// Correctly classified examples (classification data).
    pub correct: u64,
    /// Examples the sums are over.
    pub count: u64,
    /// Whether the data has class labels.
    pub has_acc: bool,
    /// Training examples processed since the last record (for throughput).
    pub examples: u64,
}

/// What a checkpoint holds besides the model and the optimizer: the position of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps done. The next step's epoch, batch within the epoch, data order and
    /// augmentation all follow from it and the seed.
    pub step: u64,
    /// The seed of the run (checked on resume).
    pub seed: u64,
    /// Length of `metrics.jsonl` when the checkpoint was taken.
    pub metrics_len: u64,
    /// Running sums of the training metrics since the last record.
    pub window: Window,
    /// Lowest training loss in a record so far.
    pub best_train_loss: Option<f64>,
    /// Lowest test loss so far.
    pub best_test_loss: Option<f64>,
    /// Highest test accuracy so far.
    pub best_test_acc: Option<f64>,
    /// Wall time of earlier sessions plus this one up to the checkpoint, in seconds.
    pub wall_s: f64,
    /// The last record written.
    pub last_record: Option<MetricsRecord>,
    /// The number of steps after which the training loss fell below `target_loss`.
    pub reached_target_at_step: Option<u64>,
}

/// Everything one session of the loop works on.
pub struct Session<'a> {
    /// The resolved run config.
    pub cfg: &'a RunConfig,
    /// The model.
    pub model: &'a dyn TrainModel,
    /// The optimizer over the model's trained parameters.
    pub optimizer: &'a mut Sgd,
    /// The training set.
    pub train: &'a dyn TrainData,
    /// The test set, if any.
    pub test: Option<&'a dyn TrainData>,
    /// Writes the model part of checkpoints.
    pub store: &'a dyn ModelStore,
    /// The device's name for the summary.
    pub device_name: String,
}

/// The number of optimizer steps per epoch.
pub fn steps_per_epoch(cfg: &RunConfig, n: usize) -> u64 {
    match cfg.optim.kind {
        OptimKind::Gd => 1,
        OptimKind::Sgd => {
            let b = cfg.data.batch_size.max(1);
            let s = if cfg.data.drop_last {
                n / b
            } else {
                n.div_ceil(b)
            };
            s as u64
        }
    }
}

/// The total number of optimizer steps of the run.
pub fn total_steps(cfg: &RunConfig, n: usize) -> u64 {
    match (cfg.steps, cfg.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e.saturating_mul(steps_per_epoch(cfg, n)),
        (None, None) => 0,
    }
}

/// What a session of the loop derives from the config and the training set once.
struct Plan {
    /// Training examples.
    n: usize,
    /// Steps per epoch.
    spe: u64,
    /// Steps of the whole run.
    total: u64,
    /// Whether the run is counted in epochs (evaluation and checkpoints at epoch ends).
    by_epochs: bool,
    schedule: Schedule,
    /// The trained parameters' names, in the optimizer's order.
    names: Vec<String>,
    /// Record every this many steps (0: only at the end and at epoch ends).
    every: u64,
    /// Evaluate every this many units (steps, or epochs when `by_epochs`).
    eval_every: u64,
    /// Checkpoint every this many units.
    ckpt_every: u64,
}

impl Plan {
    fn new(sess: &Session<'_>) -> anyhow::Result<Plan> {
        let cfg = sess.cfg;
        let n = sess.train.len();
        anyhow::ensure!(n > 0, "the training set is empty");
        let spe = steps_per_epoch(cfg, n);
        anyhow::ensure!(
            spe > 0,
            "no full batch of {} in {n} training examples (drop_last)",
            cfg.data.batch_size
        );
        let total = total_steps(cfg, n);
        let by_epochs = cfg.epochs.is_some();
        let unit = if by_epochs { spe } else { 1 };
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
struct Clock {
    before: f64,
    start: Instant,
}

impl Clock {
    fn wall(&self) -> f64 {
        self.before + self.start.elapsed().as_secs_f64()
    }
}

/// Runs the loop from `state` until the run finishes, diverges or is stopped, writing
/// records and checkpoints into `run_dir` (which holds `config.toml` already).
///
/// # Errors
/// I/O errors writing records or checkpoints, and model or data errors that are not
/// divergence. A non-finite loss or gradient is not an error: the summary says
/// `diverged`.
pub fn run_loop(
    sess: Session<'_>,
    run_dir: &Path,
    mut state: TrainState,
    mut metrics: MetricsWriter,
    opts: &RunOptions,
) -> anyhow::Result<Summary> {
    let cfg = sess.cfg;
    let plan = Plan::new(&sess)?;
    let (spe, total) = (plan.spe, plan.total);
    let clock = Clock {
        before: state.wall_s,
        start: Instant::now(),
    };
    let mut last_record_time = Instant::now();
    let mut order: Option<(u64, Vec<Vec<usize>>)> = None;

    let (span, mut progress) = begin(&sess, &plan, &state, opts);
    let _enter = span.enter();

    let mut status = RunStatus::Finished;
    let mut diverged: Option<(u64, String)> = None;
    loop {
        let stop_requested = opts.interrupt.load(Ordering::SeqCst)
            || opts.stop_after_steps.is_some_and(|s| state.step >= s);
        if state.step >= total {
            break;
        }
        if stop_requested {
            status = RunStatus::Interrupted;
            state.wall_s = clock.wall();
            checkpoint(&sess, run_dir, &mut state, &mut metrics)?;
            tracing::info!("interrupted at step {}: checkpoint written", state.step);
            break;
        }
        let s = state.step;
        let epoch = s / spe;
        let lr = plan.schedule.lr_at(s);

        let mut sg = step_grads(&sess, &plan, s, &mut order)?;
        let norms = grad_norms(&plan.names, &sg.grads)?;
        let loss = sg.loss_sum / sg.count.max(1) as f64;
        if !loss.is_finite() || !norms.global.is_finite() {
            let reason = divergence_reason(loss, norms.global);
            tracing::warn!("diverged at step {s}: {reason}");
            let record = MetricsRecord {
                wall_s: clock.wall(),
                ..diverged_record(&sess, s, lr, loss, norms)?
            };
            metrics.append(&record)?;
            state.last_record = Some(record);
            status = RunStatus::Diverged;
            diverged = Some((s, reason));
            break;
        }
        let reached_target = cfg.target_loss.is_some_and(|t| loss < t);
        if !reached_target {
            if let Some(max_norm) = cfg.optim.clip_grad_norm.filter(|&c| c > 0.0) {
                // The squared sums `grad_norms` took for the record.
                clip_with_sums(sess.optimizer, &mut sg.grads, &norms.param_sq, max_norm)?;
            }
            sess.optimizer.step(&sg.grads, lr)?;
            state.step += 1;
        }
        accumulate(&mut state.window, &sg, cfg.optim.kind);

        let when = plan.when(
            state.step,
            reached_target,
            sess.test.is_some(),
            cfg.optim.kind,
        );
        let (done, epoch_end) = (when.done, when.epoch_end);
        (progress.step, progress.loss, progress.lr) = (state.step, loss, lr);
        if let Some(o) = &opts.observer {
            o.stepped(&span, &progress);
        }

        if when.log || when.eval {
            let epoch = if epoch_end {
                state.step / spe - 1
            } else {
                epoch
            };
            let at = RecordAt {
                epoch,
                epoch_end,
                lr,
                eval: when.eval,
            };
            let record = make_record(&sess, &mut state, at, norms, &clock, &mut last_record_time)?;
            update_bests(&mut state, &record);
            metrics.append(&record)?;
            log_record(&record);
            state.last_record = Some(record);
        }
        if reached_target {
            tracing::info!(
                "training loss {loss:.3e} below the target after {} steps",
                state.step
            );
            state.reached_target_at_step = Some(state.step);
        }
        if done {
            state.wall_s = clock.wall();
            checkpoint(&sess, run_dir, &mut state, &mut metrics)?;
            break;
        }
        if when.checkpoint {
            state.wall_s = clock.wall();
            checkpoint(&sess, run_dir, &mut state, &mut metrics)?;
        }
    }
    state.wall_s = clock.wall();
    let summary = summarize(&sess, &state, status, diverged, spe);
    write_json_atomic(&run_dir.join(tau_records::SUMMARY_FILE), &summary)?;
    Ok(summary)
}

/// The session's `train` span (the observer told of the start) and its first progress;
/// logs where the session starts.
fn begin(
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
fn divergence_reason(loss: f64, grad_norm: f64) -> String {
    if !loss.is_finite() {
        format!("non-finite training loss ({loss})")
    } else {
        format!("non-finite gradient norm ({grad_norm})")
    }
}

/// What to do after a step.
struct When {
    /// The run is over (all steps done, or the target loss reached).
    done: bool,
    /// The step ended an epoch.
    epoch_end: bool,
    /// Write a metrics record.
    log: bool,
    /// Evaluate on the test set (and write a record).
    eval: bool,
    /// Write a checkpoint (besides the final one).
    checkpoint: bool,
}

impl Plan {
    /// What follows the step that left `step` steps done.
    fn when(&self, step: u64, reached_target: bool, has_test: bool, kind: OptimKind) -> When {
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
fn diverged_record(
    sess: &Session<'_>,
    step: u64,
    lr: f64,
    loss: f64,
    norms: grads::GradNorms,
) -> anyhow::Result<MetricsRecord> {
    Ok(MetricsRecord {
        step,
        epoch: step / steps_per_epoch(sess.cfg, sess.train.len()),
        epoch_end: false,
        lr,
        train_loss: Some(loss),
        train_acc: None,
        test_loss: None,
        test_acc: None,
        grad_norm: Some(norms.global),
        layer_grad_norms: norms.layers,
        tau: sess.model.learnable_tau()?,
        h_ratio: None,
        examples_per_s: 0.0,
        wall_s: 0.0,
    })
}

/// The run's summary after this session.
fn summarize(
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
fn step_grads(
    sess: &Session<'_>,
    plan: &Plan,
    s: u64,
    order: &mut Option<(u64, Vec<Vec<usize>>)>,
) -> anyhow::Result<StepGrads> {
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
fn accumulate(window: &mut Window, sg: &StepGrads, kind: OptimKind) {
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
struct RecordAt {
    epoch: u64,
    epoch_end: bool,
    lr: f64,
    /// Whether to evaluate on the test set.
    eval: bool,
}

/// The metrics record after a step: the training metrics since the last record (which it
/// resets), the test metrics when evaluating, the gradient norms, τ and the theory
/// network's norm ratio.
fn make_record(
    sess: &Session<'_>,
    state: &mut TrainState,
    at: RecordAt,
    norms: grads::GradNorms,
    clock: &Clock,
    last_record_time: &mut Instant,
) -> anyhow::Result<MetricsRecord> {
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
fn log_record(record: &MetricsRecord) {
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

fn update_bests(state: &mut TrainState, r: &MetricsRecord) {
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
fn tau_batches(
    n: usize,
    batch_size: usize,
    drop_last: bool,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    tau_data::batches(n, batch_size, drop_last, seed, epoch)
}

/// Mean loss and accuracy of `model` (BatchNorm in eval mode) over `data`, in chunks.
///
/// # Errors
/// Model or data errors.
pub fn evaluate(
    model: &dyn TrainModel,
    data: &dyn TrainData,
    loss: LossKind,
    batch_size: usize,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let n = data.len();
    if n == 0 {
        return Ok((None, None));
    }
    let (mut total, mut hits, mut has_acc) = (0f64, 0u64, false);
    let bs = batch_size.max(1);
    for start in (0..n).step_by(bs) {
        let idx: Vec<usize> = (start..(start + bs).min(n)).collect();
        let (xs, ys) = data.batch(&idx, None)?;
        let preds = model.forward_t(&xs, false)?.detach();
        total += loss_sum(loss, &preds, &ys)?
            .to_dtype(candle::DType::F64)?
            .to_scalar::<f64>()?;
        if let Some(c) = correct(&preds, &ys)? {
            hits += c;
            has_acc = true;
        }
    }
    Ok((
        Some(total / n as f64),
        has_acc.then(|| hits as f64 / n as f64),
    ))
}
