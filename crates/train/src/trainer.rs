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
use tau_model::params::ParamName;
use tracing_indicatif::span_ext::IndicatifSpanExt;

use crate::config::{LossKind, OptimKind, Reduction, RunConfig};
use crate::loss::{Targets, correct, loss_sum};
use crate::optim::Sgd;
use crate::records::{
    LayerNorm, MetricsRecord, MetricsWriter, RunStatus, Summary, current_code_version, sync_dir,
    write_atomic, write_json_atomic,
};
use crate::schedule::Schedule;

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

/// A training or test set the loop can draw batches from.
pub trait TrainData {
    /// Number of examples.
    fn len(&self) -> usize;

    /// Whether the set is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Inputs and targets of the examples `indices`, in the run's dtype on its device.
    /// `augment` is `Some(epoch)` for training batches (augmentation of that epoch, if the
    /// set augments), `None` for evaluation.
    ///
    /// # Errors
    /// Indices out of range, device errors.
    fn batch(&self, indices: &[usize], augment: Option<u64>) -> anyhow::Result<(Tensor, Targets)>;
}

/// A data set held as tensors (synthetic data, small full-batch sets, tests).
pub struct TensorData {
    xs: Tensor,
    targets: Targets,
}

impl TensorData {
    /// Wraps inputs `(N, ...)` and targets with `N` rows.
    ///
    /// # Errors
    /// Row counts that differ.
    pub fn new(xs: Tensor, targets: Targets) -> anyhow::Result<TensorData> {
        let n = xs.dim(0)?;
        let m = targets.len()?;
        anyhow::ensure!(n == m, "{n} inputs but {m} targets");
        Ok(TensorData { xs, targets })
    }
}

impl TrainData for TensorData {
    fn len(&self) -> usize {
        self.xs.dims().first().copied().unwrap_or(0)
    }

