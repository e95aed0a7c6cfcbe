"""Datasets by name: the loaders, the image-folder decode cache, the ``LabeledImages`` type.

Every dataset is a ``LabeledImages``: uint8 images ``(N, C, H, W)`` (held in memory, or decoded from files on
demand), int64 labels ``(N,)`` and class names. Views and normalisation live in ``protoclr.views``.

    train = load_dataset("cifar10_zip", split="train")             # ../shared/datasets/cifar10-jpeg/train.zip
    train = load_dataset("fashion_mnist")                           # Debian package dataset-fashion-mnist
    train = load_dataset("cifar10", root="data", download=True)     # torchvision's pickled batches

Long-tailed and uniform subsets (seeded choices of images) are protoclr.splits'.

Decoded archives and folders are cached as ``.pt`` files under ``$PROTOCLR_CACHE`` (default
``~/.cache/protoclr``), keyed by the source's path, size and modification time, so the JPEG decode runs once.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import threading
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from protoclr import atomic
from protoclr.errors import DataError, DatasetNotFound, UnknownChoice

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_REPO = Path(__file__).resolve().parents[2]
_DECODE_CHUNK = 4096  # files read before a parallel decode; bounds the memory of raw bytes held at once
# How a user points at a dataset or asks for its download, in every message that says so.
_ROOT = "root= (config: data.root; CLI: --root)"
_DOWNLOAD = "download=True (config: data.download=true; CLI: --download)"
_SHOW_BAD = 20  # bad files listed in an error message before "... and N more"
_SKIP_BAD = "on_bad='skip' (config: data.on_bad=skip; CLI: --skip-bad)"
ON_BAD = ("error", "skip")  # what a bad image file does: stop the run with the list, or leave it out and list it
# Datasets read from image files, whose loaders take on_bad (the others are decoded arrays: no file can be bad).
FILE_DATASETS = ("image_folder", "cifar10_zip", "imagenet_lt")


def default_data_root() -> Path:
    """Where downloads go when no root is given: ``$PROTOCLR_DATA`` or ``./data``."""
    return Path(os.environ.get("PROTOCLR_DATA", "data"))


def default_cache_dir() -> Path:
    """Where decoded image archives are cached: ``$PROTOCLR_CACHE`` or ``~/.cache/protoclr``."""
    return Path(os.environ.get("PROTOCLR_CACHE", Path.home() / ".cache" / "protoclr"))


# --------------------------------------------------------------------------------------------------------
# the dataset type


@dataclass(eq=False)
class LabeledImages:
    """Images with integer labels and class names.

    In-memory sets hold ``images`` ``(N, C, H, W)`` uint8 (on any device). File-backed sets (ImageNet-scale
    folders) hold ``files`` relative to ``source`` (a directory or a zip archive) and decode on demand;
    ``get_images`` then resizes the shorter side to ``image_size`` and center-crops a square.
    ``labels`` is ``(N,)`` int64, -1 for unlabeled images (STL-10 ``unlabeled``).
    """

    labels: Tensor
    classes: list[str]
    images: Tensor | None = None
    files: list[str] | None = None
    source: str | None = None
    image_size: int = 256
    channels: int = 3
    name: str = ""
    skipped: list[str] = field(default_factory=list)  # bad files left out by on_bad="skip", by path

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.labels.dim() != 1:
            raise ValueError(f"labels must be 1-D (N,), got shape {tuple(self.labels.shape)}.")
        n = self.labels.shape[0]
        if self.images is not None:
            if self.images.dim() != 4 or self.images.dtype != torch.uint8 or self.images.shape[0] != n:
                raise ValueError(
                    f"images must be uint8 (N={n}, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}."
                )
            self.channels = int(self.images.shape[1])
        elif self.files is None or self.source is None:
            raise ValueError("a LabeledImages needs either images (N, C, H, W) or files plus their source.")
        elif len(self.files) != n:
            raise ValueError(f"{len(self.files)} files but {n} labels; pass one label per file.")
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        self._zip_lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        kind = f"images={tuple(self.images.shape)}" if self.images is not None else f"files from {self.source}"
        return f"LabeledImages({self.name or 'unnamed'}, n={len(self)}, classes={len(self.classes)}, {kind})"

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the archive themselves
        state = self.__dict__.copy()
        state.update(_zip=None, _zip_pid=-1, _zip_lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._zip_lock = threading.Lock()

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def class_counts(self, num_classes: int | None = None) -> Tensor:
        """Images per class ``(C,)`` int64 (unlabeled images, label -1, are not counted)."""
        y = self.labels[self.labels >= 0]
        return torch.bincount(y, minlength=num_classes or len(self.classes))

    def path(self, i: int) -> str:
        """Where image ``i`` comes from, for messages: ``archive.zip:member``, a file path, or ``name[i]``."""
        if self.files is None:
            return f"{self.name or 'images'}[{i}]"
        return _join_source(self.source, self.files[i])

    def get_images(self, indices: Tensor | Sequence[int]) -> Tensor:
        """Images ``(B, C, H, W)`` uint8 for ``indices`` ``(B,)``; on the device of ``images`` when in memory."""
        if self.images is not None:
            idx = torch.as_tensor(indices, dtype=torch.long, device=self.images.device)
            return self.images[idx]
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        out = torch.empty(len(idx), self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        for j, i in enumerate(idx):
            out[j] = resize_center_crop(self.load_image(i), self.image_size)
        return out

    def load_image(self, i: int) -> Tensor:
        """Image ``i`` at its native size, ``(C, H, W)`` uint8 on the CPU (in-memory: a view of ``images``)."""
        if self.images is not None:
            return self.images[i].cpu()
        data = self._read_bytes(self.files[i])
        return torch.from_numpy(decode_image_bytes(data, channels=self.channels, where=self.path(i)))

    def subset(self, indices: Tensor | Sequence[int]) -> LabeledImages:
        """The images at ``indices`` (in that order), as a new ``LabeledImages`` sharing no state."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise ValueError(f"subset indices must lie in [0, {len(self)}), got [{int(idx.min())}, {int(idx.max())}].")
        return LabeledImages(
            labels=self.labels[idx],
            classes=list(self.classes),
            images=None if self.images is None else self.images[idx.to(self.images.device)],
            files=None if self.files is None else [self.files[i] for i in idx.tolist()],
            source=self.source,
            image_size=self.image_size,
            channels=self.channels,
            name=self.name,
            skipped=list(self.skipped),
        )

    def to(self, device: str | torch.device) -> LabeledImages:
        """Move the image tensor to ``device`` (in-memory sets; CIFAR-scale data fits on the training device)."""
        if self.images is None:
            raise ValueError(f"{self!r} is file-backed; stream it with a DataLoader instead of moving it.")
        return replace(self, images=self.images.to(device))

    def _read_bytes(self, member: str) -> bytes:
        src = Path(self.source)
        if src.suffix.lower() != ".zip":
            return (src / member).read_bytes()
        with self._zip_lock:
            if self._zip is None or self._zip_pid != os.getpid():
                self._zip, self._zip_pid = zipfile.ZipFile(src), os.getpid()
            return self._zip.read(member)


