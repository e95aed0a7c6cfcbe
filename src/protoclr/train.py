"""Pretraining: one readable loop from a 2-core laptop to many GPUs (Lightning Fabric for devices/precision).

    protoclr pretrain                                   # CPU default: Fashion-MNIST, convnet, balanced loss
    protoclr pretrain --config configs/cpu_cifar10.yaml # the CPU recipe on the CIFAR-10 copy
    protoclr pretrain --config configs/imagenet_resnet50.yaml data.root=/data/imagenet --dry-run   # 2 steps,
                                                        # full model, fake data (data.root must exist)
    protoclr pretrain --resume runs/NAME                # or re-run with the same train.run_name
    torchrun --nnodes=2 --nproc_per_node=8 ... -m protoclr.cli pretrain --config C.yaml trainer.devices=8 \
        trainer.num_nodes=2 trainer.strategy=ddp        # see docs/training.md (torchrun, SLURM)

A run folder ``<train.out_dir>/<run_name>/`` (protoclr.runs) holds ``config.yaml`` (resolved), ``meta.json``
(version, git commit, command, precision), ``checkpoint.pt`` (latest, atomic), ``metrics.jsonl`` and the
TensorBoard / CSV logs; ``<train.out_dir>/runs.db`` records every run.

Step: global batch ``B`` (``train.batch_size``) of dataset indices from a seeded per-epoch permutation
(protoclr.splits); each of ``W`` processes takes a contiguous ``B/W`` slice, makes its views (per-sample
deterministic in (seed, epoch, index, view); protoclr.views), runs the encoder on all of them at once, and the
loss gathers candidates from all ranks; so ``W`` processes follow the one-process run (exactly, up to float
summation order, with batch-independent norms; BatchNorm statistics are per process unless SyncBatchNorm is on).
The objective (protoclr.targets.objective: the contrastive loss toward the target branch's targets, or the
supervised prototype loss toward its class-prototype bank) is one ``loss(z, x, labels)`` call; the target branch
is updated after the optimizer step. The online probe trains on detached features of view 0 with its own
optimizer: its loss never reaches the encoder.
Measurements at epoch ends are protoclr.measure's (the ``eval`` config section).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import protoclr
from protoclr import atomic, checkpoint, custom, data, runs, splits, targets
from protoclr.config import Config, ConfigError, DataConfig, load_config
from protoclr.distributed import shutdown
from protoclr.loggers import LOGGERS
from protoclr.measure import CONSOLE, KNN, Monitor
from protoclr.models import TIMM_PREFIX, Encoder, build_encoder, timm_input_size
from protoclr.optim import LARS, build_optimizer
from protoclr.precision import cpu_has_bf16, resolve_precision
from protoclr.targets import TargetBranch
from protoclr.views import config_view_spec, fit_views, train_views

# ----------------------------------------------------------------------------------------------------------
# schedule


def lr_schedule(*, peak: float, total_steps: int, warmup_steps: int, final: float = 0.0) -> torch.Tensor:
    """(total_steps,) float64: linear warmup from ``peak/warmup_steps`` to ``peak``, then cosine to ``final``."""
    s = torch.arange(total_steps, dtype=torch.float64)
    warm = peak * (s + 1) / max(warmup_steps, 1)
    t = (s - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = final + (peak - final) * 0.5 * (1 + torch.cos(math.pi * t))
    return torch.where(s < warmup_steps, warm, cos)


# ----------------------------------------------------------------------------------------------------------
# devices, precision


def setup_fabric(cfg: Config, run_dir: Path | None):
    """``(fabric, on_gpu)``: Lightning Fabric for ``cfg.trainer`` (``precision=auto`` resolved here), with the
    loggers of ``trainer.loggers`` (:data:`LOGGERS`) writing into ``run_dir``; ``trainer.num_threads`` applied."""
    from lightning.fabric import Fabric

    t = cfg.trainer
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={t.accelerator}: no CUDA GPU is visible on this machine "
                          "(torch.cuda.is_available() is False); use trainer.accelerator=auto or cpu")
    on_gpu = accelerator in ("cuda", "gpu")
    precision = resolve_precision(t.precision, "cuda" if on_gpu else "cpu")
    devices: Any = int(t.devices) if t.devices.isdigit() else t.devices
    loggers = [LOGGERS[name](run_dir) for name in t.loggers] if run_dir is not None else []
    # Lightning announces its precision plugin at INFO on stderr; the run's own first line says the same
    for name in ("lightning.fabric", "lightning.pytorch", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=t.num_nodes, strategy=t.strategy,
                    precision=precision, loggers=loggers)
    return fabric, on_gpu


# ----------------------------------------------------------------------------------------------------------
# divergence


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient stopped the run (its status in runs.db is ``diverged``)."""

    def __init__(self, message: str, run_dir: Path):
        super().__init__(message)
        self.run_dir = run_dir


