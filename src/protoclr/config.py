"""One typed, nested config: the single source of truth for every default.

    cfg = load_config("configs/cifar10_resnet18.yaml", ["optim.base_lr=0.6", "train.epochs=10"])
    cfg = load_config(None)          # the CPU default: Fashion-MNIST, convnet, balanced loss

A YAML file holds any subset of the sections below (``yaml.safe_load``); ``key=value`` overrides are applied
after it, their values parsed as YAML scalars (``0.1``, ``true``, ``[a, b]``). Unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the key. Every field below states its default and unit;
``protoclr pretrain --print-config`` prints the resolved result.

Derived values are computed in one place, :meth:`Config.lr`: ``lr = base_lr * batch_size / 256``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protoclr import data, loggers, losses, models, optim, targets, views
from protoclr.errors import ConfigError


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"  # name in protoclr.data.DATASETS (python: a Dataset passed to pretrain)
    root: str = ""  # where the dataset lives; "" = the loader's default location (protoclr.data)
    download: bool = False  # fetch the dataset if missing (needs network)
    train_split: str = "train"  # split trained on (labels unused except by the online probe)
    test_split: str = "test"  # held-out labeled split for the online monitors
    train_subset: int = 0  # use the first N of a seeded permutation of the train split; 0 = all
    # Class balance of the training set, applied after train_subset (protoclr.splits.longtail / uniform_subset):
    # none = as loaded; longtail = class c keeps n_max * profile(c) images (n_max = the smallest class);
    # uniform = class-balanced at the same image budget as the long-tailed set (the fair comparison).
    class_profile: str = "none"  # none | longtail | uniform
    longtail_profile: str = "exp"  # exp (Cao et al. 2019, CIFAR-LT) | pareto (Liu et al. 2019, ImageNet-LT)
    imbalance_ratio: float = 100.0  # largest / smallest class size for longtail (and uniform's budget)
    uniform_total: int = 0  # uniform: this many images (e.g. ImageNet-LT's 115,846); 0 = the long-tailed set's size
    views: str = "simclr_small"  # protoclr.views preset (simclr | simclr_cifar | simclr_small)
    view_modifiers: list[str] = field(default_factory=list)  # protoclr.views modifiers applied to the preset
    # ViewSpec fields set after the preset and modifiers, as field=value (value in YAML), e.g.
    # ["crop_scale=[0.08, 1]", "brightness=0.8"]: the same syntax as `protoclr views --set`.
    view_overrides: list[str] = field(default_factory=list)
    num_views: int = 2  # V views per image at the preset's size (the "global" views)
    # Multi-crop (Caron et al. 2020, SwAV): L extra small views per image, cut with local_crop_scale and resized
    # to local_size pixels; they join the loss as positives of every other view of the image. A 16-pixel view
    # costs about a quarter of a 32-pixel one, so 4 of them cost about 1 global view.
    local_views: int = 0  # L; 0 = none
    local_size: int = 16  # pixels
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])  # area fraction (lo, hi)
    # Progressive resizing: the global views' size over training, in equal parts of the steps, e.g. [16, 24, 32]
    # trains the first third at 16 px. [] = the preset's size throughout. Evaluation always uses the preset's size.
    view_sizes: list[int] = field(default_factory=list)
    num_workers: int = 0  # DataLoader processes decoding batches ahead (file-backed datasets); 0 = in the loop
    # A bad image file (truncated, undecodable) in a dataset read from files (protoclr.data.FILE_DATASETS):
    # error = stop before training with the list of bad files; skip = leave them out, list them in the run folder
    # (skipped_files.txt) and say how many in one console line. CLI: --skip-bad.
    on_bad: str = "error"


@dataclass
class ModelConfig:
    # resnet18 | resnet50 | convnet (protoclr.models.BACKBONES), or timm/<name>: any timm model that returns pooled
    # features (pip install 'protoclr[timm]'; built with pretrained=False, num_classes=0; it keeps its own norm
    # layers and stem, so model.norm sets the projector's norm only and small_images / convnet_widths do nothing);
    # python in a run's saved config: an nn.Module passed to pretrain(cfg, backbone=...) (protoclr.custom)
    backbone: str = "convnet"
    # convnet: output channels of its stages (3x3 conv -> norm -> ReLU, max-pool between stages): the number of
    # entries is the depth, the values the width. Cost grows with width squared: [64, 128, 256, 512] is ~2.7x
    # slower than the default on a CPU.
    convnet_widths: list[int] = field(default_factory=lambda: [32, 64, 128, 256])
    convnet_pool: int = 1  # convnet: output grid of the final average pooling (1 = global; 2 keeps a 2x2 layout)
    small_images: bool = True  # resnet CIFAR stem: 3x3 conv stride 1, no max-pool
    norm: str = "batch"  # batch | group | none, in backbone and projector
    projector_layers: int = 3  # MLP depth (the paper: 3); 0 = identity
    projector_hidden_dim: int = 512  # hidden width (SimCLR uses the backbone's width: 2048 for ResNet-50)
    projector_dim: int = 128  # output dim D of z
    projector_last_norm: bool = False  # norm layer after the last linear (SimCLR v2 style)
    # timm backbones that take them (ViTs): input side and patch side in pixels; 0 = the model's own (224, 16 for
    # vit_tiny_patch16_224). A ViT's input side must equal the views' size: 32 with 4-pixel patches for CIFAR.
    timm_img_size: int = 0
    timm_patch_size: int = 0


@dataclass
class LossConfig:
    name: str = "balanced"  # nt_xent | generalized_nt_xent | decoupled | balanced | supervised_prototype
    temperature: float = 0.5  # nt_xent, decoupled: tau (the similarity is divided by tau)
    alpha: float = 2.0  # generalized_nt_xent, balanced, supervised_prototype: inverse temperature
    # The repulsion (log-sum-exp) term is weighted lam / nu (docs/losses.md, equation 2).
    lam: float = 1.0  # generalized_nt_xent, balanced, supervised_prototype: weight of the repulsion term
    nu: float = 1.0  # balanced: divides the repulsion weight (lam / nu); > 0
    # Multiply the loss by 1/alpha (inverse_alpha) or not (none); preset = the loss's own (balanced: inverse_alpha,
    # the others: none). Under SGD the scale is a learning-rate factor: comparing balanced with generalized_nt_xent
    # at one lr also compares step sizes alpha apart, unless both use the same scale (a matched control).
    scale: str = "preset"
    similarity: str = "cosine"  # cosine | dot | neg_euclidean (dot, neg_euclidean: unnormalized z; dot may
    #                             diverge at a large lr)
    chunk_size: int = 0  # anchors per tile of the exact tiled loss; 0 = automatic (dense up to
    #                      losses.DENSE_MAX_ENTRIES similarity entries, tiles of losses.TILE_ROWS above)
    prototype_momentum: float = 0.9  # supervised_prototype: EMA momentum of the class prototype bank


@dataclass
class TargetConfig:
    # Where the loss's positives and candidates come from (docs/training.md, "The target branch"); the anchors
    # are always the online encoder's z. Orthogonal to loss.name (contrastive losses; not supervised_prototype).
    name: str = "shared"  # shared (SimCLR: one encoder, gradient through both sides) | stop_gradient (target
    #                       side detached) | momentum (EMA copy of backbone + projector) | multi_view_mean (V > 2:
    #                       each anchor is pulled to the mean of its image's other views; repulsion unchanged)
    momentum_start: float = 0.99  # momentum: EMA coefficient at step 0, cosine-scheduled to 1.0 at the end
    #                               (BYOL: 0.996, MoCo v3: 0.99); lower = the target follows the online net faster
    queue_size: int = 0  # past target rows kept as extra negatives (MoCo, FIFO, V x batch rows enter per
    #                      step); 0 = no queue. Needs a loss with candidates from every view (not balanced)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd (the paper's optimizer) | lars | adamw (decoupled weight decay; ViTs)
    base_lr: float = 0.3  # learning rate per 256 images: lr = base_lr * batch_size / 256
    lr_scaling: str = "linear"  # linear (base_lr * B / 256) | sqrt (base_lr * sqrt(B), SimCLR's small-batch rule)
    momentum: float = 0.9  # sgd, lars; ours (SGD practice): the paper states no momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw: (beta1, beta2); DINO's ViTs: 0.9, 0.999
    # on conv/linear weights only; never on biases, norm parameters, ViT tokens and position embeddings
    # (protoclr.models.param_groups). adamw: decoupled, typically 0.04-0.05 for ViTs
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.2  # linear warmup from 0, then cosine decay to final_lr_ratio * lr
    final_lr_ratio: float = 0.0
    lars_eta: float = 0.001  # LARS trust coefficient (You et al. 2017)


@dataclass
class TrainConfig:
    epochs: int = 2  # the CPU default: 2 x 234 steps, a few minutes on 2 cores
    # Optimizer steps the schedule spans; 0 = `epochs` whole epochs. When set, `epochs` is ignored: the run makes
    # ceil(steps / steps_per_epoch) passes over the data, the last one cut short (a budget in steps, e.g. from
    # benchmarks/time_to_accuracy.py's minutes -> steps conversion).
    steps: int = 0
    batch_size: int = 256  # global batch (all processes together)
    seed: int = 0  # model init, data order and views all derive from it
    max_steps: int = 0  # stop after this many optimizer steps (the schedule still spans `epochs`); 0 = no cap
    out_dir: str = "runs"  # run folders are created here; runs.db lives here too
    run_name: str = ""  # folder name; "" = <dataset>-<backbone>-<loss>-<time>. An existing one resumes.
    checkpoint_every: int = 500  # also checkpoint every N steps (always at each epoch end); 0 = epoch ends only
    on_nonfinite: str = "stop"  # stop | skip: what a non-finite loss or gradient does
    max_skips: int = 20  # on_nonfinite=skip: stop anyway after this many skipped steps
    # last: keep checkpoint.pt (the latest state, what resume reads); best: also best.pt, a copy of the epoch-end
    # checkpoint with the highest online kNN top-1 so far (needs eval.every > 0; the choice survives a resume)
    keep: str = "last"
    log_every: int = 10  # steps between logger writes


@dataclass
class EvalConfig:
    # What is measured (protoclr.measure owns the protocols: weighted kNN k=200 T=0.1, the cached linear probe,
    # the diagnostics), on which images (protoclr.splits: seeded draws, the same for every run of a seed). During
    # pretraining every `every` epochs and after the last: kNN top-1 (knn_top1), the online probe (probe_top1),
    # and with `diagnostics` the diag_* keys. After pretraining (protoclr sweep, protoclr demo): eval_knn_top1 and
    # eval_linear_top1. protoclr sweep and protoclr pretrain read the same keys.
    every: int = 1  # epochs between measurements during pretraining (and always after the last); 0 = none
    # with every > 0, also measure the encoder as initialized, before the first step (an epoch record with
    # epoch -1, step 0): where a curve starts, so that "shrinks during training" is read from step 0
    initial: bool = True
    train_images: int = 10000  # training images in the kNN bank and the final probes' fit set; 0 = all
    test_images: int = 0  # held-out images scored (a fixed seeded draw of every class); 0 = all
    online_probe: bool = True  # a linear probe trained along on detached view-0 backbone features (own SGD)
    probe_lr: float = 0.1  # the online probe's SGD learning rate (momentum 0.9, no schedule)
    linear: bool = True  # after pretraining, a linear probe on frozen backbone features, by linear_protocol:
    # cached (features once, L-BFGS, weight decay chosen on 10% of the fit set; minutes on a CPU) or augmented (the
    # standard protocol: a fresh crop + flip every epoch, SGD with a cosine schedule for linear_epochs; many encoder
    # passes, for GPUs)
    linear_protocol: str = "cached"
    linear_epochs: int = 100  # augmented protocol: epochs (SimCLR and MoCo evaluate with 90-100)
    # Prototype bias, bound terms and geometry (protoclr.diagnostics) on a fixed class-balanced held-out probe
    # set, as diag_* keys; cost: diag_views * diag_images encoder forwards per measurement.
    diagnostics: bool = False
    diag_images: int = 512  # probe images (class-balanced: at most C x the smallest class)
    diag_views: int = 4  # augmentations per probe image (>= 2; the surrogate prototype is their mean)
    batch_size: int = 512  # feature-extraction batch (CPU, demo convnet: 5,000 images/s at 256-512, 3,900 at 1024)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # cpu | gpu | cuda | auto (passed to lightning.fabric.Fabric)
    devices: str = "auto"  # per node: "auto", a count ("8") or a list ("0,1")
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp | ... (Fabric strategies)
    # auto = bf16-mixed on GPU and on CPUs with bf16 matrix units (AMX or AVX512-BF16: about 2x the fp32 speed
    # of a convnet), 32-true on other CPUs; or any Fabric precision string. The run prints what it resolved to.
    precision: str = "auto"
    channels_last: bool = True  # NHWC memory format for the encoder and its input (GPU and CPU)
    num_threads: int = 0  # torch intra-op threads per process; 0 = torch's default (the core count)
    compile: bool = False  # torch.compile the encoder
    sync_batchnorm: bool = True  # convert BatchNorm to SyncBatchNorm when world size > 1 (GPU only)
    # any of LOGGERS; metrics.jsonl and runs.db are always written. wandb (pip install 'protoclr[wandb]') runs
    # offline into <run>/wandb unless WANDB_MODE or WANDB_API_KEY is set (then as they say; WANDB_PROJECT names
    # the project, default protoclr); mlflow (pip install 'protoclr[mlflow]') writes to MLFLOW_TRACKING_URI, else
    # to sqlite:///<run>/mlflow.db (MLFLOW_EXPERIMENT_NAME, default protoclr). Each gets the resolved config
    # (flattened keys: optim.base_lr) and every step and epoch record (train/*, epoch/*).
    loggers: list[str] = field(default_factory=lambda: ["tensorboard", "csv"])
    progress: bool = True  # live progress bar


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def lr(self) -> float:
        """Peak learning rate from ``base_lr`` and the global batch size (the one derived value)."""
        o, b = self.optim, self.train.batch_size
        return {"linear": o.base_lr * b / 256, "sqrt": o.base_lr * b**0.5}[o.lr_scaling]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Config:
        """Range and choice checks; raises :class:`ConfigError` naming the first offending key."""
        d, m, lo, o, t, ev, tg = self.data, self.model, self.loss, self.optim, self.train, self.eval, self.target
        # (key, value, what it names, the owner's table of valid values): read here at validation, never re-spelled
        choices: list[tuple[str, Any, str, Any]] = [
            ("data.dataset", d.dataset, "dataset", data.DATASETS),
            ("data.views", d.views, "view preset", views.PRESETS),
            *[("data.view_modifiers", mod, "modifier", views.MODIFIERS) for mod in d.view_modifiers],
            ("model.norm", m.norm, "norm", models.NORMS),
            ("loss.name", lo.name, "loss", losses.LOSSES),
            ("loss.similarity", lo.similarity, "similarity", losses.SIMILARITIES),
            # preset: the preset's own scale (losses.preset_options)
            ("loss.scale", lo.scale, "scale", ("preset", *losses.SCALES)),
            ("optim.name", o.name, "optimizer", optim.OPTIMIZERS),
            ("target.name", tg.name, "target", targets.TARGETS),
            *[("trainer.loggers", name, "logger", loggers.LOGGERS) for name in self.trainer.loggers],
        ]
        for key, value, what, table in choices:
            if value not in table and not (key == "data.dataset" and value == data.PYTHON):  # pretrain(dataset=)
                close = difflib.get_close_matches(str(value), list(table), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{key}: unknown {what} {value!r}; choose one of {', '.join(table)}{hint}")
        checks: list[tuple[str, bool, str]] = [
            ("data.num_views", d.num_views >= 2, "must be >= 2"),
            ("data.local_views", d.local_views >= 0, "must be >= 0"),
            ("data.local_size", d.local_size >= 4, "must be >= 4 pixels"),
            ("data.local_crop_scale", len(d.local_crop_scale) == 2 and 0 < d.local_crop_scale[0]
             <= d.local_crop_scale[1] <= 1, "must be [lo, hi] with 0 < lo <= hi <= 1"),
            ("data.view_sizes", all(s >= 4 for s in d.view_sizes), "every size must be >= 4 pixels"),
            ("model.convnet_pool", m.convnet_pool >= 1, "must be >= 1 (the pooled output grid's side)"),
            ("model.convnet_widths", len(m.convnet_widths) >= 1 and min(m.convnet_widths) >= 1,
             "must list at least one stage width, each >= 1"),
            ("data.train_subset", d.train_subset >= 0, "must be >= 0"),
            ("data.num_workers", d.num_workers >= 0, "must be >= 0"),
            ("data.on_bad", d.on_bad in data.ON_BAD, f"must be one of {', '.join(data.ON_BAD)}"),
            ("data.on_bad", d.on_bad == "error" or d.dataset in data.FILE_DATASETS,
             f"skip leaves out bad image files; data.dataset={d.dataset} is not read from image files (only "
             f"{', '.join(data.FILE_DATASETS)} are)"),
            ("data.class_profile", d.class_profile in ("none", "longtail", "uniform"),
             "must be one of none, longtail, uniform"),
            ("data.longtail_profile", d.longtail_profile in ("exp", "pareto"), "must be exp or pareto"),
            ("data.imbalance_ratio", d.imbalance_ratio >= 1, "must be >= 1 (largest / smallest class)"),
            ("model.projector_layers", m.projector_layers >= 0, "must be >= 0"),
            ("model.projector_hidden_dim", m.projector_hidden_dim >= 1, "must be >= 1"),
            ("model.projector_dim", m.projector_dim >= 1, "must be >= 1"),
            ("model.timm_img_size", m.timm_img_size == 0 or (m.timm_img_size >= 1 and m.backbone.startswith("timm/")),
             "is for timm backbones (model.backbone=timm/<name>) and must be >= 0"),
            ("model.timm_patch_size", m.timm_patch_size == 0 or (m.timm_patch_size >= 1
                                                                  and m.backbone.startswith("timm/")),
             "is for timm backbones (model.backbone=timm/<name>) and must be >= 0"),
            ("loss.temperature", lo.temperature > 0, "must be > 0"),
            ("loss.alpha", lo.alpha > 0, "must be > 0"),
            ("loss.lam", lo.lam >= 0, "must be >= 0"),
            ("loss.nu", lo.nu > 0, "must be > 0 (it divides the repulsion weight)"),
            ("loss.chunk_size", lo.chunk_size >= 0, "must be >= 0"),
            ("loss.prototype_momentum", 0 <= lo.prototype_momentum < 1, "must be in [0, 1)"),
            ("optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             "must be [beta1, beta2], each in [0, 1)"),
            ("optim.base_lr", o.base_lr >= 0, "must be >= 0 (a learning rate cannot be negative)"),
            ("optim.lr_scaling", o.lr_scaling in ("linear", "sqrt"), "must be linear or sqrt"),
            ("optim.momentum", 0 <= o.momentum < 1, "must be in [0, 1)"),
            ("optim.weight_decay", o.weight_decay >= 0, "must be >= 0"),
            ("optim.warmup_epochs", o.warmup_epochs >= 0, "must be >= 0"),
            ("optim.final_lr_ratio", 0 <= o.final_lr_ratio <= 1, "must be in [0, 1]"),
            ("optim.lars_eta", o.lars_eta > 0, "must be > 0"),
            ("train.epochs", t.epochs >= 1, "must be >= 1"),
            ("train.steps", t.steps >= 0, "must be >= 0 (0 = train.epochs whole epochs)"),
            ("trainer.num_threads", self.trainer.num_threads >= 0, "must be >= 0 (0 = torch's default)"),
            ("train.batch_size", t.batch_size >= 2, "must be >= 2 (a contrastive batch needs negatives)"),
            ("train.max_steps", t.max_steps >= 0, "must be >= 0"),
            ("train.checkpoint_every", t.checkpoint_every >= 0, "must be >= 0"),
            ("train.on_nonfinite", t.on_nonfinite in ("stop", "skip"), "must be stop or skip"),
            ("train.keep", t.keep in ("last", "best"), "must be last or best"),
            ("train.keep", t.keep != "best" or self.eval.every > 0,
             "best needs eval.every > 0 (the online kNN it is chosen by)"),
            ("train.log_every", t.log_every >= 1, "must be >= 1"),
            ("eval.every", ev.every >= 0, "must be >= 0"),
            ("eval.train_images", ev.train_images >= 0, "must be >= 0 (0 = all)"),
            ("eval.test_images", ev.test_images >= 0, "must be >= 0 (0 = all)"),
            ("eval.probe_lr", ev.probe_lr >= 0, "must be >= 0"),
            ("eval.batch_size", ev.batch_size >= 1, "must be >= 1"),
            ("eval.diag_images", ev.diag_images >= 2, "must be >= 2"),
            ("eval.diag_views", ev.diag_views >= 2, "must be >= 2 (the bounds pair an anchor with another view)"),
            ("eval.linear_protocol", ev.linear_protocol in ("cached", "augmented"), "must be cached or augmented"),
            ("eval.linear_epochs", ev.linear_epochs >= 1, "must be >= 1"),
            ("data.uniform_total", d.uniform_total >= 0, "must be >= 0 (0 = the long-tailed set's size)"),
            ("trainer.num_nodes", self.trainer.num_nodes >= 1, "must be >= 1"),
        ]
        all_negatives = [name for name, p in losses.PRESETS.items() if p.negatives == "all"]  # the queue's users
        checks += [
            ("target.momentum_start", 0 <= tg.momentum_start <= 1, "must be in [0, 1]"),
            ("target.queue_size", tg.queue_size >= 0, "must be >= 0"),
            ("target.name", tg.name != "multi_view_mean" or d.num_views > 2,
             f"multi_view_mean needs data.num_views > 2 (with 2 views the mean of the other views is the one other "
             f"view: that is target.name=shared); data.num_views is {d.num_views}"),
            ("target.name", tg.name == "shared" or lo.name != "supervised_prototype",
             "loss.name=supervised_prototype pulls toward class prototypes, not toward a target branch; "
             "use target.name=shared"),
            ("target.queue_size", tg.queue_size == 0 or lo.name in all_negatives,
             f"a queue adds negatives to candidates drawn from every view (negatives='all': "
             f"{', '.join(all_negatives)}); loss.name={lo.name} does not use them"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ConfigError(f"{key}: {why}, got {_get(self, key)!r}")
        try:
            spec = views.config_view_spec(d)
        except ValueError as e:
            raise ConfigError(f"data.view_overrides: {e}") from None
        if m.timm_img_size and m.timm_img_size != spec.size:
            raise ConfigError(f"model.timm_img_size: {m.timm_img_size} differs from the {spec.size}-pixel views of "
                              f"data.views={d.views}; set model.timm_img_size={spec.size}")
        if m.backbone != data.PYTHON:  # set by pretrain(backbone=) (protoclr.custom)
            models.check_backbone(m.backbone)  # timm names: against timm.list_models(), no model built
        return self


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _check_type(key: str, value: Any, tp: Any, *, from_cli: bool) -> Any:
    """``value`` converted to field type ``tp`` or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if isinstance(value, str) and from_cli:  # a=x,y on the command line; items parsed as YAML scalars
            value = [v if item_tp is str else yaml.safe_load(v) for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check_type(f"{key}[{i}]", v, item_tp, from_cli=from_cli) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; every user means the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if from_cli and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # trainer.devices=8 typed on a command line
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{key}: unsupported field type {tp!r}")  # a bug in this module, not in the user's config


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolves the postponed (string) annotations


def _unknown(key: str, name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _apply(obj: Any, values: dict[str, Any], prefix: str, *, from_cli: bool) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    types_ = _field_types(type(obj))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in types_:
            raise _unknown(key, str(name), list(types_))
        tp = types_[name]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, name), value, f"{key}.", from_cli=from_cli)
        else:
            setattr(obj, name, _check_type(key, value, tp, from_cli=from_cli))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``section.key=value`` strings (values parsed with ``yaml.safe_load``) to ``cfg`` in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.base_lr=0.6")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            hint = ""
            if raw.lstrip().startswith("[") and "=" in raw:  # a list of key=value strings: each must be quoted
                items = [x.strip() for x in re.split(r",\s*(?![^\[]*\])", raw.strip()[1:-1]) if x.strip()]
                quoted = ", ".join(json.dumps(x) for x in items)
                hint = f"; quote each item, and the argument for the shell: '{key}=[{quoted}]'"
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_error_text(e)}){hint}") from None
        *path, last = key.strip().split(".")
        nested: dict[str, Any] = {last: value}
        for part in reversed(path):
            nested = {part: nested}
        _apply(cfg, nested, "", from_cli=True)
    return cfg


