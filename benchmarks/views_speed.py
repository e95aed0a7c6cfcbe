"""Views per second: the batched device pipeline (``protoclr.views.make_views``) against the equivalent per-image
torchvision/PIL pipeline, on the same cores, for 32x32 RGB (``simclr_cifar``) and 28x28 gray (``simclr_small``).

    .venv/bin/python benchmarks/views_speed.py                 # all cores, 2 views per image
    .venv/bin/python benchmarks/views_speed.py --repeats 9 --batch-size 1024

The per-image pipeline is what a SimCLR data loader runs: PIL images through ``torchvision.transforms``
(RandomResizedCrop, flip, RandomApply(ColorJitter), RandomGrayscale, ToTensor, Normalize), measured both in
the main process and in a DataLoader with one worker per core (one torch thread each). The batched pipeline
runs with 1 torch thread and with one per core. Two ratios: batched (1 thread) over the per-image loop, both
on one core; and the best batched over the best per-image. On a machine shared with other jobs, torch's
intra-op threads can stall (a thread waits for a descheduled sibling), so the 1-thread row is the steadier one.
Timings are medians over ``--repeats`` passes after one warm-up pass; numbers are views per second.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image

from protoclr.views import ViewSpec, make_views, view_spec


def per_image_transform(spec: ViewSpec) -> T.Compose:
    """torchvision's per-image equivalent of ``spec`` (crop, flip, jitter, grayscale, normalise)."""
    ops: list = [
        T.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio),
        T.RandomHorizontalFlip(spec.flip_p),
    ]
    if spec.jitter_p > 0:
        jitter = T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
        ops.append(T.RandomApply([jitter], p=spec.jitter_p))
    if spec.gray_p > 0 and spec.channels == 3:
        ops.append(T.RandomGrayscale(spec.gray_p))
    ops += [T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(ops)


class PILViews(torch.utils.data.Dataset):
    def __init__(self, images: list[Image.Image], transform: T.Compose, num_views: int) -> None:
        self.images, self.transform, self.num_views = images, transform, num_views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.stack([self.transform(self.images[i]) for _ in range(self.num_views)])  # (V, C, s, s)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _median_rate(run, n_views: int, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return n_views / statistics.median(times)


def bench_case(
    name: str, preset: str, channels: int, *, n: int, batch_size: int, num_views: int, repeats: int, workers: int
) -> list[tuple[str, str, float]]:
    spec = view_spec(preset)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (n, spec.size, spec.size, channels), dtype=np.uint8)
    batch = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, C, H, W) uint8
    pil = [Image.fromarray(a[:, :, 0] if channels == 1 else a) for a in arr]
    n_views = n * num_views

    def batched() -> None:
        for lo in range(0, n, batch_size):
            idx = torch.arange(lo, min(lo + batch_size, n))
            make_views(batch[idx], spec, num_views=num_views, seed=0, epoch=0, indices=idx)

    tf = per_image_transform(spec)

    def per_image_main() -> None:
        for img in pil:
            for _ in range(num_views):
                tf(img)

    loader = torch.utils.data.DataLoader(
        PILViews(pil, tf, num_views),
        batch_size=batch_size,
        num_workers=workers,
        worker_init_fn=_worker_init,
        persistent_workers=True,
    )

    def per_image_workers() -> None:
        for _ in loader:
            pass

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = [(name, "batched, 1 thread", _median_rate(batched, n_views, repeats))]
    rows.append((name, "per-image PIL, main process", _median_rate(per_image_main, n_views, repeats)))
    torch.set_num_threads(threads)
    rows.append((name, f"batched, {threads} threads", _median_rate(batched, n_views, repeats)))
    rows.append((name, f"per-image PIL, {workers} workers", _median_rate(per_image_workers, n_views, repeats)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--num-views", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.workers)
    print(
        f"cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, DataLoader workers {args.workers}, "
        f"{args.images} images x {args.num_views} views, batch {args.batch_size}, median of {args.repeats}"
    )
    print(f"{'case':<28} {'pipeline':<30} {'views/s':>10}")
    for name, preset, channels in [
        ("32x32 RGB, simclr_cifar", "simclr_cifar", 3),
        ("28x28 gray, simclr_small", "simclr_small", 1),
    ]:
        rows = bench_case(
            name,
            preset,
            channels,
            n=args.images,
            batch_size=args.batch_size,
            num_views=args.num_views,
            repeats=args.repeats,
            workers=args.workers,
        )
        one_core = rows[0][2] / rows[1][2]  # 1 thread against the per-image loop, both on one core
        best = max(r for _, p, r in rows if p.startswith("batched")) / max(r for _, p, r in rows if p.startswith("per"))
        for case, pipe, rate in rows:
            print(f"{case:<28} {pipe:<30} {rate:>10.0f}")
        print(f"{'':<28} {'ratio, one core':<30} {one_core:>9.1f}x")
        print(f"{'':<28} {'ratio, best of each':<30} {best:>9.1f}x")


if __name__ == "__main__":
    main()
