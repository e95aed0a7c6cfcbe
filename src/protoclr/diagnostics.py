"""Theory diagnostics: prototype representation bias, the bounds linking contrastive and supervised
objectives, and feature geometry.

The maths are pure functions of per-view features ``feats: (K, N, D)`` (K augmentations of N labeled
images) so they can be checked by hand; :func:`view_features` produces that tensor from an encoder.

Notation: ``f`` features of one view, ``mu~_x = E_t f(t(x))`` the surrogate prototype of image x (mean
over its K views), ``mu_y = E_{x|y} E_t f(t(x))`` the class prototype, ``s`` cosine similarity.

* bias (:func:`bias_from_features`): ``d(mu~_x, mu_y^{-x})`` averaged over images, as Euclidean distance,
  cosine distance and angle in degrees, on raw or L2-normalised per-view features; ``mu_y^{-x}`` is the mean of
  every view of the *other* images of x's class (:func:`other_images_prototypes`; a class with one image is an
  error). Debiased (:func:`debiased_bias_terms`): from K views the squared distance is inflated by ``s_x^2 / K``
  (``s_x^2 = sum_v ||f_v - mu~_x||^2 / (K - 1)``, the view variance) plus ``v_x / m`` (the other images' mean);
  with ``m = n_y - 1`` and ``p = mu_y^{-x}``, unbiased pieces
    A = (||sum_v f_v||^2 - sum_v ||f_v||^2) / (K (K - 1))       for ||mu_x||^2
    B = mu~_x . p                                                for mu_x . mu_y   (p is independent of x's views)
    C = sum_{j != j' in other images} mu~_j . mu~_j' / (m (m - 1))  for ||mu_y||^2
  give ``||mu_x - mu_y||^2 ~ A - 2B + C`` and, per class, ``cos = sum B / sqrt(n_y sum A C)``.
* bounds (:func:`bound_terms`), per anchor ``z = f(t_v(x))``:
    attraction   -s(z, mu~_x)              <=  -E_t' s(z, f(t'(x)))                          (Jensen)
    supervised attraction -s(z, mu_y^{-x}) (leave-one-out, as the bias; the repulsion's mu_y' hold no x)
    repulsion    max_{y'!=y} s(z, mu_y')   <=  E_T' (1/(nu a)) log E_X' exp(a s(z, f(T'(X'))))
                                               + (1/(nu a)) log n
  The first needs unit-norm features and ``E_t' s(z, f(t'(x))) >= 0``; the second unit-norm features,
  a balanced probe set (``p_y >= 1/n``), ``nu <= ||mu_y||`` and a non-negative maximum. Each is checked
  and reported next to the gaps, so a violated assumption is visible (see docs/evaluation.md).
* geometry (:func:`geometry`): alignment and uniformity (Wang & Isola 2020), effective rank (Roy &
  Vetterli 2007), mean positive / negative similarity, contrastive top-1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protoclr.views import make_views, view_spec

_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------
# checks and shared pieces


def _check_views(feats: Tensor, labels: Tensor, num_classes: int, *, min_views: int = 1) -> None:
    if not isinstance(feats, Tensor) or feats.dim() != 3:
        shape = tuple(feats.shape) if isinstance(feats, Tensor) else type(feats).__name__
        raise ValueError(f"feats must be (K, N, D) per-view features, got {shape}; stack the K views on dim 0.")
    if not feats.is_floating_point():
        raise ValueError(f"feats must be floating point, got {feats.dtype}.")
    k, n, _ = feats.shape
    if k < min_views:
        raise ValueError(f"feats has {k} view(s) per image; this needs views >= {min_views}.")
    if n == 0:
        raise ValueError("feats has no images (N = 0); pass a non-empty probe set.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of shape (N,) = ({n},), got {shape}.")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got [{int(labels.min())}, {int(labels.max())}]."
        )
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"classes {empty[:10]} have no images in the probe set; pass a probe set with every class "
            "(e.g. protoclr.splits.uniform_subset) or relabel to the classes present."
        )


def class_prototypes_from_views(feats: Tensor, labels: Tensor, *, num_classes: int) -> Tensor:
    """``mu_y``: the mean of every view of every image of class y. feats: (K, N, D) -> (C, D)."""
    _check_views(feats, labels, num_classes)
    surrogate = feats.mean(0)  # (N, D) = mu~_x
    sums = torch.zeros(num_classes, feats.shape[2], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, labels.to(feats.device), surrogate)  # (C, D)
    counts = torch.bincount(labels.to(feats.device), minlength=num_classes).to(feats.dtype)  # (C,)
    return sums / counts[:, None]


def other_images_prototypes(feats: Tensor, labels: Tensor, *, num_classes: int) -> Tensor:
    """``mu_y^{-x}``: for each image x, the mean of every view of the *other* images of its class.

    feats: (K, N, D), labels: (N,) -> (N, D). An estimate of ``mu_{y(x)}`` independent of x's own views (the
    leave-one-out prototype of the bias and of the supervised attraction term). A class with one image has no
    other image to average, so it is an error (the probe set is too small for that class).
    """
    _check_views(feats, labels, num_classes)
    y = labels.to(feats.device)
    counts = torch.bincount(y, minlength=num_classes)  # (C,)
    lone = (counts < 2).nonzero().flatten().tolist()
    if lone:
        raise ValueError(f"leave-one-out class prototypes need at least 2 images per class; classes {lone[:10]} have "
                         "one. Pass more probe images.")
    n_y = counts.to(feats.dtype)[y][:, None]  # (N, 1) images of each one's class
    protos = class_prototypes_from_views(feats, labels, num_classes=num_classes)[y]  # (N, D)
    return (n_y * protos - feats.mean(0)) / (n_y - 1)  # (N, D): remove x's share, renormalise by n_y - 1


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity; zero vectors give 0. a, b: (..., D) -> (...)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(_EPS)


# --------------------------------------------------------------------------------------------------------
# prototype representation bias


def view_variance(feats: Tensor) -> Tensor:
    """``s_x^2 = sum_v ||f_v - mu~_x||^2 / (K - 1)``: each image's unbiased view variance (trace). (K, N, D) -> (N,)."""
    if feats.dim() != 3 or feats.shape[0] < 2:
        raise ValueError(f"feats must be (K, N, D) with K >= 2 views, got {tuple(feats.shape)}.")
    return (feats - feats.mean(0)).pow(2).sum(-1).sum(0) / (feats.shape[0] - 1)


