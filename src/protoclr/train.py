"""Pretraining: one readable loop from a 2-core laptop to many GPUs (Lightning Fabric for devices/precision).

    protoclr pretrain                                   # CPU default: Fashion-MNIST, convnet, balanced loss
    protoclr pretrain --config configs/cifar10_resnet18.yaml trainer.devices=8
    protoclr pretrain --config configs/imagenet_resnet50.yaml --dry-run   # 2 steps, full model, fake data
    protoclr pretrain --resume runs/NAME                # or re-run with the same train.run_name
    torchrun --nnodes=2 --nproc_per_node=8 ... -m protoclr.cli pretrain --config C.yaml trainer.devices=8 \
        trainer.num_nodes=2 trainer.strategy=ddp        # see docs/training.md (torchrun, SLURM)

A run folder ``<train.out_dir>/<run_name>/`` holds ``config.yaml`` (resolved), ``meta.json`` (version, git
commit, command), ``checkpoint.pt`` (latest, atomic), ``metrics.jsonl`` and the TensorBoard / CSV logs;
``<train.out_dir>/runs.db`` records every run (:class:`protoclr.results.ResultsDB`).

Step: global batch ``B`` (``train.batch_size``) of dataset indices from a seeded per-epoch permutation; each
of ``W`` processes takes a contiguous ``B/W`` slice, makes ``V`` views (per-sample deterministic in (seed,
epoch, index, view)), runs the encoder on the ``V*B/W`` views at once and the loss gathers candidates from all
ranks; so ``W`` processes follow the one-process run (exactly, up to float summation order, with
batch-independent norms; BatchNorm statistics are per process unless SyncBatchNorm is on). The online probe
trains on detached features of view 0 with its own optimizer: its loss never reaches the encoder.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import protoclr
from protoclr import checkpoint as ckpt
from protoclr.config import Config, ConfigError, LossConfig, OptimConfig, config_from_dict, load_config
from protoclr.distributed import all_gather_no_grad
from protoclr.models import Encoder, build_encoder, param_groups
from protoclr.results import ResultsDB
from protoclr.views import train_views

# ----------------------------------------------------------------------------------------------------------
# optimizer and schedule


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


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, lr: float) -> torch.optim.Optimizer:
    """SGD (momentum) or LARS over two groups: decayed weights, and biases/norm parameters with no decay."""
    groups = param_groups(model, weight_decay=cfg.weight_decay)
    if cfg.name == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum, eta=cfg.lars_eta)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def lr_schedule(*, peak: float, total_steps: int, warmup_steps: int, final: float = 0.0) -> torch.Tensor:
    """(total_steps,) float64: linear warmup from ``peak/warmup_steps`` to ``peak``, then cosine to ``final``."""
    s = torch.arange(total_steps, dtype=torch.float64)
    warm = peak * (s + 1) / max(warmup_steps, 1)
    t = (s - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = final + (peak - final) * 0.5 * (1 + torch.cos(math.pi * t))
    return torch.where(s < warmup_steps, warm, cos)


# ----------------------------------------------------------------------------------------------------------
# loss


def contrastive_preset(cfg: LossConfig) -> tuple[Callable[..., torch.Tensor], dict[str, Any]]:
    """``(fn, kwargs)``: the preset function of a contrastive ``loss.name`` and its keyword arguments.

    The loop calls ``fn(z, target=..., queue=..., **kwargs)`` with ``z`` (V, B, D), so every target branch
    and the queue run through the same loss code (dense, tiled and gathered paths included).
    """
    from protoclr import losses as L

    opts: dict[str, Any] = dict(similarity=cfg.similarity, chunk_size=cfg.chunk_size or None)  # 0 -> automatic
    presets: dict[str, tuple[Callable[..., torch.Tensor], dict[str, Any]]] = {
        "nt_xent": (L.nt_xent_loss, dict(temperature=cfg.temperature)),
        "generalized_nt_xent": (L.generalized_nt_xent_loss, dict(alpha=cfg.alpha, lam=cfg.lam)),
        "decoupled": (L.decoupled_contrastive_loss, dict(temperature=cfg.temperature)),
        "balanced": (L.balanced_contrastive_loss, dict(alpha=cfg.alpha, lam=cfg.lam, nu=cfg.nu)),
    }
    if cfg.name not in presets:
        raise ConfigError(f"loss.name: {cfg.name!r} is not a contrastive loss; choose one of {sorted(presets)}")
    fn, hparams = presets[cfg.name]
    return fn, {**hparams, **opts}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The loss module named by ``cfg.name`` with the parameters that loss takes (losses.LOSSES)."""
    from protoclr import losses as L

    if cfg.name == "supervised_prototype":
        return L.SupervisedPrototypeLoss(lam=cfg.lam, alpha=cfg.alpha, similarity=cfg.similarity)
    if cfg.name not in L.LOSSES:
        raise ConfigError(f"loss.name: unknown loss {cfg.name!r}; choose one of {sorted(L.LOSSES)}")
    _, kwargs = contrastive_preset(cfg)
    return L.LOSSES[cfg.name](**kwargs)


