"""What a caller brings to :func:`protoclr.train.pretrain` from Python: their own backbone, dataset and views.

    cfg = load_config("configs/cpu_cifar10.yaml", ["train.out_dir=runs/own"])
    spec = config_view_spec(cfg.data)                         # evaluation's input: size, mean, std
    run_dir = pretrain(cfg, backbone=net, feature_dim=512,    # net: (B, C, H, W) float -> (B, 512)
                       dataset=train_set, test_dataset=test_set,   # items (image, label) or image
                       views=view)                            # view(image (C, H, W) uint8) -> (C, s, s) float
    encoder, cfg = load_run(run_dir, backbone=net)            # the run's weights in your module

Everything else is the config's: the loss, optimizer, schedule, target branch, measurements, checkpoints and
resume. The saved config says ``model.backbone: python`` / ``data.dataset: python`` (:data:`PYTHON`) where the
object came from Python, so a command that would rebuild it (``protoclr evaluate``, ``export``) says so in one
line instead of rebuilding something else; the objects' class names are in the checkpoint and ``meta.json``.

Dataset: a map-style dataset (``len`` and ``[i]``) whose items are ``(image, label)`` or an image alone
(unlabeled: label -1); an image is a ``(C, H, W)`` or ``(H, W)`` tensor (uint8, or float in [0, 1]), a PIL image
or an ``(H, W, C)`` uint8 array, all of one size. It is decoded once into memory (:class:`protoclr.data.
LabeledImages`); a dataset too large for memory belongs in an image folder (``data.dataset=image_folder``).

Views: ``view(image)`` maps one uint8 image ``(C, H, W)`` to one view ``(C', s, s)`` float32, normalised as
evaluation normalises (the config's ``data.views``: ``spec.size``, ``spec.mean``, ``spec.std``); torchvision's
``transforms.v2.Compose([..., ToDtype(torch.float32, scale=True), Normalize(spec.mean, spec.std)])`` is one.
It is called once per image and view, with torch's and Python's RNG seeded from ``(seed, epoch, index, view)``
and restored after: the views, like protoclr's own, do not depend on the batch, the process count or a resume.
The diagnostics (``eval.diagnostics``) draw their views with ``data.views``, not with this function.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from protoclr.data import PYTHON, LabeledImages
from protoclr.errors import ConfigError, DataError
from protoclr.models import _NORMS_1D, Encoder, Projector
from protoclr.views import ViewSpec


def _name(obj: Any) -> str:
    """``module.QualName`` of an object's class (of the function itself for a function)."""
    f = obj if callable(obj) and hasattr(obj, "__qualname__") and not isinstance(obj, nn.Module) else type(obj)
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(obj).__name__)}"


def _as_uint8(img: Any, i: int) -> Tensor:
    """Item ``i``'s image as ``(C, H, W)`` uint8."""
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img))
        if img.dim() == 3 and img.shape[-1] in (1, 3, 4) and img.shape[0] not in (1, 3, 4):
            img = img.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    elif not isinstance(img, Tensor):
        try:
            from torchvision.transforms.v2.functional import pil_to_tensor
            img = pil_to_tensor(img.convert("RGB") if getattr(img, "mode", "RGB") not in ("L", "RGB") else img)
        except (TypeError, AttributeError):
            raise DataError(f"dataset item {i}: an image must be a tensor, a PIL image or a numpy array, got "
                            f"{type(img).__name__}") from None
    if img.dim() == 2:
        img = img[None]  # (H, W) -> (1, H, W)
    if img.dim() != 3:
        raise DataError(f"dataset item {i}: an image must be (C, H, W) or (H, W), got shape {tuple(img.shape)}")
    if img.dtype == torch.uint8:
        return img
    if img.is_floating_point():
        if img.min() < 0 or img.max() > 1:
            raise DataError(f"dataset item {i}: a float image must lie in [0, 1] (before normalisation), got "
                            f"values in [{img.min().item():.3g}, {img.max().item():.3g}]; drop the dataset's "
                            "Normalize: protoclr's views and evaluation normalise")
        return (img * 255).round().to(torch.uint8)
    raise DataError(f"dataset item {i}: image dtype {img.dtype}; pass uint8, or float in [0, 1]")


