"""PyTorch reference for `tau-resnet bench --device cuda`: the same training steps on the
same GPU, with cuDNN (cudnn.benchmark on) and TF32 off (f32 throughout, as candle runs).

One step is forward, cross-entropy, backward and a plain SGD update of every parameter on
random data, as `tau-resnet bench` times it; median and minimum of --steps steps after
--warmup untimed ones, each ended by torch.cuda.synchronize(). The networks are those of
tau-model (crates/model/src/resnet):

- CIFAR ResNet-(6n+2), 16/32/64 channels, option-A shortcut (stride-2 subsample, zero
  channels appended), tau = 1/sqrt(L) on the residual branch; with BatchNorm
  relu(tau * BN2(conv2(relu(BN1(conv1 x)))) + shortcut(x)), without it
  relu(tau * (conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b) + shortcut(x)) with scalar
  biases and a learnable tau (bench's `--norms none`);
- the bottleneck ResNet-50/101/152 of torchvision (v1.5: stride on the 3x3 convolution,
  projection shortcuts), tau on the last BatchNorm's output; without BatchNorm each
  convolution as conv(x + a) + b.

Output: one JSON object per point with the fields of `tau-resnet bench --json`
(model, depth, norm, phase, batch, conv = "pytorch", kernels = "cudnn" / "cpu", median_s,
min_s, images_per_s, gflop, gflop_per_s, steps), GFLOP counted the same way.

    python3 scripts/bench-gpu-torch.py --json                   # on the GPU machine
    python3 scripts/bench-gpu-torch.py --device cpu --depths 8 --batch 4 --steps 1 \\
        --bottleneck-depths 50 --bottleneck-batch 1 --bottleneck-size 64   # a smoke test
"""

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ScalarBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.b


def shortcut_a(x, stride, c_out):
    if stride == 2:
        x = x[:, :, ::2, ::2]
    c_in = x.shape[1]
    if c_out > c_in:
        x = F.pad(x, (0, 0, 0, 0, 0, c_out - c_in))
    return x


class CifarBlock(nn.Module):
    def __init__(self, c_in, c_out, stride, bn):
        super().__init__()
        self.stride, self.c_out, self.bn = stride, c_out, bn
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)
        else:
            self.b1a, self.b1b, self.b2a, self.b2b = (ScalarBias() for _ in range(4))

    def forward(self, x, tau):
        s = shortcut_a(x, self.stride, self.c_out)
        if self.bn:
            h = F.relu(self.bn1(self.conv1(x)))
            return F.relu(tau * self.bn2(self.conv2(h)) + s)
        h = F.relu(self.b1b(self.conv1(self.b1a(x))))
        return F.relu(tau * self.b2b(self.conv2(self.b2a(h))) + s)


class CifarResNet(nn.Module):
    def __init__(self, depth, bn, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        tau0 = 1.0 / math.sqrt(3 * n)
        # With BN tau is a constant, without it one shared learnable scalar (as bench runs).
        self.tau = torch.tensor(tau0) if bn else nn.Parameter(torch.tensor(tau0))
        self.bn = bn
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16) if bn else nn.Identity()
        blocks, c_in = [], 16
        for s, c_out in enumerate([16, 32, 64]):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(CifarBlock(c_in, c_out, stride, bn))
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        tau = self.tau.to(x.device) if self.bn else self.tau
        h = F.relu(self.bn1(self.conv1(x)))
        for blk in self.blocks:
            h = blk(h, tau)
        return self.fc(h.mean((2, 3)))


class ConvUnit(nn.Module):
    def __init__(self, c_in, c_out, k, stride, bn):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out) if bn else None
        if not bn:
            self.a, self.b = ScalarBias(), ScalarBias()

    def forward(self, x):
        if self.bn is not None:
            return self.bn(self.conv(x))
        return self.b(self.conv(self.a(x)))


class Bottleneck(nn.Module):
    def __init__(self, c_in, planes, stride, bn):
        super().__init__()
        c_out = 4 * planes
        self.u1 = ConvUnit(c_in, planes, 1, 1, bn)
        self.u2 = ConvUnit(planes, planes, 3, stride, bn)
        self.u3 = ConvUnit(planes, c_out, 1, 1, bn)
        self.down = None
        if stride != 1 or c_in != c_out:
            layers = [nn.Conv2d(c_in, c_out, 1, stride, bias=False)]
            if bn:
                layers.append(nn.BatchNorm2d(c_out))
            self.down = nn.Sequential(*layers)

    def forward(self, x, tau):
        h = F.relu(self.u1(x))
        h = F.relu(self.u2(h))
        s = x if self.down is None else self.down(x)
        return F.relu(tau * self.u3(h) + s)


