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
use tracing_indicatif::span_ext::IndicatifSpanExt;

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
pub use grads::{clip_grad_norm, layer_of, natural_cmp};
use grads::{clip_with_sums, gd_grads, grad_norms, sgd_grads};

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

/// How a session of the loop may be stopped early.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Set (by a Ctrl-C handler) to stop after the current step with a checkpoint and
    /// status `interrupted`.
    pub interrupt: Arc<AtomicBool>,
    /// Act as if interrupted once this many steps (in total) are done (for tests and
    /// scripted stops).
    pub stop_after_steps: Option<u64>,
    /// Draw progress bars.
    pub progress: bool,
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
) -> anyhow::Result<Summary> {
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
    let schedule = Schedule::new(
        cfg.optim.lr,
        &cfg.optim.schedule,
        cfg.optim.warmup,
        unit,
        total,
    );
    let names: Vec<String> = sess
        .optimizer
        .params()
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let every = cfg.log.every;
    let eval_every = cfg.log.eval_every(by_epochs);
    let ckpt_every = cfg.log.checkpoint_every(by_epochs);

    let session_start = Instant::now();
    let wall_before = state.wall_s;
    let mut last_record_time = Instant::now();
    let mut order: Option<(u64, Vec<Vec<usize>>)> = None;

    let span = tracing::info_span!("train", run = %cfg.name);
    if opts.progress {
        span.pb_set_style(
            &indicatif::ProgressStyle::with_template(
                "{span_child_prefix}{bar:30} {pos}/{len} steps {per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        span.pb_set_length(total);
        span.pb_set_position(state.step);
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

    let mut status = RunStatus::Finished;
    let mut diverged: Option<(u64, String)> = None;
    loop {
        let wall = |st: &Instant| wall_before + st.elapsed().as_secs_f64();
        let stop_requested = opts.interrupt.load(Ordering::SeqCst)
            || opts.stop_after_steps.is_some_and(|s| state.step >= s);
        if state.step >= total {
            break;
        }
        if stop_requested {
            status = RunStatus::Interrupted;
            state.wall_s = wall(&session_start);
            checkpoint(&sess, run_dir, &mut state, &mut metrics)?;
            tracing::info!("interrupted at step {}: checkpoint written", state.step);
            break;
        }
        let s = state.step;
        let epoch = s / spe;
        let lr = schedule.lr_at(s);

        // Gradient of the step.
        let mut sg = match cfg.optim.kind {
            OptimKind::Gd => gd_grads(&sess, n, epoch)?,
            OptimKind::Sgd => {
                if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                    let bs =
                        tau_batches(n, cfg.data.batch_size, cfg.data.drop_last, cfg.seed, epoch);
                    order = Some((epoch, bs));
                }
                let b = (s % spe) as usize;
                let indices = order
                    .as_ref()
                    .and_then(|(_, bs)| bs.get(b))
                    .context("batch index beyond the epoch")?
                    .clone();
                sgd_grads(&sess, &indices, epoch)?
            }
        };
        let norms = grad_norms(&names, &sg.grads)?;
        let loss = sg.loss_sum / sg.count.max(1) as f64;
        if !loss.is_finite() || !norms.global.is_finite() {
            let reason = if !loss.is_finite() {
                format!("non-finite training loss ({loss})")
            } else {
                format!("non-finite gradient norm ({})", norms.global)
            };
            tracing::warn!("diverged at step {s}: {reason}");
            let record = MetricsRecord {
                step: s,
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
                h_ratio: None,
                examples_per_s: 0.0,
                wall_s: wall(&session_start),
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
        if cfg.optim.kind == OptimKind::Gd {
            // Full batch: each record shows the last step's exact loss, not an average.
            state.window = Window {
                examples: state.window.examples,
                ..Window::default()
            };
        }
        let w = &mut state.window;
        w.loss_sum += sg.loss_sum;
        w.count += sg.count;
        if let Some(c) = sg.correct {
            w.correct += c;
            w.has_acc = true;
        }
        w.examples += sg.count;

        let done = state.step >= total || reached_target;
        let epoch_end = state.step.is_multiple_of(spe) && !reached_target;
        let units_done = if by_epochs {
            state.step / spe
        } else {
            state.step
        };
        let unit_end = !by_epochs || epoch_end;
        let log_now = done
            || (every > 0 && state.step.is_multiple_of(every))
            || (by_epochs && epoch_end && cfg.optim.kind == OptimKind::Sgd);
        let eval_now = sess.test.is_some()
            && (done || (unit_end && eval_every > 0 && units_done.is_multiple_of(eval_every)));
        let ckpt_now = !done && unit_end && ckpt_every > 0 && units_done.is_multiple_of(ckpt_every);

        if opts.progress {
            span.pb_set_position(state.step);
            span.pb_set_message(&format!(
                "epoch {}/{} loss {loss:.4e} lr {lr:.3e}",
                state.step.div_ceil(spe),
                total.div_ceil(spe)
            ));
        }

        if log_now || eval_now {
            let (test_loss, test_acc) = match sess.test {
                Some(t) if eval_now => evaluate(sess.model, t, cfg.loss.kind, cfg.data.batch_size)?,
                _ => (None, None),
            };
            let h_ratio = {
                let k = n.min(cfg.data.batch_size);
                let idx: Vec<usize> = (0..k).collect();
                let (xs, _) = sess.train.batch(&idx, None)?;
                sess.model.h_ratio(&xs)?
            };
            let w = std::mem::take(&mut state.window);
            let elapsed = last_record_time.elapsed().as_secs_f64();
            last_record_time = Instant::now();
            let record = MetricsRecord {
                step: state.step,
                epoch: if epoch_end {
                    state.step / spe - 1
                } else {
                    epoch
                },
                epoch_end,
                lr,
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
                wall_s: wall(&session_start),
            };
            update_bests(&mut state, &record);
            metrics.append(&record)?;
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
            state.wall_s = wall(&session_start);
            checkpoint(&sess, run_dir, &mut state, &mut metrics)?;
            break;
        }
        if ckpt_now {
            state.wall_s = wall(&session_start);
            checkpoint(&sess, run_dir, &mut state, &mut metrics)?;
        }
    }
    state.wall_s = wall_before + session_start.elapsed().as_secs_f64();
    let summary = Summary {
        name: cfg.name.clone(),
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
    };
    write_json_atomic(&run_dir.join(tau_records::SUMMARY_FILE), &summary)?;
    Ok(summary)
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
