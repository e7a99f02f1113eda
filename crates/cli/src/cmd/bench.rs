//! `tau-resnet bench`: training-step throughput (images/s and GFLOP/s) of the CIFAR
//! ResNets, with and without BatchNorm, and of the theory network, on random data, on the
//! CPU (default) or on a GPU (`--device cuda`).
//!
//! A step is forward, cross-entropy (squared loss for the theory network), backward and a
//! plain SGD update of every trained tensor with the trainer's optimizer. Each point runs
//! `--warmup` untimed steps, then `--steps` timed ones, and reports the median.

use crate::cmd::outln;
use std::time::Instant;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;
use tau_kernels::select::{KernelSet, Kernels, set_kernels};
use tau_model::{
    BottleneckResNetConfig, CifarResNetConfig, Model, ModelConfig, Norm, TheoryConfig, init_varmap,
};

use super::Outcome;
use tau_train::config::{DeviceSpec, WeightDecayMode};
use tau_train::optim::{Param, ParamSpec, Sgd, SgdConfig};

/// Normalization of a benchmarked CIFAR ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchNorm {
    /// BatchNorm after every convolution.
    Bn,
    /// No normalization (scalar biases, learnable τ).
    None,
}

/// The CPU convolution to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchConv {
    /// im2col + GEMM forward and backward (the default).
    Gemm,
    /// Stock candle `conv2d` and its autograd (the baseline).
    Candle,
}

/// The kernels a bench runs: `--conv` and `--unfused` when given, else what `TAU_KERNELS`
/// names when that is the stock-candle baseline (`candle`, `conv-only`), else the fused
/// ops of `set`.
fn bench_kernels(
    conv: Option<BenchConv>,
    unfused: bool,
    from_env: Option<Kernels>,
    set: KernelSet,
) -> Kernels {
    match (conv, unfused, from_env) {
        (Some(BenchConv::Candle), _, _) => Kernels::Candle,
        (_, true, _) => Kernels::ConvOnly,
        (None, false, Some(k @ (Kernels::Candle | Kernels::ConvOnly))) => k,
        (_, false, _) => Kernels::Fused(set),
    }
}

/// Arguments of `tau-resnet bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// CIFAR ResNet depths (6n+2) to benchmark.
    #[arg(long, value_delimiter = ',', default_value = "20,56,110")]
    pub depths: Vec<usize>,
    /// Skip the CIFAR ResNets (benchmark only the theory network).
    #[arg(long)]
    pub skip_resnets: bool,
    /// Normalizations to benchmark for each depth.
    #[arg(long, value_delimiter = ',', default_value = "none,bn")]
    pub norms: Vec<BenchNorm>,
    /// Batch size of the CIFAR ResNets (3×32×32 inputs).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Bottleneck (ImageNet) ResNet depths to benchmark (50, 101, 152), with each of
    /// `--norms`; none by default.
    #[arg(long, value_delimiter = ',')]
    pub bottleneck_depths: Vec<usize>,
    /// Batch size of the bottleneck ResNets.
    #[arg(long, default_value_t = 8)]
    pub bottleneck_batch: usize,
    /// Height and width of the bottleneck ResNets' inputs (3×S×S, 1000 classes).
    #[arg(long, default_value_t = 224)]
    pub bottleneck_size: usize,
    /// Depths L of the theory network (`0` skips it). Its step is full-batch gradient
    /// descent as `configs/theory-gd.toml` trains it (claim 3): input dimension 16, only
    /// the W_l trained, the squared loss averaged over the inputs.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    pub theory_depth: Vec<usize>,
    /// Width m of the theory network.
    #[arg(long, default_value_t = 512)]
    pub theory_width: usize,
    /// Number of inputs (the full batch) of the theory network.
    #[arg(long, default_value_t = 32)]
    pub theory_inputs: usize,
    /// Also time each ResNet's forward pass in evaluation mode (phase `eval`: BatchNorm
    /// with its running statistics), as `tau-resnet eval` and a run's test-set evaluation
    /// compute it.
    #[arg(long)]
    pub eval: bool,
    /// Timed steps per point (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// CPU convolution implementation [default: gemm, or candle when `TAU_KERNELS=candle`
    /// (and gemm with `--unfused` when `TAU_KERNELS=conv-only`)].
    #[arg(long, value_enum)]
    pub conv: Option<BenchConv>,
    /// With `--conv gemm`, run BatchNorm and the other layers as candle-nn's composed ops
    /// instead of the fused CPU ops (`--conv candle` always does).
    #[arg(long)]
    pub unfused: bool,
    /// The instruction set of the CPU kernels (`auto`: the best this CPU runs, or what
    /// `TAU_KERNELS` names); `portable` or `avx2` measure what a smaller CPU runs.
    #[arg(long, default_value = "auto")]
    pub kernels: String,
    /// Threads of candle's own pool for its elementwise ops (the `CANDLE_NUM_THREADS`
    /// environment variable, when set, wins). 1 runs them on the calling thread: candle's
    /// spin-waiting workers otherwise compete with rayon's for the cores.
    #[arg(long, default_value_t = 1)]
    pub candle_threads: usize,
    /// Print one JSON object per point instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where to run: cpu, cuda, cuda:N or metal. Off the CPU candle's own kernels run,
    /// except that a `cudnn` build runs convolutions and BatchNorm through cuDNN on CUDA
    /// (`--conv candle` turns that off; `--unfused` and `--kernels` choose CPU kernels
    /// only), and every timed step ends with a synchronization of the device, so that it
    /// is timed whole.
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