def config_from_dict(values: dict[str, Any]) -> Config:
    """A validated Config from a nested mapping (a YAML file's content, or a run's saved ``config.yaml``)."""
    cfg = Config()
    _apply(cfg, values or {}, "", from_cli=False)
    return cfg.validate()


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping with the same key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"line {line}: key {key!r} is given twice (first at line {seen[key]}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path`` with safe types only; a key given twice in one mapping is a ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; check the path (configs/ holds the shipped configs)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; pass a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e.__class__.__name__}: {e}); pass a readable YAML file") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: safe types only
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_text(e)}") from None


def yaml_error_text(e: yaml.YAMLError) -> str:
    """One line: where (line, column) and what PyYAML found wrong."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    return f"{where}{what}" + (f" ({context})" if context else "")


def without_keys(config: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A deep copy of a config dict without ``keys``: each a ``section.key`` or a whole ``section``."""
    out = json.loads(json.dumps(config))
    for key in keys:
        sec, _, name = key.partition(".")
        if name:
            out.get(sec, {}).pop(name, None)
        else:
            out.pop(sec, None)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(path) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    cfg = Config()
    _apply(cfg, values, "", from_cli=False)
    apply_overrides(cfg, list(overrides or []))
    return cfg.validate()


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TargetConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
]