def _likely_cause(cfg: Config) -> str:
    if cfg.loss.similarity == "dot":
        return ("loss.similarity=dot leaves the projections unnormalized, so exp(alpha * <z, z'>) overflows as "
                "their norm grows; use loss.similarity=cosine or a lower optim.base_lr")
    if cfg.lr() > 5.0:
        return f"the peak learning rate {cfg.lr():.3g} is very large; lower optim.base_lr"
    if cfg.trainer.precision.startswith("16"):
        return "float16 overflow; use trainer.precision=bf16-mixed or 32-true"
    return "an exploding update; lower optim.base_lr or lengthen optim.warmup_epochs"


# ----------------------------------------------------------------------------------------------------------
# the loop


def _file_backed_crops(cfg: Config, tv: Any) -> tuple[Any, int]:
    """``(spec, V)``: a file-backed dataset's global views are cropped from the full images in DataLoader workers
    (protoclr.views.crop_views); local views and progressive resizing need the images in memory."""
    if tv.num_local or tv.sizes:
        raise ConfigError(f"data.local_views / data.view_sizes need an in-memory dataset; {cfg.data.dataset} is "
                          "decoded from files batch by batch (its views are cut from the full images in DataLoader "
                          "workers): set data.local_views=0 and data.view_sizes=[]")
    return tv.spec, tv.num_views