/// One measured point.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRecord {
    /// `cifar_resnet`, `bottleneck_resnet` or `theory`.
    pub model: String,
    /// Depth: 6n+2 for the CIFAR ResNets, 50/101/152 for the bottleneck ResNets, L for the
    /// theory network.
    pub depth: usize,
    /// `bn` or `none` (the theory network has no normalization).
    pub norm: String,
    /// What one timed iteration does: `train_step` (and `eval`, the forward pass in
    /// evaluation mode, with `--eval`), or for the theory network `forward` and `gd_step`.
    pub phase: String,
    /// Images (inputs) per step.
    pub batch: usize,
    /// `gemm`, `gemm-unfused` or `candle`.
    pub conv: String,
    /// The kernels that ran (`avx512`, `avx2`, `portable`, `conv-only` or `candle`; off the
    /// CPU the device: `cuda`, `cudnn` (cuDNN convolutions and BatchNorm) or `metal`).
    pub kernels: String,
    /// Median seconds per step.
    pub median_s: f64,
    /// Fastest step, seconds.
    pub min_s: f64,
    /// batch / median_s.
    pub images_per_s: f64,
    /// Arithmetic of one step counted from the layer shapes (convolutions and matrix
    /// products; a backward pass counted as twice the forward), GFLOP.
    pub gflop: f64,
    /// gflop / median_s.
    pub gflop_per_s: f64,
    /// Timed steps.
    pub steps: usize,
}