def image_shape(dataset: Any, *, sample: int = 64) -> tuple[int, int]:
    """``(channels, side)`` of a dataset's typical image: 1 when its images are grey (a 3-channel image whose three
    channels are equal counts as grey: an image folder decodes to RGB), and the median shorter side, both from the
    first ``sample`` images (file-backed sets decode them at their native size)."""
    n = min(len(dataset), sample)
    if n == 0:
        raise DataError(f"{getattr(dataset, 'name', '') or 'the dataset'} holds no images")
    if getattr(dataset, "images", None) is not None:
        imgs = list(dataset.images[:n].cpu())  # [(C, H, W)]
    else:
        imgs = [dataset.load_image(i) for i in range(min(n, 16))]  # a few files: decoding is the slow part
    grey = all(x.shape[0] == 1 or bool((x[0] == x[1]).all() and (x[1] == x[2]).all()) for x in imgs)
    sides = sorted(min(int(x.shape[-2]), int(x.shape[-1])) for x in imgs)
    return (1 if grey else int(imgs[0].shape[0])), sides[len(sides) // 2]


def _join_source(source: str | None, member: str) -> str:
    if source is None:
        return member
    return f"{source}:{member}" if source.lower().endswith(".zip") else str(Path(source) / member)


# --------------------------------------------------------------------------------------------------------
# decoding


def decode_image_bytes(data: bytes, *, channels: int = 3, where: str = "image") -> np.ndarray:
    """Decode one encoded image to ``(C, H, W)`` uint8 with ``channels`` 3 (RGB) or 1 (gray).

    Modes are converted one way everywhere: alpha (RGBA, LA, palette with transparency) is composited over
    white, CMYK and palette go through PIL's RGB conversion, 16-bit gray keeps its high byte, and gray
    becomes RGB by repeating the channel. A truncated or undecodable file raises ``ValueError`` naming ``where``.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now so truncation surfaces here, not later
            arr = _to_mode(img, channels)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image {where}: {e}") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _to_mode(img: Image.Image, channels: int) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(img).astype(np.int64)
        a = (a >> 8) if a.max(initial=0) > 255 else a
        gray = a.clip(0, 255).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(img.convert("L" if channels == 1 else "RGB"))


def resize_center_crop(image: Tensor, size: int) -> Tensor:
    """Resize the shorter side of ``(C, H, W)`` uint8 to ``size`` (antialiased) and center-crop ``size x size``."""
    import torchvision.transforms.v2.functional as TF

    if image.shape[-2:] == (size, size):
        return image
    return TF.center_crop(TF.resize(image, [size], antialias=True), [size, size])


def _decode_all(
    read: Callable[[str], bytes],
    members: list[str],
    *,
    channels: int,
    image_size: int | None,
    where: Callable,
    keep_images: bool = True,
) -> tuple[list[Tensor | None], list[str]]:
    """Decode ``members`` with a thread pool (PIL releases the GIL); returns images (None if bad) and bad paths.

    keep_images=False only checks that each file decodes (good entries are empty tensors), for file-backed sets.
    """
    out: list[Tensor | None] = [None] * len(members)
    bad: list[str] = []

    def one(k: int, data: bytes) -> Tensor | str:
        try:
            img = torch.from_numpy(decode_image_bytes(data, channels=channels, where=where(members[k])))
        except ValueError as e:
            return str(e)
        if not keep_images:
            return torch.empty(0, dtype=torch.uint8)
        return resize_center_crop(img, image_size) if image_size else img

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(members), _DECODE_CHUNK):
            ks = range(start, min(start + _DECODE_CHUNK, len(members)))
            raw = []
            for k in ks:
                try:
                    raw.append(read(members[k]))
                except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:  # e.g. a bad CRC in the archive
                    raw.append(None)
                    out[k] = None
                    bad.append(f"cannot read image {where(members[k])}: {e}")
            results = pool.map(lambda kd: None if kd[1] is None else one(*kd), zip(ks, raw, strict=True))
            for k, res in zip(ks, results, strict=True):
                if isinstance(res, str):
                    bad.append(res)
                elif res is not None:
                    out[k] = res
    return out, bad


def _bad_files_error(bad: list[str], what: str) -> DataError:
    shown = "\n  ".join(bad[:_SHOW_BAD])
    more = f"\n  ... and {len(bad) - _SHOW_BAD} more" if len(bad) > _SHOW_BAD else ""
    return DataError(
        f"{len(bad)} bad image file(s) in {what}:\n  {shown}{more}\n"
        f"Replace or delete them, or pass {_SKIP_BAD} to leave them out and list them."
    )


# --------------------------------------------------------------------------------------------------------
# image folders (directory tree or zip archive)


def check_zip_member(name: str, *, archive: str | Path = "archive") -> None:
    """Refuse absolute, drive-letter or ``..`` member names (path traversal) with a ``ValueError``."""
    p = name.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":") or ".." in PurePosixPath(p).parts:
        raise DataError(
            f"unsafe member name {name!r} in zip archive {archive}: absolute paths and '..' components are "
            "refused (they could point outside the dataset); rebuild the archive with relative paths."
        )


def _folder_members(source: Path) -> list[str]:
    """Image files under ``source`` (directory or zip), relative POSIX paths, sorted."""
    if source.suffix.lower() == ".zip":
        with zipfile.ZipFile(source) as z:
            names = z.namelist()
        for n in names:
            check_zip_member(n, archive=source)
        files = [n for n in names if not n.endswith("/")]
    else:
        files = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
    return sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(f))


def _hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


def _classes_from_members(files: list[str], source: Path) -> tuple[list[str], list[int], str]:
    """Class = first directory below the root; a zip whose members all sit in one top folder is entered."""
    prefix = ""
    parts = [f.split("/") for f in files]
    tops = {p[0] for p in parts}
    if len(tops) == 1 and all(len(p) >= 3 for p in parts):
        prefix = next(iter(tops)) + "/"
    flat = [f for f, p in zip(files, parts, strict=True) if len(p) - bool(prefix) < 2]
    if flat:
        raise DataError(
            f"{source} has image files outside class folders (e.g. {flat[0]!r}); an image folder is laid out as "
            "<root>/<class>/<image>: move the images into one subfolder per class (one subfolder if unlabeled)."
        )
    class_of = [p[1] if prefix else p[0] for p in parts]
    classes = sorted(set(class_of))
    index = {c: i for i, c in enumerate(classes)}
    return classes, [index[c] for c in class_of], prefix


def _resolve_folder(root: str | Path | None, split: str) -> Path:
    if root is None:
        raise DatasetNotFound(
            "image_folder needs root=: a <root>/<class>/<image> directory, a zip archive with that layout, or a "
            f"folder holding {split}.zip or {split}/."
        )
    root = Path(root).expanduser()
    for cand in (root, root / f"{split}.zip", root / split):
        if cand.is_file() and cand.suffix.lower() == ".zip":
            return cand
    if (root / split).is_dir():
        return root / split
    if root.is_dir():
        return root
    raise DatasetNotFound(
        f"image folder not found: looked for {root} (a directory or .zip), {root / (split + '.zip')} and "
        f"{root / split}; pass {_ROOT} pointing at a <class>/<image> tree or a zip archive of one."
    )


def _cache_key(source: Path, **options: Any) -> str:
    st = source.stat()
    text = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sorted(options.items())}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_image_folder(
    root: str | Path | None = None,
    *,
    split: str = "train",
    channels: int = 3,
    image_size: int | None = None,
    in_memory: bool | None = None,
    on_bad: str = "error",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    max_memory_bytes: int = 4 * 2**30,
    name: str = "image_folder",
) -> LabeledImages:
    """A ``<root>/<class>/<image>`` tree, or the same layout inside a zip read in place (never extracted).

    In memory (the default when ``N * C * H * W`` of the first image is under ``max_memory_bytes``) every file
    is decoded once, with threads, and cached in ``cache_dir``; images of differing size need ``image_size``
    (shorter side resize + center crop). File-backed sets are checked the same way but only the bad-file
    list is kept. ``on_bad``: "error" stops with the list of bad files, "skip" leaves them out, warns with
    the count and records them in ``skipped``.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}.")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}.")
    source = _resolve_folder(root, split)
    cache = None
    if use_cache:
        key = _cache_key(source, channels=channels, image_size=image_size, in_memory=in_memory)
        cache = Path(cache_dir or default_cache_dir()) / f"{source.stem}-{key}.pt"
    if cache is not None and cache.is_file():  # same path, size and mtime: the listing and decode are reused
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        images, keep, bad = saved["images"], saved["keep"], saved["bad"]
        files, classes, labels = saved["files"], saved["classes"], saved["labels"]
        in_memory = images is not None
    else:
        files = _folder_members(source)
        if not files:
            raise DatasetNotFound(
                f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {source}; an image folder is laid out as "
                "<root>/<class>/<image>."
            )
        classes, label_list, _ = _classes_from_members(files, source)
        labels = torch.as_tensor(label_list, dtype=torch.int64)
        probe = LabeledImages(
            labels=torch.as_tensor(labels),
            classes=classes,
            files=files,
            source=str(source),
            channels=channels,
            name=name,
        )
        auto = in_memory is None
        if in_memory is None:
            try:
                c, h, w = probe.load_image(0).shape
                in_memory = len(files) * c * (image_size or h) * (image_size or w) <= max_memory_bytes
            except ValueError:
                in_memory = len(files) * channels * 64 * 64 <= max_memory_bytes
        decoded, bad = _decode_all(
            probe._read_bytes,
            files,
            channels=channels,
            image_size=image_size,
            keep_images=in_memory,
            where=lambda m: _join_source(str(source), m),
        )
        keep = torch.tensor([d is not None for d in decoded], dtype=torch.bool)
        images = None
        if in_memory:
            good = [d for d in decoded if d is not None]
            sizes = {tuple(d.shape) for d in good}
            if len(sizes) > 1 and auto:  # differing sizes (ImageNet-like): decode on demand instead
                in_memory, good = False, []
            elif len(sizes) > 1:
                raise DataError(
                    f"images in {source} differ in size ({len(sizes)} shapes, e.g. {sorted(sizes)[:3]}); pass "
                    "image_size=S to resize the shorter side and center-crop, or in_memory=False to decode on demand."
                )
        if in_memory:
            images = torch.stack(good) if good else torch.empty(0, channels, 1, 1, dtype=torch.uint8)
        del decoded
        if cache is not None:
            saved = {"images": images, "keep": keep, "bad": bad, "files": files, "classes": classes, "labels": labels}
            atomic.torch_save(saved, cache)
    if bad and on_bad == "error":
        raise _bad_files_error(bad, str(source))
    if bad:
        warnings.warn(f"skipped {len(bad)} bad image file(s) in {source} (see dataset.skipped)", stacklevel=2)
    idx = keep.nonzero().flatten()
    return LabeledImages(
        labels=torch.as_tensor(labels)[idx],
        classes=classes,
        images=images,
        files=None if in_memory else [files[i] for i in idx.tolist()],
        source=None if in_memory else str(source),
        image_size=image_size or 256,
        channels=channels,
        name=name,
        skipped=list(bad),
    )