def _launch(cfg: Config, *, dry_run: bool) -> tuple[Config, Any, bool, Path]:
    """``(cfg, fabric, on_gpu, run_dir)``: Fabric launched, the dry run's small-batch config (a copy), the run
    folder every process agrees on (the default name holds a time stamp)."""
    cfg.validate()
    run_dir = Path(tempfile.mkdtemp(prefix="protoclr-dry-run-")) if dry_run else \
        Path(cfg.train.out_dir) / runs.run_name(cfg)
    fabric, on_gpu = setup_fabric(cfg, None if dry_run else run_dir)
    fabric.launch()
    W = fabric.world_size
    if dry_run:
        cfg = copy.deepcopy(cfg)
        cfg.train.batch_size = W * max(1, min(cfg.train.batch_size, 8) // W)
        cfg.data.num_workers = 0  # fake data is in memory
    if cfg.train.batch_size % W:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {W} processes")
    return cfg, fabric, on_gpu, Path(fabric.broadcast(str(run_dir), src=0))


def schedule(cfg: Config, num_images: int) -> tuple[int, int, int, torch.Tensor]:
    """``(steps_per_epoch, total_steps, num_epochs, lrs)`` of a run on ``num_images`` training images: the
    incomplete last batch of an epoch is dropped; ``train.steps`` (else ``train.epochs`` epochs) steps in all, the
    last epoch cut short when they are not a multiple; ``lrs`` (total_steps,) from :func:`lr_schedule`."""
    steps_per_epoch = num_images // cfg.train.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the {num_images} training images")
    total = cfg.train.steps or steps_per_epoch * cfg.train.epochs
    lrs = lr_schedule(peak=cfg.lr(), total_steps=total, final=cfg.optim.final_lr_ratio * cfg.lr(),
                      warmup_steps=round(cfg.optim.warmup_epochs * steps_per_epoch))
    return steps_per_epoch, total, -(-total // steps_per_epoch), lrs


def _unmeasurable(cfg: Config, train: Any, test: Any, what: str) -> str | None:
    """Why accuracy on ``train``'s labels would mean nothing (no labels; one class; no held-out images, or a
    held-out split that is the training images), None when it means something or nothing is measured."""
    d, e = cfg.data, cfg.eval
    if not (e.every or e.online_probe or e.linear):
        return None
    if bool((train.labels < 0).all()):
        return f"{what} has no labels: kNN and probe accuracy need them; pass (image, label) items to measure it"
    if test is None:
        return ("no test_dataset was passed to pretrain: kNN and probe accuracy would have no held-out images to "
                "be scored on; pass test_dataset= to measure it")
    if len(train.classes) < 2:
        return (f"{what} has one class ({', '.join(train.classes) or 'none'}): kNN and probe accuracy would be 1.0 "
                "whatever the encoder; put the images in one subfolder per class to measure it")
    if data.same_images(d.dataset, root=d.root or None, split_a=d.train_split, split_b=d.test_split):
        return (f"{what} has no {d.test_split} split apart from the training images (no {d.test_split}/ or "
                f"{d.test_split}.zip beside {d.train_split}/): kNN and probe accuracy would be scored on the training "
                f"images; add a held-out {d.test_split}/ folder to measure it")
    return None


def fit_to_data(cfg: Config, train: Any, *, test: Any = (), say: Callable[[str], Any] = print) -> Config:
    """``cfg`` with its views fitted to the training images (``train``; None skips that: a dry run's fake data)
    and a fixed-size timm model (a ViT) built for the views' size when ``model.timm_img_size`` is 0: a copy when
    anything changes, each change said in one line by ``say``. A preset the user chose that would turn RGB images
    grey, and views whose side is not a multiple of the ViT's patch, raise a ConfigError naming the keys
    (protoclr.views.fit_views). ``test``: the held-out images (None: none were given, so accuracy is not
    measured). The result is the config the run saves, so evaluation and export see the same."""
    d, m = cfg.data, cfg.model
    out = copy.deepcopy(cfg)
    if train is not None:
        channels, side = data.image_shape(train)
        what = d.root if d.dataset == "image_folder" and d.root else \
            "the dataset passed to pretrain" if d.dataset == custom.PYTHON else d.dataset
        chosen = d.views != DataConfig().views or any(o.replace(" ", "").startswith("size=") for o in d.view_overrides)
        out.data.views, out.data.view_overrides, msg = fit_views(d, channels=channels, side=side, what=what,
                                                                  chosen=chosen)
        if msg:
            say(msg)
        if why := _unmeasurable(cfg, train, test, what):
            out.eval.every, out.eval.online_probe, out.eval.linear = 0, False, False
            say(f"eval: {why}, so accuracy is not measured (eval.every=0, eval.online_probe=false, "
                "eval.linear=false)")
    size = config_view_spec(out.data).size
    if m.backbone.startswith(TIMM_PREFIX) and not m.timm_img_size:
        fixed = timm_input_size(m.backbone[len(TIMM_PREFIX):], patch_size=m.timm_patch_size)
        if fixed is not None and fixed[0] != size:
            img, patch = fixed
            if size % patch:
                fits = min((p for p in range(1, size) if size % p == 0), key=lambda p: abs(p - size / 8))  # ~8x8
                raise ConfigError(f"model.timm_img_size: {m.backbone} takes {img}-pixel input in {patch}-pixel "
                                  f"patches but the views are {size} px (data.views={out.data.views}), not a multiple "
                                  f"of {patch}; set model.timm_img_size={size} model.timm_patch_size={fits}")
            out.model.timm_img_size = size
            say(f"model.timm_img_size: {m.backbone} takes {img}-pixel input; built for the {size}-pixel views "
                f"instead ({size // patch}x{size // patch} patches of {patch} px; model.timm_patch_size changes that)")
    return cfg if out.to_dict() == cfg.to_dict() else out.validate()


def _isolated(hook: Callable[[Encoder, dict[str, Any]], dict[str, Any] | None], encoder: Encoder,
              metrics: dict[str, Any]) -> dict[str, Any]:
    """``hook(encoder, metrics)`` with the RNG states and the encoder's mode restored after it."""
    rng, was_training = checkpoint.rng_state(), encoder.training
    try:
        return hook(encoder, dict(metrics)) or {}
    finally:
        checkpoint.set_rng_state(rng)
        encoder.train(was_training)


class Learner:
    """What training changes, unwrapped: the encoder, the online probe, their optimizers and the target branch
    (protoclr.targets); :meth:`state_dict` is their part of a checkpoint."""

    def __init__(self, cfg: Config, *, in_channels: int, num_classes: int, total_steps: int, lr: float,
                 sync_batchnorm: bool = False, backbone: tuple[nn.Module, int] | None = None):
        """``backbone``: a caller's module and its feature width F in place of ``cfg.model``'s (protoclr.custom)."""
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.encoder = build_encoder(cfg.model, in_channels=in_channels) if backbone is None else \
            custom.encoder_with(*backbone, cfg.model)
        self.probe = nn.Linear(self.encoder.feature_dim, num_classes) if cfg.eval.online_probe else None
        if sync_batchnorm and cfg.model.norm == "batch":
            self.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(self.encoder)
        self.branch = TargetBranch(cfg.target, self.encoder, total_steps=total_steps, dim=self.encoder.out_dim,
                                   num_classes=num_classes, supervised=cfg.loss.name == "supervised_prototype",
                                   prototype_momentum=cfg.loss.prototype_momentum)
        self.optimizer = build_optimizer(self.encoder, cfg.optim, lr=lr)
        self.probe_opt = torch.optim.SGD(self.probe.parameters(), lr=cfg.eval.probe_lr, momentum=0.9) \
            if self.probe is not None else None

    def setup(self, fabric: Any, trainer: Any) -> tuple[nn.Module, Any, nn.Module | None, Any]:
        """``(model, optimizer, probe, probe_optimizer)`` wrapped by Fabric (device, precision, DDP), the encoder
        in ``trainer.channels_last`` memory format and under ``torch.compile`` if asked; the target branch moved."""
        encoder = self.encoder.to(memory_format=torch.channels_last) if trainer.channels_last else self.encoder
        model, optimizer = fabric.setup(torch.compile(encoder) if trainer.compile else encoder, self.optimizer)
        probe, probe_opt = fabric.setup(self.probe, self.probe_opt) if self.probe is not None else (None, None)
        self.branch.to(fabric.device, channels_last=trainer.channels_last)
        return model, optimizer, probe, probe_opt

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(),
                "probe": self.probe.state_dict() if self.probe is not None else None,
                "probe_optimizer": self.probe_opt.state_dict() if self.probe_opt is not None else None,
                "target": self.branch.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.encoder.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.probe is not None:
            self.probe.load_state_dict(state["probe"])
            self.probe_opt.load_state_dict(state["probe_optimizer"])
        self.branch.load_state_dict(state["target"])


def _meta(world_size: int, precision: str, resumed_at_step: int | None, python: dict[str, str]) -> dict[str, Any]:
    """``meta.json``: what made this run (version, commit, command, the objects passed from Python) and on what
    (torch, processes, precision)."""
    return {"version": protoclr.__version__, "git_commit": runs.git_commit(), "command": sys.argv, "python": python,
            "torch": torch.__version__, "world_size": world_size, "precision": precision,
            "threads": torch.get_num_threads(), "resumed_at_step": resumed_at_step,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


class Position:
    """Where a run is (epoch, step within it, global step, skipped steps) and the epoch's running loss."""

    def __init__(self, state: dict[str, Any] | None = None):
        s = state or {"epoch": 0, "step_in_epoch": 0, "step": 0, "skips": 0, "epoch_loss": [torch.zeros(()), 0]}
        self.epoch, self.step_in_epoch, self.step, self.skips = s["epoch"], s["step_in_epoch"], s["step"], s["skips"]
        self.loss_sum, self.loss_n = s["epoch_loss"]
        self.best = s.get("best")  # the best online kNN top-1 at an epoch end so far (train.keep=best)

    def begin_epoch(self, device: torch.device) -> None:
        """An epoch's running loss starts at zero (an epoch resumed part-way keeps its own)."""
        if self.step_in_epoch == 0:
            self.loss_sum, self.loss_n = torch.zeros(()), 0
        self.loss_sum = self.loss_sum.to(device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """A taken step's loss (detached) joins the epoch's running loss."""
        self.loss_sum = self.loss_sum + loss
        self.loss_n += 1

    def advance(self) -> None:
        """A step is done (taken or skipped)."""
        self.step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0

    def improves(self, value: float | None) -> bool:
        """Whether ``value`` (an epoch end's online kNN top-1) beats every earlier one; it becomes the best."""
        if value is None or (self.best is not None and value <= self.best):
            return False
        self.best = value
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "step": self.step, "skips": self.skips,
                "epoch_loss": [self.loss_sum.detach().cpu(), self.loss_n], "best": self.best}


def _from_python(cfg: Config, own: dict[str, str]) -> Config:
    """``cfg`` saying where the backbone and dataset passed from Python are (``model.backbone`` / ``data.dataset``
    :data:`protoclr.custom.PYTHON`), a copy when that changes it."""
    if not ({"backbone", "dataset"} & set(own)):
        return cfg
    out = copy.deepcopy(cfg)
    if "backbone" in own:
        out.model.backbone = custom.PYTHON
    if "dataset" in own:
        out.data.dataset, out.data.root, out.data.on_bad = custom.PYTHON, "", "error"
    return out


def _load(cfg: Config, *, dry_run: bool, own: custom.Own) -> tuple[Any, Any]:
    """``(train, test)``: the config's data (fake for a dry run), or the datasets passed from Python (``test``
    None when none was)."""
    if own.dataset is not None:
        test = None if own.test_dataset is None else custom.as_images(own.test_dataset, what="test_dataset")
        return splits.training_set(custom.as_images(own.dataset, what="dataset"), cfg), test
    if dry_run:
        data.check_exists(cfg.data.dataset, root=cfg.data.root or None, split=cfg.data.train_split)
    with warnings.catch_warnings():  # data.on_bad=skip: the run says it once, with where the list is
        warnings.filterwarnings("ignore", message=r"skipped \d+ bad image file")
        train, test, _ = splits.load_data(cfg, fake=dry_run)
    return train, test


def _views(cfg: Config, views: Callable[[torch.Tensor], torch.Tensor] | None) -> Any:
    """The training views: the config's (protoclr.views.TrainViews), or a caller's per-image view function
    (protoclr.custom.FunctionViews), which takes no local views or progressive resizing."""
    if views is None:
        return train_views(cfg.data)
    if cfg.data.local_views or cfg.data.view_sizes:
        raise ConfigError("data.local_views / data.view_sizes belong to protoclr's views; with views= from Python "
                          "set data.local_views=0 and data.view_sizes=[]")
    return custom.FunctionViews(views, config_view_spec(cfg.data), num_views=cfg.data.num_views)


def _restore(state: dict[str, Any], learner: Learner, fabric: Any, *, order: torch.Tensor, where: Path) -> None:
    """A checkpoint's weights, optimizers, target branch, precision (loss scaler) and RNG states restored; its
    data order must be ``order``, the one recomputed for its epoch."""
    learner.load_state_dict(state)
    fabric.strategy.precision.load_state_dict(state["precision"])
    checkpoint.set_rng_state(state["rng"])
    if not torch.equal(state["data_order"], order):
        raise RuntimeError(f"{where}: saved data order differs from the recomputed one; the dataset changed")


def pretrain(cfg: Config, *, dry_run: bool = False,
             on_epoch_end: Callable[[Encoder, dict[str, Any]], dict[str, Any] | None] | None = None,
             backbone: nn.Module | None = None, feature_dim: int | None = None, dataset: Any = None,
             test_dataset: Any = None, views: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Path:
    """Train ``cfg``'s encoder; returns the run folder. Resumes when the folder already holds a checkpoint.

    ``dry_run``: the full model and view size on fake data (checking that the config's data is there), a global
    batch of at most 8 (a big config fits a small machine), two steps; no run folder or database row is kept.
    ``on_epoch_end(encoder, metrics)``: called on rank 0 after each epoch's measurements with the online
    encoder (no DDP wrapper) and the epoch's metrics so far; the scalars it returns join the epoch record
    (``metrics.jsonl``, ``runs.db``, loggers) before the checkpoint of the epoch end is written. The Python and
    torch RNG states and the encoder's train/eval mode are restored after it, so it cannot perturb the run.
    ``backbone`` (with its width ``feature_dim``, else measured), ``dataset`` / ``test_dataset`` and ``views``:
    a caller's own objects in place of the config's (protoclr.custom says what each must be).
    Raises :class:`TrainingDiverged` when a non-finite loss or gradient stops the run.
    """
    own = custom.Own(backbone, feature_dim, dataset, test_dataset, views)
    cfg, fabric, on_gpu, run_dir = _launch(_from_python(cfg, own.names), dry_run=dry_run)
    train, test = _load(cfg, dry_run=dry_run, own=own)  # then the views, the timm input size, accuracy or not:
    cfg = fit_to_data(cfg, None if dry_run and dataset is None else train, test=test, say=fabric.print)
    spec = config_view_spec(cfg.data)
    tc, W, rank = cfg.train, fabric.world_size, fabric.global_rank
    ckpt_file = runs.RunDir(run_dir).checkpoint
    state = checkpoint.load(ckpt_file) if ckpt_file.is_file() and not dry_run else None
    if state is not None:
        runs.check_resumable(state["config"], cfg.to_dict())
        custom.check_resume(state.get("python"), own.names)
    B, Bl = tc.batch_size, tc.batch_size // W
    steps_per_epoch, total_steps, num_epochs, lrs = schedule(cfg, len(train))
    tv = _views(cfg, views)  # global views (resized over training by data.view_sizes) and local views
    Vt = tv.num_views + tv.num_local  # views per image in the loss
    crops = None if getattr(train, "in_memory", True) else _file_backed_crops(cfg, tv)
    learner = Learner(cfg, in_channels=spec.channels, num_classes=len(train.classes), total_steps=total_steps,
                      lr=float(lrs[0]), sync_batchnorm=on_gpu and W > 1 and cfg.trainer.sync_batchnorm,
                      backbone=own.backbone_and_width(spec))
    pos = Position(state)
    if state is not None:
        _restore(state, learner, fabric, order=splits.epoch_order(len(train), seed=tc.seed, epoch=pos.epoch),
                 where=ckpt_file)
        if pos.step >= total_steps:
            fabric.print(f"{run_dir} is complete ({pos.step} steps); nothing to resume")
            return run_dir
    raw, branch = learner.encoder, learner.branch
    model, optimizer, probe, probe_opt = learner.setup(fabric, cfg.trainer)  # device, precision, DDP wrappers
    objective = targets.objective(cfg.loss, branch, autocast=fabric.autocast)
    monitor = Monitor(cfg, train, test, spec) if cfg.eval.every and not dry_run else None
    precision, at = str(fabric._connector._precision_input), pos.step if state else None  # at: resumed at
    rec = runs.Recorder(run_dir, cfg, enabled=rank == 0 and not dry_run, loggers=fabric.loggers,
                        say=lambda line: (fabric.print(line), sys.stdout.flush()), resume_epoch=pos.epoch,
                        resume_step=at, meta=_meta(W, precision, at, own.names), console_keys=CONSOLE)
    rec.skipped(list(dict.fromkeys([*getattr(train, "skipped", []), *getattr(test, "skipped", [])])),
                where=cfg.data.root or cfg.data.dataset)

    def save() -> None:  # the state before the next step (rank 0 writes, atomically)
        if not dry_run and rank == 0:
            checkpoint.atomic_save({
                **learner.state_dict(), "precision": fabric.strategy.precision.state_dict(),
                "rng": checkpoint.rng_state(), **pos.state_dict(),
                "data_order": splits.epoch_order(len(train), seed=tc.seed, epoch=pos.epoch),
                "config": cfg.to_dict(), "in_channels": spec.channels, "feature_dim": raw.feature_dim,
                "python": own.names, "version": protoclr.__version__}, ckpt_file)
        fabric.barrier()

    stateful = [raw, *branch.modules()]  # what a skipped step restores: the buffers its forward passes changed
    max_steps = 2 if dry_run else min(tc.max_steps or total_steps, total_steps)
    fabric.print(f"run {run_dir} | {W} process(es), {fabric.device}, precision {precision}"
                 f" | {len(train)} images, {total_steps} steps ({steps_per_epoch}/epoch), lr {cfg.lr():.4g}"
                 + (f" | resuming at epoch {pos.epoch} step {pos.step_in_epoch}" if state else ""))
    if state is None and monitor is not None and cfg.eval.initial:  # before any step: where every curve starts
        rec.epoch({"epoch": -1, "step": 0, "skips": 0, **_isolated(
            lambda enc, _: monitor.measure(enc, learner.probe, dist=fabric, device=fabric.device), raw, {})})
    if state is None:
        save()  # a last good checkpoint exists from the start (after the step-0 record: a kill between them reruns it)

    def step(idx: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> tuple[Any, Any] | None:
        """One optimizer step on this rank's slice of the global batch: ``(loss, probe_loss)`` detached (probe_loss
        None without a probe), or None when a non-finite step was skipped (train.on_nonfinite=skip)."""
        images = images.to(fabric.device, non_blocking=True)  # (Bl, C, H, W) uint8
        labels = labels.to(fabric.device, non_blocking=True).long()  # (Bl,)
        # [(V*Bl, C, s, s)] plus [(L*Bl, C, sl, sl)] with local views
        xs = tv.make(images, seed=tc.seed, epoch=pos.epoch, indices=idx, step=pos.step, total_steps=total_steps)
        if cfg.trainer.channels_last:
            xs = [xi.contiguous(memory_format=torch.channels_last) for xi in xs]
        x = xs[0] if len(xs) == 1 else xs
        backup = [b.detach().clone() for m in stateful for b in m.buffers()] if tc.on_nonfinite == "skip" else []
        h, z = model(x)  # (Vt*Bl, F), (Vt*Bl, D): global views first, view-major
        z = z.view(Vt, Bl, -1)  # (Vt, Bl, D)
        loss, t = objective.loss(z, x, labels)  # t: the targets z was pulled toward (None: z itself)
        probe_loss = F.cross_entropy(probe(h[:Bl].detach().float()), labels) if probe else None
        fabric.backward(loss if probe_loss is None else loss + probe_loss)
        if (msg := _nonfinite(loss, raw, fabric, cfg, pos, lrs)) is not None:
            _zero_grad(optimizer, probe_opt)
            if (msg := _skip(msg, pos, tc, stateful, backup, rec, fabric.print)) is None:
                return None
            rec.finish("diverged", {"step": pos.step, "epoch": pos.epoch, "skips": pos.skips}, msg)
            raise TrainingDiverged(f"training diverged: {msg}. The last good checkpoint is kept in {ckpt_file}.",
                                   run_dir)
        for g in optimizer.param_groups:
            g["lr"] = float(lrs[pos.step])
        optimizer.step()
        _zero_grad(optimizer)
        if probe_opt:
            probe_opt.step()
            _zero_grad(probe_opt)
        branch.after_step(raw, z, t, step=pos.step)  # EMA update, queue
        pos.advance()
        return loss.detach(), probe_loss.detach() if probe_loss is not None else None

    bars = Bars(enabled=cfg.trainer.progress and rank == 0 and not dry_run, total=max_steps, done=pos.step)
    epoch_metrics: dict[str, Any] = {}
    with _recording_failures(rec, lambda: epoch_metrics, on_interrupt=lambda: fabric.print(
            f"interrupted at step {pos.step}; the checkpoint saved at step {_saved_step(ckpt_file)} resumes it: "
            f"protoclr pretrain --resume {run_dir}")), \
            bars:
        while pos.epoch < num_epochs and pos.step < max_steps:
            stop = min(steps_per_epoch, total_steps - pos.epoch * steps_per_epoch)  # steps in this epoch
            bars.begin(pos.epoch, total=stop, done=pos.step_in_epoch)
            pos.begin_epoch(fabric.device)
            rate = Throughput()
            model.train()
            batches = splits.epoch_batches(train, seed=tc.seed, epoch=pos.epoch, batch_size=B, rank=rank,
                                           world_size=W, start=pos.step_in_epoch,
                                           stop=min(stop, pos.step_in_epoch + max_steps - pos.step),
                                           num_workers=cfg.data.num_workers, pin_memory=on_gpu, crops=crops)
            for idx, images, labels in batches:
                if (losses := step(idx, images, labels)) is None:
                    continue  # skipped
                loss, probe_loss = losses
                pos.add_loss(loss)
                rate.count(B)
                bars.advance(pos)
                if pos.step % tc.log_every == 0 or pos.step_in_epoch == stop:
                    loss_sum = fabric.all_reduce(pos.loss_sum, reduce_op="mean") if W > 1 else pos.loss_sum
                    avg = loss_sum.item() / pos.loss_n  # the epoch's mean loss so far
                    ips = rate.read()
                    bars.show(loss=avg, ips=ips)
                    scalars = {"loss": avg, "lr": float(lrs[pos.step - 1]), "img_per_s": ips, "epoch": pos.epoch}
                    rec.step(pos.step, scalars, probe_loss=None if probe_loss is None else float(probe_loss))
                if tc.checkpoint_every and pos.step % tc.checkpoint_every == 0 and pos.step_in_epoch < stop:
                    save()
            bars.end()
            if pos.step_in_epoch < stop:  # stopped by train.max_steps inside the epoch
                save()
                break
            epoch_metrics = {"epoch": pos.epoch, "step": pos.step, "loss": pos.loss_sum.item() / max(pos.loss_n, 1),
                             "lr": float(lrs[pos.step - 1]), "skips": pos.skips}
            if monitor is not None and monitor.due(pos.epoch, last=pos.step >= total_steps):
                epoch_metrics.update(monitor.measure(raw, learner.probe, dist=fabric, device=fabric.device))
            if on_epoch_end is not None and rank == 0 and not dry_run:
                epoch_metrics.update(_isolated(on_epoch_end, raw, epoch_metrics))
            pos.next_epoch()
            _save_epoch_end(save, pos, epoch_metrics, keep=tc.keep, run_dir=run_dir, rank=rank)
            rec.epoch(epoch_metrics)
    # stopped by train.max_steps: resuming continues the schedule
    rec.finish("interrupted" if pos.step < total_steps and not dry_run else "finished", epoch_metrics)
    if dry_run and rank == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir


def _skip(msg: str, pos: Position, tc: Any, stateful: list[nn.Module], backup: list[torch.Tensor],
          rec: runs.Recorder, say: Callable[[str], Any]) -> str | None:
    """Skip a non-finite step where ``train.on_nonfinite=skip`` allows another one: restore the buffers its forward
    passes changed (BatchNorm statistics), count it, return None; else the message the run stops with."""
    if tc.on_nonfinite == "skip" and pos.skips < tc.max_skips:
        pos.skips += 1
        with torch.no_grad():
            for b, saved in zip([b for m in stateful for b in m.buffers()], backup, strict=True):
                b.copy_(saved)
        say(f"skipping: {msg} ({pos.skips} skipped so far)")
        rec.event({"kind": "skip", "step": pos.step, "epoch": pos.epoch, "message": msg})
        pos.advance()
        return None
    if tc.on_nonfinite == "skip":
        msg += f"; {pos.skips} steps skipped before it (train.max_skips={tc.max_skips})"
    rec.event({"kind": "diverged", "step": pos.step, "epoch": pos.epoch, "message": msg})
    return msg


def _zero_grad(*optimizers: Any) -> None:
    for opt in optimizers:
        if opt is not None:
            opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _recording_failures(rec: runs.Recorder, last_metrics: Callable[[], dict[str, Any]], *,
                        on_interrupt: Callable[[], Any] = lambda: None):
    """The run's status in runs.db when the loop is left by an exception: ``interrupted`` (Ctrl-C; the last
    checkpoint resumes it, ``on_interrupt`` says how) or ``failed``, with the last epoch's metrics; a divergence
    has recorded itself."""
    try:
        yield
    except KeyboardInterrupt:
        rec.finish("interrupted", last_metrics(), "interrupted by the user; the last checkpoint resumes it")
        on_interrupt()
        raise
    except TrainingDiverged:
        raise
    except BaseException as e:
        rec.finish("failed", last_metrics(), f"{type(e).__name__}: {e}")
        raise


class Throughput:
    """Images per second since the last reading."""

    def __init__(self):
        self.start, self.images = time.perf_counter(), 0

    def count(self, images: int) -> None:
        self.images += images

    def read(self) -> float:
        now = time.perf_counter()
        ips = self.images / (now - self.start)
        self.start, self.images = now, 0
        return ips


def _nonfinite(loss: torch.Tensor, encoder: nn.Module, fabric, cfg: Config, pos: Position,
               lrs: torch.Tensor) -> str | None:
    """A message when this step's loss or encoder gradient is not finite on any rank, else None."""
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    gnorm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else loss
    bad = (~torch.isfinite(loss.detach()) | ~torch.isfinite(gnorm)).float()
    if fabric.world_size > 1:
        bad = fabric.all_reduce(bad, reduce_op="sum")
    if bad.item() == 0:
        return None
    what = "loss" if not torch.isfinite(loss.detach()) else "gradient"
    return (f"non-finite {what} at step {pos.step} (epoch {pos.epoch}, step {pos.step_in_epoch} of the epoch, lr "
            f"{float(lrs[pos.step]):.4g}); likely cause: {_likely_cause(cfg)}")


def _save_epoch_end(save: Callable[[], None], pos: Position, metrics: dict[str, Any], *, keep: str, run_dir: Path,
                    rank: int) -> None:
    """The epoch end's checkpoint, and with ``train.keep=best`` its copy as ``best.pt`` when its online kNN top-1
    beats every earlier epoch end's (the best value travels in the checkpoint, so a resume keeps choosing)."""
    improved = keep == "best" and pos.improves(metrics.get(KNN))
    save()
    if improved and rank == 0:
        files = runs.RunDir(run_dir)
        atomic.write_bytes(files.best, files.checkpoint.read_bytes())


def _saved_step(ckpt_file: Path) -> int | str:
    """The step the checkpoint on disk resumes from ("none" before the first one is written)."""
    return int(checkpoint.load(ckpt_file)["step"]) if ckpt_file.is_file() else "none"


class Bars:
    """The run's progress bars: the whole run's (with its remaining time) above the current epoch's; both advance
    every step, the loss and images per second update every ``train.log_every`` steps."""

    def __init__(self, *, enabled: bool, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.fields[what]:>8}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
                                 TimeRemainingColumn(), disable=not enabled)
        self.whole = self.progress.add_task("", total=total, completed=done, what="run", loss=0, ips=0)
        self.task: Any = None

    def __enter__(self) -> Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def begin(self, epoch: int, *, total: int, done: int) -> None:
        self.task = self.progress.add_task("", total=total, completed=done, what=f"epoch {epoch}", loss=0, ips=0)

    def advance(self, pos: Position) -> None:
        self.progress.update(self.task, completed=pos.step_in_epoch)
        self.progress.update(self.whole, completed=pos.step)

    def show(self, *, loss: float, ips: float) -> None:
        for task in (self.task, self.whole):
            self.progress.update(task, loss=loss, ips=ips)

    def end(self) -> None:
        self.progress.remove_task(self.task)


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
    p.add_argument("--skip-bad", action="store_true", help="leave out bad image files and list them in the run "
                   "folder (data.on_bad=skip) instead of stopping with their list")
    return p


def _resolve(args: argparse.Namespace) -> Config:
    if args.skip_bad:
        args.overrides = [*args.overrides, "data.on_bad=skip"]
    if args.resume:
        run = runs.RunDir(args.resume)
        if not run.checkpoint.is_file():
            raise ConfigError(f"--resume: {run.path} holds no {run.checkpoint.name}")
        overrides = [f"train.out_dir={run.path.parent}", f"train.run_name={run.name}", *args.overrides]
        return load_config(run.config, overrides)
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
    shutdown()  # a torchrun process leaves its process group before it exits
    if args.dry_run:
        print(f"dry run ok: built {cfg.model.backbone} + {cfg.model.projector_layers}-layer projector, "
              f"{cfg.loss.name} loss, {cfg.optim.name}; ran 2 steps on fake {cfg.data.views} views (batch <= 8)")
    else:
        print(f"run saved in {run_dir}")
    return 0


__all__ = ["LARS", "LOGGERS", "TrainingDiverged", "build_optimizer", "cli_main", "cpu_has_bf16", "lr_schedule",
           "pretrain", "setup_fabric"]

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