def attraction_weight(cfg: LossConfig) -> float:
    """The factor ``c`` of the attraction term ``-c * s(a, p)`` in a contrastive loss's per-anchor value:
    ``alpha`` (``1/temperature``), or 1 for ``balanced``, whose ``1/alpha`` scale cancels it."""
    if cfg.name == "balanced":
        return 1.0
    return 1.0 / cfg.temperature if cfg.name in ("nt_xent", "decoupled") else cfg.alpha


# ----------------------------------------------------------------------------------------------------------
# target branch: which estimate of the image's surrogate prototype the anchors are pulled toward


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


def mean_target_attraction(z: torch.Tensor, *, similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pairwise, to_mean)``, both (V, B), for anchors ``z`` (V, B, D) and their image's other views.

    ``pairwise[v, i] = mean_{w != v} s(z[v, i], z[w, i])``: the attraction the loss computes (a second view is
    a one-sample estimate of the surrogate prototype). ``to_mean[v, i] = s(z[v, i], mu[v, i])`` with
    ``mu[v, i] = mean_{w != v} z[w, i]``, the rows L2-normalized first for cosine (the prototype of normalized
    representations, docs/losses.md step 1): the direct estimate. For ``dot`` the two coincide; for cosine and
    ``neg_euclidean`` Jensen's inequality gives ``to_mean >= pairwise``.
    """
    V = z.shape[0]
    u = F.normalize(z.float(), dim=-1) if similarity == "cosine" else z.float()
    others = u.sum(0, keepdim=True) - u  # (V, B, D): sum over the other views of each image

    def s(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # a, b (..., D) -> (...)
        if similarity == "neg_euclidean":  # as the loss: clamp before the root so the gradient stays finite
            return -(a.pow(2).sum(-1) + b.pow(2).sum(-1) - 2 * (a * b).sum(-1)).clamp_min(1e-30).sqrt()
        return (a * b).sum(-1)

    if similarity == "neg_euclidean":
        pairwise = torch.stack([sum(s(u[v], u[w]) for w in range(V) if w != v) for v in range(V)]) / (V - 1)
    else:
        pairwise = s(u, others) / (V - 1)
    mu = others / (V - 1)
    to_mean = s(u, F.normalize(mu, dim=-1)) if similarity == "cosine" else s(u, mu)
    return pairwise, to_mean


def target_side(name: str, z: torch.Tensor, x: torch.Tensor, target_encoder: nn.Module | None) -> torch.Tensor | None:
    """The loss's target side (V, Bl, D) for anchors ``z`` (V, Bl, D) computed from views ``x`` (V*Bl, C, s, s).

    ``None`` (z itself, gradient through both sides) for shared and multi_view_mean; ``z.detach()`` for
    stop_gradient; for momentum the EMA encoder's projections of the same views, computed without a graph.
    """
    if name == "stop_gradient":
        return z.detach()
    if name == "momentum":
        assert target_encoder is not None
        with torch.no_grad():
            return target_encoder(x)[1].view_as(z)  # (V*Bl, D) -> (V, Bl, D)
    return None


def contrastive_step_loss(fn: Callable[..., torch.Tensor], kwargs: dict[str, Any], z: torch.Tensor, *,
                          target_name: str, target: torch.Tensor | None, queue: torch.Tensor | None,
                          weight: float) -> torch.Tensor:
    """The loop's contrastive loss for anchors ``z`` (V, Bl, D) and a target branch.

    ``target`` (V, Bl, D) or None (``z`` itself) supplies positives and candidates; ``queue`` (Q, D) extra
    negatives. ``multi_view_mean`` replaces each anchor's attraction ``-c * mean_w s(a, t_w)`` by
    ``-c * s(a, mean_w t_w)`` (``c = weight``, :func:`attraction_weight`) and keeps the loss's repulsion:
    ``loss + c * mean_a (pairwise - to_mean)``. The local mean is the loss's own normalization when every rank
    holds ``Bl = B / W`` images, which the loop guarantees.
    """
    loss = fn(z, target=target, queue=queue, **kwargs)
    if target_name == "multi_view_mean":
        pairwise, to_mean = mean_target_attraction(z, similarity=kwargs["similarity"])
        loss = loss + weight * (pairwise - to_mean).mean()
    return loss


def _likely_cause(cfg: Config) -> str:
    if cfg.loss.similarity == "dot":
        return ("loss.similarity=dot leaves the projections unnormalized, so exp(alpha * <z, z'>) overflows as "
                "their norm grows; use loss.similarity=cosine or a lower optim.base_lr")
    if cfg.lr() > 5.0:
        return f"the peak learning rate {cfg.lr():.3g} is very large; lower optim.base_lr"
    if cfg.trainer.precision.startswith("16"):
        return "float16 overflow; use trainer.precision=bf16-mixed or 32-true"
    return "an exploding update; lower optim.base_lr or lengthen optim.warmup_epochs"


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped the run (its status in runs.db is ``diverged``)."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


# ----------------------------------------------------------------------------------------------------------
# data


class FakeImages:
    """Random uint8 images with the ``LabeledImages`` interface, for ``--dry-run`` (no dataset needed)."""

    def __init__(self, n: int, shape: tuple[int, int, int], num_classes: int, *, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g)  # (N, C, H, W)
        self.labels = torch.randint(0, num_classes, (n,), generator=g)
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_images(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]


class EpochBatches(torch.utils.data.Dataset):
    """Item ``k``: this rank's slice of global batch ``start + k`` of an epoch's order, decoded.

    Returns ``(indices (Bl,), images (Bl, C, H, W) uint8, labels (Bl,))``. Wrapped in a DataLoader with
    ``batch_size=None`` so file-backed datasets decode ahead in ``data.num_workers`` processes.
    """

    def __init__(self, data, order: torch.Tensor, *, batch_size: int, rank: int, world_size: int, start: int):
        self.data, self.order, self.start = data, order, start
        self.B, self.Bl, self.rank = batch_size, batch_size // world_size, rank

    def __len__(self) -> int:
        return len(self.order) // self.B - self.start

    def __getitem__(self, k: int):
        s = self.start + k
        idx = self.order[s * self.B : (s + 1) * self.B][self.rank * self.Bl : (self.rank + 1) * self.Bl]  # (Bl,)
        return idx, self.data.get_images(idx), self.data.labels[idx]


def _seeded_perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def epoch_order(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation of ``range(n)`` that depends only on (seed, epoch)."""
    return _seeded_perm(n, seed * 1_000_003 + epoch)