def _shared_cifar10_jpeg(root: str | Path | None) -> Path:
    cands = [Path(root).expanduser()] if root is not None else []
    if os.environ.get("PROTOCLR_CIFAR10_JPEG"):
        cands.append(Path(os.environ["PROTOCLR_CIFAR10_JPEG"]))
    cands += [_REPO.parent / "shared/datasets/cifar10-jpeg", Path.cwd().parent / "shared/datasets/cifar10-jpeg"]
    for c in cands:
        if (c / "train.zip").is_file() or (c / "test.zip").is_file():
            return c
    raise DatasetNotFound(
        "cifar10_zip not found: looked for train.zip/test.zip in "
        + ", ".join(str(c) for c in cands)
        + f". Point {_ROOT} or $PROTOCLR_CIFAR10_JPEG at the folder holding the CIFAR-10 JPEG zips, "
        "or use dataset cifar10 with download=True."
    )


def load_cifar10_zip(
    *, split: str = "train", root: str | Path | None = None, download: bool = False, **kw: Any
) -> LabeledImages:
    """CIFAR-10 re-encoded as JPEG in ``train.zip``/``test.zip`` (found beside the repo or at ``root``)."""
    _check_split("cifar10_zip", split, ("train", "test"))
    return load_image_folder(_shared_cifar10_jpeg(root) / f"{split}.zip", split=split, name="cifar10_zip", **kw)


