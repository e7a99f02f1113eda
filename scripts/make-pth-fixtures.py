#!/usr/bin/env python3
"""Writes the PyTorch fixtures of tau-model's `.pth` import and CIFAR shortcut tests.

Run once with PyTorch (`pip install torch safetensors`) from the repository root:

    python3 scripts/make-pth-fixtures.py

It writes into crates/model/tests/fixtures/pth/ (committed; the tests never need PyTorch):

- `cifar8-*.pth`: one CIFAR ResNet-8 (BatchNorm, tau = 1/sqrt(L), L = 3) saved as
  `torch.save` writes real checkpoints: a bare `model.state_dict()`, `{'state_dict': ...}`,
  `{'model': ...}` with DataParallel's `module.` prefix, and akamaster's layout
  (`{'state_dict': ...}`, `module.` prefix, the head named `linear`).
- `cifar8-{subsample_bn,conv_bn}.pth`: the same network with the paper authors' shortcut
  (1x1 average-pool subsampling, BatchNorm, zero channels appended; `downsample.1`) and
  with option B (1x1 strided convolution + BatchNorm; `downsample.0/1`).
- `expected.safetensors`: the fixed input (`input`, f32, 2x3x8x8) and PyTorch's float64
  logits of every variant in eval mode (`logits_eval.<shortcut>`, running statistics) and
  train mode (`logits_train.<shortcut>`, batch statistics).
- bad files for the error paths: a legacy (pre-1.6, non-zip) pickle, a zip without
  `data.pkl`, an int32 tensor, a storage shorter than its tensor, a storage claiming 2^40
  elements, a tensor whose shape does not match, and a non-contiguous (transposed) tensor.

To keep the files small every weight of a network is a view into one shared storage
(`torch.save` writes a storage once), so each file holds about 150 KB of weights; the
tensors have non-zero storage offsets, which the importer must honour.

The network mirrors tau-model's `CifarResNet` (crates/model/src/resnet/cifar.rs): a 3x3
stem with BatchNorm and ReLU, three stages of basic blocks at 16/32/64 channels (stride 2
entering stages 2 and 3), each `relu(tau * bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`,
global average pooling, a linear head `fc`.
"""

import copy
import io
import math
import os
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join("crates", "model", "tests", "fixtures", "pth")
WIDTHS = (16, 32, 64)


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, tau, shortcut):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.tau, self.stride, self.c_in, self.c_out = tau, stride, c_in, c_out
        self.shortcut = shortcut
        if stride != 1 or c_in != c_out:
            if shortcut == "subsample_bn":
                # The paper authors' BN model (Fixup's resnet_cifar.py).
                self.downsample = nn.Sequential(nn.AvgPool2d(1, stride=stride), nn.BatchNorm2d(c_in))
            elif shortcut == "conv_bn":
                # Option B (chenyaofo/pytorch-cifar-models).
                self.downsample = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) * self.tau
        if self.stride == 1 and self.c_in == self.c_out:
            idn = x
        elif self.shortcut == "zero_pad":
            # Option A: every other pixel, zero channels appended.
            idn = x[:, :, :: self.stride, :: self.stride]
            idn = F.pad(idn, (0, 0, 0, 0, 0, self.c_out - self.c_in))
        elif self.shortcut == "subsample_bn":
            idn = self.downsample(x)
            idn = torch.cat((idn, torch.zeros_like(idn)), 1)
        else:
            idn = self.downsample(x)
        return F.relu(out + idn)


class CifarResNet(nn.Module):
    def __init__(self, depth, shortcut="zero_pad", in_channels=3, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        tau = 1.0 / math.sqrt(3 * n)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        c_in = 16
        for s, c_out in enumerate(WIDTHS):
            blocks = []
            for b in range(n):
                stride = 2 if (b == 0 and s > 0) else 1
                blocks.append(Block(c_in if b == 0 else c_out, c_out, stride, tau, shortcut))
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            c_in = c_out
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def share_storage(model, seed):
    """Makes every parameter and float buffer a view into one of three shared storages
    (weights N(0, 0.08^2); BN gamma/beta and means; positive running variances)."""
    g = torch.Generator().manual_seed(seed)
    bases = {
        "w": torch.randn(37_000, generator=g) * 0.08,
        "affine": torch.rand(1_100, generator=g) * 0.4 - 0.2,
        "var": torch.rand(300, generator=g) + 0.5,
    }
    for i, (name, t) in enumerate(model.state_dict().items()):
        if not t.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[1]
        if leaf == "running_var":
            base = bases["var"]
        elif t.dim() == 1 and not name.startswith("fc."):
            base = bases["affine"]
        else:
            base = bases["w"]
        span = len(base) - t.numel()
        offset = (i * 7919) % (span + 1)
        view = base[offset : offset + t.numel()].view(t.shape)
        if leaf == "weight" and t.dim() == 1:
            view = None  # BN gamma near 1: a separate small tensor of its own storage
            value = 1.0 + bases["affine"][i % 900 : i % 900 + t.numel()]
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if view is None:
            setattr(module, leaf, nn.Parameter(value.clone()))
        elif isinstance(getattr(module, leaf), nn.Parameter):
            setattr(module, leaf, nn.Parameter(view))
        else:
            module.register_buffer(leaf, view)
    # Nonzero num_batches_tracked, as a trained model has.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(391)
    return model


def logits(model, x, train):
    """float64 logits of a copy (train mode updates the running statistics)."""
    m = copy.deepcopy(model).double()
    m.train(train)
    with torch.no_grad():
        return m(x.double())


def renamed(sd, f):
    return OrderedDict((f(k), v) for k, v in sd.items())


# --- a minimal writer of torch.save's zip format, for the bad files ---------------------


class _Storage:
    def __init__(self, cls_name, key, numel):
        self.cls_name, self.key, self.numel = cls_name, key, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, self.offset, tuple(self.size), tuple(self.stride), False, OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, obj.cls_name), obj.key, "cpu", obj.numel)
        return None


