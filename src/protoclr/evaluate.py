"""Evaluation of frozen encoders: feature extraction, weighted kNN, linear probes.

Everything numeric is a pure function of feature tensors, so the training loop can monitor with the same
code the final evaluation uses:

    feats, labels = extract_features(lambda x: encoder(x)[0], train_set, batch_size=512, device="cpu")
    acc = knn_accuracy(feats, labels, test_feats, test_labels, num_classes=10)   # {"top1": .., "top5": ..}

Accuracies are fractions in [0, 1]. Which images, which k and which probe a measurement uses is protoclr.measure's;
the ``protoclr evaluate`` command is protoclr.evaluate_cmd.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoclr import atomic
from protoclr.precision import PRECISIONS, autocast

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


def _bar(items: Sequence[Any], description: str, show: bool) -> Iterable[Any]:
    """``items``, behind a transient rich bar with the remaining time when ``show``."""
    if not show:
        return items
    from rich.progress import track

    return track(items, description=description, total=len(items), transient=True)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """Class scores of a cosine-similarity weighted kNN classifier.

    train_features: (N, D), train_labels: (N,) int in [0, C), test_features: (M, D) -> scores (M, C).

    For each test row: cosine similarity to every training row, keep the top ``k``, and add
    ``exp(sim / temperature)`` to the score of each neighbour's class (Wu et al. 2018, eq. 6; DINO uses the
    same rule with k=20, T=0.07 on ImageNet; k=200, T=0.1 is the InstDisc/CIFAR default). Test rows are
    processed ``chunk_size`` at a time so memory is ``chunk_size * N`` similarities; by default the chunk is
    sized to keep that block under 64 MiB (50,000 x 10,000 in float32 peaks at about 70 MiB besides the
    inputs). Scores are in the dtype of the features; ties in the top-k are broken as ``torch.topk`` does.
    ``progress``: a transient rich bar over the chunks, with the remaining time.
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
    for start in _bar(range(0, test.shape[0], chunk_size), "kNN", progress):
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
    progress: bool = False,
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
        progress=progress,
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


@contextlib.contextmanager
def _channels_last_weights(module: Any) -> Iterator[None]:
    """While inside: every 4-D parameter of ``module`` (an ``nn.Module``; anything else is left alone) stored
    channels-last, as training stores them; on leaving, each parameter gets its own tensor back, so the module is
    as it was. With NCHW weights oneDNN converts layouts around the convolutions and pools NCHW: the demo's
    convnet extracts at 2.4x the speed with channels-last weights (docs/evaluation.md)."""
    params = [p for p in module.parameters() if p.dim() == 4] if isinstance(module, nn.Module) else []
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.data.contiguous(memory_format=torch.channels_last)
        yield
    finally:
        for p, data in zip(params, saved, strict=True):
            p.data = data


