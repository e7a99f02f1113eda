"""PyTorch reference for `tau-resnet bench --theory-gd-depths`: one full-batch gradient
descent step of the paper's theory network as configs/theory-gd.toml trains it.

h_0 = relu(A x), h_l = relu(h_{l-1} + tau W_l h_{l-1}), y = B h_L; p = 16, m = 512,
d = 1, n = 32 inputs, tau = 1/sqrt(L), only the W_l trained, loss 1/2 sum (y - y*)^2
divided by n, W_l -= lr * grad. Timed like the Rust bench: median and minimum of
--steps steps after --warmup untimed ones.

    python3 scripts/bench-theory-gd-torch.py --depths 64,256,1024 --threads 2
"""

import argparse
import json
import math
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="64,256,1024")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--inputs", type=int, default=32)
    ap.add_argument("--input-dim", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    m, p, n = args.width, args.input_dim, args.inputs
    for depth in [int(d) for d in args.depths.split(",")]:
        tau = 1.0 / math.sqrt(depth)
        a = torch.randn(m, p) * math.sqrt(2.0 / m)
        ws = [(torch.randn(m, m) / math.sqrt(m)).requires_grad_() for _ in range(depth)]
        b = torch.randn(1, m)
        xs = torch.nn.functional.normalize(torch.randn(n, p), dim=1)
        ys = torch.randn(n, 1)

        def step():
            h = torch.relu(xs @ a.t())
            for w in ws:
                h = torch.relu(h + tau * (h @ w.t()))
            loss = 0.5 * ((h @ b.t() - ys) ** 2).sum() / n
            grads = torch.autograd.grad(loss, ws)
            with torch.no_grad():
                for w, g in zip(ws, grads):
                    w.sub_(0.02 * g)

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        gflop = 3 * 2 * (m * p + depth * m * m + m) * n / 1e9
        rec = {
            "model": "theory",
            "depth": depth,
            "phase": "gd_step",
            "batch": n,
            "median_s": statistics.median(times),
            "min_s": min(times),
            "gflop_per_s": gflop / statistics.median(times),
            "torch": torch.__version__,
            "threads": args.threads,
        }
        if args.json:
            print(json.dumps(rec))
        else:
            print(f"theory L={depth:5} gd_step  median {rec['median_s']*1e3:8.2f} ms  "
                  f"min {rec['min_s']*1e3:8.2f} ms  {rec['gflop_per_s']:6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