    fn batch(&self, indices: &[usize], _augment: Option<u64>) -> anyhow::Result<(Tensor, Targets)> {
        let n = self.len();
        if let Some(&bad) = indices.iter().find(|&&i| i >= n) {
            anyhow::bail!("index {bad} out of range for {n} examples");
        }
        let all_in_order = indices.len() == n && indices.iter().enumerate().all(|(k, &i)| k == i);
        if all_in_order {
            return Ok((self.xs.clone(), self.targets.clone()));
        }
        let ids: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let ids = Tensor::new(ids.as_slice(), self.xs.device())?;
        let xs = self.xs.index_select(&ids, 0)?;
        let targets = match &self.targets {
            Targets::Classes(t, k) => Targets::Classes(t.index_select(&ids, 0)?, *k),
            Targets::Values(t) => Targets::Values(t.index_select(&ids, 0)?),
        };
        Ok((xs, targets))
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

/// The name used for a parameter's layer in the per-layer gradient norms: the block
/// (`layer2.3`, `blocks.7`) when the second name segment is an index, else the first
/// segment (`conv1`, `fc`, `tau`). See [`tau_model::params::ParamName::layer`].
pub fn layer_of(name: &str) -> &str {
    ParamName::parse(name).layer()
}

/// Sorts names with numbers compared as numbers (`layer1.2` before `layer1.10`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for ((da, xa), (db, xb)) in ca.iter().zip(&cb) {
        let ord = if *da && *db {
            let (na, nb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            na.len().cmp(&nb.len()).then(na.cmp(nb))
        } else {
            xa.cmp(xb)
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// One step's gradient, and the loss and accuracy sums measured on the way.
struct StepGrads {
    grads: Vec<Option<Tensor>>,
    loss_sum: f64,
    correct: Option<u64>,
    count: u64,
}

/// The last step's gradient norms.
#[derive(Debug, Clone, Default)]
struct GradNorms {
    global: f64,
    layers: Vec<LayerNorm>,
    /// Σ g² of each gradient, by parameter (0 where there is none).
    param_sq: Vec<f64>,
}

fn grad_norms(names: &[String], grads: &[Option<Tensor>]) -> anyhow::Result<GradNorms> {
    let mut sq = Vec::new();
    let mut which = Vec::new();
    for (i, g) in grads.iter().enumerate() {
        if let Some(g) = g {
            sq.push(g.sqr()?.sum_all()?.to_dtype(candle::DType::F64)?);
            which.push(i);
        }
    }
    if sq.is_empty() {
        return Ok(GradNorms::default());
    }
    let sq: Vec<f64> = Tensor::stack(&sq, 0)?
        .to_device(&candle::Device::Cpu)?
        .to_vec1()?;
    let mut layers: Vec<(String, f64)> = Vec::new();
    let mut param_sq = vec![0.0; grads.len()];
    for (&i, v) in which.iter().zip(&sq) {
        param_sq[i] = *v;
        let layer = layer_of(&names[i]);
        match layers.iter_mut().find(|(n, _)| n == layer) {
            Some((_, s)) => *s += v,
            None => layers.push((layer.to_string(), *v)),
        }
    }
    Ok(GradNorms {
        global: sq.iter().sum::<f64>().sqrt(),
        layers: layers
            .into_iter()
            .map(|(name, s)| LayerNorm {
                name,
                norm: s.sqrt(),
            })
            .collect(),
        param_sq,
    })
}

/// Scales the gradients so that their global L2 norm, as the optimizer sees them (each
/// times its parameter's `grad_scale`: τ's divided by L), is at most `max_norm`, exactly
/// as PyTorch's `clip_grad_norm_` (factor `max_norm / (norm + 1e-6)` when below 1).
/// Returns the norm before clipping.
///
/// # Errors
/// Device errors.
pub fn clip_grad_norm(
    opt: &Sgd,
    grads: &mut [Option<Tensor>],
    max_norm: f64,
) -> candle::Result<f64> {
    let param_sq = grads
        .iter()
        .map(|g| match g {
            Some(g) => g
                .sqr()?
                .sum_all()?
                .to_dtype(candle::DType::F64)?
                .to_scalar::<f64>(),
            None => Ok(0.0),
        })
        .collect::<candle::Result<Vec<f64>>>()?;
    clip_with_sums(opt, grads, &param_sq, max_norm)
}

/// [`clip_grad_norm`] given each gradient's Σ g² (`param_sq`, by parameter).
fn clip_with_sums(
    opt: &Sgd,
    grads: &mut [Option<Tensor>],
    param_sq: &[f64],
    max_norm: f64,
) -> candle::Result<f64> {
    let sq: f64 = opt
        .params()
        .iter()
        .zip(param_sq)
        .map(|(p, s)| s * p.spec.grad_scale * p.spec.grad_scale)
        .sum();
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

fn collect_grads(
    opt: &Sgd,
    store: &candle::backprop::GradStore,
    acc: &mut [Option<Tensor>],
) -> candle::Result<()> {
    for (p, a) in opt.params().iter().zip(acc.iter_mut()) {
        if let Some(g) = store.get(p.var.as_tensor()) {
            *a = Some(match a.take() {
                None => g.clone(),
                Some(prev) => (prev + g)?,
            });
        }
    }
    Ok(())
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

fn scale_for(cfg: &RunConfig, count: usize) -> f64 {
    match cfg.loss.reduction {
        Reduction::Mean => 1.0 / count.max(1) as f64,
        Reduction::Sum => 1.0,
    }
}

/// Full batch: the gradient of the loss over all `n` examples, summed over chunks of
/// `batch_size` in index order (the sum of the chunks' gradients is the full gradient).
fn gd_grads(sess: &Session<'_>, n: usize, epoch: u64) -> anyhow::Result<StepGrads> {
    let cfg = sess.cfg;
    let scale = scale_for(cfg, n);
    let mut acc: Vec<Option<Tensor>> = vec![None; sess.optimizer.params().len()];
    let (mut loss_total, mut hits, mut has_acc) = (0f64, 0u64, false);
    let bs = cfg.data.batch_size.max(1);
    for start in (0..n).step_by(bs) {
        let idx: Vec<usize> = (start..(start + bs).min(n)).collect();
        let (xs, ys) = sess.train.batch(&idx, Some(epoch))?;
        let preds = sess.model.forward_t(&xs, true)?;
        let l = loss_sum(cfg.loss.kind, &preds, &ys)?;
        loss_total += l.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?;
        if let Some(c) = correct(&preds, &ys)? {
            hits += c;
            has_acc = true;
        }
        let grads = l.affine(scale, 0.0)?.backward()?;
        collect_grads(sess.optimizer, &grads, &mut acc)?;
    }
    Ok(StepGrads {
        grads: acc,
        loss_sum: loss_total,
        correct: has_acc.then_some(hits),
        count: n as u64,
    })
}

fn sgd_grads(sess: &Session<'_>, indices: &[usize], epoch: u64) -> anyhow::Result<StepGrads> {
    let cfg = sess.cfg;
    let (xs, ys) = sess.train.batch(indices, Some(epoch))?;
    let preds = sess.model.forward_t(&xs, true)?;
    let l = loss_sum(cfg.loss.kind, &preds, &ys)?;
    let loss_total = l.to_dtype(candle::DType::F64)?.to_scalar::<f64>()?;
    let hits = correct(&preds, &ys)?;
    let grads = l.affine(scale_for(cfg, indices.len()), 0.0)?.backward()?;
    let mut acc: Vec<Option<Tensor>> = vec![None; sess.optimizer.params().len()];
    collect_grads(sess.optimizer, &grads, &mut acc)?;
    Ok(StepGrads {
        grads: acc,
        loss_sum: loss_total,
        correct: hits,
        count: indices.len() as u64,
    })
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

/// The checkpoint directory `checkpoints/last` points to, if any.
pub fn last_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let last = run_dir.join(tau_records::CHECKPOINTS_DIR).join("last");
    if last.is_dir() {
        return Some(last);
    }
    // Where symbolic links are unavailable, `last` is a file holding the directory name.
    let name = std::fs::read_to_string(&last).ok()?;
    let dir = run_dir.join(tau_records::CHECKPOINTS_DIR).join(name.trim());
    dir.is_dir().then_some(dir)
}

/// Writes a checkpoint of the current step: model, optimizer state and [`TrainState`] into
/// a temporary directory that is renamed to `checkpoints/step-NNNNNNNN` when complete;
/// then `checkpoints/last` is pointed at it (a new link renamed over the old one) and older
/// checkpoints are removed.
fn checkpoint(
    sess: &Session<'_>,
    run_dir: &Path,
    state: &mut TrainState,
    metrics: &mut MetricsWriter,
) -> anyhow::Result<()> {
    metrics.sync()?;
    state.metrics_len = metrics.len();
    let dir = run_dir.join(tau_records::CHECKPOINTS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("step-{:08}", state.step);
    let final_dir = dir.join(&name);
    let tmp = dir.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    sess.store.save(&tmp)?;
    let opt_path = tmp.join("optimizer.safetensors");
    let opt_state = sess.optimizer.state();
    candle::safetensors::save(&opt_state, &opt_path)
        .with_context(|| format!("writing {}", opt_path.display()))?;
    write_json_atomic(&tmp.join("state.json"), state)?;
    for entry in std::fs::read_dir(&tmp)? {
        let p = entry?.path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("syncing {}", p.display()))?;
        }
    }
    sync_dir(&tmp);
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    sync_dir(&dir);
    point_last(&dir, &name)?;
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let fname = entry.file_name();
        let fname = fname.to_string_lossy();
        if fname.starts_with("step-") && fname != name {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

#[cfg(unix)]
fn point_last(dir: &Path, name: &str) -> anyhow::Result<()> {
    let tmp = dir.join(".last.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("last"))
        .with_context(|| format!("updating {}", dir.join("last").display()))?;
    sync_dir(dir);
    Ok(())
}

#[cfg(not(unix))]
fn point_last(dir: &Path, name: &str) -> anyhow::Result<()> {
    Ok(write_atomic(&dir.join("last"), name.as_bytes())?)
}

/// Reads the optimizer state and the [`TrainState`] of a checkpoint into `optimizer`.
///
/// # Errors
/// Missing or corrupt files, or optimizer state that does not fit the model.
pub fn load_checkpoint_state(ckpt: &Path, optimizer: &mut Sgd) -> anyhow::Result<TrainState> {
    let state_path = ckpt.join("state.json");
    let text = std::fs::read_to_string(&state_path)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let state: TrainState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", state_path.display()))?;
    let opt_path = ckpt.join("optimizer.safetensors");
    let device = optimizer
        .params()
        .first()
        .map(|p| p.var.device().clone())
        .unwrap_or(candle::Device::Cpu);
    let tensors = candle::safetensors::load(&opt_path, &device)
        .with_context(|| format!("reading {}", opt_path.display()))?;
    optimizer
        .load_state(tensors)
        .with_context(|| format!("{}", opt_path.display()))?;
    Ok(state)
}

/// Writes `text` as the run's `config.toml`, atomically.
///
/// # Errors
/// I/O errors.
pub fn write_config(run_dir: &Path, text: &str) -> anyhow::Result<()> {
    Ok(write_atomic(
        &run_dir.join(tau_records::CONFIG_FILE),
        text.as_bytes(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WeightDecayMode;
    use crate::optim::{Param, ParamSpec, SgdConfig};
    use candle::{Device, Var};

    fn opt() -> Sgd {
        let var = |v: &[f64]| Var::from_slice(v, v.len(), &Device::Cpu).unwrap();
        let tau = ParamSpec {
            lr_mult: 0.1,
            grad_scale: 0.25,
            weight_decay: false,
        };
        Sgd::new(
            vec![
                Param {
                    name: "w".into(),
                    var: var(&[0.0, 0.0]),
                    spec: ParamSpec::WEIGHT,
                },
                Param {
                    name: "tau".into(),
                    var: var(&[0.0]),
                    spec: tau,
                },
            ],
            SgdConfig {
                momentum: 0.0,
                nesterov: false,
                weight_decay: 0.0,
                weight_decay_mode: WeightDecayMode::Coupled,
            },
        )
    }

    fn grads(w: [f64; 2], tau: f64) -> Vec<Option<Tensor>> {
        vec![
            Some(Tensor::new(&w, &Device::Cpu).unwrap()),
            Some(Tensor::new(&[tau], &Device::Cpu).unwrap()),
        ]
    }

    fn values(g: &[Option<Tensor>]) -> Vec<f64> {
        g.iter()
            .flat_map(|t| t.as_ref().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    }

    /// The norm is that of the gradients the optimizer applies (τ's ÷ 4 here):
    /// ‖(3, 0, 16/4)‖ = 5, so a limit of 1 scales every raw gradient by 1/(5 + 1e-6),
    /// and a limit above 5 leaves them as they are.
    #[test]
    fn clipping_scales_to_the_limit_like_pytorch() {
        let o = opt();
        let mut g = grads([3.0, 0.0], 16.0);
        let norm = clip_grad_norm(&o, &mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-12, "{norm}");
        let c = 1.0 / (5.0 + 1e-6);
        for (got, want) in values(&g).iter().zip([3.0 * c, 0.0, 16.0 * c]) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        let mut g = grads([3.0, 0.0], 16.0);
        clip_grad_norm(&o, &mut g, 6.0).unwrap();
        assert_eq!(values(&g), vec![3.0, 0.0, 16.0]);
    }

    /// Per-layer gradient norms group every family's parameters by block, the stem's and
    /// head's by module, and sum the squares within a group.
    #[test]
    fn gradient_norms_group_by_layer() {
        for (name, layer) in [
            ("input.weight", "input"),
            ("blocks.7.weight", "blocks.7"),
            ("conv1.weight", "conv1"),
            ("bn1.bias", "bn1"),
            ("layer2.3.conv1.weight", "layer2.3"),
            ("layer2.3.bias1a", "layer2.3"),
            ("layer3.0.downsample.0.weight", "layer3.0"),
            ("fc.bias", "fc"),
            ("tau", "tau"),
        ] {
            assert_eq!(layer_of(name), layer, "{name}");
        }
        let names: Vec<String> = [
            "layer1.0.conv1.weight",
            "fc.weight",
            "layer1.0.bias1a",
            "tau",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let g = |v: &[f64]| Some(Tensor::new(v, &Device::Cpu).unwrap());
        let grads = vec![g(&[3.0, 0.0]), g(&[1.0]), g(&[4.0]), None];
        let n = grad_norms(&names, &grads).unwrap();
        let layers: Vec<(&str, f64)> = n.layers.iter().map(|l| (l.name.as_str(), l.norm)).collect();
        assert_eq!(layers, vec![("layer1.0", 5.0), ("fc", 1.0)]);
        assert_eq!(n.param_sq, vec![9.0, 1.0, 16.0, 0.0]);
        assert!((n.global - 26f64.sqrt()).abs() < 1e-12);
    }
}
