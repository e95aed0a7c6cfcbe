"""Batched per-sample augmentation on the training device: ``ViewSpec``, presets, modifiers, ``make_views``.

One call turns a uint8 batch ``(B, C, H, W)`` into ``V`` views ``(V, B, C, s, s)`` float32 on the batch's device.
Every random parameter is a counter-based hash of ``(seed, epoch, index, view, slot)``, so view ``v`` of sample
``i`` in epoch ``e`` is the same whatever the batch composition, batch size, device or number of processes.

    spec = view_spec("simclr_cifar", modifiers=["add_rotation"], crop_scale=(0.2, 1.0))
    x = make_views(images, spec, num_views=2, seed=0, epoch=3, indices=idx)      # (2, B, 3, 32, 32)
    x_eval = eval_images(images, spec)                                            # (B, 3, 32, 32)

    protoclr views --dataset cifar10_zip --preset simclr_cifar --modifier add_cutout --out grid.png

Pipeline (SimCLR, Chen et al. 2020, appendix A): random resized crop (+ horizontal flip, + rotation, fused into
one ``grid_sample``), colour jitter with probability in a random order, random grayscale, Gaussian blur with
probability, normalisation, then random erasing (cutout, Zhong et al. 2020). Images too large to batch before
cropping (ImageNet) are cropped per image in DataLoader workers by ``CropViews`` with the same crop boxes, and
the rest runs batched: ``make_views`` takes the crops ``(V, B, C, s, s)`` directly.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from protoclr import data
from protoclr.errors import ConfigError, UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)


@dataclass(frozen=True)
class ViewSpec:
    """One augmentation recipe. Defaults are SimCLR's ImageNet recipe (preset ``simclr``)."""

    size: int = 224  # output side s, pixels
    crop_scale: tuple[float, float] = (0.08, 1.0)  # crop area as a fraction of the image area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, sampled log-uniformly
    flip_p: float = 0.5  # horizontal flip probability
    jitter_p: float = 0.8  # colour jitter probability (all four factors, random order, as torchvision)
    brightness: float = 0.8  # factor in [1 - b, 1 + b]; SimCLR strength s gives 0.8 s
    contrast: float = 0.8  # factor in [1 - c, 1 + c]
    saturation: float = 0.8  # factor in [1 - s, 1 + s]
    hue: float = 0.2  # shift in [-h, h] of a full turn; SimCLR strength s gives 0.2 s
    gray_p: float = 0.2  # random grayscale probability
    blur_p: float = 0.5  # Gaussian blur probability
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma range, pixels of the output view
    blur_kernel_frac: float = 0.1  # kernel side = nearest odd integer to 10% of the view side (SimCLR)
    rotation_p: float = 0.0  # random rotation probability (corners outside the image are black)
    rotation_degrees: float = 0.0  # angle uniform in [-d, d]
    rotation_step: float = 0.0  # > 0: the angle rounded to a multiple of it (SimCLR's rotation: d=180, step 90)
    cutout_p: float = 0.0  # random erasing probability (erased pixels are 0 after normalisation: the mean)
    cutout_scale: tuple[float, float] = (0.02, 0.33)  # erased area fraction (torchvision RandomErasing)
    cutout_ratio: tuple[float, float] = (0.3, 3.3)  # erased width / height, log-uniform
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel; its length sets the output channel count
    std: tuple[float, ...] = IMAGENET_STD
    eval_crop_fraction: float = 0.875  # eval: shorter side to size / 0.875, center crop (224 of 256)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(spec: ViewSpec) -> None:
    def rng(name: str, lo_min: float, hi_max: float, *, lo_open: bool = False) -> None:
        lo, hi = getattr(spec, name)
        if not (lo_min <= lo <= hi <= hi_max) or (lo_open and lo <= lo_min):
            bound = "(" if lo_open else "["
            raise ValueError(
                f"ViewSpec.{name} must be (lo, hi) with {bound}{lo_min} <= lo <= hi <= {hi_max}], got "
                f"{getattr(spec, name)}."
            )

    if not isinstance(spec.size, int) or spec.size < 1:
        raise ValueError(f"ViewSpec.size must be a positive int (pixels), got {spec.size!r}.")
    for p in ("flip_p", "jitter_p", "gray_p", "blur_p", "rotation_p", "cutout_p"):
        if not 0.0 <= getattr(spec, p) <= 1.0:
            raise ValueError(f"ViewSpec.{p} is a probability in [0, 1], got {getattr(spec, p)}.")
    for p in ("brightness", "contrast", "saturation", "rotation_degrees", "rotation_step", "blur_kernel_frac"):
        if getattr(spec, p) < 0:
            raise ValueError(f"ViewSpec.{p} must be >= 0, got {getattr(spec, p)}.")
    if not 0 <= spec.hue <= 0.5:
        raise ValueError(f"ViewSpec.hue must lie in [0, 0.5] (a fraction of a full turn), got {spec.hue}.")
    rng("crop_scale", 0.0, 1.0, lo_open=True)
    rng("crop_ratio", 0.0, math.inf, lo_open=True)
    rng("blur_sigma", 0.0, math.inf, lo_open=True)
    rng("cutout_scale", 0.0, 1.0, lo_open=True)
    rng("cutout_ratio", 0.0, math.inf, lo_open=True)
    if len(spec.mean) not in (1, 3) or len(spec.std) != len(spec.mean) or min(spec.std) <= 0:
        raise ValueError(f"ViewSpec.mean/std need 1 or 3 matching entries with std > 0, got {spec.mean}, {spec.std}.")
    if not 0 < spec.eval_crop_fraction <= 1:
        raise ValueError(f"ViewSpec.eval_crop_fraction must lie in (0, 1], got {spec.eval_crop_fraction}.")


