"""Optimizers: the ``optim.name`` table and the one non-torch optimizer, LARS.

    optimizer = build_optimizer(encoder, cfg.optim, lr=cfg.lr())

Every optimizer steps two parameter groups (``protoclr.models.param_groups``): decayed weights, and biases / norm
parameters / ViT tokens with no weight decay (and no LARS adaptation). ``protoclr.config`` validates
``optim.name`` against :data:`OPTIMIZERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from protoclr.models import param_groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, as used by SimCLR).

    Per parameter: ``d = grad + wd * p``; unless its group has ``lars_exclude`` (biases and norm parameters),
    ``d *= eta * ||p|| / ||d||`` (1 when either norm is 0); then ``v = momentum * v + d`` and
    ``p -= lr * v`` (PyTorch's SGD momentum convention).
    """

    def __init__(self, params, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if not group["lars_exclude"]:
                    pn, dn = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), group["eta"] * pn / dn, torch.ones_like(pn))
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


# optim.name -> constructor(param groups, the optim config section, lr)
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], Any, float], torch.optim.Optimizer]] = {
    "sgd": lambda groups, cfg, lr: torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum),  # the paper's optimizer
    "lars": lambda groups, cfg, lr: LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta),
    # AdamW (Loshchilov & Hutter 2019): decoupled weight decay; ViTs
    "adamw": lambda groups, cfg, lr: torch.optim.AdamW(groups, lr=lr, betas=(cfg.betas[0], cfg.betas[1])),
}


def build_optimizer(model: nn.Module, cfg: Any, *, lr: float) -> torch.optim.Optimizer:
    """:data:`OPTIMIZERS`'s ``cfg.name`` (``cfg``: a ``protoclr.config.OptimConfig``) over ``model``'s two
    parameter groups (``models.param_groups``): decayed weights, and biases / norm parameters / ViT tokens with no
    decay."""
    return OPTIMIZERS[cfg.name](param_groups(model, weight_decay=cfg.weight_decay), cfg, lr)


__all__ = ["LARS", "OPTIMIZERS", "build_optimizer"]
