"""PyTorch reference for `tau-resnet bench --depths 20,56,110 --theory-depth 0 --steps 5`:
one training step (forward, cross-entropy, backward, plain SGD) of the same CIFAR ResNets
(option-A shortcut, tau = 1/sqrt(L) on the residual branch; without BN, scalar biases and a
learnable tau as the no-BN model), batch 128, 3x32x32, median of 5 steps after one warm-up.

    python3 scripts/bench-resnet-torch.py 20,56,110

With `--eval` (as `tau-resnet bench --eval`) it also times the forward pass in evaluation
mode (`model.eval()` under `torch.no_grad()`, BatchNorm with its running statistics).
"""

import statistics, time
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)

class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, bn, tau):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn = bn
        if bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(c_out), nn.BatchNorm2d(c_out)
        else:
            self.b = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(4)])
        self.tau, self.stride, self.pad = tau, stride, c_out - c_in

    def forward(self, x):
        s = x[:, :, ::2, ::2] if self.stride == 2 else x
        if self.pad:
            s = F.pad(s, (0, 0, 0, 0, 0, self.pad))  # option A
        if self.bn:
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(self.tau * out + s)
        b = self.b
        out = self.conv2(F.relu(self.conv1(x + b[0]) + b[1]) + b[2])
        return F.relu(self.tau * (out + b[3]) + s)

class ResNet(nn.Module):
    def __init__(self, depth, bn):
        super().__init__()
        n = (depth - 2) // 6
        self.tau = nn.Parameter(torch.tensor((3.0 * n) ** -0.5), requires_grad=not bn)
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16) if bn else nn.Identity()
        blocks, c_in = [], 16
        for s, c in enumerate([16, 32, 64]):
            for i in range(n):
                blocks.append(Block(c_in, c, 2 if s > 0 and i == 0 else 1, bn, self.tau))
                c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = F.relu(self.bn1(self.stem(x)))
        return self.fc(self.blocks(h).mean((2, 3)))

x = torch.randn(128, 3, 32, 32)
y = torch.arange(128) % 10
import sys

def median_time(f):
    f()
    ts = []
    for _ in range(5):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

args = [a for a in sys.argv[1:] if a != "--eval"]
for depth in [int(d) for d in (args[0] if args else "20,56").split(",")]:
    for bn in (False, True):
        m = ResNet(depth, bn)
        if "--eval" in sys.argv:
            m.eval()
            with torch.no_grad():
                med = median_time(lambda: m(x))
            print(f"pytorch resnet-{depth} {'bn' if bn else 'none'} eval: {med:.4f} s  {128 / med:.1f} img/s")
            m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        def step():
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        med = median_time(step)
        print(f"pytorch resnet-{depth} {'bn' if bn else 'none'}: {med:.4f} s  {128 / med:.1f} img/s")