class BottleneckResNet(nn.Module):
    STAGES = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}

    def __init__(self, depth, bn, num_classes=1000):
        super().__init__()
        stages = self.STAGES[depth]
        tau0 = 1.0 / math.sqrt(sum(stages))
        self.bn = bn
        self.tau = torch.tensor(tau0) if bn else nn.Parameter(torch.tensor(tau0))
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64) if bn else nn.Identity()
        blocks, c_in = [], 64
        for s, (n, planes) in enumerate(zip(stages, [64, 128, 256, 512])):
            for b in range(n):
                blocks.append(Bottleneck(c_in, planes, 2 if s > 0 and b == 0 else 1, bn))
                c_in = 4 * planes
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        tau = self.tau.to(x.device) if self.bn else self.tau
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for blk in self.blocks:
            h = blk(h, tau)
        return self.fc(h.mean((2, 3)))


def cifar_forward_flops(depth, num_classes=10):
    # As crates/train/src/cmd/bench.rs: convolutions and the linear head.
    n = (depth - 2) // 6

    def conv(c_in, c_out, hw):
        return 2.0 * c_in * 9 * c_out * hw * hw

    flops, c_in = conv(3, 16, 32), 16
    for s, c_out in enumerate([16, 32, 64]):
        hw = 32 >> s
        for b in range(n):
            flops += conv(c_in if b == 0 else c_out, c_out, hw)
            flops += conv(c_out, c_out, hw)
        c_in = c_out
    return flops + 2.0 * 64 * num_classes


def bottleneck_forward_flops(depth, size, num_classes=1000):
    def out(h, k, s, p):
        return (h + 2 * p - k) // s + 1

    def conv(c_in, c_out, k, h_out):
        return 2.0 * c_in * k * k * c_out * h_out * h_out

    h = out(size, 7, 2, 3)
    flops = conv(3, 64, 7, h)
    h = out(h, 3, 2, 1)
    c_in = 64
    for stage, (n, planes) in enumerate(zip(BottleneckResNet.STAGES[depth], [64, 128, 256, 512])):
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            h_out = out(h, 3, stride, 1)
            flops += conv(c_in, planes, 1, h)
            flops += conv(planes, planes, 3, h_out)
            flops += conv(planes, 4 * planes, 1, h_out)
            if b == 0:
                flops += conv(c_in, 4 * planes, 1, h_out)
            c_in = 4 * planes
            h = h_out
    return flops + 2.0 * c_in * num_classes


def bench(model, batch, size, num_classes, forward_flops, args, device, family, depth, norm):
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    xs = torch.randn(batch, 3, size, size, device=device)
    labels = (torch.arange(batch, device=device) % num_classes).long()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xs), labels)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    median = statistics.median(times)
    gflop = 3.0 * forward_flops * batch / 1e9
    return {
        "model": family,
        "depth": depth,
        "norm": norm,
        "phase": "train_step",
        "batch": batch,
        "conv": "pytorch",
        "kernels": "cudnn" if device.type == "cuda" else device.type,
        "median_s": median,
        "min_s": min(times),
        "images_per_s": batch / median,
        "gflop": gflop,
        "gflop_per_s": gflop / median,
        "steps": args.steps,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--depths", default="20,56,110")
    ap.add_argument("--norms", default="none,bn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bottleneck-depths", default="50")
    ap.add_argument("--bottleneck-norms", default="bn")
    ap.add_argument("--bottleneck-batch", type=int, default=64)
    ap.add_argument("--bottleneck-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (off by default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32

    points = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        for norm in args.norms.split(","):
            model = CifarResNet(depth, norm == "bn")
            flops = cifar_forward_flops(depth)
            points.append((model, args.batch, 32, 10, flops, "cifar_resnet", depth, norm))
    for depth in [int(d) for d in args.bottleneck_depths.split(",") if d]:
        for norm in args.bottleneck_norms.split(","):
            model = BottleneckResNet(depth, norm == "bn")
            size = args.bottleneck_size
            flops = bottleneck_forward_flops(depth, size)
            points.append(
                (model, args.bottleneck_batch, size, 1000, flops, "bottleneck_resnet", depth, norm)
            )
    if not args.json:
        print(f"{'model':<17} {'depth':>5} {'norm':>5} {'batch':>6} {'median s':>10} {'images/s':>9} {'GFLOP/s':>9}")
    for model, batch, size, classes, flops, family, depth, norm in points:
        r = bench(model, batch, size, classes, flops, args, device, family, depth, norm)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(
                f"{family:<17} {depth:>5} {norm:>5} {batch:>6} {r['median_s']:>10.4f} "
                f"{r['images_per_s']:>9.1f} {r['gflop_per_s']:>9.1f}",
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