def debiased_bias_terms(feats: Tensor, labels: Tensor, *, num_classes: int) -> dict[str, Tensor]:
    """Per-image pieces of the bias freed of the view noise and of the class mean's sampling noise; all (N,).

    feats: (K, N, D) with K >= 2, labels: (N,) with >= 3 images in every class. With ``f_v`` the views of x,
    ``mu~_x`` their mean and ``p = mu_y^{-x}`` the mean of the other ``m = n_y - 1`` images of the class
    (independent of x's views), three unbiased estimates:

        A = (||sum_v f_v||^2 - sum_v ||f_v||^2) / (K (K - 1)) = ||mu~_x||^2 - s_x^2 / K      for ||mu_x||^2
        B = mu~_x . p                                                                           for mu_x . mu_y
        C = sum_{j != j' other images} mu~_j . mu~_j' / (m (m - 1)) = ||p||^2 - v_x / m        for ||mu_y||^2

    with ``s_x^2 = sum_v ||f_v - mu~_x||^2 / (K - 1)`` the view variance (trace) and ``v_x`` the same over the
    other images' ``mu~_j``; ``mu_y`` is the population class mean. Returns them as ``mu_x_sq``, ``mu_x_dot_mu_y``,
    ``mu_y_sq``, with ``sq_euclidean_debiased = A - 2B + C`` (unbiased for ``||mu_x - mu_y||^2``: the plain
    ``||mu~_x - p||^2`` exceeds it by ``s_x^2 / K + v_x / m``) and ``view_variance = s_x^2``.
    """
    _check_views(feats, labels, num_classes, min_views=2)
    k = feats.shape[0]
    y = labels.to(feats.device)
    counts = torch.bincount(y, minlength=num_classes)  # (C,)
    if int(counts.min()) < 3:
        raise ValueError("the debiased bias needs at least 3 images per class (pairs of other images estimate "
                         f"||mu_y||^2); the smallest class has {int(counts.min())}.")
    surrogate = feats.mean(0)  # (N, D) mu~_x
    view_var = view_variance(feats)  # (N,) s_x^2
    c = class_prototypes_from_views(feats, labels, num_classes=num_classes)[y]  # (N, D), x included
    u = surrogate - c  # (N, D); centred per class, so no large terms cancel below
    u2 = u.pow(2).sum(-1)  # (N,)
    u2_class = torch.zeros(num_classes, dtype=feats.dtype, device=feats.device).index_add_(0, y, u2)[y]  # (N,)
    n = counts.to(feats.dtype)[y]  # (N,)
    m = n - 1
    p = c - u / m[:, None]  # (N, D) = mu_y^{-x}
    p_excess = u2 / m**2 - (2 * u2 - u2_class) / (m * (m - 1))  # ||p||^2 - C = v_x / m
    return {
        "mu_x_sq": surrogate.pow(2).sum(-1) - view_var / k,
        "mu_x_dot_mu_y": (surrogate * p).sum(-1),
        "mu_y_sq": p.pow(2).sum(-1) - p_excess,
        "sq_euclidean_debiased": u2 * (n / m) ** 2 - view_var / k - p_excess,  # A - 2B + C; ||mu~_x - p|| = ||u|| n/m
        "view_variance": view_var,
    }