PRESETS: dict[str, ViewSpec] = {
    # Chen et al. 2020, appendix A: ImageNet, colour strength 1.0.
    "simclr": ViewSpec(),
    # SimCLR's CIFAR-10 recipe: 32 px, colour strength 0.5, no blur.
    "simclr_cifar": ViewSpec(
        size=32, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, blur_p=0.0, mean=CIFAR10_MEAN, std=CIFAR10_STD
    ),
    # 28x28 grayscale (Fashion-MNIST): gentler crops (tiny images lose the object below 20% area), no hue,
    # saturation or grayscale (one channel), no blur.
    "simclr_small": ViewSpec(
        size=28,
        crop_scale=(0.2, 1.0),
        brightness=0.4,
        contrast=0.4,
        saturation=0.0,
        hue=0.0,
        gray_p=0.0,
        blur_p=0.0,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
    ),
}

# The paper's augmentation ablations (remove blur, add rotation, remove colour, add cutout), each usable with any
# preset. The paper names the operations, not their parameters: the probabilities and ranges below are ours
# (docs/paper-settings.md), except add_rotation_90, SimCLR's rotation (Chen et al. 2020, fig. 4: one of 0, 90,
# 180, 270 degrees).
MODIFIERS: dict[str, Callable[[ViewSpec], ViewSpec]] = {
    "no_blur": lambda s: replace(s, blur_p=0.0),
    "add_rotation": lambda s: replace(s, rotation_p=0.5, rotation_degrees=30.0),
    "add_rotation_90": lambda s: replace(s, rotation_p=1.0, rotation_degrees=180.0, rotation_step=90.0),
    "no_color": lambda s: replace(s, jitter_p=0.0, gray_p=0.0),
    "add_cutout": lambda s: replace(s, cutout_p=0.5),
}


