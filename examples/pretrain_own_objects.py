"""protoclr's training engine with your own backbone, dataset and views, from Python.

    python examples/pretrain_own_objects.py                       # 150 steps on scikit-learn's digits
    python examples/pretrain_own_objects.py --steps 4 --out runs/own-test   # what the test suite runs

The data is scikit-learn's 1,797 handwritten digits (8x8 grey, no download), split 1,297 / 500; the backbone a
three-layer CNN written here; the views a torchvision pipeline written here. protoclr brings the loss (the
config's: the balanced contrastive loss), the schedule, the online kNN and probe, checkpoints and resume.

Measured on a 2-core CPU shared with other training (2026-12-06): 150 steps in 3.1 min of wall time (2.4 min of
CPU), online kNN top-1 0.816 (0.782 at step 0), online probe 0.870, against a raw-pixel kNN floor of 0.946 on the
same images. On 8-pixel digits this short run does not beat raw pixels: the script shows the API, not a recipe.

Each object's contract is in ``protoclr.custom``: the backbone maps ``(B, C, H, W)`` to ``(B, F)``; the dataset's
items are ``(image, label)`` (label None: unlabeled); the view function maps one uint8 image ``(C, H, W)`` to one
float view ``(C, s, s)`` normalised as evaluation normalises (``spec``, the config's ``data.views``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torchvision.transforms import v2

from protoclr.config import load_config
from protoclr.custom import as_images
from protoclr.measure import raw_pixel_floor
from protoclr.runs import ResultsDB, load_run
from protoclr.train import pretrain
from protoclr.views import config_view_spec


class Digits(torch.utils.data.Dataset):
    """scikit-learn's digits as (image (1, 8, 8) uint8, label) items; ``part`` "train" (1,297) or "test" (500)."""

    def __init__(self, part: str):
        d = load_digits()
        images = torch.tensor(d.images * 255 / 16).round().to(torch.uint8)[:, None]  # (1797, 1, 8, 8)
        cut = slice(0, 1297) if part == "train" else slice(1297, None)
        self.images, self.labels, self.classes = images[cut], d.target[cut].tolist(), [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class SmallCNN(nn.Module):
    """(B, 1, 8, 8) -> (B, 64)."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="runs/own-objects", help="train.out_dir (a second call resumes or says done)")
    args = ap.parse_args()

    cfg = load_config(None, [f"train.steps={args.steps}", "train.batch_size=128", "optim.base_lr=0.5",
                             f"train.out_dir={args.out}", "train.run_name=digits", "eval.every=1",
                             "eval.linear=false", "eval.diagnostics=false", "trainer.progress=false",
                             "trainer.loggers=[]", "data.views=simclr_small", "data.view_overrides=[size=8]"])
    train, test = Digits("train"), Digits("test")
    spec = config_view_spec(cfg.data)  # what evaluation feeds the backbone: grey, 8 px, this mean and std
    view = v2.Compose([
        v2.RandomAffine(degrees=15, translate=(0.125, 0.125), scale=(0.8, 1.1)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(spec.mean, spec.std),
    ])
    torch.manual_seed(0)  # your module's initial weights are yours to seed
    net = SmallCNN()
    run_dir = pretrain(cfg, backbone=net, feature_dim=64, dataset=train, test_dataset=test, views=view)

    last = ResultsDB(run_dir.parent / "runs.db").epochs(run_dir.name)[-1]
    encoder, _ = load_run(run_dir, backbone=SmallCNN())  # the trained weights in a fresh module of your class
    floor = raw_pixel_floor(as_images(train), as_images(test), linear=False)["knn_top1"]
    print(f"{run_dir}: online kNN top-1 {last['knn_top1']:.3f} after {last['step']} steps "
          f"(raw-pixel kNN floor {floor:.3f}); encoder {type(encoder.backbone).__name__}, "
          f"{encoder.feature_dim} features")


if __name__ == "__main__":
    main()
