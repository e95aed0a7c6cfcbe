"""Which images, in which order: every seeded choice of images in protoclr, with its seed named here.

    train, test, spec = load_data(cfg)            # the split trained on (subset, class profile) and the held-out one
    order = epoch_order(len(train), seed=s, epoch=e)
    bank = draw(train, cfg.eval.train_images, seed=s + KNN_BANK)
    scored = held_out(test, cfg.eval.test_images)

Draws come from ``torch.Generator`` permutations seeded from the run's ``train.seed`` plus a named offset (never
from ``hash()``, which Python randomises per process), so every process and every resume makes the same choice:

    TRAIN_SUBSET  data.train_subset of the training split
    CLASS_PROFILE the long-tailed draw, or its uniform twin (protoclr.splits.longtail / uniform_subset)
    KNN_BANK      the in-training kNN monitor's bank
    PROBE_FIT     the images the final probes (kNN bank, linear probe) fit on
    epoch order   a permutation per (seed, epoch)
    LOADER        the epoch DataLoader's own generator, per (seed, epoch): its workers' base seed is drawn from it,
                  not from the global RNG, so that a resumed run's global RNG continues where it was saved
The held-out draws (scored images, the diagnostics' probe set) use the fixed seed ``HELD_OUT``, the same for every
run, so that runs of different seeds are scored on the same images; ``protoclr evaluate --train-subset`` draws its
fit set with the fixed seed ``EVAL_FIT`` for the same reason.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from protoclr.data import LabeledImages, load_dataset
from protoclr.views import config_view_spec, crop_views

# Offsets added to train.seed (their values keep earlier runs' draws).
TRAIN_SUBSET = 0
CLASS_PROFILE = 0
KNN_BANK = 1
PROBE_FIT = 2
LOADER = 3
HELD_OUT = 0  # a fixed seed, not an offset: every run scores the same held-out images
EVAL_FIT = 0  # a fixed seed: protoclr evaluate --train-subset N fits every run on the same N training images


def permutation(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that depends only on ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def draw_indices(n: int, count: int, *, seed: int) -> torch.Tensor:
    """Sorted indices of ``count`` of ``n`` items (all of them when ``count`` is 0 or at least ``n``)."""
    if not count or count >= n:
        return torch.arange(n)
    return permutation(n, seed)[:count].sort().values


def draw(data: Any, count: int, *, seed: int) -> Any:
    """``count`` images of ``data`` (a ``LabeledImages``), drawn with ``seed``; ``data`` itself for 0 or all."""
    if not count or count >= len(data):
        return data
    return data.subset(draw_indices(len(data), count, seed=seed))


def held_out(test: Any, count: int) -> Any:
    """The held-out images a run scores: a fixed draw of ``count`` (0 = all), the same for every run. A draw,
    not the first rows: a split stored in class order (the CIFAR-10 copy) has one class in its first rows."""
    return draw(test, count, seed=HELD_OUT)


def balanced_draw(data: Any, count: int, *, seed: int) -> Any:
    """A class-balanced draw of at most ``count`` images (capped at C times the smallest class so that every class
    gives the same number; 0 = that cap)."""
    if not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}.")
    C = len(data.classes)
    smallest = int(data.class_counts(C).min())
    if smallest == 0:
        raise ValueError("a class has no image here; pick a split with every class (e.g. test).")
    per_class = min(count or C * smallest, C * smallest) // C
    if per_class < 1:
        raise ValueError(f"{count} images give no image per class for {C} classes; use at least {C}.")
    return uniform_subset(data, total=per_class * C, seed=seed)


# ----------------------------------------------------------------------------------------------------------
# long-tailed and uniform subsets (Cao et al. 2019; Liu et al. 2019)
def longtail_counts(
    max_count: int, num_classes: int, *, profile: str = "exp", imbalance_ratio: float = 100.0, pareto_alpha: float = 6.0
) -> list[int]:
    """Images per class, largest first: ``n_0 = max_count`` down to ``n_{C-1} = max_count / imbalance_ratio``.

    exp (Cao et al. 2019, CIFAR-LT): ``n_c = floor(max_count * ratio^(-c / (C-1)))``.
    pareto (ImageNet-LT, Liu et al. 2019, class sizes from a Pareto law with shape 6): the deterministic
    quantile form ``n_c = floor(max_count * (1 + k c)^(-alpha))`` with ``k`` such that ``n_{C-1}`` hits the
    ratio. Liu et al. draw the sizes at random; here they are the Pareto quantiles, so counts are exact.
    """
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1 (largest / smallest class), got {imbalance_ratio}.")
    C = num_classes
    if C == 1:
        return [max_count]
    if profile == "exp":
        fr = [imbalance_ratio ** (-c / (C - 1)) for c in range(C)]
    elif profile == "pareto":
        k = (imbalance_ratio ** (1 / pareto_alpha) - 1) / (C - 1)
        fr = [(1 + k * c) ** (-pareto_alpha) for c in range(C)]
    else:
        raise ValueError(f"profile must be 'exp' or 'pareto', got {profile!r}.")
    return [max(1, math.floor(max_count * f + 1e-9)) for f in fr]


def _per_class_indices(dataset: LabeledImages, gen: torch.Generator) -> list[Tensor]:
    y = dataset.labels
    out = []
    for c in range(len(dataset.classes)):
        idx = (y == c).nonzero().flatten()
        out.append(idx[torch.randperm(idx.numel(), generator=gen)])
    return out


def longtail(
    dataset: LabeledImages,
    *,
    profile: str = "exp",
    imbalance_ratio: float = 100.0,
    seed: int = 0,
    max_count: int | None = None,
    class_order: str = "index",
    pareto_alpha: float = 6.0,
) -> LabeledImages:
    """A long-tailed subset: class ranked r keeps ``longtail_counts(...)[r]`` images drawn with ``seed``.

    ``max_count`` defaults to the smallest class size (so every class can supply its share).
    ``class_order="index"`` ranks classes 0, 1, ... (Cao et al.); "random" ranks them by a seeded permutation.
    Indices are kept in ascending order.
    """
    C = len(dataset.classes)
    counts = dataset.class_counts(C)
    n_max = int(counts.min()) if max_count is None else int(max_count)
    target = longtail_counts(n_max, C, profile=profile, imbalance_ratio=imbalance_ratio, pareto_alpha=pareto_alpha)
    gen = torch.Generator().manual_seed(seed)
    if class_order == "index":
        order = list(range(C))
    elif class_order == "random":
        order = torch.randperm(C, generator=gen).tolist()
    else:
        raise ValueError(f"class_order must be 'index' or 'random', got {class_order!r}.")
    per_class = _per_class_indices(dataset, gen)
    keep = []
    for rank, c in enumerate(order):
        if target[rank] > per_class[c].numel():
            raise ValueError(
                f"class {dataset.classes[c]!r} has {per_class[c].numel()} images but the profile needs "
                f"{target[rank]}; lower max_count."
            )
        keep.append(per_class[c][: target[rank]])
    return dataset.subset(torch.cat(keep).sort().values)


def uniform_subset(dataset: LabeledImages, *, total: int, seed: int = 0) -> LabeledImages:
    """A class-balanced subset of exactly ``total`` images: ``total // C`` per class, one more for
    ``total % C`` classes chosen with ``seed``. Pairs with ``longtail`` to compare equal budgets."""
    C = len(dataset.classes)
    gen = torch.Generator().manual_seed(seed)
    extra = set(torch.randperm(C, generator=gen)[: total % C].tolist())
    per_class = _per_class_indices(dataset, gen)
    keep = []
    for c in range(C):
        n = total // C + (c in extra)
        if n > per_class[c].numel():
            raise ValueError(
                f"uniform_subset(total={total}) needs {n} images of class {dataset.classes[c]!r} but it "
                f"has {per_class[c].numel()}; lower total."
            )
        keep.append(per_class[c][:n])
    return dataset.subset(torch.cat(keep).sort().values)


def class_groups(
    dataset_or_counts: LabeledImages | Tensor, *, many_above: int = 100, few_below: int = 20
) -> dict[str, Tensor]:
    """Class ids by training-set size: many (> 100 images), medium (20-100), few (< 20), as in Liu et al. 2019.

    dataset_or_counts: the training set, or its per-class counts ``(C,)``. Returns int64 class-id tensors.
    """
    counts = dataset_or_counts.class_counts() if isinstance(dataset_or_counts, LabeledImages) else dataset_or_counts
    counts = torch.as_tensor(counts)
    ids = torch.arange(counts.numel())
    return {
        "many": ids[counts > many_above],
        "medium": ids[(counts >= few_below) & (counts <= many_above)],
        "few": ids[counts < few_below],
    }


def epoch_order(n: int, *, seed: int, epoch: int) -> torch.Tensor:
    """The data order of ``epoch``: a permutation of ``range(n)`` that depends only on (seed, epoch)."""
    return permutation(n, seed * 1_000_003 + epoch)


def class_profiled(train: Any, data_cfg: Any, *, seed: int) -> Any:
    """``train`` drawn to ``data.class_profile``: itself for none, the long-tailed set, or a uniform set of the
    long-tailed set's size (so that the two differ only in balance), or of ``data.uniform_total`` images (the
    twin of a long tail loaded as it is, e.g. ImageNet-LT's list)."""
    d = data_cfg
    if d.class_profile == "none":
        return train
    if d.class_profile == "uniform" and d.uniform_total:
        return uniform_subset(train, total=d.uniform_total, seed=seed + CLASS_PROFILE)
    lt = longtail(train, profile=d.longtail_profile, imbalance_ratio=d.imbalance_ratio, seed=seed + CLASS_PROFILE)
    return lt if d.class_profile == "longtail" else uniform_subset(train, total=len(lt), seed=seed + CLASS_PROFILE)