def as_images(dataset: Any, *, what: str = "dataset") -> LabeledImages:
    """A map-style dataset of ``(image, label)`` or images (module docstring) decoded into a
    :class:`~protoclr.data.LabeledImages`: images ``(N, C, H, W)`` uint8, labels ``(N,)`` (-1: none); the class
    names are the dataset's ``classes`` where it has as many as its labels need, else the label numbers."""
    if isinstance(dataset, LabeledImages):
        return dataset
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"{what}: pass a map-style dataset (len() and [i]), got {type(dataset).__name__}") from None
    if n == 0:
        raise DataError(f"{what} holds no images")
    images, labels = [], []
    for i in range(n):
        item = dataset[i]
        img, label = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, None)
        x = _as_uint8(img, i)
        if images and x.shape != images[0].shape:
            raise DataError(f"{what}: item {i} is {tuple(x.shape)} but item 0 is {tuple(images[0].shape)}; give "
                            "every image one size (e.g. torchvision.transforms.v2.Resize in the dataset)")
        images.append(x)
        y = -1 if label is None else int(label)
        if y < -1:
            raise DataError(f"{what}: item {i} has label {y}; labels are 0, 1, ... (or None: unlabeled)")
        labels.append(y)
    y = torch.tensor(labels)
    k = int(y.max()) + 1
    names = list(getattr(dataset, "classes", None) or [])
    classes = [str(c) for c in names] if len(names) >= k and names else [str(c) for c in range(k)]
    return LabeledImages(labels=y, classes=classes, images=torch.stack(images), name=what)


def backbone_width(backbone: nn.Module, *, feature_dim: int | None, channels: int, size: int) -> int:
    """F of a caller's backbone: ``feature_dim`` when given, else the module's ``feature_dim`` / ``num_features``
    attribute, else the width of its output on a zero batch ``(2, channels, size, size)`` (eval mode, no
    gradient; its mode is restored). Its output must be ``(B, F)``."""
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"backbone: pass a torch.nn.Module mapping (B, C, H, W) to (B, F), got "
                          f"{type(backbone).__name__}")
    given = feature_dim or getattr(backbone, "feature_dim", None) or getattr(backbone, "num_features", None)
    was = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            p = next(backbone.parameters(), torch.zeros(()))
            h = backbone(torch.zeros(2, channels, size, size, dtype=p.dtype, device=p.device))
    except Exception as e:
        raise ConfigError(f"backbone {_name(backbone)} fails on a (2, {channels}, {size}, {size}) batch (the views' "
                          f"channels and size, data.views): {type(e).__name__}: {e}") from None
    finally:
        backbone.train(was)
    if not isinstance(h, Tensor) or h.dim() != 2:
        shape = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
        raise ConfigError(f"backbone {_name(backbone)} returns {shape} for a batch of 2; it must return features "
                          "(B, F): end it with pooling and torch.nn.Flatten()")
    if given is not None and int(given) != h.shape[1]:
        raise ConfigError(f"feature_dim={given} but backbone {_name(backbone)} returns {h.shape[1]} features; pass "
                          f"feature_dim={h.shape[1]}")
    return int(h.shape[1])


def encoder_with(backbone: nn.Module, width: int, m: Any) -> Encoder:
    """An :class:`~protoclr.models.Encoder` of a caller's backbone (``width`` features) and the projector of the
    model config ``m`` (its hidden and output widths, layers and norm)."""
    projector = Projector(width, hidden_dim=m.projector_hidden_dim, out_dim=m.projector_dim,
                          num_layers=m.projector_layers, norm_layer=_NORMS_1D[m.norm], last_norm=m.projector_last_norm)
    return Encoder(backbone, projector, feature_dim=width)


