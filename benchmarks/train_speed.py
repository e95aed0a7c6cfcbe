"""Pretraining throughput of the CPU default against its ceiling, the bare model's forward + backward.

    python benchmarks/train_speed.py                 # CPU default (Fashion-MNIST, convnet, batch 256)
    python benchmarks/train_speed.py train.batch_size=512 model.backbone=resnet18
    python benchmarks/train_speed.py loss.name=generalized_nt_xent target.name=momentum target.queue_size=1024

Loop: ``protoclr.train.pretrain`` for ``--steps`` steps (monitors off, logging every step); its images/s is
the median of the per-step rates after ``--warmup`` steps, counting dataset images (each gives V views).
Ceiling: the same encoder on a batch of the same shape (V*B views), ``forward`` then ``backward`` of a scalar,
nothing else (no views, loss, optimizer, checks or logging); measured before and after the loop (the median of
both sets, to cancel drift on a shared machine). Target: loop / ceiling >= 0.85.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from protoclr.config import load_config
from protoclr.models import build_encoder
from protoclr.train import pretrain
from protoclr.views import view_spec


def ceiling(cfg, *, steps: int, warmup: int) -> list[float]:
    spec = view_spec(cfg.data.views, cfg.data.view_modifiers)
    torch.manual_seed(0)
    model = build_encoder(cfg.model, in_channels=spec.channels).train()
    V, B = cfg.data.num_views, cfg.train.batch_size
    x = torch.randn(V * B, spec.channels, spec.size, spec.size)  # (V*B, C, s, s)
    rates = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        _, z = model(x)
        z.square().mean().backward()
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            rates.append(B / (time.perf_counter() - t))
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [*args.overrides, f"train.out_dir={out}", "train.run_name=bench", "monitor.every=0",
                                 "train.log_every=1", "trainer.progress=false", "train.checkpoint_every=0",
                                 f"train.max_steps={args.steps + args.warmup}"])
        before = ceiling(cfg, steps=args.steps // 2, warmup=args.warmup)
        run = pretrain(cfg)
        records = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
        loop = [r["img_per_s"] for r in records if r["kind"] == "step" and r["step"] > args.warmup]
        after = ceiling(cfg, steps=args.steps // 2, warmup=1)
    bare = statistics.median(before + after)
    train = statistics.median(loop)
    print(f"config: {cfg.model.backbone}, batch {cfg.train.batch_size} x {cfg.data.num_views} views, "
          f"{cfg.data.views} views, {cfg.loss.name} loss, target {cfg.target.name} (queue {cfg.target.queue_size}), "
          f"{torch.get_num_threads()} threads")
    print(f"pretraining loop        : {train:8.0f} img/s  (median of {len(loop)} steps)")
    print(f"bare forward + backward : {bare:8.0f} img/s  (median of {len(before) + len(after)} steps)")
    print(f"ratio                   : {train / bare:8.3f}  (target >= 0.85)")


if __name__ == "__main__":
    main()