def load_data(cfg: Config, *, fake: bool = False, class_profile: bool = True):
    """``(train, test, spec)``: the training split (subset as configured), the held-out split, the view spec.

    ``class_profile=False`` leaves out ``data.class_profile`` (the split before the long-tailed or uniform draw:
    where the probes of a class-profiled run fit their classifiers)."""
    from protoclr.data import load_dataset
    from protoclr.views import config_view_spec

    d = cfg.data
    spec = config_view_spec(d)
    if fake:  # images at the view size, as many as two steps need
        shape = (spec.channels, spec.size, spec.size)
        return FakeImages(2 * cfg.train.batch_size, shape, 10, seed=1), FakeImages(64, shape, 10, seed=2), spec
    root = d.root or None
    train = load_dataset(d.dataset, split=d.train_split, root=root, download=d.download)
    test = load_dataset(d.dataset, split=d.test_split, root=root, download=d.download)
    if d.train_subset and d.train_subset < len(train):
        train = train.subset(_seeded_perm(len(train), cfg.train.seed)[: d.train_subset].sort().values)
    return (class_profiled(train, cfg) if class_profile else train), test, spec


def class_profiled(train, cfg: Config):
    """``train`` drawn to ``data.class_profile``: itself for none, the long-tailed set, or a uniform set of the
    long-tailed set's size (so the two differ only in balance)."""
    d = cfg.data
    if d.class_profile == "none":
        return train
    from protoclr.data import longtail, uniform_subset

    lt = longtail(train, profile=d.longtail_profile, imbalance_ratio=d.imbalance_ratio, seed=cfg.train.seed)
    return lt if d.class_profile == "longtail" else uniform_subset(train, total=len(lt), seed=cfg.train.seed)


# ----------------------------------------------------------------------------------------------------------
# online monitors


@torch.no_grad()
def extract(backbone: nn.Module, data, indices: torch.Tensor, spec, fabric, *, batch_size: int) -> torch.Tensor:
    """Backbone features (N, F) float32 on CPU of ``data[indices]``, sharded over ranks and gathered."""
    from protoclr.views import eval_images

    W, r = fabric.world_size, fabric.global_rank
    n = math.ceil(len(indices) / W)
    mine = indices[r * n : (r + 1) * n]
    feats = []
    for i in range(0, max(len(mine), 1), batch_size):
        idx = mine[i : i + batch_size] if len(mine) else indices[:1]
        x = eval_images(data.get_images(idx).to(fabric.device), spec)  # (b, C, s, s)
        feats.append(backbone(x).float())  # (b, F)
    f = torch.cat(feats)[: len(mine)] if len(mine) else torch.cat(feats)[:0]
    if W > 1:
        f = torch.cat([f, f.new_zeros(n - f.shape[0], f.shape[1])])  # pad to the same length on every rank
        f = fabric.all_gather(f).reshape(W * n, -1)[: len(indices)]  # (W, n, F) -> (N, F)
    return f.cpu()


def held_out_indices(n: int, *, samples: int) -> torch.Tensor:
    """Sorted indices of the ``samples`` held-out images the monitors score (0 = all ``n``): a fixed seeded draw,
    the same for every run, since a split stored in class order (the CIFAR-10 copy) has one class in its first
    rows."""
    if not samples or samples >= n:
        return torch.arange(n)
    return _seeded_perm(n, 0)[:samples].sort().values


