"""Datasets by name (each loader on tiny files in its real on-disk format), subsets, bad input, the shared copies."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protoclr import data
from protoclr.data import DATASETS, LabeledImages, decode_image_bytes, load_dataset
from protoclr.splits import class_groups, longtail, longtail_counts, uniform_subset

RNG = np.random.default_rng(0)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _tree(root: Path, per_class: dict[str, int], size: int = 8) -> Path:
    for c, n in per_class.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i:03d}.png").write_bytes(_png(RNG.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return root


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, blob in members.items():
            z.writestr(name, blob)
    return path


# --------------------------------------------------------------------------------------------------------
# one builder per DATASETS entry, writing that loader's exact on-disk format; returns (root, n, classes, C, H)


def _make_cifar10(root: Path) -> tuple[Path, int, int, int, int]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i in range(1, 6):
        x = RNG.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(base / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": x, "labels": [i % 10, 1, 2, 3], "batch_label": b"x"}, f)
    with open(base / "test_batch", "wb") as f:
        pickle.dump({"data": RNG.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [0, 1, 2]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root, 20, 10, 3, 32


def _make_cifar100(root: Path) -> tuple[Path, int, int, int, int]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, n in (("train", 6), ("test", 2)):
        with open(base / split, "wb") as f:
            pickle.dump(
                {
                    "data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": list(range(n)),
                    "coarse_labels": [0] * n,
                },
                f,
            )
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["a"] * 20}, f)
    return root, 6, 100, 3, 32


def _make_stl10(root: Path) -> tuple[Path, int, int, int, int]:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    x = RNG.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    (base / "train_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # stored column-major
    (base / "train_y.bin").write_bytes(bytes([1, 5, 10]))
    (base / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)) + "\n")
    np.save(root / "expected.npy", x)
    return root, 3, 10, 3, 96


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(head + arr.tobytes())


def _make_fashion_mnist(root: Path) -> tuple[Path, int, int, int, int]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-images-idx3-ubyte.gz").write_bytes(_idx(RNG.integers(0, 256, (5, 28, 28), dtype=np.uint8)))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(_idx(np.array([0, 1, 2, 9, 3], dtype=np.uint8)))
    return root, 5, 10, 1, 28


def _make_image_folder(root: Path) -> tuple[Path, int, int, int, int]:
    return _tree(root / "train", {"cat": 2, "dog": 3}), 5, 2, 3, 8


def _make_cifar10_zip(root: Path) -> tuple[Path, int, int, int, int]:
    root.mkdir(parents=True, exist_ok=True)
    members = {
        f"train/{c}/{i:04d}.jpg": _jpeg(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        for c in ("airplane", "bird")
        for i in range(3)
    }
    _zip(root / "train.zip", members)
    return root, 6, 2, 3, 32


def _make_imagenet_lt(root: Path) -> tuple[Path, int, int, int, int]:
    lines = []
    for y, wnid in enumerate(["n01", "n02"]):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(2 + y):
            arr = RNG.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)  # varying sizes, as in ImageNet
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(arr))
            lines.append(f"train/{wnid}/{wnid}_{i}.JPEG {y}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(lines) + "\n")
    return root, 5, 2, 3, 256


BUILDERS = {
    "cifar10": _make_cifar10,
    "cifar100": _make_cifar100,
    "stl10": _make_stl10,
    "fashion_mnist": _make_fashion_mnist,
    "image_folder": _make_image_folder,
    "cifar10_zip": _make_cifar10_zip,
    "imagenet_lt": _make_imagenet_lt,
}


def test_every_dataset_has_a_format_test():
    assert set(BUILDERS) == set(DATASETS)


@pytest.mark.parametrize("name", list(DATASETS))
def test_loader_contract(name, tmp_path):
    root, n, num_classes, C, H = BUILDERS[name](tmp_path / name)
    ds = load_dataset(
        name,
        split="train",
        root=root,
        **({"cache_dir": tmp_path / "cache"} if "zip" in name or name == "image_folder" else {}),
    )
    assert isinstance(ds, LabeledImages) and len(ds) == n
    assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,)
    assert len(ds.classes) == num_classes and int(ds.labels.max()) < num_classes and int(ds.labels.min()) >= 0
    x = ds.get_images(torch.tensor([0, n - 1]))
    assert x.dtype == torch.uint8 and x.shape == (2, C, H, H)
    sub = ds.subset([n - 1, 0])
    assert (
        len(sub) == 2
        and torch.equal(sub.get_images([0, 1]), x.flip(0))
        and torch.equal(sub.labels, ds.labels[[n - 1, 0]])
    )
    if ds.in_memory:
        assert ds.images.shape == (n, C, H, H)


def test_stl10_orientation_and_labels(tmp_path):
    root, *_ = _make_stl10(tmp_path)
    ds = load_dataset("stl10", root=root)
    assert torch.equal(ds.images, torch.from_numpy(np.load(root / "expected.npy")))
    assert ds.labels.tolist() == [0, 4, 9]  # stored 1..10


def test_cifar10_pickles_keep_order(tmp_path):
    root, *_ = _make_cifar10(tmp_path)
    ds = load_dataset("cifar10", root=root)
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        b2 = pickle.load(f)
    assert torch.equal(ds.images[4:8], torch.from_numpy(b2["data"]).reshape(4, 3, 32, 32))
    assert ds.labels[4:8].tolist() == b2["labels"]
    assert len(load_dataset("cifar10", split="test", root=root)) == 3


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("cifar10", "download=True"),
        ("cifar100", "download=True"),
        ("stl10", "download=True"),
        ("image_folder", "root="),
        ("imagenet_lt", "image-net.org"),
    ],
)
def test_missing_dataset_says_where_and_how(name, hint, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    kwargs = {"root": root / "nowhere"} if name == "image_folder" else {"root": root}
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(name, **kwargs)
    msg = str(e.value)
    assert hint in msg and str(root) in msg


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system")
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion_mnist", root=tmp_path)
    msg = str(e.value)
    assert "dataset-fashion-mnist" in msg and "download=True" in msg and str(tmp_path) in msg


def test_missing_cifar10_zip_says_where(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_REPO", tmp_path / "repo")
    monkeypatch.delenv("PROTOCLR_CIFAR10_JPEG", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="PROTOCLR_CIFAR10_JPEG"):
        load_dataset("cifar10_zip")


def test_unknown_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar11")
    with pytest.raises(ValueError, match="splits"):
        load_dataset("fashion_mnist", split="val")


def test_fashion_mnist_debian_package(fashion_mnist_dir, tmp_path):
    train = load_dataset("fashion_mnist", root=tmp_path)  # nothing in root: found in the package
    test = load_dataset("fashion_mnist", split="test", root=tmp_path)
    assert train.images.shape == (60000, 1, 28, 28) and len(test) == 10000
    assert train.class_counts().tolist() == [6000] * 10 and train.classes[9] == "Ankle boot"


# --------------------------------------------------------------------------------------------------------
# the shared CIFAR-10 JPEG copy (decoded once per session, into a fresh cache)


@pytest.fixture(scope="module")
def cifar_zip(cifar10_jpeg_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {
        s: load_dataset("cifar10_zip", split=s, root=cifar10_jpeg_dir, cache_dir=cache) for s in ("train", "test")
    }, cache


@pytest.mark.slow
def test_cifar10_zip_reads_the_shared_copy(cifar_zip, cifar10_jpeg_dir):
    sets, cache = cifar_zip
    train, test = sets["train"], sets["test"]
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert len(train.classes) == 10 and train.classes[0] == "airplane" and train.classes[-1] == "truck"
    assert train.class_counts().tolist() == [5000] * 10 and test.class_counts().tolist() == [1000] * 10
    with zipfile.ZipFile(cifar10_jpeg_dir / "test.zip") as z:  # spot-check one decode against PIL
        first = np.asarray(Image.open(io.BytesIO(z.read("test/airplane/0000.jpg"))).convert("RGB"))
    assert torch.equal(test.images[0], torch.from_numpy(first.copy()).permute(2, 0, 1))
    again = load_dataset("cifar10_zip", split="test", root=cifar10_jpeg_dir, cache_dir=cache)  # cache hit
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


@pytest.mark.slow
def test_cifar10_zip_longtail_budget(cifar_zip):
    train = cifar_zip[0]["train"]
    lt = longtail(train, profile="exp", imbalance_ratio=100)
    assert lt.class_counts().tolist() == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # Cao et al. 2019
    uni = uniform_subset(train, total=len(lt))
    assert len(uni) == len(lt) == 12406


# --------------------------------------------------------------------------------------------------------
# long tail, uniform subset, class groups


def _toy(per_class: list[int]) -> LabeledImages:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
    images = (
        torch.arange(len(labels), dtype=torch.int64)
        .remainder(256)
        .to(torch.uint8)
        .view(-1, 1, 1, 1)
        .expand(-1, 1, 2, 2)
    )
    return LabeledImages(labels=labels, classes=[f"c{c}" for c in range(len(per_class))], images=images.contiguous())


@pytest.mark.parametrize("profile", ["exp", "pareto"])
def test_longtail_counts_follow_the_profile(profile):
    ds = _toy([300] * 7)
    lt = longtail(ds, profile=profile, imbalance_ratio=50, seed=3)
    counts = lt.class_counts().tolist()
    if profile == "exp":
        expected = [int(np.floor(300 * 50 ** (-c / 6) + 1e-9)) for c in range(7)]
    else:
        k = (50 ** (1 / 6) - 1) / 6
        expected = [int(np.floor(300 * (1 + k * c) ** -6 + 1e-9)) for c in range(7)]
    assert counts == expected == longtail_counts(300, 7, profile=profile, imbalance_ratio=50)
    assert counts[0] == 300 and counts[-1] == 6  # head and tail hit the ratio exactly
    assert counts == sorted(counts, reverse=True)


def test_longtail_reproducible_from_seed():
    ds = _toy([100] * 5)
    a, b = longtail(ds, seed=1), longtail(ds, seed=1)
    c = longtail(ds, seed=2)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images) and torch.equal(a.class_counts(), c.class_counts())
    r1, r2 = longtail(ds, seed=1, class_order="random"), longtail(ds, seed=1, class_order="random")
    assert torch.equal(r1.class_counts(), r2.class_counts())
    assert sorted(r1.class_counts().tolist()) == sorted(a.class_counts().tolist())


def test_longtail_bad_arguments():
    ds = _toy([10, 10])
    with pytest.raises(ValueError, match="profile"):
        longtail(ds, profile="zipf")
    with pytest.raises(ValueError, match="imbalance_ratio"):
        longtail(ds, imbalance_ratio=0.5)
    with pytest.raises(ValueError, match="max_count"):
        longtail(ds, max_count=11)


def test_uniform_subset_matches_total_and_balance():
    ds = _toy([50, 60, 70, 80])
    lt = longtail(ds, imbalance_ratio=10)
    uni = uniform_subset(ds, total=len(lt), seed=0)
    counts = uni.class_counts()
    assert len(uni) == len(lt) and int(counts.max() - counts.min()) <= 1
    assert torch.equal(uniform_subset(ds, total=len(lt), seed=0).images, uni.images)
    with pytest.raises(ValueError, match="lower total"):
        uniform_subset(ds, total=250)


def test_class_groups_thresholds():
    groups = class_groups(torch.tensor([500, 101, 100, 20, 19, 0]))
    assert groups["many"].tolist() == [0, 1]
    assert groups["medium"].tolist() == [2, 3]
    assert groups["few"].tolist() == [4, 5]
    assert class_groups(_toy([150, 50, 5]))["few"].tolist() == [2]


# --------------------------------------------------------------------------------------------------------
# bad input


def test_bad_files_stop_with_their_paths_or_are_skipped(tmp_path):
    root = _tree(tmp_path / "set", {"a": 3, "b": 2})
    good = (root / "a" / "000.png").read_bytes()
    (root / "a" / "broken.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "b" / "noise.jpg").write_bytes(b"\x00not an image at all")
    with pytest.raises(ValueError) as e:
        load_dataset("image_folder", root=root, use_cache=False)
    msg = str(e.value)
    assert "2 bad image file(s)" in msg and "broken.png" in msg and "noise.jpg" in msg and "on_bad='skip'" in msg
    with pytest.warns(UserWarning, match="skipped 2 bad"):
        ds = load_dataset("image_folder", root=root, on_bad="skip", use_cache=False)
    assert len(ds) == 5 and len(ds.skipped) == 2 and ds.class_counts().tolist() == [3, 2]


def test_bad_files_in_file_backed_set(tmp_path):
    root = _tree(tmp_path / "set", {"a": 2, "b": 2})
    (root / "b" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_dataset("image_folder", root=root, in_memory=False, use_cache=False)
    with pytest.warns(UserWarning):
        ds = load_dataset("image_folder", root=root, in_memory=False, image_size=8, on_bad="skip", use_cache=False)
    assert len(ds) == 4 and not ds.in_memory and ds.get_images([3]).shape == (1, 3, 8, 8)


@pytest.mark.parametrize("member", ["../evil/x.png", "/abs/cls/x.png", "train/cls/../../x.png", "C:/cls/x.png"])
def test_zip_path_traversal_is_refused(tmp_path, member):
    png = _png(np.zeros((4, 4, 3), np.uint8))
    z = _zip(tmp_path / "evil.zip", {"train/cls/ok.png": png, member: png})
    with pytest.raises(ValueError, match="unsafe member name"):
        load_dataset("image_folder", root=z, use_cache=False)


def test_zip_cache_is_keyed_by_size_and_mtime(tmp_path):
    png = _png(np.full((4, 4, 3), 7, np.uint8))
    z = _zip(tmp_path / "set.zip", {"a/0.png": png, "b/0.png": png})
    cache = tmp_path / "cache"
    first = load_dataset("image_folder", root=z, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1
    assert torch.equal(load_dataset("image_folder", root=z, cache_dir=cache).images, first.images)
    _zip(z, {"a/0.png": png, "b/0.png": png, "b/1.png": _png(np.full((4, 4, 3), 9, np.uint8))})
    os.utime(z, ns=(1, 2_000_000_000_000_000_000))
    changed = load_dataset("image_folder", root=z, cache_dir=cache)
    assert len(changed) == 3 and len(list(cache.glob("*.pt"))) == 2


def test_mixed_sizes_need_image_size(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "0.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "a" / "1.png").write_bytes(_png(np.zeros((8, 12, 3), np.uint8)))
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("image_folder", root=tmp_path, in_memory=True, use_cache=False)
    auto = load_dataset("image_folder", root=tmp_path, use_cache=False)  # decodes on demand instead
    assert not auto.in_memory and auto.get_images([0, 1]).shape == (2, 3, 256, 256)
    ds = load_dataset("image_folder", root=tmp_path, image_size=6, use_cache=False)
    assert ds.images.shape == (2, 3, 6, 6)


def test_files_outside_class_folders_are_refused(tmp_path):
    png = _png(np.zeros((4, 4, 3), np.uint8))
    z = _zip(tmp_path / "flat.zip", {"a.png": png, "cls/b.png": png})
    with pytest.raises(ValueError, match="<class>/<image>"):
        load_dataset("image_folder", root=z, use_cache=False)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_image_modes_convert_consistently():
    rgb = np.array([[[255, 0, 0], [0, 0, 255]]], np.uint8)  # (1, 2, 3)
    gray = Image.fromarray(np.array([[10, 200]], np.uint8), "L")
    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 0, 0]]], np.uint8), "RGBA")
    cmyk = Image.fromarray(rgb).convert("CMYK")
    pal = Image.fromarray(rgb).convert("P")
    g16 = Image.fromarray(np.array([[0x0A00, 0xC8FF]], np.uint16))
    out = {
        k: decode_image_bytes(_encode(im, f))
        for k, im, f in [
            ("gray", gray, "PNG"),
            ("rgba", rgba, "PNG"),
            ("cmyk", cmyk, "TIFF"),
            ("pal", pal, "PNG"),
            ("g16", g16, "PNG"),
        ]
    }
    for arr in out.values():
        assert arr.shape == (3, 1, 2) and arr.dtype == np.uint8
    assert out["gray"][:, 0, 1].tolist() == [200, 200, 200]
    assert out["rgba"][:, 0, 0].tolist() == [255, 0, 0] and out["rgba"][:, 0, 1].tolist() == [255, 255, 255]
    assert out["cmyk"][:, 0, 0].tolist() == [255, 0, 0] and out["pal"][:, 0, 1].tolist() == [0, 0, 255]
    assert out["g16"][:, 0, 1].tolist() == [200, 200, 200]
    one = decode_image_bytes(_encode(Image.fromarray(rgb), "PNG"), channels=1)
    assert one.shape == (1, 1, 2) and one[0, 0, 0] == 76  # luma of pure red


def test_truncated_jpeg_is_an_error_naming_the_file():
    blob = _jpeg(RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"cannot decode image set/x\.jpg"):
        decode_image_bytes(blob[: len(blob) // 3], where="set/x.jpg")


def test_imagenet_lt_bad_file_and_list_errors(tmp_path):
    root, *_ = _make_imagenet_lt(tmp_path)
    (root / "train" / "n02" / "n02_1.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="n02_1"):
        load_dataset("imagenet_lt", root=root)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = load_dataset("imagenet_lt", root=root, on_bad="skip")
    assert len(ds) == 4 and ds.classes == ["n01", "n02"] and len(ds.skipped) == 1
    (root / "ImageNet_LT_val.txt").write_text("train/n01/n01_0.JPEG\n")
    with pytest.raises(ValueError, match="expected 'path label'"):
        load_dataset("imagenet_lt", split="val", root=root)


def test_to_device_keeps_labels_and_refuses_file_backed(tmp_path):
    ds = _toy([3, 2])
    moved = ds.to("cpu")
    assert torch.equal(moved.images, ds.images) and torch.equal(moved.labels, ds.labels) and moved is not ds
    files = load_dataset("image_folder", root=_tree(tmp_path, {"a": 2}), in_memory=False, use_cache=False)
    with pytest.raises(ValueError, match="DataLoader"):
        files.to("cpu")


def test_datasets_pickle_for_worker_processes(tmp_path):
    png = _png(np.full((4, 4, 3), 9, np.uint8))
    z = _zip(tmp_path / "set.zip", {"a/0.png": png, "b/0.png": png})
    files = load_dataset("image_folder", root=z, in_memory=False, image_size=4, use_cache=False)
    files.get_images([0])  # opens the archive in this process
    for ds in (files, _toy([2, 2])):
        clone = pickle.loads(pickle.dumps(ds))
        assert torch.equal(clone.get_images([0, 1]), ds.get_images([0, 1])) and torch.equal(clone.labels, ds.labels)


def _full_fashion_mnist(folder: Path) -> None:
    """The four IDX files (train and t10k) of a tiny Fashion-MNIST."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", 5), ("t10k", 3)):
        (folder / f"{stem}-images-idx3-ubyte.gz").write_bytes(_idx(RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)))
        (folder / f"{stem}-labels-idx1-ubyte.gz").write_bytes(_idx(np.arange(n, dtype=np.uint8)))


