"""Backbones, projector and the encoder they form.

    encoder = build_encoder(cfg.model, in_channels=3)
    h, z = encoder(x)        # x: (B, C, H, W) -> h: (B, F) backbone features, z: (B, D) projector output

``h`` (pooled backbone features) is what evaluation uses; ``z`` is what the loss sees. ``z`` is *not*
normalized here: whether it is projected to the sphere is the loss's ``similarity`` choice, and the
similarity ablation needs the raw outputs.

Backbones (``BACKBONES``): torchvision's ``resnet18`` / ``resnet50`` with an optional CIFAR stem
(``small_images=True``: 3x3 conv, stride 1, no max-pool, as in SimCLR's CIFAR-10 experiments), and a small
``convnet`` sized to train at a useful speed on a laptop CPU. Any timm model that returns pooled features is
``timm/<name>`` (``pip install 'protoclr[timm]'``): ``timm.create_model(name, pretrained=False, num_classes=0)``,
with ``model.timm_img_size`` / ``model.timm_patch_size`` for ViTs at CIFAR resolution. The projector is SimCLR
v2's MLP: hidden layers ``Linear -> BatchNorm -> ReLU``, then a final ``Linear`` (Chen et al. 2020, "Big
self-supervised models are strong semi-supervised learners"), 3 layers by default as in SimCLR v2 and the
reproduced paper's ImageNet setting.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torchvision

from protoclr import extras
from protoclr.errors import ConfigError

if TYPE_CHECKING:
    from protoclr.config import ModelConfig

NormLayer = Callable[[int], nn.Module]


def _group_norm(channels: int) -> nn.Module:
    # 32 groups (Wu & He 2018) where the width allows it; batch-independent, so results do not depend on
    # how a batch is split across processes.
    return nn.GroupNorm(math.gcd(32, channels), channels)


# name -> 2d norm layer constructor taking the channel count; the 1d (projector) twin is in _NORMS_1D.
NORMS: dict[str, NormLayer] = {"batch": nn.BatchNorm2d, "group": _group_norm, "none": lambda c: nn.Identity()}
# GroupNorm over a (B, C) vector with one channel per group is degenerate; its per-sample twin is LayerNorm.
_NORMS_1D: dict[str, NormLayer] = {"batch": nn.BatchNorm1d, "group": nn.LayerNorm, "none": lambda c: nn.Identity()}


def _resnet(depth: int) -> Callable[..., nn.Module]:
    make = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]

    def build(*, in_channels: int, small_images: bool, norm_layer: NormLayer) -> nn.Module:
        net = make(weights=None, norm_layer=norm_layer)
        if small_images:  # CIFAR stem: keep 32x32 resolution into layer1
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        net.num_features = net.fc.in_features  # 512 (resnet18) or 2048 (resnet50)
        net.fc = nn.Identity()  # forward now returns the pooled features (B, F)
        return net

    return build


class ConvNet(nn.Module):
    """Four 3x3 conv blocks (conv -> norm -> ReLU, max-pool between stages) and average pooling.

    Widths ``(32, 64, 128, 256)``; at 28x28 or 32x32 input it trains at roughly a thousand images per second
    on two CPU cores (bf16). ``pool``: the output grid of the final average pooling, flattened: 1 (global, the
    default) gives ``F = widths[-1]`` features, 2 keeps a 2x2 layout (``F = 4 widths[-1]``), which matters where the
    classes differ by where things are (Fashion-MNIST). ``small_images`` is accepted for a uniform signature.
    """

    def __init__(self, *, in_channels: int, norm_layer: NormLayer, widths: tuple[int, ...] = (32, 64, 128, 256),
                 pool: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # halve resolution between stages
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), norm_layer(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.num_features = c * pool * pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)  # (B, C, H, W) -> (B, C, pool, pool) -> (B, F)


def _convnet(*, in_channels: int, small_images: bool, norm_layer: NormLayer,
             widths: tuple[int, ...] = (32, 64, 128, 256), pool: int = 1) -> nn.Module:
    return ConvNet(in_channels=in_channels, norm_layer=norm_layer, widths=tuple(widths), pool=pool)


# name -> constructor(*, in_channels, small_images, norm_layer, [widths]) returning a module with ``num_features``.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _resnet(18),
    "resnet50": _resnet(50),
    "convnet": _convnet,
}
TIMM_PREFIX = "timm/"  # model.backbone=timm/<name>: a timm model, outside the table above


def timm_backbone(name: str, *, in_channels: int, img_size: int = 0, patch_size: int = 0) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)``: the timm model whose
    ``forward`` returns its pooled (pre-logits) features ``(B, F)``; ``img_size`` / ``patch_size`` (0 = the
    model's own) for models that take them (ViTs: ``vit_tiny_patch16_224`` at 32 px with 4 px patches).
    Never downloads weights."""
    timm = extras.require("timm", why=f"model.backbone={TIMM_PREFIX}{name}")
    options = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v}
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels, **options)
    except TypeError as e:  # a model whose constructor has no img_size / patch_size
        keys = ", ".join(f"model.timm_{k}" for k in options)
        raise ConfigError(f"{keys}: timm model {name!r} does not take {', '.join(options)} ({e}); set "
                         f"{'them' if len(options) > 1 else 'it'} to 0") from None


