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

use crate::error::Context;
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
mod step;

use checkpoints::checkpoint;
pub use checkpoints::{last_checkpoint, load_checkpoint_state, write_config};
pub use data::{TensorData, TrainData};
use grads::{StepGrads, clip_with_sums, gd_grads, grad_norms, sgd_grads};
pub use grads::{clip_grad_norm, layer_of, natural_cmp};
use step::{
    Clock, Plan, RecordAt, accumulate, begin, diverged_record, divergence_reason, log_record,
    make_record, step_grads, summarize, update_bests,
};

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

    /// The model to evaluate with: the same outputs without an autograd graph
    /// ([`tau_model::Model::inference`]), or `None` (the default) to evaluate `self`.
    ///
    /// # Errors
    /// Building the model.
    fn inference(&self) -> candle::Result<Option<Box<dyn TrainModel>>> {
        Ok(None)
    }

    /// A training step's output, loss (what `loss` returns for the output) and its
    /// gradients, where the model computes them faster than autograd over
    /// [`Self::forward_t`] (the same values); `None` (the default) to use autograd.
    ///
    /// # Errors
    /// Shape or device errors, or the loss closure's.
    #[allow(clippy::type_complexity)]
    fn loss_backward(
        &self,
        _xs: &Tensor,
        _loss: &mut dyn FnMut(&Tensor) -> candle::Result<Tensor>,
    ) -> candle::Result<Option<(Tensor, Tensor, candle::backprop::GradStore)>> {
        Ok(None)
    }
}

/// Saves the model part of a checkpoint into a directory.
pub trait ModelStore {
    /// Writes the model's files (architecture and weights) into `dir`, which exists.
    ///
    /// # Errors
    /// I/O errors.
    fn save(&self, dir: &Path) -> crate::Result<()>;
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
) -> crate::Result<Summary> {
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
                ..diverged_record(&sess, (s, epoch), lr, loss, norms)?
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

/// Mean loss and accuracy of `model` (BatchNorm in eval mode) over `data`, in chunks.
///
/// # Errors
/// Model or data errors.
pub fn evaluate(
    model: &dyn TrainModel,
    data: &dyn TrainData,
    loss: LossKind,
    batch_size: usize,
) -> crate::Result<(Option<f64>, Option<f64>)> {
    let n = data.len();
    if n == 0 {
        return Ok((None, None));
    }
    let view = model.inference()?;
    let model: &dyn TrainModel = view.as_deref().unwrap_or(model);
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