def view_seed(seed: int, epoch: int, index: int, view: int) -> int:
    """The RNG seed of view ``view`` of image ``index`` in ``epoch``: distinct for every tuple of a run."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + index) * 1_000_003 + view) % (2**63 - 1)


@dataclass
class FunctionViews:
    """A caller's per-image view function in the place of :class:`protoclr.views.TrainViews`: ``make`` returns
    ``[(V*B, C, s, s)]`` view-major, each view drawn under :func:`view_seed`. ``spec``: the config's views,
    which evaluation uses and the views must match in channels and size."""

    fn: Callable[[Tensor], Tensor]
    spec: ViewSpec
    num_views: int = 2
    num_local: int = 0
    checked: bool = False

    def make(self, images: Tensor, *, seed: int, epoch: int, indices: Tensor, step: int = 0,
             total_steps: int = 1) -> list[Tensor]:
        """``images`` ``(B, C, H, W)`` uint8 -> ``[(V*B, C', s, s)]`` float32 (row ``v * B + b``)."""
        out = []
        py_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                for v in range(self.num_views):
                    for b, i in enumerate(indices.tolist()):
                        s = view_seed(seed, epoch, int(i), v)
                        torch.manual_seed(s)
                        random.seed(s)
                        out.append(self._check(self.fn(images[b])))
        finally:  # torch's state is restored by fork_rng, Python's here, also when the function raises
            random.setstate(py_state)
        return [torch.stack(out)]  # (V*B, C', s, s)

    def _check(self, x: Any) -> Tensor:
        if self.checked:
            return x
        want = (self.spec.channels, self.spec.size, self.spec.size)
        if not isinstance(x, Tensor) or not x.is_floating_point() or tuple(x.shape) != want:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ConfigError(f"views {_name(self.fn)} returns {got} for one image; evaluation feeds the backbone "
                              f"float {want} (the config's data.views): return that, normalised by spec.mean "
                              "and spec.std, or set data.views / data.view_overrides=[size=S]")
        self.checked = True
        return x


@dataclass
class Own:
    """The objects a caller passed to ``pretrain`` (None: the config's), checked at construction with one-line
    errors for those that cannot work, before anything is built."""

    backbone: nn.Module | None = None
    feature_dim: int | None = None
    dataset: Any = None
    test_dataset: Any = None
    views: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if self.backbone is not None and not isinstance(self.backbone, nn.Module):
            raise ConfigError(f"backbone: pass a torch.nn.Module, got {type(self.backbone).__name__}")
        f = self.feature_dim
        if f is not None and (self.backbone is None or not isinstance(f, int) or f < 1):
            raise ConfigError("feature_dim: the width F of the features of the backbone you pass, a positive int "
                              "(pass it together with backbone=)")
        if self.test_dataset is not None and self.dataset is None:
            raise ConfigError("test_dataset without dataset: pass the training images as dataset= too")
        if self.views is not None and not callable(self.views):
            raise ConfigError(f"views: pass a function image (C, H, W) uint8 -> view (C, s, s) float, got "
                              f"{type(self.views).__name__}")

    @property
    def names(self) -> dict[str, str]:
        """What came from Python, by class or function name (kept in the checkpoint and ``meta.json``)."""
        given = {"backbone": self.backbone, "dataset": self.dataset, "test_dataset": self.test_dataset,
                 "views": self.views}
        return {k: _name(v) for k, v in given.items() if v is not None}

    def backbone_and_width(self, spec: ViewSpec) -> tuple[nn.Module, int] | None:
        """``(backbone, F)`` for views of ``spec`` (:func:`backbone_width`), None without a backbone."""
        if self.backbone is None:
            return None
        return self.backbone, backbone_width(self.backbone, feature_dim=self.feature_dim, channels=spec.channels,
                                             size=spec.size)


def check_resume(saved: dict[str, str] | None, now: dict[str, str]) -> None:
    """Refuse a resume whose Python objects are not the ones the run started with (by name)."""
    saved = saved or {}
    diffs = [f"{k}: {saved.get(k, 'none')} at the start, {now.get(k, 'none')} now"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"cannot resume: the run was started with other objects from Python ({'; '.join(diffs)});"
                          " pass the same ones, or use a new train.run_name")


__all__ = ["PYTHON", "FunctionViews", "Own", "as_images", "backbone_width", "check_resume", "encoder_with",
           "view_seed"]