def run_monitors(encoder: Encoder, probe: nn.Module, train, test, spec, cfg: Config, fabric) -> dict[str, float]:
    """Weighted kNN top-1 on backbone features and the online probe's top-1, both on the held-out split."""
    from protoclr.evaluate import knn_accuracy

    m = cfg.monitor
    bank_idx = _seeded_perm(len(train), cfg.train.seed + 1)
    bank_idx = (bank_idx[: m.knn_train_samples] if m.knn_train_samples else bank_idx).sort().values
    test_idx = held_out_indices(len(test), samples=m.test_samples)
    was_training = encoder.training
    encoder.eval()
    try:
        f_train = extract(encoder.backbone, train, bank_idx, spec, fabric, batch_size=m.batch_size)
        f_test = extract(encoder.backbone, test, test_idx, spec, fabric, batch_size=m.batch_size)
    finally:
        encoder.train(was_training)
    y_train, y_test = train.labels[bank_idx].long(), test.labels[test_idx].long()
    C = len(test.classes)
    out = {"knn_top1": knn_accuracy(f_train, y_train, f_test, y_test, num_classes=C, k=min(m.knn_k, len(f_train)),
                                    temperature=m.knn_temperature)["top1"]}
    if m.probe:
        with torch.no_grad():
            w = probe.weight.detach().float().cpu()
            b = probe.bias.detach().float().cpu()
            out["probe_top1"] = ((f_test @ w.T + b).argmax(1) == y_test).float().mean().item()
    return out


# ----------------------------------------------------------------------------------------------------------
# run folder


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _run_name(cfg: Config) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return cfg.train.run_name or f"{cfg.data.dataset}-{cfg.model.backbone}-{cfg.loss.name}-{stamp}"


# What must match between a run's saved config and the one resuming it (the rest may change, e.g. devices).
_RESUME_FIXED = ("data", "model", "loss", "target", "optim", "train.epochs", "train.steps", "train.batch_size",
                 "train.seed")


def _check_resumable(saved: Config, cfg: Config) -> None:
    a, b = saved.to_dict(), cfg.to_dict()
    diffs = []
    for key in _RESUME_FIXED:
        sec, _, name = key.partition(".")
        if name:
            if a[sec][name] != b[sec][name]:
                diffs.append(key)
        else:
            diffs += [f"{sec}.{k}" for k in a[sec] if a[sec][k] != b[sec][k]]
    if diffs:
        raise ConfigError(f"cannot resume: the run was started with different values of {', '.join(diffs)}; "
                          "use a new train.run_name or the run's own config.yaml")


def load_run(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[Encoder, Config]:
    """``(encoder, cfg)`` from a run folder or a checkpoint file; the encoder is in eval mode.

    ``encoder.backbone`` gives the features evaluation uses. Works for any backbone/projector config.
    """
    path = Path(path)
    file = path / "checkpoint.pt" if path.is_dir() else path
    state = ckpt.load(file, map_location=map_location)
    cfg = config_from_dict(state["config"])
    torch.manual_seed(0)  # construction only; every weight is overwritten by the checkpoint
    encoder = build_encoder(cfg.model, in_channels=int(state["in_channels"]))
    encoder.load_state_dict(state["model"])
    return encoder.eval(), cfg


# ----------------------------------------------------------------------------------------------------------
# the loop


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16), where bf16 autocast
    runs a convnet about twice as fast as float32; elsewhere bf16 is emulated and slower."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported())
    except AttributeError:  # an older torch without the probes
        return False


def _fabric(cfg: Config, run_dir: Path | None):
    from lightning.fabric import Fabric

    t = cfg.trainer
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = accelerator in ("cuda", "gpu")
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if on_gpu or cpu_has_bf16() else "32-true")
    devices: Any = t.devices
    if devices.isdigit():
        devices = int(devices)
    loggers = []
    if run_dir is not None:
        from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

        for name in t.loggers:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(root_dir=run_dir, name="tensorboard", version=""))
            elif name == "csv":
                # one csv/version_N per launch: the CSV logger rewrites an existing file, so a resume gets its own
                loggers.append(CSVLogger(root_dir=run_dir, name="csv"))
            else:
                raise ConfigError(f"trainer.loggers: unknown logger {name!r}; choose from tensorboard, csv")
    # Lightning announces its precision plugin at INFO on stderr; the run's own first line says the same
    for name in ("lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
                    precision=precision, loggers=loggers)
    return fabric, on_gpu