def probe_fit_set(split: Any, cfg: Any) -> Any:
    """The images the final probes fit on, from ``split`` (the training split before the class profile): a
    seeded draw of ``eval.train_images``; for a class-profiled run (long-tailed or uniform) a class-balanced draw
    instead, so that both profiles are scored by the same balanced protocol and the comparison measures their
    representations, not an imbalanced classifier."""
    seed = cfg.train.seed + PROBE_FIT
    if cfg.data.class_profile == "none":
        return draw(split, cfg.eval.train_images, seed=seed)
    return balanced_draw(split, cfg.eval.train_images, seed=seed)


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


def dataset_options(d: Any) -> dict[str, Any]:
    """The loader options a data config ``d`` asks for beyond name, split and root (``data.on_bad``: only the
    datasets read from image files take it, and only a non-default value is passed)."""
    return {"on_bad": d.on_bad} if d.on_bad != "error" else {}


def load_data(cfg: Any, *, fake: bool = False, class_profile: bool = True) -> tuple[Any, Any, Any]:
    """``(train, test, spec)``: the training split (``data.train_subset``, then ``data.class_profile``), the
    held-out split and the global view spec. ``class_profile=False`` stops before the profile (the split the
    probes of a class-profiled run draw from). ``fake``: random images at the view size, as many as two steps
    need (``--dry-run``)."""
    d = cfg.data
    spec = config_view_spec(d)
    if fake:
        shape = (spec.channels, spec.size, spec.size)
        return FakeImages(2 * cfg.train.batch_size, shape, 10, seed=1), FakeImages(64, shape, 10, seed=2), spec
    root = d.root or None
    options = dataset_options(d)
    train = load_dataset(d.dataset, split=d.train_split, root=root, download=d.download, **options)
    test = load_dataset(d.dataset, split=d.test_split, root=root, download=d.download, **options)
    return training_set(train, cfg, class_profile=class_profile), test, spec