def _debiased_class_cosine(t: dict[str, Tensor], labels: Tensor, num_classes: int) -> Tensor:
    """``E_{x|y}[B] / sqrt(E_{x|y}[A C])`` per class, clamped to [-1, 1]: (C,). Moments are averaged over the class
    before the ratio, so its noise bias is O(1 / n_y) (a per-image ratio of noisy A, C is biased at O(1 / K))."""
    y = labels.to(t["mu_x_sq"].device)
    zeros = torch.zeros(num_classes, dtype=t["mu_x_sq"].dtype, device=y.device)
    dot = zeros.index_add(0, y, t["mu_x_dot_mu_y"])
    norms = zeros.index_add(0, y, t["mu_x_sq"] * t["mu_y_sq"])
    counts = torch.bincount(y, minlength=num_classes).to(dot.dtype)
    return (dot / (counts * norms).clamp_min(_EPS).sqrt()).clamp(-1, 1)


def bias_from_features(feats: Tensor, labels: Tensor, *, num_classes: int, normalize: bool = True,
                       leave_one_out: bool = True) -> dict[str, Any]:
    """Prototype representation bias ``d(mu~_x, mu_{y(x)})`` for three distances, plain and debiased.

    feats: (K, N, D) per-view features, labels: (N,). With ``normalize`` each view is L2-normalised before
    any mean. Returns ``euclidean`` (||mu~_x - mu_y||), ``sq_euclidean`` (its square), ``cosine`` (1 - cos),
    ``angle_deg`` (arccos of cos, degrees) and ``view_variance`` (``s_x^2``), each averaged over images; the debiased
    estimates built from :func:`debiased_bias_terms`: ``sq_euclidean_debiased`` (mean of ``A - 2B + C``, unbiased
    for ``E_x ||mu_x - mu_y||^2``), ``cosine_debiased`` / ``angle_deg_debiased`` (per class
    ``cos_y = sum_x B / sqrt(n_y sum_x A C)``, clamped to [-1, 1], then weighted by class share; it estimates
    ``||mu_y|| / sqrt(E_{x|y} ||mu_x||^2)``, i.e. ``tan^2 = tr Cov_{x|y}(mu_x) / ||mu_y||^2``: the angle of the class's
    spread of image means, which is not the mean of per-image angles, because a per-image angle from K noisy views
    stays biased however its cosine is corrected); and ``per_class``: every one of them as a (C,) tensor (over the
    images of each class). Zero when every image's views equal its class prototype; invariant to the order of
    images and of views.

    ``leave_one_out``: the class prototype an image is compared with is the mean of the *other* images of its
    class, an estimate of ``mu_y`` independent of ``mu~_x``. Including the image pulls its prototype toward it:
    with ``n_y`` images per class the Euclidean distance shrinks by the factor ``(n_y - 1) / n_y`` exactly
    (``mu_y - mu~_x = (n_y - 1) / n_y * (mu_y^{-x} - mu~_x)``): 10% at 10 images per class, 2% at 50. A class with
    one image has no other to compare with: an error, unless ``leave_one_out=False``.

    Why debias: from K views, ``||mu~_x - mu_y^{-x}||^2`` exceeds ``||mu_x - mu_y||^2`` by the view variance over
    K (plus the class mean's own noise), so a treatment that spreads the views (rotation, cutout) raises the plain
    bias even where ``mu_x`` does not move; the debiased fields do not. They always leave x out (B needs it) and
    are nan where undefined: K = 1 (``view_variance`` too) or a class with fewer than 3 images.
    """
    _check_views(feats, labels, num_classes)
    f = F.normalize(feats, dim=-1) if normalize else feats
    surrogate = f.mean(0)  # (N, D)
    y = labels.to(f.device)
    if leave_one_out:
        protos = other_images_prototypes(f, labels, num_classes=num_classes)  # (N, D)
    else:
        protos = class_prototypes_from_views(f, labels, num_classes=num_classes)[y]  # (N, D)
    cos = _cos(surrogate, protos).clamp(-1, 1)  # (N,)
    per_image = {
        "euclidean": (surrogate - protos).norm(dim=-1),
        "sq_euclidean": (surrogate - protos).pow(2).sum(-1),
        "cosine": 1 - cos,
        "angle_deg": torch.rad2deg(torch.arccos(cos)),
    }
    counts = torch.bincount(y, minlength=num_classes)  # (C,)
    k = f.shape[0]
    per_image["view_variance"] = view_variance(f) if k >= 2 else torch.full_like(cos, math.nan)
    per_class = {
        name: torch.zeros(num_classes, dtype=f.dtype, device=f.device).index_add_(0, y, v) / counts.to(f.dtype)
        for name, v in per_image.items()
    }
    if k >= 2 and int(counts.min()) >= 3:
        t = debiased_bias_terms(f, labels, num_classes=num_classes)
        per_class["sq_euclidean_debiased"] = torch.zeros_like(per_class["cosine"]).index_add_(
            0, y, t["sq_euclidean_debiased"]) / counts.to(f.dtype)
        cos_y = _debiased_class_cosine(t, labels, num_classes)  # (C,)
        per_class["cosine_debiased"], per_class["angle_deg_debiased"] = 1 - cos_y, torch.rad2deg(torch.arccos(cos_y))
    else:
        for name in ("sq_euclidean_debiased", "cosine_debiased", "angle_deg_debiased"):
            per_class[name] = torch.full_like(per_class["cosine"], math.nan)
    share = counts.to(f.dtype) / len(y)  # (C,): per-class values weighted by class share = the mean over images
    out: dict[str, Any] = {name: (v * share).sum().item() for name, v in per_class.items()}
    out["per_class"] = per_class
    return out