# --------------------------------------------------------------------------------------------------------
# torchvision formats


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise UnknownChoice(f"{name} has splits {', '.join(allowed)}; got split={split!r}.")


def _need(name: str, files: list[Path], how: str) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing:
        folder = missing[0].parent
        names = ", ".join(f.name if f.parent == folder else str(f) for f in missing)
        raise DatasetNotFound(f"{name} not found: {folder} lacks {names}. {how}")


def _torchvision_download(cls_name: str, root: Path, **kw: Any) -> None:
    import torchvision.datasets as tvd

    getattr(tvd, cls_name)(str(root), download=True, **kw)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_cifar(
    name: str, *, split: str = "train", root: str | Path | None = None, download: bool = False
) -> LabeledImages:
    """CIFAR-10/100 from torchvision's pickled batches under ``root`` (``cifar-10-batches-py`` etc.)."""
    _check_split(name, split, ("train", "test"))
    root = Path(root).expanduser() if root is not None else default_data_root()
    if name == "cifar10":
        base = root / "cifar-10-batches-py"
        parts = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta, label_key, names_key, tv = "batches.meta", "labels", "label_names", "CIFAR10"
    else:
        base = root / "cifar-100-python"
        parts = [split]
        meta, label_key, names_key, tv = "meta", "fine_labels", "fine_label_names", "CIFAR100"
    needed = [base / p for p in [*parts, meta]]
    if download and not all(p.is_file() for p in needed):
        _torchvision_download(tv, root)
    _need(name, needed, f"Pass {_DOWNLOAD} to fetch it into {root}, or root= where it lives.")
    xs, ys = [], []
    for p in parts:
        d = _unpickle(base / p)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(d[label_key])
    classes = list(_unpickle(base / meta)[names_key])
    return LabeledImages(
        labels=torch.as_tensor(ys), classes=classes, images=torch.from_numpy(np.concatenate(xs)), name=name
    )


