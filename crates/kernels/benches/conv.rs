//! Criterion benchmarks of the CPU convolution: one layer's forward + backward at the
//! CIFAR ResNet-20 shapes (batch 128), and a whole training step of a no-BN ResNet-20, each
//! with this crate's CPU convolution (labelled `gemm`: the direct 3×3 kernels where they
//! apply, im2col + GEMM elsewhere) and with stock candle's `conv2d` for comparison.
//!
//! `cargo bench -p tau-kernels --bench conv`; add `-- gemm` to skip the slow candle
//! baseline. `TAU_KERNELS=portable` (or `avx2`) measures what a CPU without AVX-512 runs.

use candle::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{Optimizer, SGD};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tau_kernels::conv2d;
use tau_kernels::select::{Kernels, kernels, set_kernels};

const BATCH: usize = 128;

/// This crate's kernels as selected (`TAU_KERNELS`, else the best of the CPU) and
/// candle's.
fn backends() -> [(&'static str, Kernels); 2] {
    static OURS: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    [
        ("gemm", *OURS.get_or_init(kernels)),
        ("candle", Kernels::Candle),
    ]
}

fn he(c_out: usize, c_in: usize, k: usize) -> Var {
    let std = (2.0 / (c_in * k * k) as f64).sqrt();
    Var::randn(0f32, std as f32, (c_out, c_in, k, k), &Device::Cpu).expect("randn")
}

/// One convolution layer, forward and backward (gradients of input and weight).
fn conv_layer(c: &mut Criterion) {
    // The allocator policy `tau-resnet` runs with, so that page faults do not dominate.
    tau_kernels::alloc::tune_allocator();
    // (name, c_in, c_out, spatial size of the input, stride)
    let layers = [
        ("stem_3to16_32x32", 3, 16, 32, 1),
        ("stage1_16to16_32x32", 16, 16, 32, 1),
        ("stage2_16to32_32x32_s2", 16, 32, 32, 2),
        ("stage2_32to32_16x16", 32, 32, 16, 1),
        ("stage3_32to64_16x16_s2", 32, 64, 16, 2),
        ("stage3_64to64_8x8", 64, 64, 8, 1),
    ];
    let mut group = c.benchmark_group("conv_fwd_bwd");
    group.sample_size(10);
    for (name, c_in, c_out, hw, stride) in layers {
        let xs = Var::randn(0f32, 1f32, (BATCH, c_in, hw, hw), &Device::Cpu).expect("randn");
        let w = he(c_out, c_in, 3);
        let hw_out = (hw + 2 - 3) / stride + 1;
        // forward + input gradient + weight gradient: 3 GEMMs of 2·m·n·k flops.
        let flops = 3 * 2 * BATCH * c_out * hw_out * hw_out * c_in * 9;
        group.throughput(Throughput::Elements(flops as u64));
        for (backend_name, backend) in backends() {
            group.bench_function(BenchmarkId::new(backend_name, name), |b| {
                set_kernels(backend).expect("kernels");
                b.iter(|| {
                    let ys = conv2d(xs.as_tensor(), w.as_tensor(), stride, 1).expect("conv");
                    ys.sum_all().expect("sum").backward().expect("backward")
                });
                set_kernels(backends()[0].1).expect("kernels");
            });
        }
    }
    group.finish();
}

/// A no-BN CIFAR ResNet-20 (Fixup-style, without the scalar biases) built from [`conv2d`]
/// and candle ops, standing in for a full training step.
struct ResNet20 {
    stem: Var,
    blocks: Vec<(Var, Var, usize)>,
    fc_w: Var,
    fc_b: Var,
    tau: f64,
}

impl ResNet20 {
    fn new() -> Self {
        let mut blocks = Vec::new();
        let mut c_in = 16;
        for (s, c_out) in [16, 32, 64].into_iter().enumerate() {
            for b in 0..3 {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                blocks.push((he(c_out, c_in, 3), he(c_out, c_out, 3), stride));
                c_in = c_out;
            }
        }
        Self {
            stem: he(16, 3, 3),
            blocks,
            fc_w: Var::zeros((10, 64), DType::F32, &Device::Cpu).expect("zeros"),
            fc_b: Var::zeros(10, DType::F32, &Device::Cpu).expect("zeros"),
            tau: 1.0 / 9f64.sqrt(),
        }
    }

    fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.stem.clone(), self.fc_w.clone(), self.fc_b.clone()];
        for (a, b, _) in &self.blocks {
            v.push(a.clone());
            v.push(b.clone());
        }
        v
    }

    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        let mut h = conv2d(xs, self.stem.as_tensor(), 1, 1)?.relu()?;
        for (w1, w2, stride) in &self.blocks {
            let out = conv2d(&h, w1.as_tensor(), *stride, 1)?.relu()?;
            let out = (conv2d(&out, w2.as_tensor(), 1, 1)? * self.tau)?;
            let shortcut = if *stride == 2 {
                // option A: subsample by 2, zero-pad the channels
                let (n, c, hh, ww) = h.dims4()?;
                let sub = h
                    .reshape((n, c, hh / 2, 2, ww / 2, 2))?
                    .i((.., .., .., 0, .., 0))?
                    .contiguous()?;
                sub.pad_with_zeros(1, c / 2, c / 2)?
            } else {
                h
            };
            h = (out + shortcut)?.relu()?;
        }
        let pooled = h.mean((2, 3))?;
        pooled.matmul(&self.fc_w.t()?)?.broadcast_add(&self.fc_b)
    }
}

/// Forward, backward and SGD update of the stand-in ResNet-20 at batch 128.
fn train_step(c: &mut Criterion) {
    tau_kernels::alloc::tune_allocator();
    let xs = Tensor::randn(0f32, 1f32, (BATCH, 3, 32, 32), &Device::Cpu).expect("randn");
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    let labels = Tensor::new(labels, &Device::Cpu).expect("labels");
    let mut group = c.benchmark_group("resnet20_nobn_train_step");
    group.sample_size(10);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (backend_name, backend) in backends() {
        let model = ResNet20::new();
        let mut opt = SGD::new(model.vars(), 0.01).expect("sgd");
        group.bench_function(backend_name, |b| {
            set_kernels(backend).expect("kernels");
            b.iter(|| {
                let logits = model.forward(&xs).expect("forward");
                let loss = candle_nn::loss::cross_entropy(&logits, &labels).expect("loss");
                opt.backward_step(&loss).expect("step");
                loss
            });
            set_kernels(backends()[0].1).expect("kernels");
        });
    }
    group.finish();
}

criterion_group!(benches, conv_layer, train_step);
criterion_main!(benches);