def view_spec(preset: str = "simclr", modifiers: Sequence[str] = (), **overrides: Any) -> ViewSpec:
    """``PRESETS[preset]``, then each of ``MODIFIERS[m]`` in order, then ``overrides`` (any ``ViewSpec`` field).

    Unknown names and fields are errors; lists become tuples so YAML values work.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown view preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    if isinstance(modifiers, str):
        modifiers = [modifiers]
    spec = PRESETS[preset]
    for m in modifiers:
        if m not in MODIFIERS:
            raise ValueError(f"unknown view modifier {m!r}; choose from {', '.join(MODIFIERS)}.")
        spec = MODIFIERS[m](spec)
    types = {f.name: f.type for f in fields(ViewSpec)}
    clean: dict[str, Any] = {}
    for k, v in overrides.items():
        if k not in types:
            raise ValueError(f"unknown ViewSpec field {k!r}; fields are {', '.join(types)}.")
        tname = str(types[k])
        if tname.startswith("tuple"):
            if not isinstance(v, (list, tuple)) or not all(isinstance(e, (int, float)) for e in v):
                raise ValueError(f"ViewSpec.{k} must be a sequence of numbers, got {v!r}.")
            v = tuple(float(e) for e in v)
        elif tname == "int":
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"ViewSpec.{k} must be an int, got {v!r}.")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"ViewSpec.{k} must be a number, got {v!r}.")
        else:
            v = float(v)
        clean[k] = v
    return replace(spec, **clean)


@dataclass(frozen=True)
class TrainViews:
    """What a training step makes of a batch: ``num_views`` global views (``spec``, resized over training by
    ``sizes``) and ``num_local`` multi-crop views (``local``). Built from a config by :func:`train_views`."""

    spec: ViewSpec  # the global views; evaluation uses it too (its size, normalisation and eval crop)
    num_views: int = 2
    local: ViewSpec | None = None
    num_local: int = 0
    sizes: tuple[int, ...] = ()  # progressive resizing: equal parts of the steps at each size; () = spec.size

    def spec_at(self, step: int, total_steps: int) -> ViewSpec:
        """The global views' spec at optimizer step ``step`` of ``total_steps``."""
        if not self.sizes:
            return self.spec
        k = min(step * len(self.sizes) // max(total_steps, 1), len(self.sizes) - 1)
        return self.spec if self.sizes[k] == self.spec.size else replace(self.spec, size=self.sizes[k])

    def make(self, images: Tensor, *, seed: int, epoch: int, indices: Tensor, step: int = 0,
             total_steps: int = 1) -> list[Tensor]:
        """``[(V*B, C, s, s)]`` or, with local views, ``[(V*B, C, s, s), (L*B, C, sl, sl)]``, view-major (row
        ``v * B + b``); local views are numbered after the global ones, so they draw parameters of their own.
        ``images``: ``(B, C, H, W)``, or the global views' crops ``(V, B, C, s, s)`` of :func:`crop_views`."""
        g = make_views(images, self.spec_at(step, total_steps), num_views=self.num_views, seed=seed, epoch=epoch,
                       indices=indices)
        out = [g.flatten(0, 1)]  # (V, B, C, s, s) -> (V*B, C, s, s)
        if self.num_local:
            assert self.local is not None
            loc = make_views(images, self.local, num_views=self.num_local, seed=seed, epoch=epoch, indices=indices,
                             first_view=self.num_views)
            out.append(loc.flatten(0, 1))  # (L, B, C, sl, sl) -> (L*B, C, sl, sl)
        return out


def config_view_spec(d: Any) -> ViewSpec:
    """The global view spec of a data config ``d`` (``protoclr.config.DataConfig``): its preset, then its
    modifiers, then its ``view_overrides``."""
    return view_spec(d.views, list(d.view_modifiers), **parse_overrides(d.view_overrides))


def preset_for_images(channels: int, side: int) -> tuple[str, int]:
    """``(preset, view side)`` for images of ``channels`` and typical shorter ``side``: grey images take
    simclr_small, RGB images up to 64 px simclr_cifar, larger ones simclr; the views keep the images' side, up to
    224 px (SimCLR's)."""
    name = "simclr_small" if channels == 1 else "simclr_cifar" if side <= 64 else "simclr"
    return name, min(side, 224)


def fit_views(d: Any, *, channels: int, side: int, what: str, chosen: bool) -> tuple[str, list[str], str | None]:
    """``(preset, view_overrides, message)``: the views of a data config ``d`` fitted to images of ``channels``
    and typical ``side`` (``what`` names them). A preset the user did not choose (``chosen=False``) is replaced by
    :func:`preset_for_images`' and the message says so (None when it already fits); a chosen preset that would
    turn RGB images grey is refused with a :class:`ConfigError` naming ``data.views``."""
    spec = config_view_spec(d)
    kind = {1: "grey", 3: "RGB"}.get(channels, f"{channels}-channel")
    have = f"{'grey' if spec.channels == 1 else 'RGB'} {spec.size}-pixel views"
    name, size = preset_for_images(channels, side)
    if chosen:
        if spec.channels == 1 and channels == 3:
            hint = "" if size == PRESETS[name].size else f" with data.view_overrides=[size={size}]"
            raise ConfigError(f"data.views={d.views} makes {have} but {what} holds RGB images of about {side} px; "
                              f"set data.views={name}{hint}, or leave data.views unset to choose by the images")
        return d.views, list(d.view_overrides), None
    if name == d.views and size == spec.size:
        return d.views, list(d.view_overrides), None
    overrides = [o for o in d.view_overrides if not o.replace(" ", "").startswith("size=")]
    overrides += [f"size={size}"] if size != PRESETS[name].size else []
    msg = (f"data.views: {what} holds {kind} images of about {side} px, so the views are {name} at {size} px "
           f"instead of the default {d.views} ({have}); set data.views to choose another")
    return name, overrides, msg


def train_views(d: Any) -> TrainViews:
    """The :class:`TrainViews` of a data config ``d`` (``protoclr.config.DataConfig``)."""
    spec = config_view_spec(d)
    local = None
    if d.local_views:
        local = replace(spec, size=int(d.local_size), crop_scale=tuple(float(x) for x in d.local_crop_scale))
    return TrainViews(spec=spec, num_views=d.num_views, local=local, num_local=d.local_views,
                      sizes=tuple(int(x) for x in d.view_sizes))


# --------------------------------------------------------------------------------------------------------
# counter-based randomness: uniforms from a hash of (seed, epoch, index, view, slot)

_M32 = 0xFFFFFFFF

# Parameter slots: fixed positions, so turning one op on or off never changes another op's draws.
_CROP_TRIES = 10  # torchvision RandomResizedCrop: 10 rejection-sampling attempts, then a center crop
_S_CROP = 0  # 2 per attempt: area, log-ratio
_S_CROP_X, _S_CROP_Y = 20, 21
_S_FLIP = 22
_S_JIT, _S_BRI, _S_CON, _S_SAT, _S_HUE, _S_ORDER = 23, 24, 25, 26, 27, 28
_S_GRAY = 29
_S_BLUR, _S_SIGMA = 30, 31
_S_ROT, _S_ANGLE = 32, 33
_S_CUT, _S_CUT_AREA, _S_CUT_RATIO, _S_CUT_X, _S_CUT_Y = 34, 35, 36, 37, 38
NUM_SLOTS = 39


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) without int64 overflow (split into 16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons, "Hash function prospector"): a bijective 32-bit integer hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(*, seed: int, epoch: int, indices: Tensor, num_views: int, num_slots: int = NUM_SLOTS,
             first_view: int = 0) -> Tensor:
    """Uniforms in [0, 1) ``(V, B, S)`` float32 on ``indices``' device; entry ``[v, b, k]`` depends only on
    ``(seed, epoch, indices[b], first_view + v, k)`` (24 bits of a chained 32-bit hash). ``first_view`` numbers
    a second group of views (multi-crop's local views) after the first, so the two never share draws."""
    dev = indices.device
    seed32 = (int(seed) ^ (int(seed) >> 32)) & _M32
    h = _mix32(torch.tensor(seed32 ^ 0x9E3779B9, dtype=torch.int64, device=dev))
    h = _mix32(h ^ (int(epoch) & _M32))
    h = _mix32(h ^ (indices.to(torch.int64) & _M32))  # (B,)
    v = torch.arange(first_view, first_view + num_views, dtype=torch.int64, device=dev)
    h = _mix32(h[None, :] ^ v[:, None])  # (V, B)
    k = torch.arange(num_slots, dtype=torch.int64, device=dev)
    h = _mix32(h[:, :, None] ^ k)  # (V, B, S)
    return (h >> 8).to(torch.float32) * (1.0 / 2**24)


