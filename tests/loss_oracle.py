"""A float64 loop oracle for the contrastive loss family, written straight from the formulas.

Deliberately slow and literal: one Python loop per anchor, positive and candidate.
"""

from __future__ import annotations

import math

import torch


def sim(u: torch.Tensor, v: torch.Tensor, similarity: str) -> float:
    if similarity == "cosine":
        return float(u @ v / (u.norm() * v.norm()))
    if similarity == "dot":
        return float(u @ v)
    return -float((u - v).norm())


def logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def oracle_loss(z, *, alpha, lam=1.0, nu=1.0, negatives="all", positive_in_denominator=True, scale="none",
                similarity="cosine", reduction="mean", target=None, queue=None, positive="pairs"):
    """Anchors are rows of z; positives and candidates are rows of target (default z), plus queue rows.
    ``positive="mean"``: every pair's attraction term uses the mean of the anchor's other target views (of the
    unit-normalized rows for cosine) instead of the pair's own positive."""
    z = z.detach().double()
    t = z if target is None else target.detach().double()
    q = [] if queue is None else list(queue.detach().double())
    V, B, _ = z.shape
    losses = []
    for v in range(V):
        for i in range(B):
            a = z[v, i]
            others = [t[w, i] / (t[w, i].norm() if similarity == "cosine" else 1.0) for w in range(V) if w != v]
            mu = sum(others) / len(others)
            terms = []
            for w in range(V):
                if w == v:
                    continue
                p = t[w, i]
                if negatives == "all":
                    cands = [(u, j) for u in range(V) for j in range(B) if (u, j) != (v, i)]
                else:
                    cands = [(w, j) for j in range(B)]
                if not positive_in_denominator:
                    cands = [(u, j) for (u, j) in cands if j != i]
                logits = [alpha * sim(a, t[u, j], similarity) for (u, j) in cands]
                logits += [alpha * sim(a, row, similarity) for row in q]
                lse = logsumexp(logits)
                l_ap = -alpha * sim(a, mu if positive == "mean" else p, similarity) + (lam / nu) * lse
                if scale == "inverse_alpha":
                    l_ap /= alpha
                terms.append(l_ap)
            losses.append(sum(terms) / len(terms))
    out = torch.tensor(losses, dtype=torch.float64)
    return out.mean() if reduction == "mean" else out


def oracle_supervised(z, labels, prototypes, *, lam=1.0, alpha=None, similarity="cosine"):
    z, mu = z.detach().double(), prototypes.detach().double()
    out = []
    for i in range(z.shape[0]):
        y = int(labels[i])
        own = sim(z[i], mu[y], similarity)
        others = [sim(z[i], mu[c], similarity) for c in range(mu.shape[0]) if c != y]
        rep = max(others) if alpha is None else logsumexp([alpha * s for s in others]) / alpha
        out.append(-own + lam * rep)
    return torch.tensor(out, dtype=torch.float64).mean()


def preset_settings(preset, hparams: dict[str, float]) -> dict:
    """The oracle's settings for a ``protoclr.losses.Preset`` entry and the hyperparameter values it reads
    (``hparams[k]`` for ``k`` in ``preset.params``): ``alpha = 1 / temperature`` for a temperature preset (SimCLR,
    DCL), ``lam`` and ``nu`` 1 where it takes none, the preset's candidate set, denominator and scale."""
    alpha = 1 / hparams["temperature"] if preset.alpha_from == "temperature" else hparams["alpha"]
    return dict(alpha=alpha, lam=hparams["lam"] if "lam" in preset.params else 1.0,
                nu=hparams["nu"] if "nu" in preset.params else 1.0, negatives=preset.negatives,
                positive_in_denominator=preset.positive_in_denominator, scale=preset.scale)