/// Runs `tau-resnet bench`.
///
/// # Errors
/// An impossible setting (a depth that is not 6n+2, zero steps or batch), or a failure
/// inside a step.
pub fn run(args: BenchArgs) -> anyhow::Result<Outcome> {
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    if args.batch == 0 || args.theory_inputs == 0 || args.bottleneck_batch == 0 {
        anyhow::bail!("--batch, --bottleneck-batch and --theory-inputs must be at least 1");
    }
    if args.bottleneck_size == 0 {
        anyhow::bail!("--bottleneck-size must be at least 1");
    }
    for &d in &args.bottleneck_depths {
        if ![50, 101, 152].contains(&d) {
            anyhow::bail!(
                "--bottleneck-depths: a bottleneck ResNet depth is 50, 101 or 152, got {d}"
            );
        }
    }
    for &d in &args.depths {
        if d < 8 || (d - 2) % 6 != 0 {
            anyhow::bail!("--depths: a CIFAR ResNet depth is 6n+2 (20, 56, 110, ...), got {d}");
        }
    }
    let auto = args.kernels.trim().eq_ignore_ascii_case("auto");
    let from_env = if auto {
        tau_kernels::select::kernels_from_env()?
    } else {
        None
    };
    let set: KernelSet = if auto {
        from_env.map_or_else(KernelSet::detected, Kernels::set)
    } else {
        args.kernels.parse()?
    };
    let kernels = bench_kernels(args.conv, args.unfused, from_env, set);
    set_kernels(kernels).context("--kernels")?;
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: nothing else runs yet (candle reads the variable when it first starts its
        // pool, on the first elementwise op below); no other thread reads the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", args.candle_threads.to_string()) };
    }
    let device = args.device.device()?;
    let conv = match kernels {
        Kernels::Fused(_) => "gemm".to_string(),
        Kernels::ConvOnly => "gemm-unfused".to_string(),
        Kernels::Candle => "candle".to_string(),
    };
    if !args.json {
        outln!(
            "{:<17} {:>5} {:>5} {:>10} {:>6} {:>9} {:>10} {:>9} {:>9}",
            "model",
            "depth",
            "norm",
            "phase",
            "batch",
            "kernels",
            "median s",
            "images/s",
            "GFLOP/s"
        )?;
    }
    let report = |r: &BenchRecord| -> anyhow::Result<()> {
        if args.json {
            outln!("{}", serde_json::to_string(r)?)?;
        } else {
            outln!(
                "{:<17} {:>5} {:>5} {:>10} {:>6} {:>9} {:>10.4} {:>9.1} {:>9.1}",
                r.model,
                r.depth,
                r.norm,
                r.phase,
                r.batch,
                r.kernels,
                r.median_s,
                r.images_per_s,
                r.gflop_per_s
            )?;
        }
        Ok(())
    };
    let depths: &[usize] = if args.skip_resnets { &[] } else { &args.depths };
    for &depth in depths {
        for &norm in &args.norms {
            for r in bench_cifar(depth, norm, &args, &conv, &device)
                .with_context(|| format!("benchmarking CIFAR ResNet-{depth} ({norm:?})"))?
            {
                report(&r)?;
            }
        }
    }
    for &depth in &args.bottleneck_depths {
        for &norm in &args.norms {
            for r in bench_bottleneck(depth, norm, &args, &conv, &device)
                .with_context(|| format!("benchmarking bottleneck ResNet-{depth} ({norm:?})"))?
            {
                report(&r)?;
            }
        }
    }
    for &depth in args.theory_depth.iter().filter(|&&d| d > 0) {
        for r in bench_theory(depth, &args, &conv, &device)
            .with_context(|| format!("benchmarking the theory network at L = {depth}"))?
        {
            report(&r)?;
        }
    }
    Ok(Outcome::Finished)
}

/// The kernels a record names: the CPU's selection, or the GPU's kind (candle's kernels).
fn kernels_label(device: &Device) -> String {
    match device.location() {
        candle::DeviceLocation::Cpu => tau_kernels::select::kernels().to_string(),
        candle::DeviceLocation::Cuda { .. }
            if cfg!(feature = "cudnn") && tau_kernels::select::kernels().own_conv() =>
        {
            "cudnn".into()
        }
        candle::DeviceLocation::Cuda { .. } => "cuda".into(),
        candle::DeviceLocation::Metal { .. } => "metal".into(),
    }
}

/// Median and minimum of `steps` timings of `f`, after `warmup` untimed calls.
fn time_steps(
    warmup: usize,
    steps: usize,
    mut f: impl FnMut() -> candle::Result<()>,
) -> anyhow::Result<(f64, f64)> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

/// Forward FLOPs of one 32×32 image through a CIFAR ResNet of `depth`: its convolutions
/// and the linear head.
fn cifar_forward_flops(depth: usize, num_classes: usize) -> f64 {
    let n = (depth - 2) / 6;
    let conv = |c_in: usize, c_out: usize, hw_out: usize| {
        2.0 * (c_in * 9 * c_out * hw_out * hw_out) as f64
    };
    let mut flops = conv(3, 16, 32);
    let mut c_in = 16;
    for (s, c_out) in [16usize, 32, 64].into_iter().enumerate() {
        let hw = 32 >> s;
        for b in 0..n {
            flops += conv(if b == 0 { c_in } else { c_out }, c_out, hw);
            flops += conv(c_out, c_out, hw);
        }
        c_in = c_out;
    }
    flops + 2.0 * (64 * num_classes) as f64
}

