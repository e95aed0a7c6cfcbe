"""Pretraining throughput: the loop against its ceiling and against a lightly-style pipeline, and where time goes.

    python benchmarks/train_speed.py                                   # the CIFAR-10 recipe (configs/cpu_cifar10.yaml)
    python benchmarks/train_speed.py --config configs/cpu_fashion_mnist.yaml
    python benchmarks/train_speed.py trainer.precision=32-true         # any override of the config

Four measurements in one run, same encoder, batch B, V views and precision / memory format (medians of per-step
rates after warm-up, images per second, each image giving V views):
  loop      protoclr.train.pretrain itself (monitors off, logging every step).
  ceiling   the bare encoder's forward + backward on a random batch of the views' shape: nothing else.
  lightly   a lightly-style pipeline written out here (lightly is not a dependency): per-image torchvision
            transforms (RandomResizedCrop, flip, ColorJitter p=0.8, RandomGrayscale, Normalize, as lightly's
            SimCLRTransform) in a Dataset, 2 DataLoader workers, a plain NT-Xent (cross-entropy over the 2B x 2B
            cosine logits, lightly's NTXentLoss), SGD; the same autocast as the loop.
  phases    one loop step taken apart with the library's own functions: views, forward + backward, loss,
            optimizer; their sum against the loop's step time says what the bookkeeping costs.
  monitors  one epoch-end measurement of protoclr.measure.Monitor (kNN on the eval.train_images bank, the online
            probe, diagnostics if on) against an epoch at the loop's rate: the cost of eval.every=1.
Targets (issue "learning you can see on a laptop"): loop / ceiling >= 0.9, loop / lightly >= 1.5.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from protoclr.config import load_config
from protoclr.losses import config_options, contrastive_loss
from protoclr.models import build_encoder
from protoclr.splits import load_data
from protoclr.train import build_optimizer, cpu_has_bf16, pretrain
from protoclr.views import train_views

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "cpu_cifar10.yaml"


def _autocast(cfg):
    p = cfg.trainer.precision
    bf16 = p.startswith("bf16") or (p == "auto" and cpu_has_bf16())
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _prepare(model, x, cfg):
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = [xi.contiguous(memory_format=torch.channels_last) for xi in x]
    return model, x


def median_rate(fn, *, steps: int, warmup: int, images: int) -> float:
    rates = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        fn()
        if i >= warmup:
            rates.append(images / (time.perf_counter() - t))
    return statistics.median(rates)


def ceiling(cfg, tv, *, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    B = cfg.train.batch_size
    model = build_encoder(cfg.model, in_channels=tv.spec.channels).train()
    shapes = [(tv.num_views * B, tv.spec.size)] + ([(tv.num_local * B, tv.local.size)] if tv.num_local else [])
    model, x = _prepare(model, [torch.randn(n, tv.spec.channels, s, s) for n, s in shapes], cfg)

    def step():
        with _autocast(cfg):
            _, z = model(x if len(x) > 1 else x[0])
        z.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return median_rate(step, steps=steps, warmup=warmup, images=B)


def loop(config, overrides, *, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, f"train.out_dir={out}", "train.run_name=bench", "eval.every=0",
                                   "train.log_every=1", "trainer.progress=false", "train.checkpoint_every=0",
                                   "trainer.loggers=[]", f"train.max_steps={steps + warmup}"])
        with contextlib.redirect_stdout(io.StringIO()):
            run = pretrain(cfg)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["img_per_s"] for r in recs if r["kind"] == "step" and r["step"] > warmup)


class _LightlyStyle(torch.utils.data.Dataset):
    """Two views per image from per-image torchvision transforms, as lightly's SimCLRTransform does."""

    def __init__(self, images, spec):
        import torchvision.transforms as T

        self.images = images  # (N, C, H, W) uint8
        s = spec
        self.t = T.Compose([
            T.RandomResizedCrop(s.size, scale=s.crop_scale, ratio=s.crop_ratio, antialias=True),
            T.RandomHorizontalFlip(s.flip_p),
            T.RandomApply([T.ColorJitter(s.brightness, s.contrast, s.saturation, s.hue)], p=s.jitter_p),
            T.RandomGrayscale(s.gray_p) if images.shape[1] == 3 else T.Lambda(lambda x: x),
            T.ConvertImageDtype(torch.float32),
            T.Normalize(s.mean, s.std),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i]
        return self.t(x), self.t(x)


def nt_xent_lightly(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """lightly's NTXentLoss without a memory bank: z0, z1 (B, D) -> cross-entropy over (2B, 2B - 1) logits."""
    B = z0.shape[0]
    out = F.normalize(torch.cat([z0, z1]).float(), dim=1)  # (2B, D)
    logits = out @ out.T / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
    labels = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    return F.cross_entropy(logits, labels)


def lightly_style(cfg, train, tv, *, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    B = cfg.train.batch_size
    model = build_encoder(cfg.model, in_channels=tv.spec.channels).train()
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    loader = torch.utils.data.DataLoader(_LightlyStyle(train.images, tv.spec), batch_size=B, shuffle=True,
                                         num_workers=2, drop_last=True, persistent_workers=True)
    it = iter(loader)

    def step():
        x0, x1 = next(it)
        x = torch.cat([x0, x1])
        if cfg.trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(cfg):
            _, z = model(x)
        loss = nt_xent_lightly(z[:B], z[B:], 0.5)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_rate(step, steps=steps, warmup=warmup, images=B)


def phases(cfg, train, tv, *, steps: int) -> dict[str, float]:
    """Seconds per step of each part of the loop's step, timed one after the other with the library's functions."""
    torch.manual_seed(0)
    B, V = cfg.train.batch_size, tv.num_views + tv.num_local
    model = build_encoder(cfg.model, in_channels=tv.spec.channels).train()
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, cfg.optim, lr=0.1)
    options = config_options(cfg.loss)
    times: dict[str, list[float]] = {"views": [], "forward + backward": [], "loss (forward + backward)": [],
                                     "optimizer step": []}
    for i in range(steps + 2):
        idx = torch.arange(i * B, (i + 1) * B) % len(train)
        t0 = time.perf_counter()
        xs = tv.make(train.get_images(idx), seed=0, epoch=0, indices=idx)
        if cfg.trainer.channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        t1 = time.perf_counter()
        with _autocast(cfg):
            _, z = model(xs if len(xs) > 1 else xs[0])
        z = z.float().view(V, B, -1).detach().requires_grad_()
        t2 = time.perf_counter()
        loss = contrastive_loss(z, **options)
        loss.backward()
        t3 = time.perf_counter()
        with _autocast(cfg):
            _, z2 = model(xs if len(xs) > 1 else xs[0])
        z2.float().view(V, B, -1).backward(z.grad)
        t4 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i >= 2:
            for k, dt in zip(times, (t1 - t0, t4 - t3, t3 - t2, t5 - t4), strict=True):
                times[k].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def monitor_cost(cfg, train, test, spec) -> float:
    """Seconds of one Monitor.measure of the config's encoder (median of 3)."""
    from protoclr.measure import Monitor

    torch.manual_seed(0)
    encoder = build_encoder(cfg.model, in_channels=spec.channels)
    probe = torch.nn.Linear(encoder.feature_dim, len(train.classes))
    monitor = Monitor(cfg, train, test, spec)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        monitor.measure(encoder, probe)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--config", default=str(RECIPE) if RECIPE.is_file() else None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    tv = train_views(cfg.data)
    train, test, spec = load_data(cfg)
    B = cfg.train.batch_size
    # interleaved: ceiling, loop, lightly, twice, so that drift on a shared machine hits all three alike
    rates: dict[str, list[float]] = {"loop": [], "ceiling": [], "lightly": []}
    for _ in range(2):
        rates["ceiling"].append(ceiling(cfg, tv, steps=args.steps // 2, warmup=2))
        rates["loop"].append(loop(args.config, args.overrides, steps=args.steps, warmup=args.warmup))
        rates["lightly"].append(lightly_style(cfg, train, tv, steps=args.steps, warmup=args.warmup))
    med = {k: statistics.median(v) for k, v in rates.items()}
    parts = phases(cfg, train, tv, steps=max(6, args.steps // 2))
    t_monitor = monitor_cost(cfg, train, test, spec)
    print(f"config: {args.config} {' '.join(args.overrides)}")
    print(f"  {cfg.model.backbone} {cfg.model.convnet_widths}, batch {B} x ({tv.num_views} views at {tv.spec.size} px"
          f" + {tv.num_local} local), {cfg.loss.name} loss, precision {cfg.trainer.precision}, channels_last "
          f"{cfg.trainer.channels_last}, {torch.get_num_threads()} threads")
    for k, label in (("loop", "protoclr loop"), ("ceiling", "bare forward + backward"),
                     ("lightly", "lightly-style pipeline")):
        print(f"  {label:<26}: {med[k]:7.0f} img/s   (runs: {', '.join(f'{r:.0f}' for r in rates[k])})")
    print(f"  loop / ceiling            : {med['loop'] / med['ceiling']:7.3f}   (target >= 0.9)")
    print(f"  loop / lightly-style      : {med['loop'] / med['lightly']:7.3f}   (target >= 1.5)")
    total = sum(parts.values())
    step = B / med["loop"]
    print(f"  where a loop step's {1000 * step:.0f} ms go (phases timed apart, medians):")
    for k, v in parts.items():
        print(f"    {k:<28} {1000 * v:7.1f} ms  {100 * v / step:5.1f}%")
    rest = step - total
    print(f"    {'rest (checks, logging, data)':<28} {1000 * rest:7.1f} ms  {100 * rest / step:5.1f}%")
    epoch = len(train) / med["loop"]
    print(f"  online monitors: {t_monitor:.1f} s per measurement (kNN bank {cfg.eval.train_images or len(train)}, "
          f"{cfg.eval.test_images or len(test)} scored) = {100 * t_monitor / epoch:.1f}% of a {epoch:.0f} s epoch")


if __name__ == "__main__":
    main()