def timm_input_size(name: str, *, patch_size: int = 0) -> tuple[int, int] | None:
    """``(img_size, patch_size)`` of a timm model that only takes inputs of one size (a ViT's strict patch
    embedding, built with ``patch_size`` when given), None for one that takes any size (a CNN). The model is built
    on the meta device: no memory, no weights, no forward pass."""
    timm = extras.require("timm", why=f"model.backbone={TIMM_PREFIX}{name}")
    options = {"patch_size": patch_size} if patch_size else {}
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0, **options)
    except TypeError:  # no patch_size: not a ViT
        return None
    embed = getattr(model, "patch_embed", None)
    if embed is None or not getattr(embed, "strict_img_size", False):
        return None
    return int(embed.img_size[0]), int(embed.patch_size[0])


def check_backbone(name: str) -> None:
    """Raise :class:`~protoclr.errors.ConfigError` naming ``model.backbone`` (with the closest known name) for a
    backbone that is neither in :data:`BACKBONES` nor a timm model (``timm/<name>``, checked with
    ``timm.is_model``, no model built); :class:`~protoclr.errors.MissingExtra` when timm is not installed."""
    if name in BACKBONES:
        return
    if not name.startswith(TIMM_PREFIX):
        close = difflib.get_close_matches(name, list(BACKBONES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; {hint}choose one of "
                         f"{', '.join(sorted(BACKBONES))} or {TIMM_PREFIX}<a timm model name>")
    arch = name[len(TIMM_PREFIX):].split(".")[0]  # a pretrained tag (name.tag) means nothing without weights
    timm = extras.require("timm", why=f"model.backbone={name}")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f"; did you mean {TIMM_PREFIX}{close[0]}?" if close else "; timm.list_models() lists the names"
        raise ConfigError(f"model.backbone: timm has no model {arch!r}{hint}")


def feature_dim(backbone: nn.Module) -> int:
    """F, the width of the backbone's features: timm's ``head_hidden_size`` where a model has one that differs
    from ``num_features`` (the pooled features pass a head MLP or conv first, e.g. MobileNetV3), else
    ``num_features``."""
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


_feature_dim = feature_dim  # for Encoder, whose keyword of the same name shadows it


class Projector(nn.Module):
    """MLP ``in_dim -> hidden_dim x (num_layers - 1) -> out_dim``; hidden layers are Linear -> norm -> act.

    ``num_layers=0`` is the identity (``z = h``), ``1`` a single linear map. ``last_norm`` adds a norm layer
    after the last linear (SimCLR v2 uses BN there with no ReLU); off by default.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 3,
        norm_layer: NormLayer = nn.BatchNorm1d,
        act_layer: Callable[[], nn.Module] = lambda: nn.ReLU(inplace=True),
        last_norm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=False), norm_layer(hidden_dim), act_layer()]
            d = hidden_dim
        if num_layers >= 1:
            layers.append(nn.Linear(d, out_dim, bias=not last_norm))
            if last_norm:
                layers.append(norm_layer(out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)  # (B, F) -> (B, D)


class Encoder(nn.Module):
    """Backbone plus projector: ``forward(x) -> (h, z)`` with ``h`` (B, F) features and ``z`` (B, D)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, *, feature_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.feature_dim: int = feature_dim or _feature_dim(backbone)  # F: given for a backbone of the caller's
        self.out_dim: int = projector.out_dim

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, C, H, W), or a list of batches of different sizes (multi-crop: global then local views),
        each through the backbone on its own (BatchNorm statistics per size, as SwAV and DINO), the features
        concatenated in list order: ``(sum B_i, F)``, ``(sum B_i, D)``."""
        if isinstance(x, (list, tuple)):
            h = torch.cat([self.backbone(xi) for xi in x])  # [(B_i, C, H_i, W_i)] -> (sum B_i, F)
        else:
            h = self.backbone(x)  # (B, C, H, W) -> (B, F)
        return h, self.projector(h)  # (B, F), (B, D)


def build_encoder(cfg: ModelConfig, *, in_channels: int) -> Encoder:
    """The encoder described by ``cfg`` (see :class:`protoclr.config.ModelConfig`) for ``in_channels`` input.
    A timm backbone keeps its own norm layers (``model.norm`` then sets the projector's only)."""
    check_backbone(cfg.backbone)
    if cfg.backbone.startswith(TIMM_PREFIX):
        backbone = timm_backbone(cfg.backbone[len(TIMM_PREFIX):], in_channels=in_channels,
                                 img_size=cfg.timm_img_size, patch_size=cfg.timm_patch_size)
    else:
        extra = {"widths": tuple(cfg.convnet_widths), "pool": cfg.convnet_pool} if cfg.backbone == "convnet" else {}
        backbone = BACKBONES[cfg.backbone](
            in_channels=in_channels, small_images=cfg.small_images, norm_layer=NORMS[cfg.norm], **extra
        )
    projector = Projector(
        feature_dim(backbone),
        hidden_dim=cfg.projector_hidden_dim,
        out_dim=cfg.projector_dim,
        num_layers=cfg.projector_layers,
        norm_layer=_NORMS_1D[cfg.norm],
        last_norm=cfg.projector_last_norm,
    )
    return Encoder(backbone, projector)


# Parameters that are not layer weights although they have 2 or more dims: a ViT's class / distillation /
# register tokens and position embeddings (timm's names; its models list them in ``no_weight_decay()`` too).
NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token", "reg_token")


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters that modules of ``model`` declare weight-decay free (timm's
    ``no_weight_decay()``, names relative to the module that declares them)."""
    out: set[str] = set()
    for prefix, m in model.named_modules():
        declared = getattr(m, "no_weight_decay", None)
        if callable(declared):
            out |= {f"{prefix}.{n}" if prefix else n for n in declared()}
    return out


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two optimizer groups: weights of conv/linear layers get ``weight_decay``; biases, norm parameters (every
    parameter with fewer than 2 dims), ViT tokens and position embeddings (:data:`NO_DECAY_NAMES`, and what a
    timm model's ``no_weight_decay()`` lists) get none and are also excluded from LARS adaptation
    (``lars_exclude=True``), as in SimCLR / BYOL and timm / DINO for ViTs."""
    declared = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            exempt = p.ndim < 2 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or name in declared
            (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
