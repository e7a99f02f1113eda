#!/usr/bin/env python3
"""PyTorch reference for the residual-scaling schemes of the CIFAR ResNets.

Builds a CIFAR ResNet-8 (one basic block per stage: an identity block and two stage
transitions) under every scheme of tau-model's `scaling` option -- `tau` (with and without
BatchNorm), `fixup`, `skipinit` (with and without BatchNorm), `rezero` -- exactly as
crates/model/src/resnet/cifar.rs computes it, loads one set of random weights (the union
of every scheme's tensors, under tau-model's PyTorch-style names), and writes

    crates/model/tests/fixtures/scaling-schemes.safetensors

holding the weights (f32), the input batch `input` (2x3x8x8, f32) and, per case, the
logits computed in float64: `logits.<case>.eval` and, for the BatchNorm cases,
`logits.<case>.train` (batch statistics). The Rust test crates/model/tests/scaling.rs
loads the same weights into tau-model and compares (relative error <= 1e-5).

The schemes, one block (x its input, sc(x) the option-A shortcut: stride-2 subsample and
zero channels appended):
  tau       relu(tau * F(x) + sc(x)), F = bn2(conv2(relu(bn1(conv1 x)))) with BatchNorm,
            F = conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b without
  fixup     relu(scale * conv2(relu(conv1(x + b1a) + b1b) + b2a) + b2b + sc(x)),
            stem relu(conv1(x) + bias1), head fc(pool(h) + bias2)  (Zhang et al. 2019)
  skipinit  relu(alpha * F(x) + sc(x)), F as for tau                (De & Smith 2020)
  rezero    sc(x) + alpha * conv2(relu(conv1 x))                    (Bachlechner et al. 2020)

Run from the repository root: python3 scripts/scaling-schemes-reference.py
(PyTorch, numpy and safetensors; the tests never need them.)
"""

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

WIDTHS = [16, 32, 64]
CASES = [
    # (case name, scaling, batch norm)
    ("tau_none", "tau", False),
    ("tau_bn", "tau", True),
    ("fixup", "fixup", False),
    ("skipinit_bn", "skipinit", True),
    ("skipinit_none", "skipinit", False),
    ("rezero", "rezero", False),
]
OUT = "crates/model/tests/fixtures/scaling-schemes.safetensors"


def weights(gen):
    """Random weights for every tensor any scheme of a CIFAR ResNet-8 names."""
    w = {}

    def normal(name, shape, std):
        w[name] = torch.randn(shape, generator=gen, dtype=torch.float64) * std

    def uniform(name, shape, lo, hi):
        w[name] = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)

    def conv(name, c_out, c_in):
        normal(name, (c_out, c_in, 3, 3), (2.0 / (9 * c_out)) ** 0.5)

    def bn(prefix, c):
        uniform(f"{prefix}.weight", (c,), 0.5, 1.5)
        uniform(f"{prefix}.bias", (c,), -0.3, 0.3)
        uniform(f"{prefix}.running_mean", (c,), -0.2, 0.2)
        uniform(f"{prefix}.running_var", (c,), 0.5, 1.5)

    conv("conv1.weight", 16, 3)
    bn("bn1", 16)
    uniform("bias1", (1,), -0.2, 0.2)
    c_in = 16
    for s, c in enumerate(WIDTHS):
        p = f"layer{s + 1}.0"
        conv(f"{p}.conv1.weight", c, c_in)
        conv(f"{p}.conv2.weight", c, c)
        bn(f"{p}.bn1", c)
        bn(f"{p}.bn2", c)
        for b in ["bias1a", "bias1b", "bias2a", "bias2b"]:
            uniform(f"{p}.{b}", (1,), -0.2, 0.2)
        uniform(f"{p}.scale", (1,), 0.5, 1.5)
        uniform(f"{p}.alpha", (1,), 0.2, 0.8)
        c_in = c
    uniform("bias2", (1,), -0.2, 0.2)
    uniform("fc.weight", (10, 64), -0.125, 0.125)
    uniform("fc.bias", (10,), -0.125, 0.125)
    w["tau"] = torch.tensor([0.4], dtype=torch.float64)
    # The f32 values tau-model will see, back in f64, so both sides compute on the same
    # numbers.
    return {k: v.float().double() for k, v in w.items()}


