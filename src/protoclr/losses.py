"""The contrastive loss family and the supervised prototype objective it approximates.

Notation (docs/losses.md has the derivation): ``z`` is ``(V, B, D)``, ``V >= 2`` augmented views of the same
``B`` images, row ``i`` of every view from image ``i``. Each of the ``V*B`` rows is an anchor ``a``; its
positives are the other views of the same image. With similarity ``s`` and inverse temperature ``alpha``:

    l_{a,p} = -alpha * s(a, p) + (lam / nu) * log sum_{b in C(a,p)} exp(alpha * s(a, b))

times ``1/alpha`` when ``scale="inverse_alpha"``, and ``l_a`` is the mean of ``l_{a,p}`` over the ``V-1``
positives of ``a``. The candidate set ``C(a,p)`` is every other row of the stack (``negatives="all"``,
SimCLR) or the ``B`` rows of the positive's view (``negatives="cross"``, the loss derived from the supervised
objective); ``positive_in_denominator=False`` removes every positive of ``a`` from it (DCL).

Exactness: similarities and reductions run in float32 (autocast is switched off inside), excluded entries are
removed with boolean masks, every sum of exponentials is a log-sum-exp. Scale: above ``DENSE_MAX_ENTRIES``
similarity entries (or with ``chunk_size``) an exact tiled path keeps O(V*B * chunk) memory; with
``reduction="mean"`` it computes the gradient in the same sweep as the value (3 matrix products, the minimum),
otherwise its backward recomputes the tiles.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protoclr.distributed import DistContext, all_gather_with_grad, current_context

NEGATIVES = ("all", "cross")
POSITIVES = ("pairs", "mean")
SCALES = ("none", "inverse_alpha")
SIMILARITIES = ("cosine", "dot", "neg_euclidean")
REDUCTIONS = ("mean", "none")

# Above this many similarity entries per call the tiled path is taken automatically; it is faster than the
# autograd-built dense path from about 64 x 64 rows on (benchmarks/loss_speed.py), the dense path keeps
# double backward for small problems.
DENSE_MAX_ENTRIES = 1 << 16
# Rows per tile in the automatic tiled path: TILE_ROWS (measured best on CPU for D=128), fewer when one tile
# would exceed TILE_ENTRIES entries (huge gathered batches).
TILE_ROWS = 256
TILE_ENTRIES = 1 << 24


# ----------------------------------------------------------------------------------------------------------
# validation


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, options))}")


def _positive_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_views(z: torch.Tensor) -> None:
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a torch.Tensor of shape (V, B, D), got {type(z).__name__}")
    if z.dim() != 3:
        raise ValueError(f"z must have shape (V, B, D) (views, batch, dim); got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor, got dtype {z.dtype}")
    V, B, D = z.shape
    if V < 2:
        raise ValueError(f"z needs V >= 2 views of each image (shape (V, B, D)); got V={V}")
    if B < 1 or D < 1:
        raise ValueError(f"z has an empty dimension: shape {tuple(z.shape)}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(-1, x.shape[-1]).any(-1).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (first rows {rows}); the encoder has diverged or "
            "its input holds NaN/Inf: lower the learning rate or use similarity='cosine'"
        )


# ----------------------------------------------------------------------------------------------------------
# similarity kernels on flat rows: a (R, D), c (M, D) -> (R, M)


def _similarity(a: torch.Tensor, c: torch.Tensor, kernel: str) -> torch.Tensor:
    if kernel == "dot":
        return a @ c.T
    # -||a - c|| through the expansion; the clamp keeps sqrt's gradient finite where distances vanish.
    sq = (a * a).sum(-1, keepdim=True) + (c * c).sum(-1) - 2.0 * (a @ c.T)
    return -sq.clamp_min(1e-30).sqrt()


def _pairwise_similarity(x: torch.Tensor, y: torch.Tensor, kernel: str) -> torch.Tensor:
    """Row-wise similarity of matching rows: x, y (..., D) -> (...)."""
    if kernel == "dot":
        return (x * y).sum(-1)
    return -((x - y).pow(2).sum(-1).clamp_min(1e-30).sqrt())


# ----------------------------------------------------------------------------------------------------------
# the log-sum-exp term


def _groups(negatives: str, V: int, Bg: int, view: int, Q: int = 0) -> list[tuple[int, int, float]]:
    """Column groups ``(start, stop, weight)`` of the flat candidate stack for anchors of view ``view``.

    ``all``: one group, every row plus the ``Q`` queue rows appended after them (the anchor itself is
    masked). ``cross``: one group per other view ``v'``, weighted ``1/(V-1)`` since ``l_a`` averages over the
    positives, one in each other view.
    """
    if negatives == "all":
        return [(0, V * Bg + Q, 1.0)]
    return [(v * Bg, (v + 1) * Bg, 1.0 / (V - 1)) for v in range(V) if v != view]


def _masked_logits(
    za: torch.Tensor, zc: torch.Tensor, img: torch.Tensor, view: int, group: tuple[int, int, float], *,
    alpha: float, kernel: str, negatives: str, positive_in_denominator: bool, V: int, Bg: int,
) -> torch.Tensor:
    """``alpha * s(a, b)`` for anchors ``za`` (R, D) of one view against a column group, excluded entries -inf.

    ``img`` (R,) holds the anchors' global image indices. Returns (R, stop - start).
    """
    start, stop, _ = group
    if kernel == "dot":
        logits = (alpha * za) @ zc[start:stop].T  # alpha on the (R, D) side: no extra pass over the tile
    else:
        logits = alpha * _similarity(za, zc[start:stop], kernel)
    if negatives == "all":
        # Exclude the anchor itself, or every view of its image when positives leave the denominator.
        views = range(V) if not positive_in_denominator else [view]
        cols = torch.stack([v * Bg + img for v in views], dim=1)  # (R, 1 or V)
    elif not positive_in_denominator:
        cols = img.unsqueeze(1)  # within the group (one view), the anchor's positive sits at column img
    else:
        return logits
    rows = torch.arange(za.shape[0], device=za.device).unsqueeze(1).expand_as(cols)
    if torch.is_grad_enabled() and logits.requires_grad:
        return logits.index_put((rows, cols), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
    return logits.index_put_((rows, cols), torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))


def _anchor_blocks(Na: int, Bl: int, V: int, chunk: int):
    """Row blocks ``(start, stop, view)`` of the flat local anchors (view-major), never straddling views."""
    for v in range(V):
        for s in range(v * Bl, (v + 1) * Bl, chunk):
            yield s, min(s + chunk, (v + 1) * Bl), v


def _lse_dense(za: torch.Tensor, zc: torch.Tensor, img: torch.Tensor, *, V: int, Bl: int, Bg: int, Q: int, **kw):
    """Differentiable LSE term per anchor (Na,), one block per view."""
    out = []
    for v in range(V):
        rows = slice(v * Bl, (v + 1) * Bl)
        term = 0.0
        for g in _groups(kw["negatives"], V, Bg, v, Q):
            logits = _masked_logits(za[rows], zc, img[rows], v, g, V=V, Bg=Bg, **kw)
            term = term + g[2] * torch.logsumexp(logits, dim=1)
        out.append(term)
    return torch.cat(out)


def _lse_sweep(za, zc, img, weights, *, V, Bl, Bg, Q, chunk, need_grad, **kw):
    """One tiled pass: the LSE term per anchor (Na,) and the gradients of ``sum_a weights[a] * term[a]``
    with respect to ``za`` (Na, D) and ``zc`` (Nc, D), each only where ``need_grad`` (a pair of bools) asks."""
    kernel, alpha = kw["kernel"], kw["alpha"]
    need_a, need_c = need_grad
    term = za.new_zeros(za.shape[0])
    dza = torch.zeros_like(za) if need_a else None
    dzc = torch.zeros_like(zc) if need_c else None
    for s, e, v in _anchor_blocks(za.shape[0], Bl, V, chunk):
        a = za[s:e]
        for g in _groups(kw["negatives"], V, Bg, v, Q):
            logits = _masked_logits(a, zc, img[s:e], v, g, V=V, Bg=Bg, **kw)  # (R, M)
            dist = logits / (-alpha) if (need_a or need_c) and kernel != "dot" else None  # ||a-c||, inf if masked
            # log-sum-exp in place: one exp pass over the tile, which then holds the softmax numerators.
            m = logits.amax(1, keepdim=True)
            total = logits.sub_(m).exp_().sum(1, keepdim=True)
            term[s:e] += g[2] * (m + total.log()).squeeze(1)
            if not (need_a or need_c):
                continue
            # d lse / d logits = softmax; the chain through alpha * s(a, b) gives the kernel's derivative.
            p = logits.mul_((alpha * g[2]) * weights[s:e].unsqueeze(1) / total)
            c = zc[g[0] : g[1]]
            if dist is None:
                if need_a:
                    dza[s:e] += p @ c
                if need_c:
                    dzc[g[0] : g[1]] += p.T @ a
            else:  # s = -||a - c||: ds/da = -(a - c)/d, ds/dc = (a - c)/d; masked entries have p = 0
                h = p.div_(dist)
                if need_a:
                    dza[s:e] += h @ c - h.sum(1, keepdim=True) * a
                if need_c:
                    dzc[g[0] : g[1]] += h.T @ a - h.sum(0).unsqueeze(1) * c
    return term, dza, dzc


class _TiledLSE(torch.autograd.Function):
    """Exact tiled LSE term. ``fused``: the forward also computes the gradient for uniform upstream
    weights, so that a mean-reduced loss costs one sweep; other upstream gradients trigger a recompute."""

    @staticmethod
    def forward(ctx, za, zc, img, kw, fused):  # type: ignore[override]
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ones = za.new_ones(za.shape[0])
        term, dza, dzc = _lse_sweep(za, zc, img, ones, need_grad=need if fused else (False, False), **kw)
        ctx.save_for_backward(za, zc, img)
        ctx.kw, ctx.fused, ctx.grads, ctx.need = kw, fused, (dza, dzc), need
        return term

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        za, zc, img = ctx.saved_tensors
        if ctx.fused and bool((grad == grad[0]).all()):
            dza, dzc = (None if g is None else grad[0] * g for g in ctx.grads)
        else:
            _, dza, dzc = _lse_sweep(za, zc, img, grad, need_grad=ctx.need, **ctx.kw)
        return dza, dzc, None, None, None


# ----------------------------------------------------------------------------------------------------------
# the general loss


def contrastive_loss(
    z: torch.Tensor,
    *,
    alpha: float,
    lam: float = 1.0,
    nu: float = 1.0,
    negatives: str = "all",
    positive_in_denominator: bool = True,
    positive: str = "pairs",
    scale: str = "none",
    similarity: str = "cosine",
    reduction: str = "mean",
    chunk_size: int | None = None,
    gather: bool | DistContext | None = None,
    check_finite: bool = False,
    target: torch.Tensor | None = None,
    queue: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contrastive loss family (module docstring; docs/losses.md).

    Args:
        z: ``(V, B, D)`` projections, row ``i`` of every view from image ``i``.
        alpha: inverse temperature ``> 0``.
        lam, nu: the repulsion term is weighted ``lam / nu`` (``lam >= 0``, ``nu > 0``).
        negatives: ``"all"`` (every other row, SimCLR) or ``"cross"`` (the rows of the positive's view).
        positive_in_denominator: ``False`` removes every positive of the anchor from its candidates (DCL).
        positive: the attraction term. ``"pairs"``: ``-alpha * mean_{w != v} s(a, t_w)``, each other view a
            one-sample estimate of the image's surrogate prototype (the loss as written above). ``"mean"``:
            ``-alpha * s(a, mu)`` with ``mu`` the mean of the image's other target views (of the L2-normalized
            rows for cosine, the prototype of normalized representations; docs/losses.md step 1), the direct
            estimate (target branch ``multi_view_mean``). The two coincide for ``dot`` and for V = 2; for cosine
            and ``neg_euclidean`` Jensen's inequality makes ``"mean"``'s similarity the larger. The repulsion term
            is the same for both.
        scale: ``"none"`` or ``"inverse_alpha"`` (multiply by ``1/alpha``).
        similarity: ``"cosine"`` (L2-normalized dot), ``"dot"`` or ``"neg_euclidean"`` (``-||u - v||``).
        reduction: ``"mean"`` over anchors, or ``"none"`` for the ``(V*B,)`` per-anchor losses, view-major.
        chunk_size: anchors per tile of the exact tiled path; ``None`` picks the dense path up to
            ``DENSE_MAX_ENTRIES`` similarity entries and tiles above it.
        gather: take candidates from all ranks, with gradients. ``None``: on when a process group with world
            size > 1 is initialized; a ``DistContext`` names the group explicitly. With gathering,
            ``reduction="mean"`` returns ``world_size / (V * B_global)`` times the sum of this rank's anchor
            losses, so that averaging the value and the gradients over ranks (as DDP does) gives exactly the
            single-process loss with the global batch, even when ranks hold different batch sizes.
        check_finite: raise ``ValueError`` if ``z`` (or ``target``) holds NaN or Inf.
        target: ``(V, B, D)`` like ``z``, default ``z``. ``z`` supplies the anchors, ``target`` the positives
            and the candidates (same rows, same masks). Gradient reaches each side that requires it: pass
            ``target=z.detach()`` for a stop-gradient branch, a momentum encoder's output for MoCo/BYOL-style
            targets. The attraction and repulsion terms both read ``target``.
        queue: ``(Q, D)`` extra negatives (past targets, MoCo-style) appended to every candidate set; no
            gradient reaches them. Only with ``negatives="all"``; every rank must hold the same queue.

    Returns:
        a scalar (``"mean"``) or ``(V*B,)`` (``"none"``), float32 (float64 for float64 input).
    """
    _check_views(z)
    _positive_number("alpha", alpha)
    _positive_number("nu", nu)
    _non_negative_number("lam", lam)
    _choice("negatives", negatives, NEGATIVES)
    _choice("positive", positive, POSITIVES)
    _choice("scale", scale, SCALES)
    _choice("similarity", similarity, SIMILARITIES)
    _choice("reduction", reduction, REDUCTIONS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if target is not None and (not isinstance(target, torch.Tensor) or target.shape != z.shape):
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ValueError(f"target must be a tensor shaped like z {tuple(z.shape)}; got {got}")
    if queue is not None:
        if negatives != "all":
            raise ValueError("queue (extra negatives) is supported with negatives='all' only: with 'cross' the "
                             "candidates are one view's rows and a queue belongs to no view")
        if not isinstance(queue, torch.Tensor) or queue.dim() != 2 or queue.shape[1] != z.shape[2]:
            got = tuple(queue.shape) if isinstance(queue, torch.Tensor) else type(queue).__name__
            raise ValueError(f"queue must have shape (Q, D) with D={z.shape[2]}; got {got}")
    if check_finite:
        _check_finite("z", z)
        if target is not None:
            _check_finite("target", target)
    ctx = gather if isinstance(gather, DistContext) else current_context()
    if gather is False:
        ctx = DistContext()

    with torch.autocast(device_type=z.device.type, enabled=False):
        def prepare(x: torch.Tensor) -> torch.Tensor:
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return F.normalize(x, dim=-1) if similarity == "cosine" else x

        zf = prepare(z)
        tf = zf if target is None else prepare(target).to(zf.dtype)
        kernel = "neg_euclidean" if similarity == "neg_euclidean" else "dot"
        V, Bl, D = zf.shape

        # Candidates: the (V, B_global, D) target stack, gathered along the batch so rows stay view-major.
        zc3, offset = all_gather_with_grad(tf.transpose(0, 1), ctx)  # (B_global, V, D)
        zc3 = zc3.transpose(0, 1)
        Bg = zc3.shape[1]
        if Bg < 2:
            raise ValueError(
                f"the batch holds {Bg} image(s): a contrastive loss needs at least 2 images so that every "
                "anchor has a negative; increase the batch size"
            )
        za, zc = zf.reshape(V * Bl, D), zc3.reshape(V * Bg, D)
        Q = 0
        if queue is not None:
            zq = prepare(queue.detach()).to(zc.dtype)
            zc, Q = torch.cat([zc, zq]), zq.shape[0]
        img = (torch.arange(Bl, device=z.device) + offset).repeat(V)  # (V*Bl,) global image index

        # Attraction: mean over the V-1 positives of s(a, p), or s(a, mean of them); positives are always on
        # this rank.
        if positive == "mean" and similarity != "dot":  # for dot the mean of similarities is the similarity to the mean
            mu = (tf.sum(0, keepdim=True) - tf) / (V - 1)  # (V, Bl, D): the mean of the other views' targets
            mu = F.normalize(mu, dim=-1) if similarity == "cosine" else mu
            pos = _pairwise_similarity(zf, mu, kernel)  # (V, Bl)
        elif kernel == "dot":
            pos = (zf * (tf.sum(0, keepdim=True) - tf)).sum(-1) / (V - 1)  # (V, Bl)
        else:
            pos = torch.stack(
                [sum(_pairwise_similarity(zf[v], tf[w], kernel) for w in range(V) if w != v) for v in range(V)]
            ) / (V - 1)
        pos = pos.reshape(V * Bl)

        kw = dict(alpha=float(alpha), kernel=kernel, negatives=negatives,
                  positive_in_denominator=positive_in_denominator)
        cols = (V - 1) * Bg if negatives == "cross" else V * Bg + Q  # candidate columns per anchor
        if chunk_size is None and V * Bl * cols <= DENSE_MAX_ENTRIES:
            lse = _lse_dense(za, zc, img, V=V, Bl=Bl, Bg=Bg, Q=Q, **kw)
        else:
            chunk = chunk_size or min(TILE_ROWS, max(16, TILE_ENTRIES // cols))
            fused = reduction == "mean" and torch.is_grad_enabled() and (za.requires_grad or zc.requires_grad)
            lse = _TiledLSE.apply(za, zc, img, dict(kw, V=V, Bl=Bl, Bg=Bg, Q=Q, chunk=chunk), fused)

        loss = -alpha * pos + (lam / nu) * lse
        if scale == "inverse_alpha":
            loss = loss / alpha
        if reduction == "none":
            return loss
        if ctx.is_distributed:
            return loss.sum() * (ctx.world_size / (V * Bg))
        return loss.mean()


# ----------------------------------------------------------------------------------------------------------
# named presets


@dataclass(frozen=True)
class Preset:
    """A named member of the family: the options of :func:`contrastive_loss` it fixes and the numbers it reads."""

    alpha_from: str  # "temperature": alpha = 1 / temperature; "alpha": alpha as given
    params: tuple[str, ...]  # the hyperparameters it takes (the config's loss.<name> keys)
    negatives: str = "all"
    positive_in_denominator: bool = True
    scale: str = "none"  # its default scale (the config's loss.scale=preset)


# name -> preset; the config (loss.name), the loop, the diagnostics and the module classes below all read it.
PRESETS: dict[str, Preset] = {
    # SimCLR (Chen et al. 2020): all negatives, the positive in the denominator.
    "nt_xent": Preset(alpha_from="temperature", params=("temperature",)),
    # NT-Xent with a repulsion weight lam (the paper's generalization), unscaled.
    "generalized_nt_xent": Preset(alpha_from="alpha", params=("alpha", "lam")),
    # DCL (Yeh et al. 2022): the positives out of the denominator.
    "decoupled": Preset(alpha_from="temperature", params=("temperature",), positive_in_denominator=False),
    # The loss derived from the supervised prototype objective: cross-view candidates, lam / nu, times 1 / alpha.
    "balanced": Preset(alpha_from="alpha", params=("alpha", "lam", "nu"), negatives="cross", scale="inverse_alpha"),
}


def preset_options(name: str, *, temperature: float = 0.5, alpha: float = 2.0, lam: float = 1.0, nu: float = 1.0,
                   scale: str = "preset") -> dict:
    """The keyword arguments of :func:`contrastive_loss` that make loss ``name``: ``alpha`` (``1 / temperature``
    for the temperature presets), ``lam`` and ``nu`` (1 where the preset takes none), ``negatives``,
    ``positive_in_denominator`` and ``scale`` (``"preset"``: the preset's own)."""
    if name not in PRESETS:
        raise ValueError(f"unknown contrastive loss {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[name]
    if p.alpha_from == "temperature":
        _positive_number("temperature", temperature)
        alpha = 1.0 / temperature
    if scale != "preset":
        _choice("scale", scale, SCALES)
    return dict(alpha=float(alpha), lam=float(lam) if "lam" in p.params else 1.0,
                nu=float(nu) if "nu" in p.params else 1.0, negatives=p.negatives,
                positive_in_denominator=p.positive_in_denominator, scale=p.scale if scale == "preset" else scale)


def config_options(loss: Any) -> dict:
    """:func:`preset_options` of a loss config (``protoclr.config.LossConfig``) with its similarity and chunk size:
    everything :func:`contrastive_loss` needs besides ``z``, ``target``, ``queue`` and ``positive``."""
    return dict(preset_options(loss.name, temperature=loss.temperature, alpha=loss.alpha, lam=loss.lam, nu=loss.nu,
                               scale=loss.scale),
                similarity=loss.similarity, chunk_size=loss.chunk_size or None)  # chunk 0 -> automatic


def config_alpha(loss: Any) -> float:
    """The inverse temperature of a loss config: the preset's ``alpha`` (``1 / temperature`` for nt_xent and
    decoupled), ``alpha`` for the supervised objective. The diagnostics evaluate the bounds at it."""
    return float(loss.alpha) if loss.name not in PRESETS else preset_options(
        loss.name, temperature=loss.temperature, alpha=loss.alpha)["alpha"]


def nt_xent_loss(z: torch.Tensor, temperature: float = 0.5, **kwargs) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020): ``alpha = 1/temperature``, all negatives, positive in."""
    return contrastive_loss(z, **preset_options("nt_xent", temperature=temperature), **kwargs)


def generalized_nt_xent_loss(z: torch.Tensor, alpha: float = 2.0, lam: float = 1.0, **kwargs) -> torch.Tensor:
    """NT-Xent with the repulsion term weighted by ``lam``: all negatives, positive in, no scale."""
    return contrastive_loss(z, **preset_options("generalized_nt_xent", alpha=alpha, lam=lam), **kwargs)


def decoupled_contrastive_loss(z: torch.Tensor, temperature: float = 0.1, **kwargs) -> torch.Tensor:
    """Decoupled contrastive loss (Yeh et al. 2022): NT-Xent with the positives out of the denominator."""
    return contrastive_loss(z, **preset_options("decoupled", temperature=temperature), **kwargs)


def balanced_contrastive_loss(
    z: torch.Tensor, alpha: float = 2.0, lam: float = 1.0, nu: float = 1.0, **kwargs
) -> torch.Tensor:
    """The loss derived from the supervised prototype objective: cross-view candidates, positive in,
    repulsion weighted ``lam / nu``, scaled by ``1/alpha``."""
    return contrastive_loss(z, **preset_options("balanced", alpha=alpha, lam=lam, nu=nu), **kwargs)


# contrastive_loss's keywords a module may fix besides its preset's hyperparameters (target and queue are per call)
MODULE_OPTIONS = ("positive", "similarity", "reduction", "chunk_size", "gather", "check_finite")


def _alpha(module: nn.Module, alpha: float | None, temperature: float | None) -> float:
    """The alpha a module of an alpha preset was given: ``alpha``, else 2.0 (``temperature`` then replaces it)."""
    if alpha is not None and temperature is not None:
        raise TypeError(f"{type(module).__name__}: pass alpha or temperature (= 1 / alpha), not both")
    return 2.0 if alpha is None else alpha


class _ViewsLoss(nn.Module):
    """A thin module over a preset: holds the hyperparameters; ``forward(*views)`` takes V tensors (B, D).

    Every keyword is checked at construction (an unknown name is a ``TypeError`` naming it and the valid ones; a
    bad value a ``ValueError``), so a typo fails where it is written, not at the first forward."""

    preset: str = ""

    def __init__(self, fn, hparams: dict[str, float], options: dict[str, Any], *,
                 temperature: float | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        takes_alpha = "alpha" in hparams
        valid = [*hparams, *(["temperature"] if takes_alpha else []), *MODULE_OPTIONS]
        for key in options:
            if key not in MODULE_OPTIONS:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise TypeError(f"{name}: unknown keyword {key!r}; {hint}valid keywords: {', '.join(valid)}")
        if temperature is not None:  # the temperature of the NT-Xent papers: alpha = 1 / temperature
            _positive_number("temperature", temperature)
            hparams = {**hparams, "alpha": 1.0 / temperature}
        preset_options(self.preset, **hparams)  # the hyperparameters' values, checked now
        for key, table in (("positive", POSITIVES), ("similarity", SIMILARITIES), ("reduction", REDUCTIONS)):
            if key in options:
                _choice(key, options[key], table)
        if "alpha" in hparams:
            _positive_number("alpha", hparams["alpha"])
        if "lam" in hparams:
            _non_negative_number("lam", hparams["lam"])
        if "nu" in hparams:
            _positive_number("nu", hparams["nu"])
        self._fn, self.hparams, self.options = fn, hparams, options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        """``views``: V >= 2 tensors ``(B, D)``, row ``i`` of each from image ``i``; returns the loss (a scalar, or
        ``(V*B,)`` with ``reduction="none"``)."""
        if len(views) < 2:
            raise ValueError(f"{type(self).__name__} takes V >= 2 view tensors of shape (B, D); got {len(views)}")
        shapes = {tuple(v.shape) for v in views}
        if len(shapes) != 1:
            raise ValueError(f"all views must have the same shape (B, D); got {sorted(shapes)}")
        return self._fn(torch.stack(views), **self.hparams, **self.options)  # (V, B, D)


class NTXentLoss(_ViewsLoss):
    """SimCLR's NT-Xent / InfoNCE (Chen et al. 2020, eq. 1), for views ``(B, D)`` each:

        l_{a,p} = -s(a, p) / tau + log sum_{b != a} exp(s(a, b) / tau)

    every other row of the ``V*B`` stack a candidate, the positive included; cosine ``s``; the mean over anchors
    and positives. ``temperature`` tau > 0 (alpha = 1 / tau in docs/losses.md). Keywords: ``temperature`` and
    the options of :data:`MODULE_OPTIONS` (``similarity``, ``reduction``, ...)."""

    preset = "nt_xent"

    def __init__(self, *, temperature: float = 0.5, **options: Any) -> None:
        super().__init__(nt_xent_loss, {"temperature": temperature}, options)


class GeneralizedNTXentLoss(_ViewsLoss):
    """NT-Xent with the repulsion weighted by ``lam`` (docs/losses.md, eq. 2 with nu = 1), views ``(B, D)``:

        l_{a,p} = -alpha * s(a, p) + lam * log sum_{b != a} exp(alpha * s(a, b))

    ``alpha`` > 0 (inverse temperature; or ``temperature`` = 1 / alpha), ``lam`` >= 0; no scale."""

    preset = "generalized_nt_xent"

    def __init__(self, *, alpha: float | None = None, lam: float = 1.0, temperature: float | None = None,
                 **options: Any) -> None:
        super().__init__(generalized_nt_xent_loss, {"alpha": _alpha(self, alpha, temperature), "lam": lam}, options,
                         temperature=temperature)


class DecoupledContrastiveLoss(_ViewsLoss):
    """Decoupled contrastive loss (Yeh et al. 2022, eq. 6), views ``(B, D)``: NT-Xent with every positive of the
    anchor out of the denominator,

        l_{a,p} = -s(a, p) / tau + log sum_{b not a positive of a} exp(s(a, b) / tau)

    ``temperature`` tau > 0."""

    preset = "decoupled"

    def __init__(self, *, temperature: float = 0.1, **options: Any) -> None:
        super().__init__(decoupled_contrastive_loss, {"temperature": temperature}, options)


class BalancedContrastiveLoss(_ViewsLoss):
    """The balanced contrastive loss derived from the supervised prototype objective (docs/losses.md, eq. 2),
    views ``(B, D)``:

        l_{a,p} = (1 / alpha) * [ -alpha * s(a, p) + (lam / nu) * log sum_{b in view(p)} exp(alpha * s(a, b)) ]

    the candidates are the ``B`` rows of the positive's view (positive included); cosine ``s``. ``alpha`` > 0
    (inverse temperature; or ``temperature`` = 1 / alpha), ``lam`` >= 0 and ``nu`` > 0 weigh repulsion against
    attraction.

        BalancedContrastiveLoss(alpha=4.0, lam=2.0)(z1, z2)        # z1, z2: (B, D)
    """

    preset = "balanced"

    def __init__(self, *, alpha: float | None = None, lam: float = 1.0, nu: float = 1.0,
                 temperature: float | None = None, **options: Any) -> None:
        super().__init__(balanced_contrastive_loss, {"alpha": _alpha(self, alpha, temperature), "lam": lam, "nu": nu},
                         options, temperature=temperature)


# ----------------------------------------------------------------------------------------------------------
# the supervised objective


def _check_labels(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    if z.dim() != 2:
        raise ValueError(f"z must have shape (N, D); got {tuple(z.shape)} (flatten views first)")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"labels must have shape (N,) = ({z.shape[0]},); got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]")


def class_prototypes(z: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class means ``mu_c`` of ``z`` (N, D) -> (C, D). Raises if a class has no sample (its mean is undefined)."""
    _check_labels(z, labels, num_classes)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    if bool((counts == 0).any()):
        empty = (counts == 0).nonzero().flatten().tolist()
        raise ValueError(f"classes {empty[:10]} have no sample; use PrototypeBank to keep estimates across batches")
    sums = z.new_zeros(num_classes, z.shape[1]).index_add_(0, labels.long(), z)
    return sums / counts.unsqueeze(1).to(z.dtype)


def supervised_prototype_loss(
    z: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    lam: float = 1.0,
    alpha: float | None = None,
    similarity: str = "cosine",
    reduction: str = "mean",
) -> torch.Tensor:
    """The supervised objective: ``l_i = -s(z_i, mu_{y_i}) + lam * max_{y' != y_i} s(z_i, mu_{y'})``.

    With ``alpha`` the max becomes its smooth upper bound ``(1/alpha) log sum_{y' != y_i} exp(alpha s)``.
    ``z`` (N, D), ``labels`` (N,), ``prototypes`` (C, D) with C >= 2. Returns a scalar or (N,).
    """
    _choice("similarity", similarity, SIMILARITIES)
    _choice("reduction", reduction, REDUCTIONS)
    if prototypes.dim() != 2 or prototypes.shape[0] < 2:
        raise ValueError(f"prototypes must have shape (C, D) with C >= 2; got {tuple(prototypes.shape)}")
    if z.dim() != 2 or prototypes.shape[1] != z.shape[1]:
        raise ValueError(f"z (N, D) and prototypes (C, D) disagree: {tuple(z.shape)} vs {tuple(prototypes.shape)}")
    _check_labels(z, labels, prototypes.shape[0])
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if alpha is not None:
        _positive_number("alpha", alpha)
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        mu = prototypes.to(zf.dtype)
        if similarity == "cosine":
            zf, mu = F.normalize(zf, dim=-1), F.normalize(mu, dim=-1)
        sim = _similarity(zf, mu, "neg_euclidean" if similarity == "neg_euclidean" else "dot")  # (N, C)
        own = sim.gather(1, labels.long().unsqueeze(1)).squeeze(1)
        others = sim.scatter(1, labels.long().unsqueeze(1), float("-inf"))
        if alpha is None:
            rep = others.max(dim=1).values
        else:
            rep = torch.logsumexp(alpha * others, dim=1) / alpha
        loss = -own + lam * rep
        return loss.mean() if reduction == "mean" else loss


class SupervisedPrototypeLoss(nn.Module):
    """Module over :func:`supervised_prototype_loss`; ``forward(z, labels, prototypes)``."""

    def __init__(self, lam: float = 1.0, alpha: float | None = None, similarity: str = "cosine") -> None:
        super().__init__()
        _choice("similarity", similarity, SIMILARITIES)
        self.lam, self.alpha, self.similarity = lam, alpha, similarity

    def forward(self, z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        return supervised_prototype_loss(z, labels, prototypes, lam=self.lam, alpha=self.alpha,
                                         similarity=self.similarity)


class PrototypeBank(nn.Module):
    """Exponential moving averages of class prototypes, ``mu_c <- m * mu_c + (1 - m) * batch_mean_c``.

    The training loop calls :meth:`update` after each step (never inside a loss). A class takes its first
    batch mean as is. State lives in buffers, so it is saved with the model's ``state_dict``.
    """

    def __init__(self, num_classes: int, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if num_classes < 2 or dim < 1:
            raise ValueError(f"PrototypeBank needs num_classes >= 2 and dim >= 1; got {num_classes}, {dim}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        self.momentum = momentum
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))

    @torch.no_grad()
    def update(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold the class means of a batch ``z`` (N, D) with ``labels`` (N,) into the bank."""
        C = self.prototypes.shape[0]
        _check_labels(z, labels, C)
        counts = torch.bincount(labels.long(), minlength=C)
        present = counts > 0
        sums = torch.zeros_like(self.prototypes).index_add_(0, labels.long(), z.detach().to(self.prototypes.dtype))
        means = sums[present] / counts[present].unsqueeze(1)
        m = torch.where(self.seen[present], self.momentum, 0.0).unsqueeze(1).to(means.dtype)
        self.prototypes[present] = m * self.prototypes[present] + (1 - m) * means
        self.seen |= present

    def ready(self) -> bool:
        """Whether every class has been seen at least once."""
        return bool(self.seen.all())


# name -> module class, as chosen by the training config (`loss.name`).
LOSSES: dict[str, type[nn.Module]] = {
    "nt_xent": NTXentLoss,
    "generalized_nt_xent": GeneralizedNTXentLoss,
    "decoupled": DecoupledContrastiveLoss,
    "balanced": BalancedContrastiveLoss,
    "supervised_prototype": SupervisedPrototypeLoss,
}
