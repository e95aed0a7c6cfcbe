"""Gathered negatives across gloo processes reproduce the single-process loss and gradients exactly."""

from __future__ import annotations

import pytest
import torch

from protoclr.distributed import DistContext, run_local_processes
from protoclr.losses import contrastive_loss

pytestmark = pytest.mark.distributed

SETTINGS = [
    dict(alpha=2.0),
    dict(alpha=1.5, lam=2.0, negatives="cross", scale="inverse_alpha"),
    dict(alpha=3.0, positive_in_denominator=False, similarity="neg_euclidean"),
    dict(alpha=2.0, similarity="dot", chunk_size=3),
    dict(alpha=2.0, negatives="cross", positive_in_denominator=False, chunk_size=4),
]


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 6, generator=g, dtype=torch.float64)  # (V, B_global, D_in)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    return x, w


def _rank_step(ctx: DistContext, sizes: list[int]):
    """One rank: its slice of the batch through a shared linear encoder; returns losses and weight grads."""
    x, w = _problem()
    start = sum(sizes[: ctx.rank])
    x_local = x[:, start : start + sizes[ctx.rank]]
    out = []
    for kw in SETTINGS:
        w_r = w.clone().requires_grad_()
        loss = contrastive_loss(x_local @ w_r, gather=ctx, **kw)
        loss.backward()
        per_anchor = contrastive_loss((x_local @ w).detach(), gather=ctx, reduction="none", **kw)
        out.append((loss.item(), w_r.grad, per_anchor))
    return out


def _reference():
    x, w = _problem()
    ref = []
    for kw in SETTINGS:
        w_r = w.clone().requires_grad_()
        loss = contrastive_loss(x @ w_r, **kw)
        loss.backward()
        per_anchor = contrastive_loss(x @ w, reduction="none", **kw).reshape(3, 10)
        ref.append((loss.item(), w_r.grad, per_anchor))
    return ref


@pytest.mark.parametrize("sizes", [[10], [6, 4], [3, 3, 3, 1]], ids=["world1", "world2-uneven", "world4-uneven"])
def test_gathered_loss_matches_single_process(sizes):
    results = run_local_processes(_rank_step, len(sizes), sizes)
    for k, (ref_loss, ref_grad, ref_per_anchor) in enumerate(_reference()):
        # DDP averages gradients over ranks; the loss shares are defined so that their average is the loss.
        loss = sum(r[k][0] for r in results) / len(sizes)
        grad = sum(r[k][1] for r in results) / len(sizes)
        assert loss == pytest.approx(ref_loss, rel=1e-12), SETTINGS[k]
        torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
        per_anchor = torch.cat([r[k][2].reshape(3, -1) for r in results], dim=1)
        torch.testing.assert_close(per_anchor, ref_per_anchor, rtol=1e-10, atol=1e-12)