def shortcut(x, stride, c_out):
    """Option A: stride-2 subsample x[:, :, ::2, ::2], zero channels appended."""
    if stride == 2:
        x = x[:, :, ::2, ::2]
    return F.pad(x, (0, 0, 0, 0, 0, c_out - x.shape[1]))


def batch_norm(x, w, prefix, train):
    # A copy of the running statistics: train mode updates them in place.
    rm, rv = w[f"{prefix}.running_mean"].clone(), w[f"{prefix}.running_var"].clone()
    return F.batch_norm(
        x, rm, rv, w[f"{prefix}.weight"], w[f"{prefix}.bias"], train, 0.1, 1e-5
    )


def block(x, w, p, stride, c_out, scaling, bn, train):
    sc = shortcut(x, stride, c_out)
    w1, w2 = w[f"{p}.conv1.weight"], w[f"{p}.conv2.weight"]
    if scaling == "rezero":
        h = F.relu(F.conv2d(x, w1, stride=stride, padding=1))
        return sc + w[f"{p}.alpha"] * F.conv2d(h, w2, padding=1)
    mult = {"tau": w["tau"], "fixup": w[f"{p}.scale"], "skipinit": w[f"{p}.alpha"]}[scaling]
    if bn:
        h = F.relu(batch_norm(F.conv2d(x, w1, stride=stride, padding=1), w, f"{p}.bn1", train))
        branch = batch_norm(F.conv2d(h, w2, padding=1), w, f"{p}.bn2", train)
        return F.relu(mult * branch + sc)
    b1a, b1b, b2a, b2b = (w[f"{p}.{b}"] for b in ["bias1a", "bias1b", "bias2a", "bias2b"])
    h = F.relu(F.conv2d(x + b1a, w1, stride=stride, padding=1) + b1b) + b2a
    y2 = F.conv2d(h, w2, padding=1)
    if scaling == "fixup":
        return F.relu(mult * y2 + b2b + sc)
    return F.relu(mult * (y2 + b2b) + sc)


def forward(x, w, scaling, bn, train):
    h = F.conv2d(x, w["conv1.weight"], padding=1)
    if bn:
        h = F.relu(batch_norm(h, w, "bn1", train))
    elif scaling == "fixup":
        h = F.relu(h + w["bias1"])
    else:
        h = F.relu(h)
    c_in = 16
    for s, c in enumerate(WIDTHS):
        stride = 1 if s == 0 else 2
        h = block(h, w, f"layer{s + 1}.0", stride, c, scaling, bn, train)
        c_in = c
    pooled = h.mean(dim=(2, 3))
    if scaling == "fixup":
        pooled = pooled + w["bias2"]
    return F.linear(pooled, w["fc.weight"], w["fc.bias"])


def main():
    gen = torch.Generator().manual_seed(17)
    w = weights(gen)
    x = (torch.rand((2, 3, 8, 8), generator=gen, dtype=torch.float64) * 2 - 1).float().double()
    out = {k: v.float().contiguous() for k, v in w.items()}
    out["input"] = x.float().contiguous()
    for name, scaling, bn in CASES:
        modes = ["eval", "train"] if bn else ["eval"]
        for mode in modes:
            with torch.no_grad():
                y = forward(x, w, scaling, bn, mode == "train")
            out[f"logits.{name}.{mode}"] = y.contiguous()
            print(f"{name:14s} {mode:5s} logits[0,:4] = {y[0, :4].tolist()}")
    save_file(out, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
