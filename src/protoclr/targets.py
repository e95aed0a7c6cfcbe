"""The target branch: which estimate of an image's surrogate prototype its anchors are pulled toward.

    branch = TargetBranch(cfg.target, encoder, total_steps=T, dim=D, num_classes=C, supervised=False)
    t = branch.side(z, x)                                     # (V, B, D) or None (z itself)
    loss = contrastive_loss(z, target=t, **branch.loss_options(), **config_options(cfg.loss))
    ...optimizer step...
    branch.after_step(encoder, z, t, step=k)                  # EMA update, queue

The loop sees the training objective as one object with one method (:func:`objective`): ``loss, t =
objective.loss(z, x, labels)``; :class:`Contrastive` is the contrastive loss toward the branch's targets,
:class:`SupervisedPrototype` the supervised prototype loss toward the bank's class prototypes.

Names (docs/training.md, "The target branch"): ``shared`` (SimCLR: one encoder, gradient through both sides),
``stop_gradient`` (the target side detached), ``momentum`` (an EMA copy of backbone and projector, cosine
momentum schedule, updated by the loop after each step: BYOL, Grill et al. 2020; MoCo v3), ``multi_view_mean``
(each anchor pulled toward the mean of its image's other views: the loss's ``positive="mean"``). A queue of past
targets (MoCo) adds negatives to any of them. The supervised objective's class-prototype bank is loop state of
the same kind and lives here too (``bank``); the loop updates it where a reader sees it.

Everything the branch carries across steps (the EMA encoder, the queue, the bank) is in :meth:`state_dict`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from protoclr.distributed import all_gather_no_grad
from protoclr.losses import PrototypeBank, config_options, contrastive_loss, supervised_prototype_loss

# target.name values (TargetBranch implements each; protoclr.config validates target.name against this tuple)
TARGETS = ("shared", "stop_gradient", "momentum", "multi_view_mean")


def momentum_schedule(*, start: float, total_steps: int) -> torch.Tensor:
    """(total_steps,) float64: ``m_k = 1 - (1 - start) * (cos(pi k / K) + 1) / 2``, from ``start`` toward 1
    (BYOL, Grill et al. 2020, section 3.2; MoCo v3). ``m_k`` is used for the update after optimizer step k."""
    k = torch.arange(total_steps, dtype=torch.float64)
    return 1 - (1 - start) * (torch.cos(math.pi * k / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, *, momentum: float) -> None:
    """``p_target <- momentum * p_target + (1 - momentum) * p_online`` for every parameter (in place).

    Buffers (BatchNorm running statistics) are not averaged: the target encoder keeps its own, updated by its
    forward passes in train mode, as MoCo's key encoder does.
    """
    for pt, po in zip(target.parameters(), online.parameters(), strict=True):
        pt.mul_(momentum).add_(po.detach(), alpha=1 - momentum)


def enqueue(queue: torch.Tensor, rows: torch.Tensor, *, size: int) -> torch.Tensor:
    """FIFO queue ``(<= size, D)``, oldest row first: ``rows`` (N, D) enter at the end, the oldest leave."""
    return torch.cat([queue, rows.detach().to(queue.dtype)])[-size:]


class TargetBranch:
    """The loop's target state: an EMA encoder (``momentum``), a FIFO queue of past targets, the supervised
    objective's prototype bank; each present only when the config asks for it."""

    def __init__(self, cfg: Any, encoder: nn.Module, *, total_steps: int, dim: int, num_classes: int = 0,
                 supervised: bool = False, prototype_momentum: float = 0.9):
        self.name = cfg.name
        self.encoder = copy.deepcopy(encoder).requires_grad_(False) if cfg.name == "momentum" else None
        self.momentums = momentum_schedule(start=cfg.momentum_start, total_steps=total_steps)  # indexed by step
        self.queue_size = cfg.queue_size
        self.queue = torch.zeros(0, dim) if cfg.queue_size else None  # (<= queue_size, D), oldest row first
        self.bank = PrototypeBank(num_classes, dim, momentum=prototype_momentum) if supervised else None

    def side(self, z: torch.Tensor, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | None:
        """The loss's target (V, Bl, D) for anchors ``z`` (V, Bl, D) made from views ``x``: ``None`` (z itself,
        gradient through both sides) for shared and multi_view_mean, ``z.detach()`` for stop_gradient, the EMA
        encoder's projections of the same views (no graph) for momentum."""
        if self.name == "stop_gradient":
            return z.detach()
        if self.encoder is not None:
            with torch.no_grad():
                return self.encoder(x)[1].view_as(z)  # (V*Bl, D) -> (V, Bl, D)
        return None

    def loss_options(self) -> dict[str, Any]:
        """The branch's keyword arguments of :func:`protoclr.losses.contrastive_loss`: the attraction form and
        the queue (None while empty)."""
        queue = self.queue if self.queue is not None and len(self.queue) else None
        return {"positive": "mean" if self.name == "multi_view_mean" else "pairs", "queue": queue}

    @torch.no_grad()
    def after_step(self, online: nn.Module, z: torch.Tensor, target: torch.Tensor | None, *, step: int) -> None:
        """After optimizer step ``step``: the EMA update with ``m_step``; this step's targets (every rank's, in
        global batch order) enter the queue."""
        if self.encoder is not None:
            ema_update(self.encoder, online, momentum=float(self.momentums[step]))
        if self.queue is not None:
            rows = (z if target is None else target).detach().transpose(0, 1)  # (Bl, V, D)
            rows = all_gather_no_grad(rows).transpose(0, 1).flatten(0, 1)  # (B, V, D) -> (V*B, D)
            self.queue = enqueue(self.queue, rows, size=self.queue_size)

    @torch.no_grad()
    def update_bank(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """The supervised objective's step: every rank's projections ``z`` (V, Bl, D) of images with ``labels``
        (Bl,) update the class-prototype bank (before the loss reads it)."""
        zf = z.detach().flatten(0, 1)  # (V*Bl, D)
        yf = labels.repeat(z.shape[0])  # (V*Bl,)
        self.bank.update(all_gather_no_grad(zf), all_gather_no_grad(yf))

    def modules(self) -> list[nn.Module]:
        """Modules whose buffers a step changes besides the online encoder (restored when a step is skipped)."""
        return [m for m in (self.encoder, self.bank) if m is not None]

    def to(self, device: torch.device | str, *, channels_last: bool = False) -> TargetBranch:
        if self.encoder is not None:
            self.encoder = self.encoder.to(device)
            if channels_last:
                self.encoder = self.encoder.to(memory_format=torch.channels_last)
        if self.queue is not None:
            self.queue = self.queue.to(device)
        if self.bank is not None:
            self.bank = self.bank.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": self.encoder.state_dict() if self.encoder is not None else None,
                "queue": self.queue.cpu() if self.queue is not None else None,
                "bank": self.bank.state_dict() if self.bank is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, have in (("encoder", self.encoder), ("queue", self.queue), ("bank", self.bank)):
            if (have is None) != (state.get(key) is None):
                raise ValueError(f"the checkpoint's target state has {key} {'absent' if have is not None else 'set'}"
                                 f" but this config {'needs' if have is not None else 'has no'} one")
        if self.encoder is not None:
            self.encoder.load_state_dict(state["encoder"])
        if self.queue is not None:
            self.queue = state["queue"].to(self.queue.device)
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])