_FAKE_APT = """#!/bin/sh
echo "$@" >> "$APT_LOG"
if [ "$1" = install ] && [ -n "$APT_WORKS" ]; then
    if [ -n "$APT_NEEDS_UPDATE" ] && [ ! -e "$APT_LOG.updated" ]; then exit 100; fi
    mkdir -p "$(dirname "$APT_DIR")" && cp -r "$APT_SRC" "$APT_DIR" && exit 0
fi
if [ "$1" = update ]; then touch "$APT_LOG.updated"; fi
exit 0
"""


@pytest.mark.parametrize("needs_update", [False, True])
def test_fetch_fashion_mnist_installs_the_debian_package_as_root(tmp_path, monkeypatch, needs_update):
    system = tmp_path / "usr-share" / "fashion-mnist"
    _full_fashion_mnist(tmp_path / "package-content")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(_FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("APT_LOG", str(tmp_path / "apt.log"))
    monkeypatch.setenv("APT_SRC", str(tmp_path / "package-content"))
    monkeypatch.setenv("APT_DIR", str(system))
    monkeypatch.setenv("APT_WORKS", "1")
    monkeypatch.setenv("APT_NEEDS_UPDATE", "1" if needs_update else "")
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", system)
    monkeypatch.setattr(data.os, "geteuid", lambda: 0)
    monkeypatch.setattr(data, "_torchvision_download", lambda *a, **k: pytest.fail("downloaded instead of apt"))
    said = []
    data.fetch_fashion_mnist(tmp_path / "data", log=said.append)
    calls = (tmp_path / "apt.log").read_text().splitlines()
    install = "install -y -q dataset-fashion-mnist"
    assert calls == ([install, "update -q", install] if needs_update else [install])
    assert "dataset-fashion-mnist" in said[0] and len(load_dataset("fashion_mnist", split="test", root=tmp_path)) == 3


def test_fetch_fashion_mnist_downloads_when_not_root_and_explains_when_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system")
    monkeypatch.setattr(data.os, "geteuid", lambda: 1000)
    got = []

    def download(cls, root, **kw):
        got.append((cls, root))
        _full_fashion_mnist(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(data, "_torchvision_download", download)
    said = []
    data.fetch_fashion_mnist(tmp_path / "data", log=said.append)
    assert got == [("FashionMNIST", tmp_path / "data")] and "downloading" in said[-1]
    assert load_dataset("fashion_mnist", root=tmp_path / "data").images.shape == (5, 1, 28, 28)

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(data, "_torchvision_download", offline)
    with pytest.raises(data.DatasetNotFound) as e:
        data.fetch_fashion_mnist(tmp_path / "elsewhere", log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and "the download failed (OSError" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "elsewhere") in msg


def test_same_images_knows_a_folder_without_a_test_split(tmp_path):
    flat = _tree(tmp_path / "flat", {"a": 1, "b": 1})  # class folders only: every split reads them
    assert data.same_images("image_folder", root=flat, split_a="train", split_b="test")
    only_train = _tree(tmp_path / "only_train" / "train", {"a": 1, "b": 1}).parent
    assert data.same_images("image_folder", root=only_train, split_a="train", split_b="test")
    both = tmp_path / "both"
    _tree(both / "train", {"a": 1, "b": 1})
    _tree(both / "test", {"a": 1, "b": 1})
    assert not data.same_images("image_folder", root=both, split_a="train", split_b="test")
    assert data.same_images("cifar10", root=None, split_a="train", split_b="train")
    assert not data.same_images("cifar10", root=None, split_a="train", split_b="test")
