"""Evaluation of frozen encoders: feature extraction, weighted kNN, linear probes, CLI ``evaluate``.

Everything numeric is a pure function of feature tensors, so the training loop can monitor with the same
code the final evaluation uses:

    feats, labels = extract_features(lambda x: encoder(x)[0], train_set, batch_size=512, device="cpu")
    acc = knn_accuracy(feats, labels, test_feats, test_labels, num_classes=10)   # {"top1": .., "top5": ..}

    protoclr evaluate runs/simclr-0 --knn --linear cached

Accuracies are fractions in [0, 1]; the CLI prints percentages.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Similarity block budget for kNN when no chunk size is given: rows * N * 4 bytes stays under this.
_KNN_BLOCK_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------------------
# argument checks


def _check_features(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, D), got {shape}; flatten or pool features first.")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty; pass at least one row of features.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}; convert with .float().")


def _check_labels(name: str, y: Tensor, n: int, num_classes: int) -> None:
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != n:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{name} must be a 1-D tensor with one label per feature row ({n}), got {shape}.")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {y.dtype}; convert with .long().")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, num_classes={num_classes}), got range [{int(y.min())}, {int(y.max())}]; "
            "pass the dataset's number of classes as num_classes."
        )


def _check_num_classes(num_classes: int) -> None:
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")


# --------------------------------------------------------------------------------------------------------
# weighted kNN (Wu et al. 2018, InstDisc; the DINO `knn_classifier`)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Class scores of a cosine-similarity weighted kNN classifier.

    train_features: (N, D), train_labels: (N,) int in [0, C), test_features: (M, D) -> scores (M, C).

    For each test row: cosine similarity to every training row, keep the top ``k``, and add
    ``exp(sim / temperature)`` to the score of each neighbour's class (Wu et al. 2018, eq. 6; DINO uses the
    same rule with k=20, T=0.07 on ImageNet; k=200, T=0.1 is the InstDisc/CIFAR default). Test rows are
    processed ``chunk_size`` at a time so memory is ``chunk_size * N`` similarities; by default the chunk is
    sized to keep that block under 64 MiB (50,000 x 10,000 in float32 peaks at about 70 MiB besides the
    inputs). Scores are in the dtype of the features; ties in the top-k are broken as ``torch.topk`` does.
    """
    _check_num_classes(num_classes)
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    n, d = train_features.shape
    if test_features.shape[1] != d:
        raise ValueError(
            f"test_features has dimension {test_features.shape[1]} but train_features has {d}; "
            "extract both with the same encoder and feature head."
        )
    _check_labels("train_labels", train_labels, n, num_classes)
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}.")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of training rows ({n}); pass k <= {n}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}.")
    if chunk_size is None:
        chunk_size = max(1, _KNN_BLOCK_BYTES // (n * train_features.element_size()))
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")

    dtype = torch.promote_types(train_features.dtype, test_features.dtype)
    train = F.normalize(train_features.to(dtype), dim=1)  # (N, D)
    test = F.normalize(test_features.to(device=train.device, dtype=dtype), dim=1)  # (M, D)
    labels = train_labels.to(train.device)
    scores = torch.zeros(test.shape[0], num_classes, dtype=dtype, device=train.device)
    for start in range(0, test.shape[0], chunk_size):
        sim = test[start : start + chunk_size] @ train.T  # (b, N)
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()  # (b, k)
        scores[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)  # (b, C)
    return scores


def topk_accuracy(scores: Tensor, labels: Tensor, *, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose label is among the ``k`` highest scores, for each ``k`` in ``ks``.

    scores: (M, C), labels: (M,) -> {"top1": .., "top5": ..}. With fewer than ``k`` classes top-k is 1.0.
    Ties are resolved by ``torch.topk``.
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty 2-D tensor (M, C), got {tuple(scores.shape)}.")
    _check_labels("labels", labels, scores.shape[0], scores.shape[1])
    if not ks or any((not isinstance(k, int)) or k <= 0 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of positive ints, got {ks!r}.")
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (M, kmax)
    hit = top == labels.to(top.device)[:, None]  # (M, kmax)
    return {f"top{k}": hit[:, :k].any(dim=1).double().mean().item() for k in ks}


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of :func:`knn_predict` on labeled test features.

    train_features: (N, D), train_labels: (N,), test_features: (M, D), test_labels: (M,).
    """
    scores = knn_predict(
        train_features,
        train_labels,
        test_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        chunk_size=chunk_size,
    )
    return topk_accuracy(scores, test_labels)


# --------------------------------------------------------------------------------------------------------
# feature extraction and the on-disk cache


def _default_preprocess(images: Tensor) -> Tensor:
    """uint8 (B, C, H, W) -> float32 in [0, 1]; float input is passed through."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


def _num_rows(data: Any) -> int:
    return data.shape[0] if isinstance(data, Tensor) else len(data)


def _get_batch(data: Any, idx: Tensor) -> Tensor:
    if isinstance(data, Tensor):
        return data[idx]
    if hasattr(data, "get_images"):
        return data.get_images(idx)
    raise ValueError(
        "dataset_or_images must be an image tensor (N, C, H, W) or a dataset with get_images(indices), "
        f"got {type(data).__name__}."
    )


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def feature_cache_path(
    cache_dir: str | os.PathLike, checkpoint: str | os.PathLike, *, split: str, feature: str = "backbone"
) -> Path:
    """Cache file for the features of ``split`` under ``checkpoint``.

    The key hashes the checkpoint's resolved path, size and modification time (nanoseconds), so a new
    checkpoint at the same path gets a new file; ``split`` and ``feature`` name what was extracted
    (e.g. ``"cifar10_zip:test"``, ``"backbone"``).
    """
    ckpt = Path(checkpoint).resolve()
    st = ckpt.stat()
    digest = hashlib.sha256(f"{ckpt}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{split}-{feature}")
    return Path(cache_dir) / f"features-{safe}-{digest}.pt"


@torch.no_grad()
def extract_features(
    model_fn: Callable[[Tensor], Tensor],
    dataset_or_images: Any,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    preprocess: Callable[[Tensor], Tensor] | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Run ``model_fn`` over a dataset in batches and return ``(features (N, D) float32 on CPU, labels)``.

    dataset_or_images: an image tensor (N, C, H, W), or a dataset with ``get_images(indices)`` and
    ``labels`` (``protoclr.data.LabeledImages``); labels are None for a bare tensor. Each batch is moved to
    ``device``, passed through ``preprocess`` (default: uint8 -> float in [0, 1]; pass
    ``protoclr.views.eval_images`` for a dataset's evaluation resize/normalisation), then ``model_fn``,
    which must return (B, D) or (B, ...) features (flattened). Call ``model.eval()`` first: this function
    does not change module state. With ``cache`` (see :func:`feature_cache_path`) the result is loaded from
    that file if present (``weights_only=True``) and written atomically otherwise.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    labels = getattr(dataset_or_images, "labels", None)
    labels = torch.as_tensor(labels).long().cpu() if labels is not None else None
    if cache is not None and Path(cache).is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        n = _num_rows(dataset_or_images)
        if saved["features"].shape[0] != n:
            raise ValueError(
                f"cache {cache} holds {saved['features'].shape[0]} rows but the dataset has {n}; "
                "delete the file or key the cache by split."
            )
        return saved["features"], saved["labels"]
    n = _num_rows(dataset_or_images)
    if n == 0:
        raise ValueError("dataset_or_images is empty; pass at least one image.")
    preprocess = preprocess or _default_preprocess
    starts = range(0, n, batch_size)
    if progress:
        from rich.progress import track

        starts = track(starts, description="features", total=len(starts), transient=True)
    chunks = []
    for start in starts:
        idx = torch.arange(start, min(start + batch_size, n))
        x = preprocess(_get_batch(dataset_or_images, idx).to(device))  # (B, C, H, W)
        out = model_fn(x)
        if isinstance(out, tuple):
            raise ValueError("model_fn returned a tuple; pass e.g. `lambda x: encoder(x)[0]` for backbone features.")
        chunks.append(out.flatten(1).float().cpu())  # (B, D)
    features = torch.cat(chunks)  # (N, D)
    if cache is not None:
        atomic_save({"features": features, "labels": labels}, cache)
    return features, labels