def _lerp(u: Tensor, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * u


# --------------------------------------------------------------------------------------------------------
# parameter sampling (pure functions of the uniforms)


def crop_boxes(u: Tensor, spec: ViewSpec, height: int, width: int) -> Tensor:
    """Random resized crop boxes ``(V, B, 4)`` = (x0, y0, w, h) in pixels of an ``height x width`` image.

    torchvision's ``RandomResizedCrop.get_params`` in continuous coordinates (no rounding to whole pixels):
    up to 10 draws of (area, log-ratio) until the box fits, else a center crop with the ratio clamped.
    """
    H, W = float(height), float(width)
    area = H * W * _lerp(u[..., _S_CROP : _S_CROP + 2 * _CROP_TRIES : 2], *spec.crop_scale)  # (V, B, T)
    log_r = _lerp(u[..., _S_CROP + 1 : _S_CROP + 2 * _CROP_TRIES : 2], *map(math.log, spec.crop_ratio))
    w = torch.sqrt(area * torch.exp(log_r))
    h = torch.sqrt(area / torch.exp(log_r))
    ok = (w <= W) & (h <= H)
    first = ok.to(torch.int8).argmax(-1, keepdim=True)  # first fitting attempt (0 when none fits)
    w, h = w.gather(-1, first)[..., 0], h.gather(-1, first)[..., 0]  # (V, B)
    lo_r, hi_r = spec.crop_ratio
    if W / H < lo_r:
        fw, fh = W, W / lo_r
    elif W / H > hi_r:
        fw, fh = H * hi_r, H
    else:
        fw, fh = W, H
    any_ok = ok.any(-1)
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    x0 = u[..., _S_CROP_X] * (W - w)
    y0 = u[..., _S_CROP_Y] * (H - h)
    return torch.stack([x0, y0, w, h], dim=-1)


@dataclass
class ViewParams:
    """Per-view random parameters, each ``(V, B)`` (boxes ``(V, B, 4)``); what ``make_views`` applied."""

    boxes: Tensor  # (x0, y0, w, h) in source pixels
    flip: Tensor  # bool
    angle: Tensor  # degrees, 0 where no rotation
    jitter: Tensor  # bool
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor  # fraction of a turn
    order: Tensor  # int64 index into the 24 permutations of (brightness, contrast, saturation, hue)
    gray: Tensor  # bool
    blur: Tensor  # bool
    sigma: Tensor  # pixels
    cutout: Tensor  # bool
    cutout_boxes: Tensor  # (x0, y0, w, h) in view pixels


def sample_params(
    spec: ViewSpec, *, height: int, width: int, num_views: int, seed: int, epoch: int, indices: Tensor,
    first_view: int = 0,
) -> ViewParams:
    """All random parameters of ``num_views`` views (numbered from ``first_view``) of the samples ``indices``
    ``(B,)`` of size height x width."""
    u = uniforms(seed=seed, epoch=epoch, indices=indices, num_views=num_views, first_view=first_view)  # (V, B, S)
    s = float(spec.size)

    def factor(slot: int, strength: float) -> Tensor:
        return _lerp(u[..., slot], max(0.0, 1.0 - strength), 1.0 + strength)

    c_area = s * s * _lerp(u[..., _S_CUT_AREA], *spec.cutout_scale)
    c_ratio = torch.exp(_lerp(u[..., _S_CUT_RATIO], *map(math.log, spec.cutout_ratio)))
    cw = torch.sqrt(c_area * c_ratio).clamp(max=s)  # deviation: torchvision retries boxes that do not fit
    ch = torch.sqrt(c_area / c_ratio).clamp(max=s)
    rot = u[..., _S_ROT] < spec.rotation_p
    angle = _lerp(u[..., _S_ANGLE], -spec.rotation_degrees, spec.rotation_degrees)
    if spec.rotation_step > 0:  # uniform on [-180, 180] rounded to 90: each of 4 rotations with probability 1/4
        angle = torch.round(angle / spec.rotation_step) * spec.rotation_step
    return ViewParams(
        boxes=crop_boxes(u, spec, height, width),
        flip=u[..., _S_FLIP] < spec.flip_p,
        angle=torch.where(rot, angle, 0.0),
        jitter=u[..., _S_JIT] < spec.jitter_p,
        brightness=factor(_S_BRI, spec.brightness),
        contrast=factor(_S_CON, spec.contrast),
        saturation=factor(_S_SAT, spec.saturation),
        hue=_lerp(u[..., _S_HUE], -spec.hue, spec.hue),
        order=(u[..., _S_ORDER] * 24).long().clamp(max=23),
        gray=u[..., _S_GRAY] < spec.gray_p,
        blur=u[..., _S_BLUR] < spec.blur_p,
        sigma=_lerp(u[..., _S_SIGMA], *spec.blur_sigma),
        cutout=u[..., _S_CUT] < spec.cutout_p,
        cutout_boxes=torch.stack([u[..., _S_CUT_X] * (s - cw), u[..., _S_CUT_Y] * (s - ch), cw, ch], dim=-1),
    )


# --------------------------------------------------------------------------------------------------------
# the ops, batched over N = V * B images (float in [0, 1] until normalisation)


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma, as PIL and torchvision: ``(N, 3, H, W) -> (N, 1, H, W)``."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x


def match_channels(x: Tensor, channels: int) -> Tensor:
    """Gray -> RGB by repeating, RGB -> gray by luma; ``(N, C, H, W) -> (N, channels, H, W)``."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and channels == 1:
        y = _gray(x.float())
        return y.round().clamp(0, 255).to(x.dtype) if x.dtype == torch.uint8 else y
    raise ValueError(f"images have {x.shape[1]} channels; views handle 1 (gray) or 3 (RGB).")


def _affine_crop(x: Tensor, boxes: Tensor, flip: Tensor, angle: Tensor, size: int) -> Tensor:
    """Crop ``boxes`` (N, 4), flip, rotate and resize to ``size`` in one bilinear ``grid_sample``.

    Output = Rotate(Flip(Crop(x))): output point p samples the crop at F R(-angle) p (normalised coords, y
    down), so a positive angle turns the content counter-clockwise on screen, as torchvision's ``rotate``.
    """
    N, _, H, W = x.shape
    x0, y0, w, h = boxes.unbind(-1)
    a = -torch.deg2rad(angle)  # image y axis points down
    cos, sin = torch.cos(a), torch.sin(a)
    f = torch.where(flip, -1.0, 1.0)
    sx, sy = w / W, h / H
    theta = torch.stack(
        [
            torch.stack([f * sx * cos, f * sx * sin, (2 * x0 + w) / W - 1], -1),
            torch.stack([-sy * sin, sy * cos, (2 * y0 + h) / H - 1], -1),
        ],
        dim=-2,
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, [N, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# Colour ops are per-image affine maps x -> M x + t on the channel vector, so each jitter step is one batched
# matrix product for all images whichever op each image draws (torchvision's random order), then a clamp.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _jitter_plan(p: ViewParams, C: int) -> tuple[Tensor, Tensor]:
    """Per-image jitter as 4 affine steps: matrices ``(N, 4, C, C)`` and contrast weights ``(N, 4)``.

    Step k applies ``x -> M_k x + w_k mean(luma(x))`` then clamps to [0, 1], with the op each image drew
    for position k (identity where it has no jitter): brightness ``b x``; contrast ``c x + (1 - c) mean``;
    saturation ``s x + (1 - s) luma(x)``; hue: a rotation of the chroma plane in YIQ by ``2 pi h``
    (deviation: torchvision shifts H in HSV; the YIQ rotation keeps luma and is linear, so it batches as one
    matrix product). Rows N = V * B, view-major.
    """
    dev = p.brightness.device
    N = p.brightness.numel()
    op = _PERMS.to(dev)[p.order.flatten()]  # (N, 4): 0 brightness, 1 contrast, 2 saturation, 3 hue
    op = torch.where(p.jitter.flatten()[:, None], op, -1)
    eye = torch.eye(C, device=dev).expand(N, C, C)
    b, c, sat, h = (t.flatten()[:, None, None] for t in (p.brightness, p.contrast, p.saturation, p.hue))
    if C == 1:
        mats = [b * eye, c * eye, eye, eye]
    else:
        luma = _LUMA.to(dev)
        a = -2 * math.pi * h[:, 0, 0]  # rotate by -a: +h moves red toward yellow, as in HSV
        rot = torch.zeros(N, 3, 3, device=dev)
        rot[:, 0, 0] = 1.0
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
        hue = _YIQ_TO_RGB.to(dev) @ rot @ _RGB_TO_YIQ.to(dev)
        mats = [b * eye, c * eye, sat * eye + (1 - sat) * luma.expand(3, 3), hue]
    table = torch.stack([*mats, eye], 1)  # (N, 5, C, C); index 4 = identity
    M = table[torch.arange(N, device=dev)[:, None], torch.where(op < 0, 4, op)]  # (N, 4, C, C)
    w = torch.where(op == 1, 1 - c[:, :, 0], 0.0)  # (N, 4)
    return M, w


def _affine_channels(x: Tensor, M: Tensor, t: Tensor) -> Tensor:
    """``x (N, C, H, W) -> M x + t`` per image, ``M (N, C', C)``, ``t (N, C')``."""
    N, C, H, W = x.shape
    return torch.baddbmm(t[:, :, None], M, x.reshape(N, C, H * W)).reshape(N, M.shape[1], H, W)


_PERMS = torch.tensor(
    [[a, b, c, d] for a in range(4) for b in range(4) for c in range(4) for d in range(4) if len({a, b, c, d}) == 4]
)  # (24, 4): ColorJitter applies ops in random order


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with a per-image ``sigma`` ``(N,)``, reflect padding; ``(N, C, s, s)``."""
    N, C, H, W = x.shape
    r = kernel // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, k)
    y = x.reshape(1, N * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=N * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=N * C)
    return y.reshape(N, C, H, W)


def _cutout_mask(boxes: Tensor, size: int) -> Tensor:
    """``(N, 1, s, s)`` bool, True inside each (x0, y0, w, h) box (pixel centres)."""
    c = torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5
    x0, y0, w, h = (b[:, None] for b in boxes.unbind(-1))
    in_x = (c >= x0) & (c < x0 + w)  # (N, s)
    in_y = (c >= y0) & (c < y0 + h)
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def blur_kernel_size(spec: ViewSpec) -> int:
    k = round(spec.blur_kernel_frac * spec.size)
    return max(3, k + 1 - k % 2)  # odd, at least 3


def make_views(
    images: Tensor,
    spec: ViewSpec,
    *,
    num_views: int,
    seed: int,
    epoch: int,
    indices: Tensor,
    return_params: bool = False,
    chunk: int = 256,
    first_view: int = 0,
) -> Tensor | tuple[Tensor, ViewParams]:
    """``num_views`` random views of each image, batched on ``images``' device.

    ``first_view``: the number of the first view (views ``first_view .. first_view + num_views - 1``), so that a
    second call for multi-crop's local views draws parameters of its own.

    images: ``(B, C, H, W)`` uint8 (or float in [0, 1]); or pre-cropped views ``(V, B, C, s, s)`` from
    ``CropViews`` (then the crop is skipped and the rest uses the same parameters). indices: ``(B,)`` the
    samples' dataset indices, which with (seed, epoch, view) fix every random parameter.
    Returns ``(V, B, C', s, s)`` float32 normalised, ``C' = spec.channels`` (and the ``ViewParams`` if asked).
    """
    pre_cropped = images.dim() == 5
    if images.dim() not in (4, 5):
        raise ValueError(f"images must be (B, C, H, W) or pre-cropped (V, B, C, s, s), got {tuple(images.shape)}.")
    B = images.shape[-4]
    if pre_cropped and (images.shape[0] != num_views or images.shape[-2:] != (spec.size, spec.size)):
        raise ValueError(
            f"pre-cropped views must be (V={num_views}, B, C, {spec.size}, {spec.size}), got {tuple(images.shape)}."
        )
    indices = torch.as_tensor(indices, device=images.device).flatten()
    if indices.numel() != B:
        raise ValueError(f"indices must hold one dataset index per image ({B}), got {indices.numel()}.")
    H, W = images.shape[-2:]
    p = sample_params(spec, height=H, width=W, num_views=num_views, seed=seed, epoch=epoch, indices=indices,
                      first_view=first_view)
    V, s, C = num_views, spec.size, spec.channels
    src = images.reshape(-1, *images.shape[-3:])  # (B or V*B, C_in, H, W)
    flat = _FlatParams(p, C)
    out = torch.empty(V * B, C, s, s, device=images.device)
    # Chunks of images keep the ~20 passes over the data in cache; every op is per image, so chunking
    # changes nothing in the result.
    for lo in range(0, V * B, chunk):
        rows = torch.arange(lo, min(lo + chunk, V * B), device=images.device)  # view-major: row = v * B + b
        out[rows] = _views_chunk(src[rows if pre_cropped else rows % B], flat.take(rows), spec, pre_cropped)
    out = out.reshape(V, B, C, s, s)
    return (out, p) if return_params else out


class _FlatParams:
    """``ViewParams`` flattened to rows ``V * B`` (view-major) so chunks can take slices of them."""

    def __init__(self, p: ViewParams, C: int) -> None:
        self.d = {k: v.reshape(-1, *v.shape[2:]) for k, v in vars(p).items()}
        self.d["jitter_M"], self.d["jitter_w"] = _jitter_plan(p, C)

    def take(self, rows: Tensor) -> dict[str, Tensor]:
        return {k: v[rows] for k, v in self.d.items()}


def _views_chunk(x: Tensor, p: dict[str, Tensor], spec: ViewSpec, pre_cropped: bool) -> Tensor:
    """The pipeline on ``N`` images ``(N, C_in, H, W)`` with their parameters ``(N, ...)`` -> ``(N, C', s, s)``."""
    s, C = spec.size, spec.channels
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    x = match_channels(x, C)
    boxes = (
        torch.tensor([0.0, 0.0, float(s), float(s)], device=x.device).expand(x.shape[0], 4)
        if pre_cropped
        else p["boxes"]
    )
    x = _affine_crop(x, boxes, p["flip"], p["angle"], s)  # (N, C, s, s)
    if spec.jitter_p > 0:
        luma = _LUMA.to(x.device) if C == 3 else torch.ones(1, device=x.device)
        for k in range(4):
            gray_mean = x.mean(dim=(2, 3)) @ luma  # (N,)
            t = (p["jitter_w"][:, k] * gray_mean)[:, None].expand(-1, C)
            x = _affine_channels(x, p["jitter_M"][:, k], t).clamp_(0.0, 1.0)
    # grayscale and normalisation fused into one per-image affine map
    std = torch.tensor(spec.std, device=x.device)
    mean = torch.tensor(spec.mean, device=x.device)
    M = torch.diag(1 / std).expand(x.shape[0], C, C)
    if C == 3 and spec.gray_p > 0:
        G = _LUMA.to(x.device).expand(3, 3)  # every row = luma
        M = torch.where(p["gray"][:, None, None], M @ G, M)
    x = _affine_channels(x, M, (-mean / std).expand(x.shape[0], C))
    if spec.blur_p > 0:  # blur commutes with the per-pixel affine maps above (normalised kernel, reflect padding)
        sel = p["blur"].nonzero().flatten()
        if sel.numel():
            x[sel] = _gaussian_blur(x[sel], p["sigma"][sel], blur_kernel_size(spec))
    if spec.cutout_p > 0:
        mask = _cutout_mask(p["cutout_boxes"], s) & p["cutout"][:, None, None, None]
        x = x.masked_fill(mask, 0.0)
    return x


def eval_images(images: Tensor, spec: ViewSpec) -> Tensor:
    """Deterministic evaluation input: ``(B, C, H, W)`` uint8 -> ``(B, C', s, s)`` float32 normalised.

    Images already ``s x s`` are only normalised; others have the shorter side resized (antialiased) to
    ``round(s / eval_crop_fraction)`` and are center-cropped to ``s`` (ImageNet: 256 then 224).
    """
    import torchvision.transforms.v2.functional as TF

    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}.")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    x = match_channels(x, spec.channels)
    s = spec.size
    if x.shape[-2:] != (s, s):
        x = TF.resize(x, [round(s / spec.eval_crop_fraction)], antialias=True)
        x = TF.center_crop(x, [s, s]).clamp(0, 1)
    mean = torch.tensor(spec.mean, device=x.device)[:, None, None]
    std = torch.tensor(spec.std, device=x.device)[:, None, None]
    return (x - mean) / std