# ----------------------------------------------------------------------------------------------------------
# the objective: what the loop minimizes, as one object with one method


class Contrastive:
    """The contrastive loss (protoclr.losses.contrastive_loss, ``loss.name`` a preset) toward the target
    branch's targets; the branch's target side runs under ``autocast`` (the training precision)."""

    def __init__(self, loss_cfg: Any, branch: TargetBranch, *,
                 autocast: Callable[[], Any] = contextlib.nullcontext):
        self.branch, self.options, self.autocast = branch, config_options(loss_cfg), autocast

    def loss(self, z: torch.Tensor, x: Any, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(loss, t)``: the loss of anchors ``z`` (V, Bl, D) made from views ``x``, and the targets ``t``
        (V, Bl, D) it pulled them toward (None: z itself) for :meth:`TargetBranch.after_step`."""
        with self.autocast():
            t = self.branch.side(z, x)  # (V, Bl, D) or None (z itself)
        return contrastive_loss(z, target=t, **self.branch.loss_options(), **self.options), t


class SupervisedPrototype:
    """The supervised prototype loss (protoclr.losses.supervised_prototype_loss) toward the class prototypes of
    the branch's bank, which this step's projections update first."""

    def __init__(self, loss_cfg: Any, branch: TargetBranch):
        self.branch, self.cfg = branch, loss_cfg

    def loss(self, z: torch.Tensor, x: Any, labels: torch.Tensor) -> tuple[torch.Tensor, None]:
        """``(loss, None)`` of projections ``z`` (V, Bl, D) of images with ``labels`` (Bl,); views ``x`` unused."""
        self.branch.update_bank(z, labels)
        yf = labels.repeat(z.shape[0])  # (V*Bl,): view-major, as z.flatten(0, 1)
        loss = supervised_prototype_loss(z.flatten(0, 1), yf, self.branch.bank.prototypes, lam=self.cfg.lam,
                                         alpha=self.cfg.alpha, similarity=self.cfg.similarity)
        return loss, None


def objective(loss_cfg: Any, branch: TargetBranch, *,
              autocast: Callable[[], Any] = contextlib.nullcontext) -> Contrastive | SupervisedPrototype:
    """The objective of ``loss.name``: :class:`SupervisedPrototype` for ``supervised_prototype``, else
    :class:`Contrastive` (the presets of protoclr.losses)."""
    if loss_cfg.name == "supervised_prototype":
        return SupervisedPrototype(loss_cfg, branch)
    return Contrastive(loss_cfg, branch, autocast=autocast)


__all__ = ["TARGETS", "Contrastive", "SupervisedPrototype", "TargetBranch", "ema_update", "enqueue",
           "momentum_schedule", "objective"]
