"""Weighted kNN and diagnostics cost on CPU: time and peak resident memory.

    .venv/bin/python benchmarks/knn_speed.py            # 50,000 x 10,000, D=512, C=10, k=200
    .venv/bin/python benchmarks/knn_speed.py --n 5000   # smaller
    .venv/bin/python benchmarks/knn_speed.py --only track   # track() against training steps (Fashion-MNIST)

Peak memory is the growth of the process's max RSS during the call, after inputs exist (Linux ru_maxrss).
The diagnostics line times ``diagnose_features`` on a probe set (K views of N images), the cost of
``track_bounds`` / ``track_bias`` per evaluation besides the K*N encoder forwards.

The track line is the whole in-training cost on the CPU default (Fashion-MNIST, convnet, balanced loss,
batch 256, 2 views): ``protoclr.diagnostics.track`` on a 512-image class-balanced probe set at K views
against one training step (views, forward, loss, backward, SGD step) of the same encoder, interleaved and
timed as medians so both see the same load; an epoch is ``60000 // 256`` steps.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from protoclr.config import load_config
from protoclr.diagnostics import diagnose_features
from protoclr.evaluate import knn_accuracy
from protoclr.losses import config_options, contrastive_loss
from protoclr.measure import diagnostics_metrics
from protoclr.models import build_encoder
from protoclr.splits import balanced_draw, load_data
from protoclr.train import build_optimizer
from protoclr.views import make_views


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--m", type=int, default=10_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--probe", type=int, default=512, help="probe images for the diagnostics timing")
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--only", choices=("knn", "track"), help="run one part (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="track timings (each against 3 training steps)")
    args = p.parse_args()
    if args.only != "track":
        knn_and_diagnose(args)
    if args.only != "knn":
        track_overhead(args)


def knn_and_diagnose(args: argparse.Namespace) -> None:
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


def track_overhead(args: argparse.Namespace) -> None:
    import statistics

    cfg = load_config(None)  # the CPU default
    train, test, spec = load_data(cfg)
    probe = balanced_draw(test, args.probe, seed=0)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, in_channels=spec.channels)
    options = config_options(cfg.loss)
    opt = build_optimizer(encoder, cfg.optim, lr=cfg.lr())
    B, V = cfg.train.batch_size, cfg.data.num_views

    def train_step(step: int) -> float:
        t = time.perf_counter()
        idx = torch.arange(step * B, (step + 1) * B) % len(train)
        z = encoder(make_views(train.get_images(idx), spec, num_views=V, seed=0, epoch=0, indices=idx).flatten(0, 1))[1]
        loss = contrastive_loss(z.view(V, B, -1), **options)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    def tracked() -> float:
        t = time.perf_counter()
        diagnostics_metrics(encoder, probe, spec=spec, views=args.views, alphas=(options["alpha"],))
        return time.perf_counter() - t

    encoder.train()
    train_step(0), tracked()  # warm-up
    steps, tracks = [], []
    for r in range(args.repeats):
        steps += [train_step(1 + 3 * r + i) for i in range(3)]
        tracks.append(tracked())
    step_s, track_s = statistics.median(steps), statistics.median(tracks)
    epoch_s = step_s * (len(train) // B)
    print(
        f"track K={args.views} N={len(probe)} (bounds + bias + geometry, convnet): {track_s:.2f} s median of "
        f"{len(tracks)} (min {min(tracks):.2f}); training step B={B} V={V}: {step_s:.3f} s median of {len(steps)}; "
        f"epoch ({len(train) // B} steps) ~{epoch_s:.0f} s; track / epoch = {100 * track_s / epoch_s:.2f}%, "
        f"= {track_s / step_s:.1f} training steps"
    )


if __name__ == "__main__":
    main()