fn model_norm(norm: BenchNorm) -> Norm {
    match norm {
        BenchNorm::Bn => Norm::BatchNorm,
        BenchNorm::None => Norm::None,
    }
}

fn bench_cifar(
    depth: usize,
    norm: BenchNorm,
    args: &BenchArgs,
    conv: &str,
    device: &Device,
) -> anyhow::Result<Vec<BenchRecord>> {
    let cfg = CifarResNetConfig {
        depth,
        norm: model_norm(norm),
        learnable_tau: norm == BenchNorm::None,
        ..CifarResNetConfig::default()
    };
    let step = TrainStep {
        depth,
        norm,
        batch: args.batch,
        size: 32,
        num_classes: cfg.num_classes,
        forward_flops: cifar_forward_flops(depth, cfg.num_classes),
        cfg: ModelConfig::CifarResnet(cfg),
    };
    step.bench(args, conv, device)
}

fn bench_bottleneck(
    depth: usize,
    norm: BenchNorm,
    args: &BenchArgs,
    conv: &str,
    device: &Device,
) -> anyhow::Result<Vec<BenchRecord>> {
    let cfg = BottleneckResNetConfig {
        depth,
        norm: model_norm(norm),
        learnable_tau: norm == BenchNorm::None,
        ..BottleneckResNetConfig::default()
    };
    let step = TrainStep {
        depth,
        norm,
        batch: args.bottleneck_batch,
        size: args.bottleneck_size,
        num_classes: cfg.num_classes,
        forward_flops: bottleneck_forward_flops(depth, args.bottleneck_size, cfg.num_classes),
        cfg: ModelConfig::BottleneckResnet(cfg),
    };
    step.bench(args, conv, device)
}

/// One image-classifier training step to time: forward, cross-entropy, backward, SGD.
struct TrainStep {
    /// The model; its family names the record.
    cfg: ModelConfig,
    depth: usize,
    norm: BenchNorm,
    batch: usize,
    /// Input height and width (3 channels).
    size: usize,
    num_classes: usize,
    /// Forward FLOPs of one image.
    forward_flops: f64,
}

