//! Memory estimates, so that work too large for the machine is refused (or, for
//! evaluation, done in smaller batches) with one message naming the settings that size it,
//! instead of aborting on a failed allocation or waking the kernel's OOM killer. The
//! estimates are of the CPU's memory: they size what runs on the CPU.

use tau_model::{ModelConfig, Norm};

use crate::config::{DataConfig, SourceKind};
use crate::error::bail;

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// The memory available to a new allocation, in bytes: `MemAvailable` of `/proc/meminfo`
/// on Linux; on macOS, which compresses and swaps memory before an allocation fails, the
/// physical memory (`sysctl hw.memsize`), so that only work larger than the machine is
/// refused there; `None` elsewhere or where it cannot be read.
pub fn available() -> Option<u64> {
    #[cfg(target_os = "macos")]
    {
        physical_memory()
    }
    #[cfg(not(target_os = "macos"))]
    {
        let text = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb.saturating_mul(1024))
    }
}

/// The physical memory (`sysctl hw.memsize`), in bytes.
#[cfg(target_os = "macos")]
fn physical_memory() -> Option<u64> {
    let mut bytes: u64 = 0;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: `hw.memsize` is a 64-bit integer, and `bytes` and `len` describe a buffer of
    // that size; no new value is passed.
    let rc = unsafe {
        libc::sysctlbyname(
            c"hw.memsize".as_ptr(),
            (&raw mut bytes).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && len == std::mem::size_of::<u64>()).then_some(bytes)
}

/// Refuses work that needs `needed` bytes when less is available: "`what` needs about
/// 12.3 GiB of memory, 4.0 GiB are available: lower `lower`".
///
/// # Errors
/// `needed` is more than the available memory.
pub fn check(needed: f64, what: &str, lower: &str) -> crate::Result<()> {
    let Some(avail) = available() else {
        return Ok(());
    };
    if needed <= avail as f64 {
        return Ok(());
    }
    bail!(
        "{what} needs about {:.1} GiB of memory, {:.1} GiB are available: lower {lower}",
        needed / GIB,
        avail as f64 / GIB
    )
}

/// f32 feature maps of one input that the forward pass of a ResNet keeps for the
/// backward pass, in values: `(maps, channels, stride)` per stem and per block, each map
/// of `channels` × ⌈height/stride⌉ × ⌈width/stride⌉.
pub(crate) fn kept_maps(cfg: &ModelConfig) -> Vec<(usize, usize, usize)> {
    let stages = cfg.stage_blocks();
    match cfg {
        ModelConfig::Theory(_) => Vec::new(),
        // The stem's convolution and its normalized (or ReLU'd) output at 16 channels;
        // per basic block, two convolutions with their normalized outputs and the
        // residual end (τ·branch, the sum, its ReLU), at 16, 32 and 64 channels.
        ModelConfig::CifarResnet(_) => {
            let mut maps = vec![(2, 16, 1)];
            for (k, &blocks) in stages.iter().enumerate() {
                maps.extend(std::iter::repeat_n((7, 16 << k, 1 << k), blocks));
            }
            maps
        }
        // The stem's convolution, BatchNorm and ReLU at half size and its max-pool at a
        // quarter; per bottleneck block of `p` planes, two convolutions with their
        // normalized outputs at `p` channels, and four maps at 4p: the last convolution,
        // its normalization, the residual sum and the block's output (or the projection
        // shortcut's).
        ModelConfig::BottleneckResnet(_) => {
            let mut maps = vec![(3, 64, 2), (1, 64, 4)];
            for (k, &blocks) in stages.iter().enumerate() {
                let (planes, stride) = (64 << k, 4 << k);
                for _ in 0..blocks {
                    maps.extend([(4, planes, stride), (4, 4 * planes, stride)]);
                }
            }
            maps
        }
    }
}

/// The memory a forward and backward pass of the ResNet `cfg` on `n` images of `height` ×
/// `width` needs, about, in bytes: the f32 weights and their gradients, the inputs (16
/// bytes a value: a probe draws them in f64, then makes an f32 tensor and a scaled copy; a
/// training batch is gathered and moved), and the f32 feature maps the forward pass keeps
/// for the backward pass. In f64, so that absurd sizes cannot overflow.
pub fn resnet(cfg: &ModelConfig, n: usize, (height, width): (usize, usize)) -> f64 {
    let input = cfg.in_channels().unwrap_or(1) as f64 * height as f64 * width as f64;
    8.0 * cfg.num_parameters() as f64
        + n as f64 * (16.0 * input + 4.0 * kept_values(cfg, (height, width)))
}

/// Per [`kept_maps`] entry, how many maps and the values of each, on `height` × `width`
/// inputs.
fn map_values(cfg: &ModelConfig, (height, width): (usize, usize)) -> Vec<(f64, f64)> {
    let (h, w) = (height as f64, width as f64);
    kept_maps(cfg)
        .into_iter()
        .map(|(maps, channels, stride)| {
            let s = stride as f64;
            (
                maps as f64,
                channels as f64 * (h / s).ceil() * (w / s).ceil(),
            )
        })
        .collect()
}

/// The values of the feature maps one input keeps for the backward pass ([`kept_maps`]).
fn kept_values(cfg: &ModelConfig, hw: (usize, usize)) -> f64 {
    map_values(cfg, hw).into_iter().map(|(m, v)| m * v).sum()
}

/// The memory a training (or evaluation) step of `model` on a batch of `batch` examples
/// of shape `input` needs, about, in bytes, calibrated against the peak resident memory of
/// `tau-resnet train` (see the tests).
///
/// The theory network: the f32 weights with their gradients, and per block and input the
/// f32 state, its pre-activation and the gradient flowing back (a momentum buffer, or the
/// gradient summed over several batches, adds 4 bytes a weight). The ResNets: the f32
/// weights with their gradients, the batch's inputs, and the feature maps the forward
/// pass keeps for the backward pass: [`resnet`]'s maps (a probe's, which runs the
/// per-layer ops) times 0.71 with BatchNorm and 0.56 without, as the fused blocks keep
/// fewer.
pub fn step(model: &ModelConfig, batch: usize, input: &[usize]) -> f64 {
    let weights = 8.0 * model.num_parameters() as f64;
    let n = batch as f64;
    match (model, input) {
        (ModelConfig::Theory(t), _) => weights + 12.0 * n * t.width as f64 * (t.depth + 2) as f64,
        (_, [c, h, w]) => {
            let kept = if batch_norm(model) { 0.71 } else { 0.56 };
            weights + n * (16.0 * (c * h * w) as f64 + kept * 4.0 * kept_values(model, (*h, *w)))
        }
        _ => weights,
    }
}

/// Whether the ResNet `model` has BatchNorm layers.
fn batch_norm(model: &ModelConfig) -> bool {
    match model {
        ModelConfig::CifarResnet(c) => c.norm != Norm::None,
        ModelConfig::BottleneckResnet(c) => c.norm != Norm::None,
        ModelConfig::Theory(_) => false,
    }
}

/// The memory an evaluation forward pass of `model` on a batch of `batch` examples of
/// shape `input` needs, about, in bytes, on [`tau_model::Model::inference`] (no autograd
/// graph, so only the maps in flight live): the f32 weights, the batch's inputs and for
/// a ResNet six of its largest feature maps per example, for the theory network six
/// states. Measured: `tau-resnet eval` of a ResNet-56 with BN on MNIST grows by 273 KB an
/// example (batch 128 → 1024).
pub fn inference(model: &ModelConfig, batch: usize, input: &[usize]) -> f64 {
    let weights = 4.0 * model.num_parameters() as f64;
    let n = batch as f64;
    match (model, input) {
        (ModelConfig::Theory(t), _) => weights + 24.0 * n * t.width as f64,
        (_, [c, h, w]) => {
            let largest = map_values(model, (*h, *w))
                .into_iter()
                .map(|(_, values)| values)
                .fold(0f64, f64::max);
            weights + n * (16.0 * (c * h * w) as f64 + 24.0 * largest)
        }
        _ => weights,
    }
}

/// The largest batch, at most `wanted`, whose memory `need(batch)` (an estimate linear in
/// the batch, as [`step`] and [`inference`]) fits in `avail` bytes; 0 when not even one
/// example fits.
pub fn fitting_batch(need: impl Fn(usize) -> f64, wanted: usize, avail: u64) -> usize {
    let fixed = need(0);
    let per = need(1) - fixed;
    if per <= 0.0 {
        return wanted;
    }
    let fit = ((avail as f64 - fixed) / per).floor();
    if fit < 1.0 {
        0
    } else {
        fit.min(wanted as f64) as usize
    }
}

/// The memory the synthetic data set of `data` takes while it is drawn and moved into
/// tensors, about, in bytes (0 for other sources): f64 inputs and targets, their f32
/// tensors, for the training and test points.
pub fn synthetic(data: &DataConfig) -> f64 {
    if data.source != SourceKind::Synthetic {
        return 0.0;
    }
    let (n, p, d) = (
        data.n.unwrap_or(0) as f64,
        data.p.unwrap_or(0) as f64,
        data.d.unwrap_or(0) as f64,
    );
    12.0 * (n + data.n_test as f64) * (p + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(json: &str) -> ModelConfig {
        serde_json::from_str(json).unwrap()
    }

    const GIB: f64 = (1u64 << 30) as f64;

    /// The estimate against the peak resident memory of `tau-resnet probe --seeds 1`
    /// (measured: ResNet-20 at 256², 8 inputs: 1.0 GiB, 16: 1.9 GiB; ResNet-50 at 224²,
    /// 8 inputs: 1.2 GiB, 16: 2.1 GiB): the right size, and linear in the inputs.
    #[test]
    fn memory_estimate_is_near_the_measured_peak() {
        let r20 = model(r#"{"family": "cifar_resnet", "depth": 20}"#);
        let r50 = model(r#"{"family": "bottleneck_resnet", "depth": 50}"#);
        for (cfg, image, n, measured) in [
            (&r20, 256, 8, 1.0),
            (&r20, 256, 16, 1.9),
            (&r50, 224, 8, 1.2),
            (&r50, 224, 16, 2.1),
        ] {
            let est = resnet(cfg, n, (image, image)) / GIB;
            assert!(
                (0.7 * measured..1.5 * measured).contains(&est),
                "{} at {image}², {n} inputs: {est:.2} GiB",
                cfg.family()
            );
        }
        // The defaults are small: ResNet-1202 at 32², 8 inputs.
        let r1202 = model(r#"{"family": "cifar_resnet", "depth": 1202}"#);
        assert!(resnet(&r1202, 8, (32, 32)) < 4.0 * GIB);
    }

    /// The side that aborted the probe (`probe.image_size=100000`: 1.9 TB for the inputs
    /// alone) is far beyond any machine, and the largest side does not overflow.
    #[test]
    fn absurd_image_sizes_have_finite_huge_estimates() {
        let r8 = model(r#"{"family": "cifar_resnet", "depth": 8}"#);
        assert!(resnet(&r8, 8, (100_000, 100_000)) > 10_000.0 * GIB);
        let huge = resnet(&r8, 1 << 20, (usize::MAX, usize::MAX));
        assert!(huge.is_finite() && huge > 1e40, "{huge}");
    }

    #[test]
    fn the_fitting_batch_is_the_largest_that_fits() {
        let r110 = model(r#"{"family": "cifar_resnet", "depth": 110}"#);
        let input = [3, 32, 32];
        let gib = |g: f64| (g * GIB) as u64;
        let need = |b| step(&r110, b, &input);
        let b = fitting_batch(need, 100_000, gib(8.0));
        assert!(b > 100 && b < 100_000, "{b}");
        assert!(need(b) <= 8.0 * GIB);
        assert!(need(b + 1) > 8.0 * GIB);
        // Enough memory: what was asked for; none: nothing.
        assert_eq!(fitting_batch(need, 256, gib(1000.0)), 256);
        assert_eq!(fitting_batch(need, 256, 1000), 0);
        // Evaluation needs far less a batch.
        assert!(fitting_batch(|b| inference(&r110, b, &input), 100_000, gib(8.0)) > 10 * b);
    }

    /// The estimate against the peak resident memory of `tau-resnet train` for 2 steps
    /// (MNIST, 28×28, `configs/mnist-resnet20-nobn.toml` with `--set model.depth=… --set
    /// model.norm=… --set data.batch_size=… --set data.test_subset='{first_n = 1}'`, so
    /// that the final evaluation does not set the peak; `configs/theory-gd.toml` with
    /// `--set model.depth=256 --set data.n=…`), as the growth per example between two batch
    /// sizes (which leaves out the process, the data set and the weights): ResNet-20 without
    /// BN 1.20 MB, with BN 1.50 MB; ResNet-56 without BN 2.90 MB, with BN 3.72 MB (batch 128
    /// → 512); the theory network (width 512, L = 256) 1.59 MB (32 → 2048 points), and 0.60
    /// GB at 32 points, the weights and their gradients.
    #[test]
    fn a_training_step_is_near_the_measured_peak() {
        let mb = 1e6;
        for (json, measured) in [
            (
                r#"{"family": "cifar_resnet", "depth": 20, "norm": "none", "in_channels": 1}"#,
                1.20,
            ),
            (
                r#"{"family": "cifar_resnet", "depth": 20, "in_channels": 1}"#,
                1.50,
            ),
            (
                r#"{"family": "cifar_resnet", "depth": 56, "norm": "none", "in_channels": 1}"#,
                2.90,
            ),
            (
                r#"{"family": "cifar_resnet", "depth": 56, "in_channels": 1}"#,
                3.72,
            ),
        ] {
            let cfg = model(json);
            let per = step(&cfg, 1, &[1, 28, 28]) - step(&cfg, 0, &[1, 28, 28]);
            assert!(
                (0.8 * measured..1.25 * measured).contains(&(per / mb)),
                "{json}: {:.2} MB per example, measured {measured}",
                per / mb
            );
        }
        let t = model(
            r#"{"family": "theory", "input_dim": 16, "width": 512, "depth": 256, "output_dim": 1}"#,
        );
        let per = step(&t, 1, &[16]) - step(&t, 0, &[16]);
        assert!((0.8 * 1.59..1.25 * 1.59).contains(&(per / mb)), "{per}");
        let at_32 = step(&t, 32, &[16]) / 1e9;
        assert!((0.8 * 0.60..1.25 * 0.60).contains(&at_32), "{at_32} GB");
    }

    /// See [`inference`]: a ResNet-56 with BN on 28×28 MNIST, 273 KB an example measured.
    #[test]
    fn an_evaluation_is_near_the_measured_growth() {
        let r56 = model(r#"{"family": "cifar_resnet", "depth": 56, "in_channels": 1}"#);
        let per = inference(&r56, 1, &[1, 28, 28]) - inference(&r56, 0, &[1, 28, 28]);
        assert!((0.8 * 273e3..1.25 * 273e3).contains(&per), "{per}");
    }
}