def load_stl10(*, split: str = "train", root: str | Path | None = None, download: bool = False) -> LabeledImages:
    """STL-10 from torchvision's ``stl10_binary`` files; ``unlabeled`` images get label -1."""
    _check_split("stl10", split, ("train", "test", "unlabeled"))
    root = Path(root).expanduser() if root is not None else default_data_root()
    base = root / "stl10_binary"
    needed = [base / f"{split}_X.bin", base / "class_names.txt"]
    if split != "unlabeled":
        needed.append(base / f"{split}_y.bin")
    if download and not all(p.is_file() for p in needed):
        _torchvision_download("STL10", root, split=split)
    _need("stl10", needed, f"Pass {_DOWNLOAD} to fetch it into {root}, or root= where it lives.")
    x = np.fromfile(base / f"{split}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    if split == "unlabeled":
        y = np.full(x.shape[0], -1, dtype=np.int64)
    else:
        y = np.fromfile(base / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1  # stored 1..10
    classes = (base / "class_names.txt").read_text().split()
    return LabeledImages(
        labels=torch.from_numpy(y), classes=classes, images=torch.from_numpy(np.ascontiguousarray(x)), name="stl10"
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # type byte 0x08 = unsigned byte, low byte = number of dimensions
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x}).")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_files(split: str, data_root: Path) -> tuple[Path, Path] | None:
    """(images, labels) IDX files of ``split`` in ``data_root``, its torchvision layout, or the Debian package."""
    stem = "train" if split == "train" else "t10k"
    for d in (data_root, data_root / "FashionMNIST" / "raw", FASHION_MNIST_SYSTEM_DIR):
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            found += [p for p in (d / f"{stem}-{kind}-ubyte.gz", d / f"{stem}-{kind}-ubyte") if p.is_file()][:1]
        if len(found) == 2:
            return found[0], found[1]
    return None


def fetch_fashion_mnist(root: str | Path | None = None, *, log: Callable[[str], None] = print,
                        apt: bool = True) -> None:
    """Make Fashion-MNIST loadable: nothing when it is there; else, as root with apt-get, install the Debian package
    ``dataset-fashion-mnist``; else download it through torchvision into ``root`` (``./data``) with a progress bar.
    Raises :class:`~protoclr.errors.DatasetNotFound` with what to do when all of that fails (offline)."""
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    if all(_fashion_mnist_files(s, data_root) for s in ("train", "test")):
        return
    tried = []
    if apt and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log("Fashion-MNIST is not installed: installing the Debian package dataset-fashion-mnist (apt-get) ...")
        install = ["apt-get", "install", "-y", "-q", "dataset-fashion-mnist"]
        ok = subprocess.run(install, stdout=subprocess.DEVNULL).returncode == 0
        if not ok:  # a fresh machine's package lists may be empty
            ok = (subprocess.run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL).returncode == 0
                  and subprocess.run(install, stdout=subprocess.DEVNULL).returncode == 0)
        if all(_fashion_mnist_files(s, data_root) for s in ("train", "test")):
            return
        tried.append("apt-get install dataset-fashion-mnist failed")
    log(f"downloading Fashion-MNIST through torchvision into {data_root} ...")
    try:
        _torchvision_download("FashionMNIST", data_root)
    except Exception as e:  # offline, a proxy, a full disk: all end in the same advice
        tried.append(f"the download failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if all(_fashion_mnist_files(s, data_root) for s in ("train", "test")):
        return
    raise DatasetNotFound(
        f"Fashion-MNIST is not installed and could not be fetched: {'; '.join(tried)}. Install the Debian package "
        f"(sudo apt-get install dataset-fashion-mnist), or copy train-images-idx3-ubyte.gz, "
        f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into {data_root}."
    )


def load_fashion_mnist(
    *, split: str = "train", root: str | Path | None = None, download: bool = False
) -> LabeledImages:
    """Fashion-MNIST ``(N, 1, 28, 28)``: from ``root``, the Debian package, or ``./data``; ``download`` fetches it
    when missing (:func:`fetch_fashion_mnist`: the Debian package as root, else torchvision)."""
    _check_split("fashion_mnist", split, ("train", "test"))
    data_root = Path(root).expanduser() if root is not None else default_data_root()
    files = _fashion_mnist_files(split, data_root)
    if files is None and download:
        fetch_fashion_mnist(data_root)
        files = _fashion_mnist_files(split, data_root)
    if files is None:
        raise DatasetNotFound(
            f"fashion_mnist not found in {data_root}, {data_root / 'FashionMNIST' / 'raw'} or "
            f"{FASHION_MNIST_SYSTEM_DIR}. Install the Debian package dataset-fashion-mnist (apt-get install "
            f"dataset-fashion-mnist), or pass {_DOWNLOAD} to fetch it into {data_root}."
        )
    x, y = _read_idx(files[0]), _read_idx(files[1])
    return LabeledImages(labels=torch.from_numpy(y.astype(np.int64)), classes=list(FASHION_MNIST_CLASSES),
                         images=torch.from_numpy(x.copy()).unsqueeze(1), name="fashion_mnist")


def load_imagenet_lt(
    *,
    split: str = "train",
    root: str | Path | None = None,
    download: bool = False,
    lists: str | Path | None = None,
    image_size: int = 256,
    on_bad: str = "error",
    check: bool = True,
) -> LabeledImages:
    """ImageNet-LT (Liu et al. 2019): ``ImageNet_LT_{split}.txt`` lines ``path label`` over an ImageNet folder.

    File-backed (decoded on demand, shorter side resized to ``image_size`` by ``get_images``). Class names
    are the WordNet ids of the folders. ``check`` decodes every listed file first so bad ones stop the run
    before training (or are skipped with ``on_bad="skip"``).
    """
    _check_split("imagenet_lt", split, ("train", "val", "test"))
    if root is None:
        raise DatasetNotFound(f"imagenet_lt needs {_ROOT}: the ImageNet folder holding train/ and val/.")
    root = Path(root).expanduser()
    list_file = Path(lists).expanduser() if lists is not None else root
    if list_file.is_dir():
        list_file = list_file / f"ImageNet_LT_{split}.txt"
    how = (
        "ImageNet cannot be downloaded automatically: get it from image-net.org and the ImageNet-LT lists from "
        "https://github.com/zhmiao/OpenLongTailRecognition-OLTR, then pass root= and lists=."
    )
    _need("imagenet_lt split list", [list_file], how)
    files, labels = [], []
    for ln, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{list_file}:{ln}: expected 'path label', got {line!r}.")
        check_zip_member(parts[0], archive=list_file)
        files.append(parts[0])
        labels.append(int(parts[1]))
    num = max(labels) + 1
    classes = [""] * num
    for f, y in zip(files, labels, strict=True):
        classes[y] = classes[y] or PurePosixPath(f).parent.name
    missing = [f for f in files[:1000] if not (root / f).is_file()]
    if missing:
        raise DatasetNotFound(
            f"imagenet_lt: {len(missing)} listed images missing under {root}, e.g. {root / missing[0]}. {how}"
        )
    ds = LabeledImages(
        labels=torch.as_tensor(labels),
        classes=classes,
        files=files,
        source=str(root),
        image_size=image_size,
        name="imagenet_lt",
    )
    if check:
        ds = verify_files(ds, on_bad=on_bad)
    return ds


def verify_files(dataset: LabeledImages, *, on_bad: str = "error") -> LabeledImages:
    """Decode every file of a file-backed set; stop with the bad list, or (``on_bad="skip"``) drop and warn."""
    if dataset.files is None:
        return dataset
    decoded, bad = _decode_all(
        dataset._read_bytes,
        dataset.files,
        channels=dataset.channels,
        image_size=None,
        keep_images=False,
        where=lambda m: _join_source(dataset.source, m),
    )
    if not bad:
        return dataset
    if on_bad == "error":
        raise _bad_files_error(bad, dataset.source or dataset.name)
    warnings.warn(f"skipped {len(bad)} bad image file(s) in {dataset.source}", stacklevel=2)
    keep = [i for i, d in enumerate(decoded) if d is not None]
    out = dataset.subset(keep)
    out.skipped = list(bad)
    return out


# --------------------------------------------------------------------------------------------------------
# the name table


def _image_folder(
    *, split: str = "train", root: str | Path | None = None, download: bool = False, **kw: Any
) -> LabeledImages:
    if download:
        raise ValueError("image_folder cannot be downloaded; pass root= pointing at the folder or zip archive.")
    return load_image_folder(root, split=split, **kw)


# data.dataset (and model.backbone) in a run's saved config when the dataset (backbone) was an object passed to
# protoclr.train.pretrain from Python (protoclr.custom): no command can rebuild it
PYTHON = "python"

DATASETS: dict[str, Callable[..., LabeledImages]] = {
    "cifar10": lambda **kw: load_cifar("cifar10", **kw),
    "cifar100": lambda **kw: load_cifar("cifar100", **kw),
    "stl10": load_stl10,
    "fashion_mnist": load_fashion_mnist,
    "image_folder": _image_folder,
    "cifar10_zip": load_cifar10_zip,
    "imagenet_lt": load_imagenet_lt,
}


def same_images(name: str, *, root: str | Path | None, split_a: str, split_b: str) -> bool:
    """Whether splits ``split_a`` and ``split_b`` of dataset ``name`` hold the same images: the same split, or an
    image folder where one split falls back to ``root`` itself, which holds the other (a folder of class folders
    only, or one with ``train/`` and no ``test/``). Reads no image."""
    if split_a == split_b:
        return True
    if name != "image_folder" or root is None:
        return False
    try:
        a, b = _resolve_folder(root, split_a).resolve(), _resolve_folder(root, split_b).resolve()
    except DatasetNotFound:
        return False
    return a == b or a in b.parents or b in a.parents


def check_exists(name: str, *, root: str | Path | None, split: str = "train") -> None:
    """Raise :class:`DatasetNotFound` when ``root`` (given) does not exist, or an image folder's split is not
    there; reads no image (``--dry-run`` trains on fake data but checks where the real data would come from)."""
    if name == "image_folder":
        _resolve_folder(root, split)
    elif root is not None and not Path(root).expanduser().exists():
        raise DatasetNotFound(f"{root} does not exist; point {_ROOT} at the folder holding {name}")


def load_dataset(
    name: str, *, split: str = "train", root: str | Path | None = None, download: bool = False, **options: Any
) -> LabeledImages:
    """Load dataset ``name`` (a key of ``DATASETS``); ``options`` go to its loader (e.g. ``on_bad="skip"``)."""
    if name == PYTHON:
        raise DataError("data.dataset=python: the run's images were a dataset passed to protoclr.train.pretrain(cfg, "
                        "dataset=...) from Python; a command cannot reload them: evaluate from Python "
                        "(protoclr.measure.evaluate_backbone) or set data.dataset to a named dataset")
    if name not in DATASETS:
        raise UnknownChoice(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    return DATASETS[name](split=split, root=root, download=download, **options)