def pretrain(cfg: Config, *, dry_run: bool = False,
             on_epoch_end: Callable[[Encoder, dict[str, Any]], dict[str, Any] | None] | None = None) -> Path:
    """Train ``cfg``'s encoder; returns the run folder. Resumes when the folder already holds a checkpoint.

    ``dry_run``: the full model and view size on fake data, a global batch of at most 8 (so that a big config
    fits a small machine), two steps; no run folder is kept and no database row written.
    ``on_epoch_end(encoder, metrics)``: called on rank 0 after each epoch's monitors with the online encoder
    (no DDP wrapper) and the epoch's metrics so far; the scalars it returns join the epoch record
    (``metrics.jsonl``, ``runs.db``, loggers) before the checkpoint of the epoch end is written. The Python and
    torch RNG states and the encoder's train/eval mode are restored after it, so it cannot perturb the run.
    Raises :class:`TrainingDiverged` when a non-finite loss or gradient stops the run.
    """
    cfg.validate()
    tc = cfg.train
    if dry_run:
        import tempfile

        run_dir = Path(tempfile.mkdtemp(prefix="protoclr-dry-run-"))
    else:
        run_dir = Path(tc.out_dir) / _run_name(cfg)
    fabric, on_gpu = _fabric(cfg, None if dry_run else run_dir)
    fabric.launch()
    W, rank = fabric.world_size, fabric.global_rank
    if dry_run:
        cfg = copy.deepcopy(cfg)
        cfg.train.batch_size = W * max(1, min(cfg.train.batch_size, 8) // W)
        cfg.data.num_workers = 0  # fake data is in memory
        tc = cfg.train
    if tc.batch_size % W:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is not divisible by the {W} processes")
    # Every rank must agree on the run folder (the default name holds a time stamp).
    run_dir = Path(fabric.broadcast(str(run_dir), src=0))
    ckpt_file = run_dir / "checkpoint.pt"
    resume = ckpt_file.is_file() and not dry_run
    if resume:
        _check_resumable(config_from_dict(ckpt.load(ckpt_file)["config"]), cfg)

    # ---- data, model, loss, optimizers, schedule
    train, test, spec = load_data(cfg, fake=dry_run)
    mo = cfg.monitor
    probe_set = None  # the fixed class-balanced set the in-training diagnostics read
    if (mo.track_bounds or mo.track_bias) and not dry_run:
        from protoclr.diagnostics import probe_subset

        probe_set = probe_subset(test, size=mo.track_images, seed=0)
    B, Bl, V = tc.batch_size, tc.batch_size // W, cfg.data.num_views
    steps_per_epoch = len(train) // B  # the incomplete last batch is dropped
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size: {B} is larger than the {len(train)} training images")
    total_steps = tc.steps or steps_per_epoch * tc.epochs
    num_epochs = -(-total_steps // steps_per_epoch)  # the last one cut short when train.steps is not a multiple
    tv = train_views(cfg.data)  # global views (resized over training by data.view_sizes) and local views
    Vt = V + tv.num_local  # views per image in the loss
    in_channels = spec.channels  # views are converted to the spec's channel count
    num_classes = len(train.classes)

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    encoder = build_encoder(cfg.model, in_channels=in_channels)
    probe = nn.Linear(encoder.feature_dim, num_classes)
    loss_fn = build_loss(cfg.loss)
    bank = None
    if cfg.loss.name == "supervised_prototype":
        from protoclr.losses import PrototypeBank

        bank = PrototypeBank(num_classes, encoder.out_dim, momentum=cfg.loss.prototype_momentum)
    lr = cfg.lr()
    lrs = lr_schedule(peak=lr, total_steps=total_steps, final=cfg.optim.final_lr_ratio * lr,
                      warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch))
    if on_gpu and W > 1 and cfg.trainer.sync_batchnorm and cfg.model.norm == "batch":
        encoder = nn.SyncBatchNorm.convert_sync_batchnorm(encoder)
    raw_encoder = encoder  # what checkpoints hold (no DDP / compile wrapper)
    tg = cfg.target
    contrastive, loss_kw = contrastive_preset(cfg.loss) if bank is None else (None, {})
    # momentum: an EMA copy of backbone + projector, never trained by the optimizer; the loop updates it
    target_encoder = copy.deepcopy(raw_encoder).requires_grad_(False) if tg.name == "momentum" else None
    momentums = momentum_schedule(start=tg.momentum_start, total_steps=total_steps)  # indexed by step
    queue = torch.zeros(0, encoder.out_dim) if tg.queue_size else None  # (<= queue_size, D), oldest first
    optimizer = build_optimizer(encoder, cfg.optim, lr=float(lrs[0]))
    probe_opt = torch.optim.SGD(probe.parameters(), lr=cfg.monitor.probe_lr, momentum=0.9)

    epoch, step_in_epoch, step, skips = 0, 0, 0, 0
    loss_sum, loss_n = torch.zeros(()), 0  # the epoch's running loss (summed over steps)
    if resume:
        state = ckpt.load(ckpt_file)
        raw_encoder.load_state_dict(state["model"])
        probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        probe_opt.load_state_dict(state["probe_optimizer"])
        if bank is not None:
            bank.load_state_dict(state["bank"])
        if target_encoder is not None:
            target_encoder.load_state_dict(state["target"]["encoder"])
        if queue is not None:
            queue = state["target"]["queue"]
        fabric.strategy.precision.load_state_dict(state["precision"])
        epoch, step_in_epoch, step, skips = state["epoch"], state["step_in_epoch"], state["step"], state["skips"]
        loss_sum, loss_n = state["epoch_loss"]
        ckpt.set_rng_state(state["rng"])
        if not torch.equal(state["data_order"], epoch_order(len(train), seed=tc.seed, epoch=epoch)):
            raise RuntimeError(f"{ckpt_file}: saved data order differs from the recomputed one; the dataset changed")
        if step >= total_steps:
            fabric.print(f"{run_dir} is complete ({step} steps); nothing to resume")
            return run_dir

    if cfg.trainer.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    model = torch.compile(encoder) if cfg.trainer.compile else encoder
    model, optimizer = fabric.setup(model, optimizer)
    probe_m, probe_opt = fabric.setup(probe, probe_opt)
    if bank is not None:
        bank = bank.to(fabric.device)
    if target_encoder is not None:
        target_encoder = fabric.to_device(target_encoder)
        if cfg.trainer.channels_last:
            target_encoder = target_encoder.to(memory_format=torch.channels_last)
    if queue is not None:
        queue = queue.to(fabric.device)
    # what a skipped step restores: BatchNorm statistics its forward passes changed
    stateful = [raw_encoder] + ([target_encoder] if target_encoder is not None else [])

    db = None
    if not dry_run and rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
        meta = {"version": protoclr.__version__, "git_commit": _git_commit(), "command": sys.argv,
                "torch": torch.__version__, "world_size": W, "resumed_at_step": step if resume else None,
                "precision": str(fabric._connector._precision_input), "threads": torch.get_num_threads(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        db = ResultsDB(Path(tc.out_dir) / "runs.db")
        db.start_run(run_dir.name, config=cfg.to_dict(), run_dir=run_dir)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if rank == 0 and not dry_run else None

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

    def save(ep: int, k: int) -> None:
        """Checkpoint the state *before* step ``k`` of epoch ``ep`` (rank 0 writes, atomically)."""
        if dry_run:
            return
        if rank == 0:
            ckpt.atomic_save({
                "model": raw_encoder.state_dict(), "probe": probe.state_dict(),
                "optimizer": optimizer.state_dict(), "probe_optimizer": probe_opt.state_dict(),
                "bank": bank.state_dict() if bank is not None else {},
                "target": {"encoder": target_encoder.state_dict() if target_encoder is not None else {},
                           "momentum": momentums, "step": step,  # the schedule and its position
                           "queue": queue.cpu() if queue is not None else None},
                "precision": fabric.strategy.precision.state_dict(),
                "scheduler": {"lr": lrs, "step": step}, "rng": ckpt.rng_state(),
                "epoch": ep, "step_in_epoch": k, "step": step, "skips": skips,
                "epoch_loss": [loss_sum.detach().cpu(), loss_n],  # running mean of the epoch so far
                "data_order": epoch_order(len(train), seed=tc.seed, epoch=ep),
                "config": cfg.to_dict(), "in_channels": in_channels, "version": protoclr.__version__,
            }, ckpt_file)
        fabric.barrier()

    def finish(status: str, final: dict[str, Any], message: str | None = None) -> None:
        if db is not None:
            db.finish_run(run_dir.name, status, final, message=message)
        if metrics_file is not None:
            metrics_file.close()

    if not resume:
        save(0, 0)  # a last good checkpoint exists from the start

    # ---- loop
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
                        TimeRemainingColumn(), disable=not (cfg.trainer.progress and rank == 0 and not dry_run))
    max_steps = 2 if dry_run else (tc.max_steps or total_steps)
    epoch_metrics: dict[str, Any] = {}
    status = "finished"
    if rank == 0:
        fabric.print(f"run {run_dir} | {W} process(es), {fabric.device}, precision {fabric._connector._precision_input}"
                     f" | {len(train)} images, {total_steps} steps ({steps_per_epoch}/epoch), lr {lr:.4g}"
                     + (f" | resuming at epoch {epoch} step {step_in_epoch}" if resume else ""))
    buffers_backup: list[torch.Tensor] | None = None
    try:
        with progress:
            while epoch < num_epochs and step < max_steps:
                order = epoch_order(len(train), seed=tc.seed, epoch=epoch)
                task = progress.add_task("", total=min(steps_per_epoch, total_steps - epoch * steps_per_epoch),
                                         completed=step_in_epoch, epoch=epoch,
                                         loss=float("nan"), ips=0.0)
                if step_in_epoch == 0:
                    loss_sum, loss_n = torch.zeros(()), 0
                loss_sum = loss_sum.to(fabric.device)
                t_log, n_log = time.perf_counter(), 0
                model.train()
                batches = torch.utils.data.DataLoader(
                    EpochBatches(train, order, batch_size=B, rank=rank, world_size=W, start=step_in_epoch),
                    batch_size=None, num_workers=cfg.data.num_workers, pin_memory=on_gpu)
                for idx, images, labels in batches:
                    if step >= max_steps:
                        break
                    images = images.to(fabric.device, non_blocking=True)  # (Bl, C, H, W) uint8
                    labels = labels.to(fabric.device, non_blocking=True).long()  # (Bl,)
                    # [(V*Bl, C, s, s)] plus [(L*Bl, C, sl, sl)] with local views
                    xs = tv.make(images, seed=tc.seed, epoch=epoch, indices=idx, step=step, total_steps=total_steps)
                    if cfg.trainer.channels_last:
                        xs = [xi.contiguous(memory_format=torch.channels_last) for xi in xs]
                    x = xs[0] if len(xs) == 1 else xs
                    if tc.on_nonfinite == "skip":
                        buffers_backup = [b.detach().clone() for m in stateful for b in m.buffers()]
                    h, z = model(x)  # (Vt*Bl, F), (Vt*Bl, D): global views first, view-major
                    z = z.view(Vt, Bl, -1)  # (Vt, Bl, D)
                    if bank is not None:
                        zf, yf = z.detach().flatten(0, 1), labels.repeat(Vt)  # (Vt*Bl, D), (Vt*Bl,)
                        bank.update(all_gather_no_grad(zf), all_gather_no_grad(yf))  # the loop owns the bank
                        loss = loss_fn(z.flatten(0, 1), labels.repeat(Vt), bank.prototypes)
                    else:
                        with fabric.autocast():
                            t = target_side(tg.name, z, x, target_encoder)  # (V, Bl, D) or None (z itself)
                        loss = contrastive_step_loss(contrastive, loss_kw, z, target_name=tg.name, target=t,
                                                     queue=queue if queue is not None and len(queue) else None,
                                                     weight=attraction_weight(cfg.loss))
                    probe_loss = F.cross_entropy(probe_m(h[:Bl].detach().float()), labels)
                    fabric.backward(loss + probe_loss)
                    grads = [p.grad for p in raw_encoder.parameters() if p.grad is not None]
                    gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss
                    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm)).float()
                    if W > 1:
                        bad = fabric.all_reduce(bad, reduce_op="sum")
                    if bad.item() > 0:
                        what = "loss" if not torch.isfinite(loss.detach()) else "gradient"
                        msg = (f"non-finite {what} at step {step} (epoch {epoch}, step {step_in_epoch} of the "
                               f"epoch, lr {float(lrs[step]):.4g}); likely cause: {_likely_cause(cfg)}")
                        optimizer.zero_grad(set_to_none=True)
                        probe_opt.zero_grad(set_to_none=True)
                        if tc.on_nonfinite == "skip" and skips < tc.max_skips:
                            skips += 1
                            assert buffers_backup is not None
                            with torch.no_grad():
                                for b, saved in zip([b for m in stateful for b in m.buffers()], buffers_backup,
                                                    strict=True):
                                    b.copy_(saved)
                            fabric.print(f"skipping: {msg} ({skips} skipped so far)")
                            log({"kind": "skip", "step": step, "epoch": epoch, "message": msg})
                            step, step_in_epoch = step + 1, step_in_epoch + 1
                            continue
                        if tc.on_nonfinite == "skip":
                            msg += f"; {skips} steps skipped before it (train.max_skips={tc.max_skips})"
                        log({"kind": "diverged", "step": step, "epoch": epoch, "message": msg})
                        finish("diverged", {"step": step, "epoch": epoch, "skips": skips}, msg)
                        raise TrainingDiverged(f"training diverged: {msg}. The last good checkpoint is kept in "
                                               f"{ckpt_file}.", run_dir)
                    for g in optimizer.param_groups:
                        g["lr"] = float(lrs[step])
                    optimizer.step()
                    probe_opt.step()
                    if target_encoder is not None:
                        ema_update(target_encoder, raw_encoder, momentum=float(momentums[step]))
                    if queue is not None:  # this step's targets, all ranks in global batch order, enter the queue
                        rows = (z if t is None else t).detach().transpose(0, 1)  # (Bl, V, D)
                        rows = all_gather_no_grad(rows).transpose(0, 1).flatten(0, 1)  # (B, V, D) -> (V*B, D)
                        queue = enqueue(queue, rows, size=tg.queue_size)
                    optimizer.zero_grad(set_to_none=True)
                    probe_opt.zero_grad(set_to_none=True)
                    step, step_in_epoch = step + 1, step_in_epoch + 1
                    loss_sum += loss.detach()
                    loss_n += 1
                    n_log += B
                    if step % tc.log_every == 0 or step_in_epoch == steps_per_epoch:
                        avg = (fabric.all_reduce(loss_sum, reduce_op="mean") if W > 1 else loss_sum).item() / loss_n
                        ips = n_log / (time.perf_counter() - t_log)
                        t_log, n_log = time.perf_counter(), 0
                        progress.update(task, completed=step_in_epoch, loss=avg, ips=ips)
                        rec = {"loss": avg, "lr": float(lrs[step - 1]), "img_per_s": ips, "epoch": epoch}
                        fabric.log_dict({f"train/{k}": v for k, v in rec.items()}, step=step)
                        log({"kind": "step", "step": step, **rec, "probe_loss": probe_loss.item()})
                    if (tc.checkpoint_every and step % tc.checkpoint_every == 0 and step_in_epoch < steps_per_epoch
                            and step < total_steps):
                        save(epoch, step_in_epoch)
                progress.remove_task(task)
                if step_in_epoch < steps_per_epoch and step < total_steps:  # stopped by max_steps inside the epoch
                    save(epoch, step_in_epoch)
                    break
                last = step >= total_steps
                epoch_metrics = {"epoch": epoch, "step": step, "loss": loss_sum.item() / max(loss_n, 1),
                                 "lr": float(lrs[step - 1]), "skips": skips}
                if not dry_run and cfg.monitor.every and ((epoch + 1) % cfg.monitor.every == 0 or last):
                    epoch_metrics.update(run_monitors(raw_encoder, probe, train, test, spec, cfg, fabric))
                if probe_set is not None and rank == 0 and ((epoch + 1) % mo.track_every == 0 or last):
                    from protoclr.diagnostics import loss_alpha, track

                    # nu=1: the same repulsion bound protoclr sweep records, whatever the loss's nu
                    epoch_metrics.update(track(raw_encoder, probe_set, spec=spec, views=mo.track_views,
                                               alphas=(loss_alpha(cfg.loss),), nus=(1.0,), bounds=mo.track_bounds,
                                               bias=mo.track_bias, seed=tc.seed, device=fabric.device))
                if on_epoch_end is not None and rank == 0 and not dry_run:
                    rng, was_training = ckpt.rng_state(), raw_encoder.training
                    epoch_metrics.update(on_epoch_end(raw_encoder, dict(epoch_metrics)) or {})
                    ckpt.set_rng_state(rng)
                    raw_encoder.train(was_training)
                epoch, step_in_epoch = epoch + 1, 0
                save(epoch, 0)
                fabric.log_dict({f"epoch/{k}": v for k, v in epoch_metrics.items()}, step=step)
                log({"kind": "epoch", **epoch_metrics})
                if db is not None:
                    db.log_epoch(run_dir.name, epoch_metrics["epoch"], epoch_metrics)
                fabric.print(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in epoch_metrics.items()))
                sys.stdout.flush()  # one line per epoch reaches a log file (or a sweep worker's) as it happens
    except KeyboardInterrupt:
        finish("interrupted", epoch_metrics, "interrupted by the user; the last checkpoint resumes it")
        raise
    except TrainingDiverged:
        raise
    except BaseException as e:
        finish("failed", epoch_metrics, f"{type(e).__name__}: {e}")
        raise
    if step < total_steps and not dry_run:
        status = "interrupted"  # stopped by train.max_steps; resuming continues the schedule
    finish(status, epoch_metrics)
    for logger in fabric.loggers:
        logger.finalize("success")
    if dry_run and rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


