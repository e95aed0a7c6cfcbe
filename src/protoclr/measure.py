"""What is measured on which images: the full evaluation protocol and the floors a representation is read against.

    acc = evaluate_backbone(encoder.backbone, train, test, spec)   # {"knn_top1": ..., "linear_top1": ...}
    floor = raw_pixel_floor(train, test)                             # the same protocol on centered pixels
    init = random_init_floor(cfg, train, test, spec)                 # the run's encoder before any step

The full protocol: backbone features of every training image (the kNN bank and the probe's training set) and
every held-out image (scored), the deterministic evaluation crop of ``spec``; weighted kNN (Wu et al. 2018,
k=200, T=0.1) and the cached linear probe (L-BFGS on standardized features, weight decay chosen on 10% of the
training rows; :func:`protoclr.evaluate.linear_probe_cached`). Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from protoclr.evaluate import extract_features, knn_accuracy, linear_probe_cached
from protoclr.views import ViewSpec, eval_images

KNN_K = 200  # neighbours (InstDisc, Wu et al. 2018)
KNN_TEMPERATURE = 0.1  # weight exp(sim / T)


def score_features(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, *, num_classes: int,
                   linear: bool = True) -> dict[str, float]:
    """Weighted kNN and (if ``linear``) the cached linear probe: ``f_*`` (N, F) / (M, F), ``y_*`` (N,) / (M,)."""
    out = {"knn_top1": knn_accuracy(f_train, y_train, f_test, y_test, num_classes=num_classes,
                                    k=min(KNN_K, len(f_train)), temperature=KNN_TEMPERATURE)["top1"]}
    if linear:
        out["linear_top1"] = linear_probe_cached(f_train, y_train, f_test, y_test, num_classes=num_classes)["top1"]
    return out


@torch.no_grad()
def backbone_features(backbone: nn.Module, data: Any, spec: ViewSpec, *, batch_size: int = 1024,
                      device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """``(features (N, F) float32 on CPU, labels (N,))`` of every image of ``data`` (a ``LabeledImages``) in
    evaluation mode; the module's train/eval mode is restored afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        f, y = extract_features(backbone, data, batch_size=batch_size, device=device,
                                preprocess=lambda x: eval_images(x, spec))
    finally:
        backbone.train(was_training)
    return f, y


def evaluate_backbone(backbone: nn.Module, train: Any, test: Any, spec: ViewSpec, *, linear: bool = True,
                      batch_size: int = 1024, device: str | torch.device = "cpu") -> dict[str, float]:
    """The full protocol (module docstring) for ``backbone`` on ``train`` -> ``test``."""
    f_tr, y_tr = backbone_features(backbone, train, spec, batch_size=batch_size, device=device)
    f_te, y_te = backbone_features(backbone, test, spec, batch_size=batch_size, device=device)
    return score_features(f_tr, y_tr, f_te, y_te, num_classes=len(test.classes), linear=linear)


def raw_pixel_floor(train: Any, test: Any, *, linear: bool = True) -> dict[str, float]:
    """The full protocol on raw pixels, centered by the training mean: the floor any representation must beat.
    In-memory datasets only (their stored images, as uint8 -> float)."""
    x_tr = train.get_images(torch.arange(len(train))).flatten(1).float()  # (N, C*H*W)
    x_te = test.get_images(torch.arange(len(test))).flatten(1).float()
    mean = x_tr.mean(0)
    return score_features(x_tr - mean, train.labels.long(), x_te - mean, test.labels.long(),
                          num_classes=len(test.classes), linear=linear)


def random_init_floor(cfg: Any, train: Any, test: Any, spec: ViewSpec, *, linear: bool = True,
                      device: str | torch.device = "cpu") -> dict[str, float]:
    """The full protocol on the encoder of ``cfg`` as the run initializes it (seeded with ``train.seed``) before
    any step: how much of an accuracy the architecture gives without training."""
    from protoclr.models import build_encoder

    torch.manual_seed(cfg.train.seed)  # the loop seeds the same way right before it builds the encoder
    encoder = build_encoder(cfg.model, in_channels=spec.channels).to(device)
    return evaluate_backbone(encoder.backbone, train, test, spec, linear=linear, device=device)


__all__ = ["KNN_K", "KNN_TEMPERATURE", "backbone_features", "evaluate_backbone", "random_init_floor",
           "raw_pixel_floor", "score_features"]
