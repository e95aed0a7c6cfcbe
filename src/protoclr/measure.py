"""What is measured, on which images, under which keys: the one owner of protoclr's measurement protocols.

    monitor = Monitor(cfg, train, test, spec)                 # the draws a run measures on, fixed for the run
    monitor.measure(encoder, probe, dist=fabric)              # knn_top1, probe_top1, diag_* (during pretraining)
    final_metrics(encoder, {"": fit_set}, test, spec, cfg)    # eval_knn_top1, eval_linear_top1 (after it)
    evaluate_backbone(encoder.backbone, train, test, spec)    # the full protocol (demo, benchmarks)
    raw_pixel_floor(train, test); random_init_floor(cfg, train, test, spec)

Protocols: backbone features of the deterministic evaluation crop of ``spec``; weighted kNN (Wu et al. 2018,
k=200, T=0.1); the cached linear probe (L-BFGS on standardized features, weight decay chosen on 10% of the fit
set; :func:`protoclr.evaluate.linear_probe_cached`); the diagnostics of :mod:`protoclr.diagnostics` on a
class-balanced held-out probe set with ``eval.diag_views`` augmentations per image. Which images: protoclr.splits
(the kNN monitor's bank, the final probes' fit set, the scored held-out draw, the diagnostics' probe set).
Accuracies are fractions in [0, 1]. The keys below are the ones epoch records, ``runs.db``, ``protoclr report``
and ``protoclr diagnose`` use; a new metric is a new key here and the function that computes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

import protoclr
from protoclr import atomic, splits
from protoclr.data import default_cache_dir
from protoclr.diagnostics import diagnose_features, view_features
from protoclr.evaluate import (
    extract_features,
    group_accuracy,
    knn_accuracy,
    knn_predict,
    linear_probe_augmented,
    linear_probe_cached,
    topk_accuracy,
)
from protoclr.losses import config_alpha
from protoclr.models import build_encoder
from protoclr.views import ViewSpec, eval_images

KNN_K = 200  # neighbours (InstDisc, Wu et al. 2018)
KNN_TEMPERATURE = 0.1  # weight exp(sim / T)
PROTOCOL_REVISION = 3  # bumped when the protocol code changes its numbers (2: preconditioned probe, bf16 features;
# 3: the probe checks its rule every iteration, stops the decay path after two falls, starts from a coarse fit)

# score_features' scores (a protocol's two numbers, before a key names where they were measured)
SCORE_KNN, SCORE_LINEAR = "knn_top1", "linear_top1"

# during pretraining (epoch records)
KNN = "knn_top1"  # weighted kNN on the monitor's bank, scored on the held-out draw
PROBE = "probe_top1"  # the online linear probe
# after pretraining (a run's final metrics); a suffix names another fit set (e.g. "_pretrain_set")
EVAL_KNN = "eval_knn_top1"
EVAL_LINEAR = "eval_linear_top1"
# diagnostics (protoclr.diagnostics), per epoch and in final metrics
BIAS = "diag_bias_angle_deg"  # backbone, L2-normalized: the angle between mu~_x and mu_y
BIAS_PROJ = "diag_bias_proj_angle_deg"
# the same, debiased for the view noise (protoclr.diagnostics.debiased_bias_terms), backbone, L2-normalized
BIAS_DEBIASED = "diag_bias_angle_deg_debiased"  # per class arccos(||mu_y|| / rms ||mu_x||), weighted by class share
BIAS_PROJ_DEBIASED = "diag_bias_proj_angle_deg_debiased"
BIAS_SQ = "diag_bias_sq_euclidean_normalized"  # plain mean ||mu~_x - mu_y^{-x}||^2, the square the debiasing corrects
BIAS_SQ_DEBIASED = "diag_bias_sq_euclidean_normalized_debiased"  # unbiased for E ||mu_x - mu_y||^2
VIEW_VARIANCE = "diag_view_variance"  # mean over images of the views' variance around mu~_x (trace, K - 1)
ATTRACTION_SUP, ATTRACTION_SURROGATE, ATTRACTION_SSL = "diag_attraction_sup", "diag_attraction_surrogate", \
    "diag_attraction_ssl"
ATTRACTION_GAP = "diag_attraction_gap"  # self-supervised minus surrogate attraction (>= 0 where the bound holds)
REPULSION_SUP, REPULSION_SSL = "diag_repulsion_sup", "diag_repulsion_ssl"
REPULSION_GAP = "diag_repulsion_gap"  # self-supervised minus supervised repulsion at the loss's alpha, nu=min||mu||
REPULSION_GAP_NU1 = "diag_repulsion_gap/alpha{alpha:g}_nu1"  # the same at nu = 1 (format with the alpha)
NU1_VIOLATES = "diag_nu1_violates"  # 1 when nu = 1 exceeds the smallest prototype norm (the bound's assumption fails)
VIOLATIONS = "diag_violations"
# the keys an epoch's console line shows (the rest go to metrics.jsonl, runs.db and the loggers)
CONSOLE = ("epoch", "step", "loss", "lr", "skips", KNN, PROBE, BIAS, ATTRACTION_GAP, REPULSION_GAP)
# the rest of headline's keys
BIAS_COSINE, BIAS_EUCLIDEAN = "diag_bias_cosine", "diag_bias_euclidean"
ATTRACTION_HOLDS, REPULSION_HOLDS = "diag_attraction_holds", "diag_repulsion_holds"  # share of anchors where it holds
BOUND_ALPHA, BOUND_NU = "diag_bound_alpha", "diag_bound_nu"  # the (alpha, nu) of the plain repulsion keys
BALANCE_RATIO, PROTOTYPE_NORM_MIN = "diag_balance_ratio", "diag_prototype_norm_min"
REPULSION_GAP_PAIR = REPULSION_GAP + "/alpha{alpha:g}_nu{nu:g}"  # format with both; REPULSION_GAP_NU1 is nu = 1
REPULSION_HOLDS_PAIR = REPULSION_HOLDS + "/alpha{alpha:g}_nu{nu:g}"
EVAL = "eval_"  # the prefix of every final metric
DIAG = "diag_"  # the prefix of every diagnostic key; diag_<geometry name> for each of diagnostics.geometry's
# final metrics' bookkeeping
EVAL_TEST_IMAGES, EVAL_TRAIN_IMAGES = "eval_test_images", "eval_train_images"  # the scored / fitted images' count
EVAL_NONFINITE = "eval_nonfinite_features"  # 1 when a diverged encoder gave non-finite features (no accuracy)

# Suffixes: a final metric's name says its protocol. Without one, final_metrics' draws (protoclr.splits); with:
PRETRAIN_SET = "_pretrain_set"  # final_metrics fitted on the class-profiled pretraining set instead
LAST_GOOD = "_last_good"  # final_metrics of the last good checkpoint of a diverged run
FULL = "_full"  # the full protocol: fitted on every training image, scored on every test image (evaluate, demo)
FIT = "_fit{n}"  # the full protocol fitted on n training images (splits.EVAL_FIT) instead of every one
# Prefixes of the floors (protoclr demo): the same protocol on another representation than the run's encoder
RAW_PIXEL, RANDOM_INIT = "raw_pixel_", "random_init_"


# ----------------------------------------------------------------------------------------------------------
# keys: the only place one is built


def last_good(key: str) -> str:
    """``key`` measured on the last good checkpoint of a diverged run."""
    return key + LAST_GOOD


def as_last_good(final: dict[str, float]) -> dict[str, float]:
    """:func:`final_metrics` of a diverged run's last good checkpoint: every accuracy key under :func:`last_good`
    (the image counts keep their names)."""
    return {last_good(k) if k.startswith((EVAL_KNN, EVAL_LINEAR)) else k: v for k, v in final.items()}


def is_diagnostic(key: str) -> bool:
    """Whether ``key`` is a diagnostic (``diag_*``: :func:`headline`'s keys and their variants)."""
    return key.startswith(DIAG)


def diagnostics_only(metrics: dict[str, Any]) -> dict[str, Any]:
    """The diagnostic keys of ``metrics`` (an epoch record, a final-metrics dict)."""
    return {k: v for k, v in metrics.items() if is_diagnostic(k)}


def on_probe(key: str, *, images: int, views: int) -> str:
    """A diagnostic measured by ``protoclr diagnose`` on its own probe set (``images`` x ``views``), not the
    monitor's: ``diag_bias_angle_deg_probe1000x8``. Never the key the training loop's monitor writes."""
    if not is_diagnostic(key):
        raise ValueError(f"{key!r} is not a diagnostic key")
    return f"{key}_probe{images}x{views}"


def short_name(key: str) -> str:
    """A diagnostic key without its prefix, for a table or a plot (``attraction_gap``)."""
    return key.removeprefix(DIAG)


def on_dataset(key: str, dataset: str) -> str:
    """``key`` measured on ``dataset`` rather than the run's own: the dataset after the prefix
    (``diag_cifar10_bias_angle_deg``, ``eval_cifar10_knn_top1_full``)."""
    for prefix in (DIAG, EVAL):
        if key.startswith(prefix):
            return f"{prefix}{dataset}_{key.removeprefix(prefix)}"
    raise ValueError(f"{key!r} is not a diagnostic or final-evaluation key")


def full_metrics(scores: dict[str, float], *, of: str = EVAL) -> dict[str, float]:
    """:func:`score_features`' scores under the full protocol's keys (:data:`FULL`): ``eval_knn_top1_full``,
    ``eval_linear_top1_full``; ``of``: :data:`RAW_PIXEL` or :data:`RANDOM_INIT` for a floor."""
    return {f"{of}{name}{FULL}": v for name, v in scores.items()}


# protoclr evaluate's methods -> the name in their keys (the cached probe is the linear probe of final_metrics)
_METHOD_KEYS = {"knn": "knn", "linear_cached": "linear", "linear_augmented": "linear_augmented"}


def command_metrics(results: dict[str, dict[str, Any]], *, fit_images: int = 0, k: int = KNN_K,
                    temperature: float = KNN_TEMPERATURE, dataset: str | None = None) -> dict[str, float]:
    """The keys of ``protoclr evaluate``'s results (``{"knn" | "linear_cached" | "linear_augmented": {"top1",
    "top5", "groups"?}}``), named for their protocol: ``eval_<method>_top1`` + :data:`FULL` (every training
    image fitted) or :data:`FIT` (``fit_images`` of them), + ``_k<k>`` / ``_t<T>`` for a kNN off :data:`KNN_K`
    / :data:`KNN_TEMPERATURE`; per group ``eval_<method>_<group>_top1..``; :func:`on_dataset` for another
    dataset. Never :func:`final_metrics`' keys, whose images are other draws."""
    suffix = FIT.format(n=fit_images) if fit_images else FULL
    out: dict[str, float] = {}
    for method, res in results.items():
        name, tail = EVAL + _METHOD_KEYS[method], suffix
        if method == "knn":
            tail += (f"_k{k}" if k != KNN_K else "") + (f"_t{temperature:g}" if temperature != KNN_TEMPERATURE else "")
        keys = {f"{name}_{m}{tail}": res[m] for m in ("top1", "top5")}
        keys |= {f"{name}_{group}_top1{tail}": acc for group, acc in res.get("groups", {}).items()}
        out |= {on_dataset(key, dataset) if dataset else key: v for key, v in keys.items()}
    return out


# ----------------------------------------------------------------------------------------------------------
# features and scores


def score_features(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, *, num_classes: int,
                   knn: bool = True, linear: bool = True, stage: Callable[[str], Any] | None = None,
                   progress: bool = False) -> dict[str, float]:
    """``{"knn_top1", "linear_top1"}`` (those asked for): ``f_*`` (N, F) / (M, F), ``y_*`` (N,) / (M,). ``stage``,
    ``progress``: as in :func:`evaluate_backbone`."""
    stage = stage or (lambda name: contextlib.nullcontext())
    out = {}
    if knn:
        with stage(f"kNN ({len(f_test):,} x {len(f_train):,})"):
            out[SCORE_KNN] = knn_accuracy(f_train, y_train, f_test, y_test, num_classes=num_classes,
                                          k=min(KNN_K, len(f_train)), temperature=KNN_TEMPERATURE,
                                          progress=progress)["top1"]
    if linear:
        with stage(f"linear probe ({len(f_train):,} x {f_train.shape[1]})"):
            out[SCORE_LINEAR] = linear_probe_cached(f_train, y_train, f_test, y_test, num_classes=num_classes,
                                                    progress=progress)["top1"]
    return out


@torch.no_grad()
def backbone_features(backbone: nn.Module, data: Any, spec: ViewSpec, *, batch_size: int = 512,
                      device: str | torch.device = "cpu", dist: Any = None, cache: Any = None,
                      progress: bool = False, dim: int | None = None) -> tuple[Tensor, Tensor]:
    """``(features (N, F) float32 on CPU, labels (N,))`` of every image of ``data`` in evaluation mode (the module's
    mode is restored). With ``dist`` (Fabric: ``world_size``, ``global_rank``, ``all_gather``) each process
    extracts its shard and every process gets all the rows (``dim``: F, for a rank whose shard is empty; default the
    backbone's ``num_features``). ``cache``: a file for the features of one process
    (:func:`protoclr.evaluate.feature_cache_path`)."""
    was_training = backbone.training
    backbone.eval()
    try:
        W, r = (dist.world_size, dist.global_rank) if dist is not None else (1, 0)
        n = -(-len(data) // W)
        idx = torch.arange(r * n, min((r + 1) * n, len(data)))  # this process's shard
        mine = data.subset(idx) if W > 1 else data
        f, _ = extract_features(backbone, mine, batch_size=batch_size, device=device,
                                preprocess=lambda x: eval_images(x, spec), cache=cache if W == 1 else None,
                                progress=progress) if len(idx) else (None, None)
        if W > 1:
            dim = dim or backbone.num_features  # every backbone of protoclr.models states its feature width
            f = torch.zeros(0, dim) if f is None else f
            f = torch.cat([f, f.new_zeros(n - f.shape[0], dim)]).to(device)  # the same length on every rank
            f = dist.all_gather(f).reshape(W * n, dim)[: len(data)].cpu()  # (W, n, F) -> (N, F)
    finally:
        backbone.train(was_training)
    return f, torch.as_tensor(data.labels).long()


def evaluate_backbone(backbone: nn.Module, train: Any, test: Any, spec: ViewSpec, *, knn: bool = True,
                      linear: bool = True, batch_size: int = 512, device: str | torch.device = "cpu",
                      stage: Callable[[str], Any] | None = None, progress: bool = False) -> dict[str, float]:
    """The protocol (module docstring) for ``backbone``, fitted on every image of ``train``, scored on ``test``.
    ``stage(name)``: a context manager entered around each stage ("features", "kNN", "linear probe"), e.g. to
    print its time; ``progress``: a bar with the remaining time in each stage (features, kNN, the probe's decays)."""
    stage = stage or (lambda name: contextlib.nullcontext())
    with stage(f"features of {len(train) + len(test):,} images"):
        f_tr, y_tr = backbone_features(backbone, train, spec, batch_size=batch_size, device=device, progress=progress)
        f_te, y_te = backbone_features(backbone, test, spec, batch_size=batch_size, device=device, progress=progress)
    return score_features(f_tr, y_tr, f_te, y_te, num_classes=len(test.classes), knn=knn, linear=linear, stage=stage,
                          progress=progress)


def knn_scores(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, *, num_classes: int,
               k: int = KNN_K, temperature: float = KNN_TEMPERATURE, groups: dict[str, Any] | None = None,
               progress: bool = False) -> dict[str, Any]:
    """The protocol's weighted kNN in detail: ``top1``, ``top5``, the ``k`` used (at most ``len(f_train)``),
    ``temperature`` and with ``groups`` (:func:`protoclr.splits.class_groups`) each group's top-1. ``progress``: a
    bar over the test rows."""
    k = min(k, len(f_train))
    scores = knn_predict(f_train, y_train, f_test, num_classes=num_classes, k=k, temperature=temperature,
                         progress=progress)  # (M, C)
    out: dict[str, Any] = {**topk_accuracy(scores, y_test), "k": k, "temperature": temperature}
    if groups is not None:
        out["groups"] = group_accuracy(scores, y_test, groups)
    return out


def cached_probe_scores(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, *, num_classes: int,
                        groups: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """The protocol's linear probe in detail (:func:`protoclr.evaluate.linear_probe_cached`: ``top1``, ``top5``,
    the weight decay chosen and each fitted one's validation top-1, per-group top-1). ``progress``: a bar over the
    decays."""
    return linear_probe_cached(f_train, y_train, f_test, y_test, num_classes=num_classes, groups=groups,
                               progress=progress)


def augmented_probe_scores(backbone: nn.Module, train: Any, test: Any, spec: ViewSpec, *, epochs: int,
                           lr: float = 0.1, batch_size: int = 256, device: str | torch.device = "cpu",
                           groups: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """The augmented linear probe (:func:`protoclr.evaluate.linear_probe_augmented`) on ``backbone``'s features of
    the evaluation crop of ``spec``, fitted on ``train`` and scored on ``test``; ``lr`` per 256 images."""
    return linear_probe_augmented(backbone.eval(), train, test, num_classes=len(test.classes), epochs=epochs, lr=lr,
                                  batch_size=batch_size, device=device, preprocess=lambda x: eval_images(x, spec),
                                  groups=groups, progress=progress)


def raw_pixel_floor(train: Any, test: Any, *, linear: bool = True, stage: Callable[[str], Any] | None = None,
                    progress: bool = False) -> dict[str, float]:
    """The protocol on raw pixels, centered by the training mean: the floor any representation must beat.
    In-memory datasets only (their stored images, as uint8 -> float). ``stage``, ``progress``: as in
    :func:`evaluate_backbone`."""
    x_tr = train.get_images(torch.arange(len(train))).flatten(1).float()  # (N, C*H*W)
    x_te = test.get_images(torch.arange(len(test))).flatten(1).float()
    mean = x_tr.mean(0)
    return score_features(x_tr - mean, train.labels.long(), x_te - mean, test.labels.long(),
                          num_classes=len(test.classes), linear=linear, stage=stage, progress=progress)


def random_init_floor(cfg: Any, train: Any, test: Any, spec: ViewSpec, *, linear: bool = True,
                      device: str | torch.device = "cpu", stage: Callable[[str], Any] | None = None,
                      progress: bool = False) -> dict[str, float]:
    """The protocol on the encoder of ``cfg`` as the run initializes it (seeded with ``train.seed``) before
    any step: how much accuracy the architecture gives without training."""
    torch.manual_seed(cfg.train.seed)  # the loop seeds the same way right before it builds the encoder
    encoder = build_encoder(cfg.model, in_channels=spec.channels).to(device)
    return evaluate_backbone(encoder.backbone, train, test, spec, linear=linear, device=device, stage=stage,
                             progress=progress)


def protocol_fingerprint() -> dict[str, Any]:
    """What the full protocol's numbers depend on besides the data and the encoder: the kNN's k and temperature,
    the probe's defaults (weight decays, validation split, stopping rule) and protoclr's version. A cached floor
    (:func:`cached_floor`) is recomputed when any of them changes."""
    probe = {name: p.default for name, p in inspect.signature(linear_probe_cached).parameters.items()
             if p.default is not inspect.Parameter.empty and name != "progress"}  # a bar changes no number
    return {"knn_k": KNN_K, "knn_temperature": KNN_TEMPERATURE, "probe": probe, "revision": PROTOCOL_REVISION,
            "version": protoclr.__version__}


def data_fingerprint(data: Any) -> dict[str, Any]:
    """A cheap identity of an in-memory labeled dataset for :func:`cached_floor`: its size, image shape, and
    hashes of its labels and of every 97th image."""
    idx = torch.arange(0, len(data), 97)
    images = data.get_images(idx)
    return {"rows": len(data), "shape": list(images.shape[1:]),
            "labels": hashlib.sha256(torch.as_tensor(data.labels).long().numpy().tobytes()).hexdigest()[:16],
            "images": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]}


def cached_floor(name: str, key: dict[str, Any], compute: Callable[[], dict[str, float]], *,
                 cache_dir: str | Path | None = None) -> tuple[dict[str, float], bool]:
    """``(scores, from_cache)``: a deterministic floor (raw pixels, random init) computed once and kept as JSON
    under ``cache_dir`` (default: the decode cache, :func:`protoclr.data.default_cache_dir`), in a file named by
    the hash of ``key`` (the data and encoder it depends on) and :func:`protocol_fingerprint`."""
    blob = json.dumps({"floor": name, **key, "protocol": protocol_fingerprint()}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"floor-{name}-{digest}.json"
    if path.is_file():
        try:
            return {k: float(v) for k, v in json.loads(path.read_text())["scores"].items()}, True
        except (ValueError, KeyError, TypeError):
            pass  # an unreadable cache file is recomputed and replaced
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps({"key": json.loads(blob), "scores": scores}, indent=1))
    return scores, False


# ----------------------------------------------------------------------------------------------------------
# diagnostics as metrics


def headline(report: dict[str, Any], *, alpha: float, nu: float | str = "min") -> dict[str, float]:
    """The ``diag_*`` scalars kept from a :func:`protoclr.diagnostics.diagnose_features`-style report.

    Bias (if present): :data:`BIAS` / ``diag_bias_cosine`` (backbone, normalized), ``diag_bias_euclidean``
    (backbone, raw features), :data:`BIAS_PROJ`; debiased for the view noise, :data:`BIAS_DEBIASED`,
    :data:`BIAS_PROJ_DEBIASED`, :data:`BIAS_SQ` / :data:`BIAS_SQ_DEBIASED` and :data:`VIEW_VARIANCE` (backbone,
    normalized; nan where a class has fewer than 3 probe images). Bounds (if present): the attraction terms, the
    repulsion terms at (``alpha``, ``nu``) (which must be in the report; ``nu="min"``, the default, is
    ``min ||mu_y||``, where the bound's assumption holds), ``.._holds`` (share of anchors where the bound holds),
    ``diag_repulsion_gap/alpha{A}_nu{V}`` and ``.._holds/..`` for every pair (``nu1`` among them: the repulsion
    bound at nu = 1, where ``nu <= ||mu_y||`` usually fails; :data:`NU1_VIOLATES` says whether it does), the
    assumption quantities and :data:`VIOLATIONS` (a count over every pair's assumptions).
    Geometry: alignment, uniformity, effective rank, positive / negative
    similarity, contrastive top-1.
    """
    out: dict[str, float] = {}
    if "bias" in report:
        bb, bp = report["bias"]["backbone"], report["bias"]["projector"]
        out.update({BIAS: bb["normalized"]["angle_deg"], "diag_bias_cosine": bb["normalized"]["cosine"],
                    "diag_bias_euclidean": bb["raw"]["euclidean"], BIAS_PROJ: bp["normalized"]["angle_deg"],
                    BIAS_DEBIASED: bb["normalized"]["angle_deg_debiased"],
                    BIAS_PROJ_DEBIASED: bp["normalized"]["angle_deg_debiased"],
                    BIAS_SQ: bb["normalized"]["sq_euclidean"],
                    BIAS_SQ_DEBIASED: bb["normalized"]["sq_euclidean_debiased"],
                    VIEW_VARIANCE: bb["normalized"]["view_variance"]})
    if "bounds" in report:
        b = report["bounds"]
        key = f"alpha={alpha:g},nu={nu if isinstance(nu, str) else f'{nu:g}'}"
        if key not in b["repulsion"]:
            raise ValueError(f"{key} is not in the report ({sorted(b['repulsion'])}); compute the bounds with that "
                             "pair among alphas and nus (nu=min: with nu_at_min_norm=True).")
        a, r, asm = b["attraction"], b["repulsion"][key], b["assumptions"]
        out.update({ATTRACTION_SUP: a["supervised"], ATTRACTION_SURROGATE: a["surrogate"],
                    ATTRACTION_SSL: a["self_supervised"], ATTRACTION_GAP: a["gap"],
                    "diag_attraction_holds": a["holds_fraction"], REPULSION_SUP: r["supervised"],
                    REPULSION_SSL: r["self_supervised"], REPULSION_GAP: r["gap"],
                    "diag_repulsion_holds": r["holds_fraction"], "diag_bound_alpha": float(alpha),
                    "diag_bound_nu": float(asm["nu_min_norm"] if nu == "min" else nu)})
        for pair, rr in b["repulsion"].items():
            if pair.endswith("nu=min"):
                continue  # the plain keys when nu="min"; its value changes with the encoder, so no key of its own
            a_, nu_ = (float(v.split("=")[1]) for v in pair.split(","))
            out[f"{REPULSION_GAP}/alpha{a_:g}_nu{nu_:g}"] = rr["gap"]
            out[f"diag_repulsion_holds/alpha{a_:g}_nu{nu_:g}"] = rr["holds_fraction"]
        out.update({"diag_balance_ratio": asm["balance_ratio"], "diag_prototype_norm_min": asm["prototype_norm_min"],
                    VIOLATIONS: float(len(b["violations"])),
                    NU1_VIOLATES: float(asm["prototype_norm_min"] < 1.0)})
    if "geometry" in report:
        out.update({f"diag_{k}": float(v) for k, v in report["geometry"].items()})
    return out


def diagnostics_metrics(encoder: nn.Module, probe: Any, *, spec: ViewSpec, views: int = 4,
                        alphas: tuple[float, ...] = (2.0,), nus: tuple[float, ...] = (1.0,), seed: int = 0,
                        batch_size: int = 512, device: str | torch.device = "cpu") -> dict[str, float]:
    """:func:`headline` keys of ``encoder`` on ``probe`` (a fixed labeled set, e.g. ``splits.balanced_draw``):
    bias, bound terms at every (alpha, nu) of ``alphas`` x ``nus`` (the first pair gives the plain repulsion keys:
    pass the loss's alpha first), and geometry, from ``views`` augmentations per image. The encoder is switched to
    eval mode (frozen BatchNorm statistics) and back, no gradient, the global RNG untouched; view ``v`` of probe
    image ``i`` depends only on ``(seed, i, v)``, so two calls on the same weights agree and a resumed run logs
    what an uninterrupted one would. Cost: ``views * len(probe)`` encoder forwards (docs/evaluation.md)."""
    if not isinstance(views, int) or views < 2:
        raise ValueError(f"views must be an int >= 2 (the bounds pair an anchor with another view), got {views!r}.")
    labels = torch.as_tensor(probe.labels).long()
    C = len(probe.classes)
    was_training = encoder.training
    encoder.eval()
    try:
        feats = view_features(encoder, probe, views=views, recipe=spec, seed=seed, batch_size=batch_size,
                              device=device)
    finally:
        encoder.train(was_training)
    report = diagnose_features(feats, labels, num_classes=C, alphas=tuple(alphas), nus=tuple(nus))
    return headline(report, alpha=alphas[0], nu="min")


# ----------------------------------------------------------------------------------------------------------
# during and after pretraining


class Monitor:
    """The measurements of a run during pretraining, on images fixed for the run (protoclr.splits): weighted
    kNN with the ``eval.train_images`` bank (seed + KNN_BANK) scored on the held-out draw of ``eval.test_images``,
    the online probe's top-1 on the same draw, and with ``eval.diagnostics`` the ``diag_*`` keys on a
    class-balanced held-out probe set of ``eval.diag_images``."""

    def __init__(self, cfg: Any, train: Any, test: Any, spec: ViewSpec):
        ev = cfg.eval
        self.cfg, self.spec, self.every = cfg, spec, ev.every
        self.bank = splits.draw(train, ev.train_images, seed=cfg.train.seed + splits.KNN_BANK)
        self.scored = splits.held_out(test, ev.test_images)
        self.diag_set = splits.balanced_draw(test, ev.diag_images, seed=splits.HELD_OUT) if ev.diagnostics else None
        self.alpha = config_alpha(cfg.loss)

    def due(self, epoch: int, *, last: bool) -> bool:
        """Whether epoch ``epoch`` (0-based) is measured: every ``eval.every`` epochs and the last one."""
        return bool(self.every) and ((epoch + 1) % self.every == 0 or last)

    def measure(self, encoder: nn.Module, probe: nn.Module | None, *, dist: Any = None,
                device: str | torch.device = "cpu") -> dict[str, float]:
        """:data:`KNN`, :data:`PROBE` (with an online probe) and the diagnostics, on every rank (the extraction
        is sharded; the diagnostics run on rank 0 only and the other ranks get none)."""
        bs = self.cfg.eval.batch_size
        f_bank, y_bank = backbone_features(encoder.backbone, self.bank, self.spec, batch_size=bs, device=device,
                                           dist=dist, dim=encoder.feature_dim)
        f_te, y_te = backbone_features(encoder.backbone, self.scored, self.spec, batch_size=bs, device=device,
                                       dist=dist, dim=encoder.feature_dim)
        out = {KNN: score_features(f_bank, y_bank, f_te, y_te, num_classes=len(self.scored.classes),
                                   linear=False)["knn_top1"]}
        if probe is not None:
            with torch.no_grad():
                w, b = probe.weight.detach().float().cpu(), probe.bias.detach().float().cpu()
                out[PROBE] = ((f_te @ w.T + b).argmax(1) == y_te).float().mean().item()
        if self.diag_set is not None and (dist is None or dist.global_rank == 0):
            out.update(diagnostics_metrics(encoder, self.diag_set, spec=self.spec, views=self.cfg.eval.diag_views,
                                           alphas=(self.alpha,), seed=self.cfg.train.seed, device=device))
        return out


def final_metrics(encoder: nn.Module, fit_sets: dict[str, Any], test: Any, spec: ViewSpec, cfg: Any, *,
                  device: str | torch.device = "cpu") -> dict[str, float]:
    """After pretraining: :data:`EVAL_KNN` and (``eval.linear``, by ``eval.linear_protocol``: the cached probe on
    features extracted once, or the augmented one of :func:`protoclr.evaluate.linear_probe_augmented`)
    :data:`EVAL_LINEAR` of the backbone, fitted on
    each of ``fit_sets`` (key: the suffix of its metric names, "" for the headline set, e.g.
    ``splits.probe_fit_set``) and scored on the held-out draw of ``eval.test_images``; ``eval_nonfinite_features``
    instead when a diverged encoder gives non-finite features."""
    scored = splits.held_out(test, cfg.eval.test_images)
    bs = cfg.eval.batch_size
    f_te, y_te = backbone_features(encoder.backbone, scored, spec, batch_size=bs, device=device)
    out: dict[str, float] = {EVAL_TEST_IMAGES: float(len(scored))}
    fitted = {}
    for suffix, data in fit_sets.items():
        out[f"{EVAL_TRAIN_IMAGES}{suffix}"] = float(len(data))
        fitted[suffix] = backbone_features(encoder.backbone, data, spec, batch_size=bs, device=device)
    if not (torch.isfinite(f_te).all() and all(torch.isfinite(f).all() for f, _ in fitted.values())):
        out[EVAL_NONFINITE] = 1.0  # a diverged encoder: no accuracy to report
        return out
    augmented = cfg.eval.linear and cfg.eval.linear_protocol == "augmented"
    for suffix, (f_tr, y_tr) in fitted.items():
        res = score_features(f_tr, y_tr, f_te, y_te, num_classes=len(test.classes),
                             linear=cfg.eval.linear and not augmented)
        out[f"{EVAL_KNN}{suffix}"] = res["knn_top1"]
        if augmented:  # the standard protocol: crop + flip every epoch through the frozen backbone
            res["linear_top1"] = linear_probe_augmented(
                encoder.backbone.eval(), fit_sets[suffix], scored, num_classes=len(test.classes),
                epochs=cfg.eval.linear_epochs, batch_size=min(256, len(fit_sets[suffix])), device=device,
                preprocess=lambda x: eval_images(x, spec))["top1"]
        if "linear_top1" in res:
            out[f"{EVAL_LINEAR}{suffix}"] = res["linear_top1"]
    return out


__all__ = ["ATTRACTION_GAP", "BIAS", "BIAS_DEBIASED", "BIAS_PROJ", "BIAS_PROJ_DEBIASED", "BIAS_SQ", "BIAS_SQ_DEBIASED",
           "EVAL_KNN", "EVAL_LINEAR", "KNN", "KNN_K", "KNN_TEMPERATURE", "NU1_VIOLATES", "PROBE", "REPULSION_GAP",
           "REPULSION_GAP_NU1", "VIEW_VARIANCE", "VIOLATIONS", "Monitor", "backbone_features", "diagnostics_metrics",
           "evaluate_backbone", "final_metrics", "headline", "random_init_floor", "raw_pixel_floor", "score_features"]