def training_set(split: Any, cfg: Any, *, class_profile: bool = True) -> Any:
    """The images a run trains on from its training split: ``data.train_subset`` (a seeded subset), then
    ``data.class_profile`` (unless ``class_profile=False``)."""
    d = cfg.data
    if d.train_subset and d.train_subset < len(split):
        split = split.subset(permutation(len(split), cfg.train.seed + TRAIN_SUBSET)[: d.train_subset].sort().values)
    return class_profiled(split, d, seed=cfg.train.seed) if class_profile else split


class EpochBatches(torch.utils.data.Dataset):
    """Item ``k``: this rank's slice of global batch ``start + k`` of an epoch's order, decoded.

    Returns ``(indices (Bl,), images, labels (Bl,))``: images ``(Bl, C, H, W)`` uint8, or with ``crops=(spec,
    V, seed, epoch)`` (file-backed datasets) the global views' random resized crops of the full images, ``(V, Bl,
    C, s, s)`` uint8 (protoclr.views.crop_views). Wrapped in a DataLoader with ``batch_size=None`` so that the
    decoding and cropping run ahead in ``data.num_workers`` processes.
    """

    def __init__(self, data: Any, order: torch.Tensor, *, batch_size: int, rank: int, world_size: int, start: int,
                 stop: int | None = None, crops: tuple[Any, int, int, int] | None = None):
        self.data, self.order, self.start, self.crops = data, order, start, crops
        self.B, self.Bl, self.rank = batch_size, batch_size // world_size, rank
        self.stop = len(order) // batch_size if stop is None else stop  # the incomplete last batch is dropped

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int):
        s = self.start + k
        idx = self.order[s * self.B : (s + 1) * self.B][self.rank * self.Bl : (self.rank + 1) * self.Bl]  # (Bl,)
        if self.crops is None:
            return idx, self.data.get_images(idx), self.data.labels[idx]
        spec, num_views, seed, epoch = self.crops
        return idx, crop_views(self.data, idx.tolist(), spec, num_views=num_views, seed=seed, epoch=epoch), \
            self.data.labels[idx]