@torch.no_grad()
def extract_features(
    model_fn: Callable[[Tensor], Tensor],
    dataset_or_images: Any,
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    preprocess: Callable[[Tensor], Tensor] | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = False,
    precision: str = "auto",
    channels_last: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Run ``model_fn`` over a dataset in batches and return ``(features (N, D) float32 on CPU, labels)``.

    dataset_or_images: an image tensor (N, C, H, W), or a dataset with ``get_images(indices)`` and
    ``labels`` (``protoclr.data.LabeledImages``); labels are None for a bare tensor. Each batch is moved to
    ``device``, passed through ``preprocess`` (default: uint8 -> float in [0, 1]; pass
    ``protoclr.views.eval_images`` for a dataset's evaluation resize/normalisation), then ``model_fn``,
    which must return (B, D) or (B, ...) features (flattened). Call ``model.eval()`` first: this function
    leaves the module's state as it found it.

    Inference runs as training does (``protoclr.train``): under ``precision`` (``"auto"``: bf16 autocast on a GPU or a
    CPU with bf16 units, float32 elsewhere; ``"bf16-mixed"``; ``"32-true"``) and, with ``channels_last``, on NHWC
    batches (4-D inputs only) through channels-last weights: when ``model_fn`` is an ``nn.Module`` its 4-D parameters
    are stored channels-last while it runs and given back afterwards (with NCHW weights oneDNN runs the pools NCHW: 2.4x
    slower on the demo's convnet). Features come back float32 whatever the precision; bf16 features change weighted-kNN
    top-1 on Fashion-MNIST by a few test images in 10,000 (docs/evaluation.md).

    With ``cache`` (see :func:`feature_cache_path`) the result is loaded from that file if present
    (``weights_only=True``) and written atomically otherwise.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}.")
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
    chunks = []
    with _channels_last_weights(model_fn if channels_last else None):
        for start in _bar(range(0, n, batch_size), "features", progress):
            idx = torch.arange(start, min(start + batch_size, n))
            x = preprocess(_get_batch(dataset_or_images, idx).to(device))  # (B, C, H, W)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, precision):
                out = model_fn(x)
            if isinstance(out, tuple):
                raise ValueError(
                    "model_fn returned a tuple; pass e.g. `lambda x: encoder(x)[0]` for backbone features."
                )
            chunks.append(out.flatten(1).float().cpu())  # (B, D)
    features = torch.cat(chunks)  # (N, D)
    if cache is not None:
        atomic.torch_save({"features": features, "labels": labels}, cache)
    return features, labels


# --------------------------------------------------------------------------------------------------------
# linear probes


def feature_eigenbasis(features: Tensor) -> tuple[Tensor, Tensor]:
    """``(eigenvalues (D,), eigenvectors (D, D))`` of the second-moment matrix ``x^T x / N`` of features (N, D).

    The curvature of the logistic loss in the weights is bounded by half this matrix (Boehning 1992, for the
    multinomial case: ``H <= 1/2 (I - 11^T / C) kron x^T x / N``), so it preconditions
    :func:`fit_linear_classifier`; compute it once and pass it to every fit on the same rows.
    """
    _check_features("features", features)
    x = features.detach()
    moment = (x.T @ x).double() / x.shape[0]  # (D, D), accumulated in the features' dtype
    lam, q = torch.linalg.eigh(moment)  # (D,), (D, D)
    return lam.clamp_min(0).to(x.dtype), q.to(x.dtype)


def fit_linear_classifier(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 300,
    tol: float | None = None,
    init: tuple[Tensor, Tensor] | None = None,
    eigenbasis: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by full-batch, preconditioned L-BFGS (strong Wolfe line search).

    features: (N, D), labels: (N,) -> (weight (C, D), bias (C,)) in the dtype of ``features``.
    Minimises ``mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2``; the bias is not penalised. This is
    scikit-learn's ``LogisticRegression(C=1 / (weight_decay * N))`` objective, so the two agree.

    Stopping: when the largest entry of that objective's gradient (in W and b) is at most ``tol``
    (scikit-learn's rule: its ``tol=1e-4`` is scipy's ``gtol`` on the same mean objective), checked after every
    iteration as scipy checks it (from ``init``, not before 10); after ``max_iter`` iterations; or when 10 iterations
    made no progress (rounding). ``tol=None`` is 1e-6 in float32 and 1e-10 in float64 (an optimum to rounding).

    Deviation from a plain L-BFGS: it runs in the variables ``U = W Q diag(s)^-1`` with ``s = (lam / 2 +
    weight_decay)^(-1/2)``, where ``(lam, Q)`` is the eigenbasis of ``x^T x / N`` (:func:`feature_eigenbasis`,
    computed here unless passed in ``eigenbasis``): the Boehning bound on the Hessian becomes the identity, so
    the iteration count no longer grows with the spread of the feature spectrum (correlated features, small
    decays). The objective and its optimum are unchanged. ``init``: a warm start ``(weight (C, D), bias (C,))``,
    e.g. the solution at a nearby weight decay.
    """
    _check_num_classes(num_classes)
    _check_features("features", features)
    _check_labels("labels", labels, features.shape[0], num_classes)
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if not isinstance(max_iter, int) or max_iter <= 0:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}.")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be > 0 or None, got {tol!r}.")
    x, y = features.detach(), labels.to(features.device)
    n, d = x.shape
    if tol is None:
        tol = 1e-10 if x.dtype == torch.float64 else 1e-6
    lam, q = eigenbasis if eigenbasis is not None else feature_eigenbasis(x)  # (D,), (D, D)
    lam, q = lam.to(x.device, x.dtype), q.to(x.device, x.dtype)
    # floor: a direction the features never span has no curvature but the penalty's; keep its scale finite
    s = (0.5 * lam + weight_decay).clamp_min(1e-6 * float(lam.max().clamp_min(1e-12))).rsqrt()  # (D,)
    if init is None:
        w0 = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device)
        b0 = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
    else:
        w0, b0 = (t.detach().to(x.device, x.dtype) for t in init)
        if w0.shape != (num_classes, d) or b0.shape != (num_classes,):
            raise ValueError(f"init must be (weight ({num_classes}, {d}), bias ({num_classes},)), got "
                             f"({tuple(w0.shape)}, {tuple(b0.shape)}).")
    u = ((w0 @ q) / s).requires_grad_(True)  # (C, D): W = U diag(s) Q^T
    bias = b0.clone().requires_grad_(True)  # (C,)
    rows = torch.arange(n, device=x.device)
    largest = [math.inf]  # max |gradient| in (W, b) at the last evaluated point
    memo: dict[str, Any] = {}  # the last evaluation: point, loss, gradients, largest

    def closure() -> Tensor:
        # the gradient written out: one pass over x for the logits and one for the gradient, no autograd graph
        with torch.no_grad():
            if memo and torch.equal(memo["u"], u) and torch.equal(memo["bias"], bias):
                u.grad, bias.grad, largest[0] = memo["u_grad"], memo["bias_grad"], memo["largest"]
                return memo["loss"]
            weight = (u * s) @ q.T  # (C, D)
            logits = torch.addmm(bias, x, weight.T)  # (N, C)
            lse = logits.logsumexp(1)  # (N,)
            # reductions in float64: near the optimum a line search compares losses 1e-8 apart
            loss = (lse - logits[rows, y]).double().mean() + 0.5 * weight_decay * weight.double().pow(2).sum()
            resid = logits.sub_(lse[:, None]).exp_()  # (N, C) softmax
            resid[rows, y] -= 1  # dCE/dlogits
            resid /= n
            grad_w = torch.addmm(weight, resid.T, x, beta=weight_decay)  # (C, D)
            bias.grad = resid.sum(0)  # (C,)
            u.grad = (grad_w @ q) * s  # (C, D), the chain rule through W = U diag(s) Q^T
            largest[0] = max(grad_w.abs().max().item(), bias.grad.abs().max().item())
            memo.update(u=u.detach().clone(), bias=bias.detach().clone(), u_grad=u.grad, bias_grad=bias.grad,
                        largest=largest[0], loss=loss)
        return loss

    # L-BFGS one iteration per step() so the rule below is checked after every iteration; its state (the history)
    # persists between calls. The step's first evaluation and the check are at the point the line search just
    # accepted, usually its last evaluation: the memo returns that instead of two more passes over x.
    opt = torch.optim.LBFGS([u, bias], lr=1, max_iter=1, max_eval=25, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=0.0, tolerance_change=0.0)  # rule below
    losses: list[float] = []
    for i in range(max_iter + 1):
        loss = float(closure())  # the current point: scikit-learn's rule on the original variables
        # converged (a warm start takes 10 iterations first: a nearby decay's optimum often meets the rule already
        # while its objective is still well above this one's), or 10 iterations made no progress in this dtype
        if (largest[0] <= tol and (i >= 10 or init is None)) or (i >= 10 and loss >= losses[-10]) or i == max_iter:
            break
        losses.append(loss)
        opt.step(closure)
    with torch.no_grad():
        return (u * s) @ q.T, bias.detach()


def group_accuracy(scores: Tensor, labels: Tensor, groups: dict[str, Any]) -> dict[str, float]:
    """Top-1 accuracy (fraction) over the test rows whose label belongs to each group of classes.

    scores: (M, C), labels: (M,), groups: name -> class ids. A group with no test rows gets NaN, so an empty
    group stays visible in tables instead of reading as 0%.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (M, C), got {tuple(scores.shape)}.")
    _check_labels("labels", labels, scores.shape[0], scores.shape[1])
    hit = scores.argmax(1).cpu() == labels.cpu()  # (M,)
    out = {}
    for name, ids in groups.items():
        member = torch.isin(labels.cpu(), torch.as_tensor(ids, dtype=torch.long))  # (M,)
        out[name] = hit[member].double().mean().item() if member.any() else float("nan")
    return out


_COARSE_EVERY, _COARSE_MIN_ROWS = 8, 16_000  # the probe's coarse start (measured: 5.2 s -> 2.5 s, docs/evaluation.md)


def linear_probe_cached(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    weight_decays: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 300,
    tol: float = 1e-4,
    standardize: bool = True,
    groups: dict[str, Any] | None = None,
    patience: int | None = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """Linear probe on features computed once: pick weight decay on a held-out split, refit, test.

    train_features: (N, D), train_labels: (N,), test_features: (M, D), test_labels: (M,).
    ``val_fraction`` of the training rows (random, ``seed``) score each value of ``weight_decays``; the best by
    validation top-1 (ties: the larger decay) is refitted on all training rows. Every fit minimises scikit-learn's
    ``LogisticRegression(C = 1 / (weight_decay * rows))`` objective with :func:`fit_linear_classifier` until its largest
    gradient entry is at most ``tol`` (1e-4: scikit-learn's default rule). The decays are fitted from the largest down,
    each warm-started at the previous solution (the regularisation path: a smaller decay moves the optimum a little and
    the well-conditioned large-decay fits are cheap; the first, from zero, starts at the same fit on every 8th row when
    there are at least 16,000 and they hold every class), and the refit starts from the chosen decay's solution on the
    90%. The path stops once ``patience`` decays in a row score strictly below the best so far (the smaller, slower
    decays past a peak are not fitted; ``None`` fits every decay), so the choice is the exhaustive one wherever
    validation top-1 does not fall twice and then rise again toward smaller decays. ``standardize`` centres and scales
    each feature by training statistics first (a fixed affine map, so the probe stays linear in the frozen features).
    Features are used in their own dtype (float32 from :func:`extract_features`). Returns top1/top5 on the test rows,
    the chosen ``weight_decay``, ``val_top1`` per decay fitted, and per-group top-1 if ``groups``. ``progress``: a
    transient rich bar over the decays, with the remaining time (the path may stop before its end).
    """
    _check_num_classes(num_classes)
    for name, f in (("train_features", train_features), ("test_features", test_features)):
        _check_features(name, f)
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"test_features has dimension {test_features.shape[1]} but train_features has "
            f"{train_features.shape[1]}; extract both with the same encoder."
        )
    _check_labels("train_labels", train_labels, train_features.shape[0], num_classes)
    _check_labels("test_labels", test_labels, test_features.shape[0], num_classes)
    if not weight_decays or any(not wd >= 0 for wd in weight_decays):
        raise ValueError(f"weight_decays must be a non-empty tuple of values >= 0, got {weight_decays!r}.")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}.")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive int or None (fit every decay), got {patience!r}.")
    n = train_features.shape[0]
    n_val = round(val_fraction * n)
    if not 0 < val_fraction < 1 or n_val < 1 or n - n_val < 1:
        raise ValueError(
            f"val_fraction={val_fraction!r} leaves {n_val} validation and {n - n_val} training rows of {n}; "
            "pick a fraction in (0, 1) that leaves both non-empty."
        )
    x_tr, x_te = train_features, test_features.to(train_features.device, train_features.dtype)
    if standardize:
        mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)  # (D,)
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    y_tr = train_labels.to(x_tr.device)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x_tr.device)
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    x_fit, y_fit = x_tr[fit_idx], y_tr[fit_idx]  # (N - n_val, D), (N - n_val,)
    basis = feature_eigenbasis(x_fit)  # one preconditioner for every fit (it changes no optimum)
    val_top1, solution, start, below = {}, {}, None, 0
    sub = slice(None, None, _COARSE_EVERY)  # the path's first fit starts from the same fit on every 8th row
    if len(y_fit) >= _COARSE_MIN_ROWS and y_fit[sub].unique().numel() == y_fit.unique().numel():
        start = fit_linear_classifier(x_fit[sub].contiguous(), y_fit[sub], num_classes=num_classes,
                                      weight_decay=max(weight_decays), max_iter=max_iter, tol=tol, eigenbasis=basis)
    # from the largest decay down, each fit warm-started
    for wd in _bar(sorted(set(weight_decays), reverse=True), "probe (decays)", progress):
        start = solution[wd] = fit_linear_classifier(x_fit, y_fit, num_classes=num_classes, weight_decay=wd,
                                                     max_iter=max_iter, tol=tol, init=start, eigenbasis=basis)
        val_top1[wd] = topk_accuracy(x_tr[val_idx] @ start[0].T + start[1], y_tr[val_idx], ks=(1,))["top1"]
        below = below + 1 if val_top1[wd] < max(val_top1.values()) else 0
        if below == patience:
            break
    val_top1 = {wd: val_top1[wd] for wd in weight_decays if wd in val_top1}  # the caller's order
    best = max(val_top1, key=lambda wd: (val_top1[wd], wd))
    w, b = fit_linear_classifier(x_tr, y_tr, num_classes=num_classes, weight_decay=best, max_iter=max_iter,
                                 tol=tol, init=solution[best], eigenbasis=basis)
    scores = x_te @ w.T + b  # (M, C)
    out: dict[str, Any] = {**topk_accuracy(scores, test_labels), "weight_decay": best, "val_top1": val_top1}
    if groups is not None:
        out["groups"] = group_accuracy(scores, test_labels, groups)
    return out