# ----------------------------------------------------------------------------------------------------------
# command line


def _parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Pretrain an encoder without labels. With no --config: the CPU default "
        "(Fashion-MNIST, convnet, balanced loss; a few minutes on 2 cores).",
        epilog="Overrides are section.key=value, e.g. optim.base_lr=0.6 train.epochs=10 trainer.devices=8. "
        "`--print-config` lists every key with its resolved value; src/protoclr/config.py documents them.")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--dry-run", action="store_true", help="build everything, run 2 steps on fake data, exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _resolve(args: argparse.Namespace) -> Config:
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoint.pt").is_file():
            raise ConfigError(f"--resume: {run_dir} holds no checkpoint.pt")
        overrides = [f"train.out_dir={run_dir.parent}", f"train.run_name={run_dir.name}", *args.overrides]
        return load_config(run_dir / "config.yaml", overrides)
    return load_config(args.config, args.overrides)


def cli_main(argv: list[str]) -> int:
    args = _parser("protoclr pretrain").parse_args(argv)
    cfg = _resolve(args)  # user errors reach protoclr.cli, which prints them as one line
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        run_dir = pretrain(cfg, dry_run=args.dry_run)
    except TrainingDiverged as e:
        print(f"protoclr pretrain: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(f"dry run ok: built {cfg.model.backbone} + {cfg.model.projector_layers}-layer projector, "
              f"{cfg.loss.name} loss, {cfg.optim.name}; ran 2 steps on fake {cfg.data.views} views (batch <= 8)")
    else:
        print(f"run saved in {run_dir}")
    return 0


__all__ = [
    "LARS",
    "FakeImages",
    "TrainingDiverged",
    "attraction_weight",
    "build_loss",
    "build_optimizer",
    "cli_main",
    "contrastive_preset",
    "contrastive_step_loss",
    "ema_update",
    "enqueue",
    "epoch_order",
    "load_data",
    "load_run",
    "lr_schedule",
    "mean_target_attraction",
    "momentum_schedule",
    "pretrain",
    "target_side",
]

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