def epoch_batches(data: Any, *, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1,
                  start: int = 0, stop: int | None = None, num_workers: int = 0, pin_memory: bool = False,
                  crops: tuple[Any, int] | None = None):
    """A DataLoader over :class:`EpochBatches` of ``epoch``'s order: this rank's slices of global batches
    ``start .. stop - 1``, decoded ahead in ``num_workers`` processes; ``crops=(spec, V)`` crops the global views
    from the full images there (file-backed datasets)."""
    batches = EpochBatches(data, epoch_order(len(data), seed=seed, epoch=epoch), batch_size=batch_size, rank=rank,
                           world_size=world_size, start=start, stop=stop,
                           crops=(*crops, seed, epoch) if crops is not None else None)
    # without a generator, iterating the loader draws its base seed from the global RNG (after a resume has
    # restored it: the resumed run would be one draw ahead of the uninterrupted one)
    generator = torch.Generator().manual_seed((seed + LOADER) * 1_000_003 + epoch)
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                       generator=generator)


__all__ = [
    "CLASS_PROFILE",
    "EVAL_FIT",
    "HELD_OUT",
    "KNN_BANK",
    "LOADER",
    "PROBE_FIT",
    "TRAIN_SUBSET",
    "EpochBatches",
    "FakeImages",
    "balanced_draw",
    "class_groups",
    "class_profiled",
    "dataset_options",
    "draw",
    "draw_indices",
    "epoch_batches",
    "epoch_order",
    "held_out",
    "load_data",
    "longtail",
    "longtail_counts",
    "permutation",
    "probe_fit_set",
    "training_set",
    "uniform_subset",
]