def denormalize(x: Tensor, spec: ViewSpec) -> Tensor:
    """Inverse of the normalisation, clamped to [0, 1], for display; any ``(..., C, s, s)``."""
    mean = torch.tensor(spec.mean, device=x.device)[:, None, None]
    std = torch.tensor(spec.std, device=x.device)[:, None, None]
    return (x * std + mean).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------
# large images: crop + resize per image in DataLoader workers


def crop_views(dataset: Any, indices: Sequence[int], spec: ViewSpec, *, num_views: int, seed: int,
               epoch: int) -> Tensor:
    """``(V, B, C, s, s)`` uint8: the random resized crops of :func:`make_views` (the same boxes: one draw per
    ``(seed, epoch, index, view)``), cut from each image at its native size and resized with antialiasing, for
    datasets too large to batch uncropped (file-backed ``LabeledImages``). ``make_views`` then applies the rest
    of the pipeline to them batched. The crops reach every part of the image, its borders included."""
    import torchvision.transforms.v2.functional as TF

    s, out = spec.size, []
    for i in indices:
        img = match_channels(dataset.load_image(int(i))[None], spec.channels)[0]  # (C, H, W) uint8, native size
        H, W = img.shape[-2:]
        u = uniforms(seed=seed, epoch=epoch, indices=torch.tensor([int(i)]), num_views=num_views)
        crops = []
        for x0, y0, w, h in crop_boxes(u, spec, H, W)[:, 0].tolist():  # (V, 4)
            top, left = round(y0), round(x0)
            hh, ww = max(1, min(round(h), H - top)), max(1, min(round(w), W - left))
            crops.append(TF.resized_crop(img, top, left, hh, ww, [s, s], antialias=True))
        out.append(torch.stack(crops))  # (V, C, s, s)
    return torch.stack(out, 1)  # (V, B, C, s, s)


