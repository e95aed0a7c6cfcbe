"""Weighted kNN and diagnostics cost on CPU: time and peak resident memory.

    .venv/bin/python benchmarks/knn_speed.py            # 50,000 x 10,000, D=512, C=10, k=200
    .venv/bin/python benchmarks/knn_speed.py --n 5000   # smaller

Peak memory is the growth of the process's max RSS during the call, after inputs exist (Linux ru_maxrss).
The diagnostics line times ``diagnose_features`` on a probe set (K views of N images), the cost of
``track_bounds`` / ``track_bias`` per evaluation besides the K*N encoder forwards.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from protoclr.diagnostics import diagnose_features
from protoclr.evaluate import knn_accuracy


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--m", type=int, default=10_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--probe", type=int, default=512, help="probe images for the diagnostics timing")
    p.add_argument("--views", type=int, default=4)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    train = torch.randn(args.n, args.d, generator=g)
    test = torch.randn(args.m, args.d, generator=g)
    y_train, y_test = torch.randint(0, 10, (args.n,), generator=g), torch.randint(0, 10, (args.m,), generator=g)
    base = maxrss_mib()
    t = time.perf_counter()
    knn_accuracy(train, y_train, test, y_test, num_classes=10, k=200, temperature=0.1)
    dt = time.perf_counter() - t
    inputs = (train.numel() + test.numel()) * 4 / 2**20
    print(
        f"knn {args.n} x {args.m}, D={args.d}, k=200: {dt:.1f} s, peak RSS growth {maxrss_mib() - base:.0f} MiB "
        f"(inputs {inputs:.0f} MiB), torch threads {torch.get_num_threads()}"
    )
    feats = {
        "backbone": torch.randn(args.views, args.probe, args.d, generator=g),
        "projector": torch.randn(args.views, args.probe, 128, generator=g),
    }
    labels = torch.arange(args.probe) % 10
    diagnose_features(feats, labels, num_classes=10)  # warm-up: first-call kernel setup is not the steady cost
    t = time.perf_counter()
    for _ in range(3):
        diagnose_features(feats, labels, num_classes=10, alphas=(1.0, 5.0, 10.0), nus=(1.0,))
    dt = (time.perf_counter() - t) / 3
    print(f"diagnose_features K={args.views} N={args.probe} (D=512 backbone, 128 projector, 3 alphas): {dt:.2f} s")


if __name__ == "__main__":
    main()