def bias_report(features: dict[str, Tensor], labels: Tensor, *, num_classes: int) -> dict[str, Any]:
    """Every documented bias variant: ``{head: {"raw"|"normalized": bias_from_features(...)}}``.

    features: head name ("backbone", "projector") -> (K, N, D_head). Per-class tensors become lists.
    """
    report: dict[str, Any] = {}
    for head, f in features.items():
        report[head] = {}
        for variant, normalize in (("raw", False), ("normalized", True)):
            b = bias_from_features(f, labels, num_classes=num_classes, normalize=normalize)
            b["per_class"] = {k: v.tolist() for k, v in b["per_class"].items()}
            report[head][variant] = b
    return report


# --------------------------------------------------------------------------------------------------------
# bound terms


def bound_terms_per_anchor(
    feats: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    alpha: float,
    nu: float,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Every term of both bounds for each anchor ``z = f(t_v(x_i))``; all outputs are (K, N).

    feats: (K, N, D), labels: (N,). Positives are the other K - 1 views of the same image (leave-one-out,
    as a contrastive loss pairs an anchor with another view); ``mu~`` is their mean. The repulsion's ``mu_y'``
    and the negatives use every view of every image, so ``E_X'`` is the probe set's empirical distribution and
    ``E_T'`` the mean over view index. ``n = num_classes``. Similarity is cosine; ``normalize`` L2-normalises
    the features first (the bounds' assumption; pass False to see what breaks without it).

    attraction: ``sup_attraction = -s(z, mu_y^{-x})`` with ``mu_y^{-x}`` the mean of every view of the *other*
    images of x's class (:func:`other_images_prototypes`, as the bias's leave-one-out prototype: the full ``mu_y``
    holds x's own K views, ``1 / n_y`` of it, whose pull on ``z`` is not the class's; an error for a class with
    one image), ``surrogate_attraction = -s(z, mu~)``,
    ``ssl_attraction = -mean_{k!=v} s(z, f_k(x))``, ``attraction_gap = ssl - surrogate`` (>= 0 by Jensen).
    repulsion: ``sup_repulsion = max_{y'!=y} s(z, mu_y')`` with the full prototypes of the *other* classes (they do
    not contain x, so there is nothing to leave out), ``ssl_repulsion`` the right-hand side,
    ``repulsion_gap = ssl - sup`` (>= 0 under the assumptions). Also the per-anchor assumption inputs:
    ``positive_mean`` (= -ssl_attraction), ``nearest_class`` (argmax y'), its probe-set proportion times n
    ``nearest_class_balance`` (>= 1 needed) and its prototype norm ``nearest_prototype_norm`` (>= nu needed).
    """
    _check_views(feats, labels, num_classes, min_views=2)
    if num_classes < 2:
        raise ValueError("num_classes must be >= 2 for the repulsion term (it maximises over other classes).")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}.")
    if not nu > 0:
        raise ValueError(f"nu must be > 0, got {nu!r}.")
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    k, n, d = feats.shape
    f = F.normalize(feats, dim=-1) if normalize else feats  # (K, N, D)
    fhat = F.normalize(f, dim=-1)  # cosine similarity = dot product of unit vectors
    y = labels.to(f.device)
    protos = class_prototypes_from_views(f, y, num_classes=num_classes)  # (C, D)
    proto_norm = protos.norm(dim=-1)  # (C,)
    proportion = torch.bincount(y, minlength=num_classes).to(f.dtype) / n  # (C,)

    # attraction: leave-one-out positives
    z = fhat  # (K, N, D) anchors, unit norm
    pos_sum = fhat.sum(0, keepdim=True)  # (1, N, D)
    pos_mean = ((z * pos_sum).sum(-1) - (z * fhat).sum(-1)) / (k - 1)  # (K, N)
    loo = (f.sum(0, keepdim=True) - f) / (k - 1)  # (K, N, D) mu~ without view v
    surrogate_attr = -_cos(z, loo)  # (K, N)
    sup_attr = -_cos(z, other_images_prototypes(f, y, num_classes=num_classes)[None])  # (K, N), mu_y^{-x}

    # repulsion
    proto_sim = z @ F.normalize(protos, dim=-1).T  # (K, N, C)
    own = F.one_hot(y, num_classes).bool()[None]  # (1, N, C)
    sup_rep, nearest = proto_sim.masked_fill(own, -math.inf).max(-1)  # (K, N)
    anchors = z.reshape(k * n, d)  # (KN, D)
    negatives = fhat.reshape(k * n, d)  # (K' N', D), ordered view-major
    lse = torch.empty(k * n, dtype=f.dtype, device=f.device)
    for start in range(0, k * n, chunk_size):
        sim = anchors[start : start + chunk_size] @ negatives.T  # (b, K' N')
        per_view = torch.logsumexp(alpha * sim.view(-1, k, n), dim=-1) - math.log(n)  # (b, K') log E_X'
        lse[start : start + chunk_size] = per_view.mean(-1)  # E_T'
    ssl_rep = (lse.view(k, n) + math.log(num_classes)) / (nu * alpha)  # (K, N)
    return {
        "sup_attraction": sup_attr,
        "surrogate_attraction": surrogate_attr,
        "ssl_attraction": -pos_mean,
        "attraction_gap": -pos_mean - surrogate_attr,
        "sup_repulsion": sup_rep,
        "ssl_repulsion": ssl_rep,
        "repulsion_gap": ssl_rep - sup_rep,
        "positive_mean": pos_mean,
        "nearest_class": nearest,
        "nearest_class_balance": proportion[nearest] * num_classes,
        "nearest_prototype_norm": proto_norm[nearest],
    }


def bound_terms(
    feats: Tensor,
    labels: Tensor,
    *,
    num_classes: int,
    alphas: tuple[float, ...] = (1.0, 5.0, 10.0),
    nus: tuple[float, ...] = (1.0,),
    normalize: bool = True,
    tol: float = 1e-5,
    nu_at_min_norm: bool = False,
) -> dict[str, Any]:
    """Bound terms averaged over anchors, their gaps, and the assumptions they rest on.

    feats: (K, N, D), labels: (N,). See :func:`bound_terms_per_anchor` for each term. Returns
    ``attraction`` (means of the terms, ``gap`` and ``gap_min``, ``holds_fraction`` = share of anchors
    with gap >= -tol, and ``bias_gap = s(z, mu~) - s(z, mu_y^{-x})``, supervised minus surrogate attraction, both
    leave-one-out: how much closer an anchor is to its surrogate prototype than to its class's other images),
    ``repulsion`` keyed ``"alpha=A,nu=V"`` with the same fields, ``assumptions``
    (unit norm, non-negative positives, class counts and ``balance_ratio = n * min_y p_y``, prototype norms,
    non-negative nearest-prototype similarity) and ``violations``: one sentence per failed assumption.
    A bound whose assumptions all hold has ``holds_fraction == 1``; a test checks that.

    ``nu_at_min_norm``: also the repulsion terms at ``nu = min_y ||mu_y||`` (``assumptions["nu_min_norm"]``), the
    largest nu that satisfies the bound's ``nu <= ||mu_y||`` on this probe set (the per-anchor condition uses
    the nearest class's norm, so it holds for every anchor), keyed ``"alpha=A,nu=min"``.
    """
    if not alphas or not nus:
        raise ValueError("alphas and nus must be non-empty tuples of positive numbers.")
    if any(not nu > 0 for nu in nus):
        raise ValueError(f"nus must all be > 0, got {tuple(nus)!r}.")
    f = F.normalize(feats, dim=-1) if normalize else feats
    norms = f.norm(dim=-1)  # (K, N)
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    report: dict[str, Any] = {"num_anchors": feats.shape[0] * feats.shape[1], "num_classes": num_classes}
    violations: list[str] = []
    repulsion = {}
    protos = class_prototypes_from_views(f, labels, num_classes=num_classes)
    pnorm = protos.norm(dim=-1)
    nu_min = pnorm.min().item()
    for alpha in alphas:
        t = bound_terms_per_anchor(f, labels, num_classes=num_classes, alpha=alpha, nu=1.0, normalize=False)
        for key, nu in [(f"{n:g}", n) for n in nus] + ([("min", nu_min)] if nu_at_min_norm else []):
            ssl = t["ssl_repulsion"] / nu  # the right-hand side scales as 1 / nu; nothing else depends on nu
            gap = ssl - t["sup_repulsion"]
            repulsion[f"alpha={alpha:g},nu={key}"] = {
                "supervised": t["sup_repulsion"].mean().item(),
                "self_supervised": ssl.mean().item(),
                "gap": gap.mean().item(),
                "gap_min": gap.min().item(),
                "holds_fraction": (gap >= -tol).double().mean().item(),
            }
    report["attraction"] = {
        "supervised": t["sup_attraction"].mean().item(),
        "surrogate": t["surrogate_attraction"].mean().item(),
        "self_supervised": t["ssl_attraction"].mean().item(),
        "gap": t["attraction_gap"].mean().item(),
        "gap_min": t["attraction_gap"].min().item(),
        "holds_fraction": (t["attraction_gap"] >= -tol).double().mean().item(),
        "bias_gap": (t["sup_attraction"] - t["surrogate_attraction"]).mean().item(),
    }
    report["repulsion"] = repulsion
    a = {
        "max_norm_deviation": (norms - 1).abs().max().item(),
        "positive_nonneg_fraction": (t["positive_mean"] >= 0).double().mean().item(),
        "class_counts": counts.tolist(),
        "balance_ratio": (counts.min() * num_classes / counts.sum()).item(),
        "prototype_norm_min": nu_min,
        "nu_min_norm": nu_min,
        "prototype_norm_mean": pnorm.mean().item(),
        "prototype_norm_max": pnorm.max().item(),
        "nearest_similarity_nonneg_fraction": (t["sup_repulsion"] >= 0).double().mean().item(),
    }
    report["assumptions"] = a
    if a["max_norm_deviation"] > tol:
        violations.append(
            f"features are not unit norm (max | ||f|| - 1 | = {a['max_norm_deviation']:.3g}): both bounds assume "
            "normalised features; use normalize=True"
        )
    if a["positive_nonneg_fraction"] < 1:
        violations.append(
            f"{1 - a['positive_nonneg_fraction']:.1%} of anchors have negative mean positive similarity: the "
            "attraction bound needs E_t' s(z, f(t'(x))) >= 0"
        )
    if a["balance_ratio"] < 1 - tol:
        violations.append(
            f"probe set is imbalanced (n * min_y p_y = {a['balance_ratio']:.3g} < 1, counts "
            f"{min(a['class_counts'])}..{max(a['class_counts'])}): the log n term of the repulsion bound assumes "
            "balanced classes"
        )
    for nu in nus:
        if nu > a["prototype_norm_min"] + tol:
            violations.append(
                f"nu={nu:g} exceeds the smallest prototype norm {a['prototype_norm_min']:.3g}: the repulsion bound "
                "needs nu <= ||mu_y||"
            )
    if a["nearest_similarity_nonneg_fraction"] < 1:
        violations.append(
            f"{1 - a['nearest_similarity_nonneg_fraction']:.1%} of anchors have a negative nearest-prototype "
            "similarity: the repulsion bound with nu < ||mu_y|| assumes it non-negative"
        )
    report["violations"] = violations
    return report


# --------------------------------------------------------------------------------------------------------
# geometry


def alignment(z1: Tensor, z2: Tensor, *, alpha: float = 2.0) -> Tensor:
    """``E ||z1 - z2||^alpha`` over positive pairs of unit vectors (Wang & Isola 2020). z1, z2: (B, D)."""
    return (F.normalize(z1, dim=-1) - F.normalize(z2, dim=-1)).norm(dim=-1).pow(alpha).mean()


def uniformity(z: Tensor, *, t: float = 2.0) -> Tensor:
    """``log E_{i<j} exp(-t ||z_i - z_j||^2)`` of unit vectors (Wang & Isola 2020). z: (B, D), B >= 2."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be (B, D) with B >= 2, got {tuple(z.shape)}.")
    return torch.pdist(F.normalize(z, dim=-1)).pow(2).mul(-t).exp().mean().log()


def effective_rank(z: Tensor) -> float:
    """``exp(H(p))``, p = eigenvalues of the feature covariance over their sum (Roy & Vetterli 2007).

    z: (N, D), N >= 2 -> a value in [1, min(N - 1, D)]; 1 for features on a line, D for isotropic ones.
    """
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"z must be (N, D) with N >= 2, got {tuple(z.shape)}.")
    zc = z.double() - z.double().mean(0)
    eig = torch.linalg.svdvals(zc).pow(2)  # covariance eigenvalues up to 1/(N-1)
    if eig.sum() <= 0:
        return 1.0
    p = eig / eig.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def geometry(feats: Tensor) -> dict[str, float]:
    """Alignment, uniformity, effective rank, mean positive / negative cosine similarity, contrastive top-1.

    feats: (K, N, D), K >= 2, N >= 2. Pairs are (view a, view b) for a != b. ``contrastive_top1``: share of
    anchors (view a of image i) whose most similar view-b candidate among all N images is image i.
    ``uniformity`` and ``effective_rank`` use view 0.
    """
    if feats.dim() != 3 or feats.shape[0] < 2 or feats.shape[1] < 2:
        raise ValueError(f"feats must be (K, N, D) with K >= 2 and N >= 2, got {tuple(feats.shape)}.")
    k, n, _ = feats.shape
    fhat = F.normalize(feats, dim=-1)
    align, pos, neg, top1 = [], [], [], []
    eye = torch.eye(n, dtype=torch.bool, device=feats.device)
    for a in range(k):
        for b in range(k):
            if a == b:
                continue
            align.append(alignment(fhat[a], fhat[b]))
            sim = fhat[a] @ fhat[b].T  # (N, N)
            pos.append(sim.diagonal().mean())
            neg.append(sim[~eye].mean())
            top1.append((sim.argmax(1) == torch.arange(n, device=feats.device)).double().mean())
    return {
        "alignment": torch.stack(align).mean().item(),
        "uniformity": uniformity(fhat[0]).item(),
        "effective_rank": effective_rank(feats[0]),
        "positive_similarity": torch.stack(pos).mean().item(),
        "negative_similarity": torch.stack(neg).mean().item(),
        "contrastive_top1": torch.stack(top1).mean().item(),
    }


# --------------------------------------------------------------------------------------------------------
# from an encoder


def _resolve_recipe(recipe: Any) -> Callable[..., Tensor]:
    """A callable ``(images uint8 (B, C, H, W), *, num_views, seed, indices) -> (K, B, C, s, s)``.

    ``recipe`` is such a callable, a ``protoclr.views.ViewSpec``, or a preset name of ``protoclr.views``.
    """
    if callable(recipe) and not hasattr(recipe, "size"):
        return recipe
    spec = view_spec(recipe, []) if isinstance(recipe, str) else recipe

    def views(images: Tensor, *, num_views: int, seed: int, indices: Tensor) -> Tensor:
        return make_views(images, spec, num_views=num_views, seed=seed, epoch=0, indices=indices)

    return views


@torch.no_grad()
def view_features(
    encoder: torch.nn.Module,
    dataset: Any,
    *,
    views: int = 8,
    recipe: Any,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Backbone and projector features of ``views`` augmentations of every image: ``{"backbone": (K, N, F),
    "projector": (K, N, D)}`` float32 on CPU.

    encoder: ``forward(x) -> (h, z)`` (``protoclr.models.Encoder``), put in eval mode by the caller.
    dataset: has ``get_images(indices)`` and ``__len__``. ``recipe``: see :func:`_resolve_recipe`; view ``v``
    of image ``i`` depends only on ``(seed, i, v)``, so the probe set sees the same views every time.
    """
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be a positive int, got {views!r}.")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    make = _resolve_recipe(recipe)
    n = len(dataset)
    hs, zs = [], []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x = make(dataset.get_images(idx).to(device), num_views=views, seed=seed, indices=idx)  # (K, B, C, s, s)
        h, z = encoder(x.flatten(0, 1))  # (K B, F), (K B, D)
        hs.append(h.float().view(views, len(idx), -1).cpu())
        zs.append(z.float().view(views, len(idx), -1).cpu())
    return {"backbone": torch.cat(hs, dim=1), "projector": torch.cat(zs, dim=1)}


def prototype_bias(
    encoder: torch.nn.Module,
    dataset: Any,
    *,
    views: int = 8,
    recipe: Any,
    feature: str = "backbone",
    normalize: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Prototype representation bias of ``encoder`` on a labeled ``dataset`` (:func:`bias_from_features`).

    ``feature``: "backbone" (h) or "projector" (z). ``views`` augmentations per image estimate ``mu~_x``;
    the class prototypes are the means over the dataset. Use :func:`diagnose` for every variant at once.
    """
    if feature not in ("backbone", "projector"):
        raise ValueError(f"feature must be 'backbone' or 'projector', got {feature!r}.")
    labels = torch.as_tensor(dataset.labels).long()
    feats = view_features(encoder, dataset, views=views, recipe=recipe, seed=seed, batch_size=batch_size,
                          device=device)[feature]  # fmt: skip
    num_classes = len(getattr(dataset, "classes", [])) or int(labels.max()) + 1
    return bias_from_features(feats, labels, num_classes=num_classes, normalize=normalize)


def diagnose_features(
    features: dict[str, Tensor],
    labels: Tensor,
    *,
    num_classes: int,
    alphas: tuple[float, ...] = (1.0, 5.0, 10.0),
    nus: tuple[float, ...] = (1.0,),
) -> dict[str, Any]:
    """Everything at once from per-view features: ``bias`` (every head and variant), ``bounds`` (at every
    ``alphas`` x ``nus`` and at ``nu = min ||mu_y||``, where the repulsion bound's assumption holds) and
    ``geometry`` on the projector output (the space the contrastive loss sees), L2-normalised.

    features: {"backbone": (K, N, F), "projector": (K, N, D)}, K >= 2; labels: (N,).
    """
    z = features["projector"]
    return {
        "bias": bias_report(features, labels, num_classes=num_classes),
        "bounds": bound_terms(z, labels, num_classes=num_classes, alphas=alphas, nus=nus, nu_at_min_norm=True),
        "geometry": geometry(z),
    }


def flat_metrics(report: dict[str, Any], *, prefix: str = "") -> dict[str, float]:
    """Scalars of a :func:`diagnose_features` report as flat ``a/b/c`` keys, for metric logs. Lists
    (per-class values, class counts) and violation messages are left out; ``violations`` becomes a count."""
    out: dict[str, float] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}/{key}" if path else str(key))
        elif isinstance(node, bool | int | float):
            out[prefix + path] = float(node)

    walk(report, "")
    if "bounds" in report:
        out[prefix + "bounds/violations"] = float(len(report["bounds"]["violations"]))
    return out