def write_raw_pth(path, tensors, storages):
    """`tensors`: name -> _Tensor; `storages`: key -> raw bytes. Writes the zip layout of
    `torch.save` (archive/data.pkl, archive/data/<key>, archive/byteorder)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(OrderedDict(tensors))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            z.writestr(f"archive/data/{key}", data)


def contiguous_strides(size):
    strides, acc = [], 1
    for d in reversed(size):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))


def main():
    if not os.path.isdir(os.path.join("crates", "model")):
        sys.exit("run from the repository root")
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    i = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64)
    x = (torch.sin(0.731 * i) * 1.5 + 0.2 * torch.cos(0.013 * i)).reshape(2, 3, 8, 8).float()
    expected = {"input": x.contiguous()}

    for seed, shortcut in enumerate(["zero_pad", "subsample_bn", "conv_bn"]):
        model = share_storage(CifarResNet(8, shortcut), seed)
        model.eval()
        expected[f"logits_eval.{shortcut}"] = logits(model, x, False).contiguous()
        expected[f"logits_train.{shortcut}"] = logits(model, x, True).contiguous()
        sd = model.state_dict()
        if shortcut != "zero_pad":
            torch.save(sd, os.path.join(OUT, f"cifar8-{shortcut}.pth"))
            continue
        torch.save(sd, os.path.join(OUT, "cifar8-bare.pth"))
        torch.save(
            {"state_dict": sd, "epoch": 200, "best_prec1": 91.25},
            os.path.join(OUT, "cifar8-state-dict.pth"),
        )
        torch.save(
            {"model": renamed(sd, lambda k: "module." + k), "epoch": 200, "args": {"lr": 0.1}},
            os.path.join(OUT, "cifar8-model-dataparallel.pth"),
        )
        aka = renamed(sd, lambda k: "module." + (("linear." + k[3:]) if k.startswith("fc.") else k))
        torch.save({"state_dict": aka, "best_prec1": 91.25}, os.path.join(OUT, "cifar8-akamaster.pth"))
        # A legacy (pre-1.6) pickle, as old checkpoints are.
        torch.save(
            {"fc.bias": torch.zeros(10)},
            os.path.join(OUT, "legacy.pth"),
            _use_new_zipfile_serialization=False,
        )
    save_file(expected, os.path.join(OUT, "expected.safetensors"))

    # --- bad files: a theory network {input_dim 2, width 4, depth 1, output_dim 1} -----
    # (input.weight [4, 2], blocks.0.weight [4, 4], output.weight [1, 4]).
    def f32(n, start=0.0):
        return struct.pack(f"<{n}f", *[start + 0.25 * k for k in range(n)])

    shapes = {"input.weight": [4, 2], "blocks.0.weight": [4, 4], "output.weight": [1, 4]}

    def theory_file(name, override=None, storages=None):
        tensors, data = {}, {}
        for k, (tname, size) in enumerate(shapes.items()):
            n = math.prod(size)
            tensors[tname] = _Tensor(_Storage("FloatStorage", str(k), n), 0, size, contiguous_strides(size))
            data[str(k)] = f32(n, k)
        if override:
            override(tensors, data)
        write_raw_pth(os.path.join(OUT, name), tensors, data)

    theory_file("theory-ok.pth")

    def transposed(t, d):
        # blocks.0.weight stored transposed: stride (1, 4), as `w.t()` is saved.
        t["blocks.0.weight"] = _Tensor(_Storage("FloatStorage", "1", 16), 0, [4, 4], [1, 4])

    theory_file("theory-transposed.pth", transposed)

    def int32(t, d):
        t["blocks.0.weight"] = _Tensor(_Storage("IntStorage", "1", 16), 0, [4, 4], [4, 1])
        d["1"] = struct.pack("<16i", *range(16))

    theory_file("bad-int32.pth", int32)

    def short(t, d):
        d["1"] = d["1"][:40]  # 10 of 16 floats

    theory_file("bad-short-storage.pth", short)

    def huge(t, d):
        t["blocks.0.weight"] = _Tensor(_Storage("FloatStorage", "1", 1 << 40), (1 << 40) - 16, [4, 4], [4, 1])

    theory_file("bad-huge-claim.pth", huge)

    def misshapen(t, d):
        t["output.weight"] = _Tensor(_Storage("FloatStorage", "2", 4), 0, [4, 1], [1, 1])

    theory_file("bad-shape.pth", misshapen)

    with zipfile.ZipFile(os.path.join(OUT, "bad-no-data-pkl.pth"), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/version", "3\n")

    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} files, {total} bytes, into {OUT}")
    for k, v in expected.items():
        if k.startswith("logits_eval"):
            print(k, v[0].tolist())


if __name__ == "__main__":
    main()