class CropViews(torch.utils.data.Dataset):
    """``dataset[i] -> (i, crops (V, C, s, s) uint8)``: :func:`crop_views` of one image, for a DataLoader.

        loader = DataLoader(CropViews(train, spec, num_views=2, seed=0, epoch=e), batch_size=256, num_workers=8)
        for idx, crops in loader:                                   # crops: (B, V, C, s, s)
            x = make_views(crops.transpose(0, 1).to(dev), spec, num_views=2, seed=0, epoch=e, indices=idx)

    The training loop uses :func:`crop_views` on whole batches (protoclr.splits.EpochBatches). Build a new loader
    each epoch (or call ``set_epoch`` before workers start): the epoch is part of the seed.
    """

    def __init__(self, dataset: Any, spec: ViewSpec, *, num_views: int, seed: int, epoch: int = 0) -> None:
        self.dataset, self.spec, self.num_views, self.seed, self.epoch = dataset, spec, num_views, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, Tensor]:
        crops = crop_views(self.dataset, [i], self.spec, num_views=self.num_views, seed=self.seed, epoch=self.epoch)
        return int(i), crops[:, 0]


# --------------------------------------------------------------------------------------------------------
# CLI: a grid of originals and their views


def view_grid(
    images: Tensor,
    spec: ViewSpec,
    *,
    num_views: int,
    seed: int = 0,
    epoch: int = 0,
    indices: Tensor | None = None,
    originals: Tensor | None = None,
    cell: int = 96,
) -> Tensor:
    """``(3, rows*cell, cols*cell)`` float image: each row is one original (eval crop) then its views.

    images: ``(B, C, H, W)`` uint8, or pre-cropped ``(V, B, C, s, s)`` from ``CropViews`` together with
    ``originals`` ``(B, C, H', W')`` uint8 for the first column.
    """
    import torchvision.utils as vutils

    B = images.shape[-4]
    idx = torch.arange(B) if indices is None else torch.as_tensor(indices)
    views = make_views(images, spec, num_views=num_views, seed=seed, epoch=epoch, indices=idx)  # (V, B, C, s, s)
    if originals is None:
        if images.dim() == 5:
            raise ValueError("pre-cropped images need originals= (B, C, H, W) uint8 for the first column.")
        originals = images
    orig = denormalize(eval_images(originals, spec), spec)  # (B, C, s, s)
    cols = torch.cat([orig[:, None], denormalize(views, spec).transpose(0, 1)], 1)  # (B, 1+V, C, s, s)
    cols = match_channels(cols.flatten(0, 1), 3)
    cols = F.interpolate(cols, size=(cell, cell), mode="nearest")
    return vutils.make_grid(cols, nrow=1 + num_views, padding=2, pad_value=1.0)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["crop_scale=[0.08, 1]", "brightness=0.8"]`` -> ``{"crop_scale": [0.08, 1], "brightness": 0.8}`` (values
    parsed as YAML); :func:`view_spec` then checks the names and types."""
    import yaml

    out: dict[str, Any] = {}
    for kv in items:
        if "=" not in kv:
            raise ValueError(f"a view override is FIELD=VALUE, e.g. crop_scale=[0.2,1.0]; got {kv!r}.")
        k, v = kv.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ValueError(f"view override {kv!r}: the value is not valid YAML.") from None
    return out


def cli_main(argv: list[str]) -> int:
    """``protoclr views``: save a PNG grid of images and their augmented views."""

    ap = argparse.ArgumentParser(prog="protoclr views", description=cli_main.__doc__)
    ap.add_argument("--dataset", required=True, help=f"one of {', '.join(data.DATASETS)}")
    ap.add_argument("--root", default=None, help="dataset folder or archive (default: the dataset's usual places)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--download", action="store_true", help="fetch torchvision datasets into --root if missing")
    ap.add_argument("--skip-bad", action="store_true", help="leave out undecodable images and report the count")
    ap.add_argument("--preset", default="simclr_cifar", help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--modifier", action="append", default=[], help=f"repeatable: {', '.join(MODIFIERS)}")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a ViewSpec field, e.g. --set crop_scale=[0.2,1.0]",
    )
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--num-views", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epoch", type=int, default=0)
    ap.add_argument("--cell", type=int, default=96, help="pixels per grid cell (views are upscaled, nearest)")
    ap.add_argument("--out", default="views.png")
    args = ap.parse_args(argv)
    try:
        spec = view_spec(args.preset, args.modifier, **parse_overrides(args.set))
        ds = data.load_dataset(
            args.dataset,
            split=args.split,
            root=args.root,
            download=args.download,
            **({"on_bad": "skip"} if args.skip_bad else {}),
        )
        if ds.skipped:
            print(f"skipped {len(ds.skipped)} bad image file(s)", file=sys.stderr)
        gen = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(ds), generator=gen)[: args.num_images].sort().values
        originals = ds.get_images(idx)  # file-backed: shorter side resized to ds.image_size, center crop
        if ds.in_memory:
            images = originals
        else:  # the crops come from the native-size images, as in training
            cv = CropViews(ds, spec, num_views=args.num_views, seed=args.seed, epoch=args.epoch)
            images = torch.stack([cv[i][1] for i in idx.tolist()], 1)  # (V, B, C, s, s)
        grid = view_grid(
            images,
            spec,
            num_views=args.num_views,
            seed=args.seed,
            epoch=args.epoch,
            indices=idx,
            originals=originals,
            cell=args.cell,
        )
    except ValueError as e:  # a bad preset, modifier or field: the user's, reported as one line by protoclr.cli
        raise UserError(str(e)) from e
    import torchvision.utils as vutils

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image(grid, args.out)
    names = ", ".join(ds.classes[int(y)] if y >= 0 else "unlabeled" for y in ds.labels[idx])
    print(f"wrote {args.out}: {len(idx)} images ({names}) x (original + {args.num_views} views), spec {asdict(spec)}")
    return 0