impl TrainStep {
    /// The training step's record, after the evaluation forward pass's with `args.eval`.
    fn bench(
        &self,
        args: &BenchArgs,
        conv: &str,
        device: &Device,
    ) -> anyhow::Result<Vec<BenchRecord>> {
        let cfg = &self.cfg;
        let varmap = init_varmap(cfg, 0, DType::F32, device)?;
        let model = Model::new(cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let mut opt = trainer_sgd(cfg, &varmap);
        let xs = Tensor::randn(0f32, 1f32, (self.batch, 3, self.size, self.size), device)?;
        let labels: Vec<u32> = (0..self.batch)
            .map(|i| (i % self.num_classes) as u32)
            .collect();
        let labels = Tensor::new(labels, device)?;
        let record = |phase: &str, gflop: f64, (median_s, min_s): (f64, f64)| BenchRecord {
            model: cfg.family().into(),
            depth: self.depth,
            norm: format!("{:?}", self.norm).to_lowercase(),
            phase: phase.into(),
            batch: self.batch,
            conv: conv.into(),
            kernels: kernels_label(device),
            median_s,
            min_s,
            images_per_s: self.batch as f64 / median_s,
            gflop,
            gflop_per_s: gflop / median_s,
            steps: args.steps,
        };
        let forward_gflop = self.forward_flops * self.batch as f64 / 1e9;
        let mut records = Vec::new();
        if args.eval {
            let times = time_steps(args.warmup, args.steps, || {
                model.forward_t(&xs, false)?;
                device.synchronize()
            })?;
            records.push(record("eval", forward_gflop, times));
        }
        let times = time_steps(args.warmup, args.steps, || {
            let logits = model.forward_t(&xs, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            sgd_step(&mut opt, &loss, 1e-3)?;
            device.synchronize()
        })?;
        records.push(record("train_step", 3.0 * forward_gflop, times));
        Ok(records)
    }
}

/// Forward FLOPs of one s×s image through a bottleneck ResNet of `depth` (torchvision v1.5
/// layout: 7×7/2 stem, 3×3/2 max pool, stride on each stage's first 3×3 convolution,
/// projection shortcut on each stage's first block): its convolutions and the linear head.
fn bottleneck_forward_flops(depth: usize, size: usize, num_classes: usize) -> f64 {
    let blocks: &[usize] = match depth {
        50 => &[3, 4, 6, 3],
        101 => &[3, 4, 23, 3],
        _ => &[3, 8, 36, 3],
    };
    let out = |h: usize, k: usize, s: usize, p: usize| (h + 2 * p - k) / s + 1;
    // 2·c_in·k²·c_out per output position
    let conv = |c_in: usize, c_out: usize, k: usize, h_out: usize| {
        2.0 * (c_in * k * k * c_out * h_out * h_out) as f64
    };
    let mut h = out(size, 7, 2, 3);
    let mut flops = conv(3, 64, 7, h);
    h = out(h, 3, 2, 1);
    let mut c_in = 64;
    for (stage, (&n, planes)) in blocks.iter().zip([64usize, 128, 256, 512]).enumerate() {
        for b in 0..n {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            let h_out = out(h, 3, stride, 1);
            flops += conv(c_in, planes, 1, h);
            flops += conv(planes, planes, 3, h_out);
            flops += conv(planes, 4 * planes, 1, h_out);
            if b == 0 {
                flops += conv(c_in, 4 * planes, 1, h_out);
            }
            c_in = 4 * planes;
            h = h_out;
        }
    }
    flops + 2.0 * (c_in * num_classes) as f64
}

fn bench_theory(
    depth: usize,
    args: &BenchArgs,
    conv: &str,
    device: &Device,
) -> anyhow::Result<Vec<BenchRecord>> {
    // configs/theory-gd.toml's network: p = 16, d = 1, τ = 1/√L, A and B frozen.
    let tcfg = TheoryConfig {
        input_dim: 16,
        depth,
        width: args.theory_width,
        ..TheoryConfig::default()
    };
    let (p, m, d, l, n) = (
        tcfg.input_dim,
        tcfg.width,
        tcfg.output_dim,
        tcfg.depth,
        args.theory_inputs,
    );
    let cfg = ModelConfig::Theory(tcfg);
    let varmap = init_varmap(&cfg, 0, DType::F32, device)?;
    let model = Model::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
    let mut opt = trainer_sgd(&cfg, &varmap);
    let xs = Tensor::randn(0f32, 1f32, (n, p), device)?;
    let ys = Tensor::randn(0f32, 1f32, (n, d), device)?;
    // Per input: A (m×p), L blocks of W (m×m), B (d×m), 2 flops per multiply-add.
    let forward_gflop = 2.0 * (m * p + l * m * m + d * m) as f64 * n as f64 / 1e9;
    let record = |phase: &str, gflop: f64, (median_s, min_s): (f64, f64)| BenchRecord {
        model: "theory".into(),
        depth: l,
        norm: "none".into(),
        phase: phase.into(),
        batch: n,
        conv: conv.into(),
        kernels: kernels_label(device),
        median_s,
        min_s,
        images_per_s: n as f64 / median_s,
        gflop,
        gflop_per_s: gflop / median_s,
        steps: args.steps,
    };
    let forward = time_steps(args.warmup, args.steps, || {
        model.forward_t(&xs, false)?;
        device.synchronize()
    })?;
    // The trainer's step: ½ Σ (y − y*)² / n, the model's own backward pass (as the
    // trainer runs it: `Model::loss_backward`), W_l −= lr · ∂.
    let loss = |preds: &Tensor| (preds - &ys)?.sqr()?.sum_all()?.affine(0.5 / n as f64, 0.0);
    let step = time_steps(args.warmup, args.steps, || {
        let grads = match model.loss_backward(&xs, loss)? {
            Some((_, _, grads)) => grads,
            None => loss(&model.forward_t(&xs, true)?)?.backward()?,
        };
        apply_grads(&mut opt, &grads, 0.02)?;
        device.synchronize()
    })?;
    Ok(vec![
        record("forward", forward_gflop, forward),
        record("gd_step", 3.0 * forward_gflop, step),
    ])
}

/// The trainer's optimizer (plain SGD, in place on the CPU) over the trainable tensors of
/// `varmap`, in name order.
fn trainer_sgd(cfg: &ModelConfig, varmap: &VarMap) -> Sgd {
    let params = tau_model::named_vars(varmap)
        .into_iter()
        .filter(|(name, _)| cfg.param_kind(name).is_trainable())
        .map(|(name, var)| Param {
            name,
            var,
            spec: ParamSpec::WEIGHT,
        })
        .collect();
    Sgd::new(
        params,
        SgdConfig {
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            weight_decay_mode: WeightDecayMode::Coupled,
        },
    )
}

/// Backward from `loss` and one step of `opt` at learning rate `lr`.
fn sgd_step(opt: &mut Sgd, loss: &Tensor, lr: f64) -> candle::Result<()> {
    apply_grads(opt, &loss.backward()?, lr)
}

/// One step of `opt` at learning rate `lr` with the gradients in `grads`.
fn apply_grads(opt: &mut Sgd, grads: &candle::backprop::GradStore, lr: f64) -> candle::Result<()> {
    let gs: Vec<Option<Tensor>> = opt
        .params()
        .iter()
        .map(|p| grads.get(p.var.as_tensor()).cloned())
        .collect();
    opt.step(&gs, lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_forward_flops_match_torchvision() {
        // torchvision's model card for resnet50 (IMAGENET1K_V1/V2): 4.09 GFLOPS, counted as
        // multiply-adds of the convolutions and the head at 224×224.
        let macs = bottleneck_forward_flops(50, 224, 1000) / 2.0;
        assert!((macs / 1e9 - 4.09).abs() < 0.005, "{macs}");
        // ResNet-101 and -152: 7.80 and 11.51.
        let macs = bottleneck_forward_flops(101, 224, 1000) / 2.0;
        assert!((macs / 1e9 - 7.80).abs() < 0.005, "{macs}");
        let macs = bottleneck_forward_flops(152, 224, 1000) / 2.0;
        assert!((macs / 1e9 - 11.51).abs() < 0.005, "{macs}");
    }

    #[test]
    fn resnet20_forward_flops_match_the_known_count() {
        // Σ c_in·9·c_out·H·W over the layers of ResNet-20 plus the 64×10 head:
        // 442 368 + 6·2 359 296 + (1 179 648 + 5·2 359 296)·2 + 640 = 40 551 040 multiply-adds.
        let f = cifar_forward_flops(20, 10);
        assert_eq!(f, 2.0 * 40_551_040.0);
    }

    #[test]
    fn the_flags_win_and_tau_kernels_names_the_baseline_otherwise() {
        let set = KernelSet::Portable;
        let (gemm, candle) = (Some(BenchConv::Gemm), Some(BenchConv::Candle));
        assert_eq!(bench_kernels(None, false, None, set), Kernels::Fused(set));
        assert_eq!(
            bench_kernels(None, false, Some(Kernels::Candle), set),
            Kernels::Candle
        );
        assert_eq!(
            bench_kernels(None, false, Some(Kernels::ConvOnly), set),
            Kernels::ConvOnly
        );
        assert_eq!(
            bench_kernels(None, false, Some(Kernels::Fused(set)), set),
            Kernels::Fused(set)
        );
        assert_eq!(
            bench_kernels(gemm, false, Some(Kernels::Candle), set),
            Kernels::Fused(set)
        );
        assert_eq!(
            bench_kernels(None, true, Some(Kernels::Candle), set),
            Kernels::ConvOnly
        );
        assert_eq!(bench_kernels(candle, false, None, set), Kernels::Candle);
        assert_eq!(bench_kernels(candle, true, None, set), Kernels::Candle);
    }
}