def random_crop_flip(images: Tensor, *, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-image random crop (reflect padding, same output size) and horizontal flip with p=0.5.

    images: (B, C, H, W) any dtype -> (B, C, H, W). The CIFAR linear-evaluation augmentation
    (padding 4 at 32 px); one random offset and flip per image, drawn on the CPU from ``generator``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}.")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}.")
    b, _, h, w = images.shape
    dev = images.device
    off = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(dev)  # (2, B)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)  # (B,)
    padded = F.pad(images.float(), (padding,) * 4, mode="reflect") if padding else images.float()
    rows = off[0][:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = off[1][:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # (B, W)
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).to(images.dtype)  # (B, C, H, W)


def linear_probe_augmented(
    backbone_fn: Callable[[Tensor], Tensor],
    train_data: Any,
    test_data: Any,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = 0.1,  # per 256 images
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    padding: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    preprocess: Callable[[Tensor], Tensor] | None = None,
    groups: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The standard linear evaluation: a linear layer on the frozen backbone, fresh crop + flip every epoch.

    train_data / test_data: image tensors (N, C, H, W) or datasets with ``get_images`` and ``labels``;
    ``backbone_fn``: (B, C, H, W) preprocessed images -> (B, D) features (put the model in eval mode).
    SGD with momentum, learning rate ``lr * batch_size / 256`` on a per-step cosine schedule to 0 (as
    SimCLR/MoCo's linear evaluation; MoCo uses lr 30 without feature normalisation, we keep features raw
    too). ``padding`` defaults to H // 8 (4 px at 32). Test images are not augmented. Returns top1/top5
    (fractions), per-group top-1 if ``groups``, and the final training loss.
    """
    _check_num_classes(num_classes)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}.")
    train_y = getattr(train_data, "labels", None)
    test_y = getattr(test_data, "labels", None)
    if train_y is None or test_y is None:
        raise ValueError("train_data and test_data must carry labels (use protoclr.data.LabeledImages).")
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    n = _num_rows(train_data)
    _check_labels("train_data.labels", train_y, n, num_classes)
    preprocess = preprocess or _default_preprocess
    gen = torch.Generator().manual_seed(seed)
    first = _get_batch(train_data, torch.arange(min(2, n)))
    if padding is None:
        padding = first.shape[-2] // 8
    with torch.no_grad():
        dim = backbone_fn(preprocess(first.to(device))).flatten(1).shape[1]
    head = torch.nn.Linear(dim, num_classes).to(device)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=torch.Generator(device=head.weight.device).manual_seed(seed))
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = -(-n // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    loss = torch.tensor(float("nan"))  # the last step's loss, reported
    for _ in _bar(range(epochs), "linear probe", progress):
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            x = random_crop_flip(_get_batch(train_data, idx), padding=padding, generator=gen).to(device)
            with torch.no_grad():
                h = backbone_fn(preprocess(x)).flatten(1)  # (B, D)
            loss = F.cross_entropy(head(h), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    feats, _ = extract_features(backbone_fn, test_data, batch_size=batch_size, device=device, preprocess=preprocess)
    with torch.no_grad():
        scores = head.to("cpu")(feats)  # (M, C)
    out: dict[str, Any] = {**topk_accuracy(scores, test_y), "train_loss": loss.item()}
    if groups is not None:
        out["groups"] = group_accuracy(scores, test_y, groups)
    return out

