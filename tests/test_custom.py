"""pretrain with a caller's own backbone, dataset and view function (protoclr.custom): the same run as the config's
when the objects are the config's, exact resume with fresh objects, batch-independent seeded views, every image
form a Dataset may return, and one-line errors for objects that cannot work."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision.transforms import v2

from protoclr import checkpoint as ckpt
from protoclr.config import load_config
from protoclr.custom import PYTHON, FunctionViews, as_images, backbone_width, view_seed
from protoclr.errors import ConfigError, DataError, UserError
from protoclr.runs import ResultsDB, load_run
from protoclr.splits import load_data
from protoclr.train import pretrain
from protoclr.views import config_view_spec

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.train_subset=256", "train.batch_size=64", "train.epochs=2", "model.projector_hidden_dim=64",
        "model.projector_dim=32", "eval.train_images=256", "eval.test_images=200", "trainer.progress=false",
        "train.log_every=1", "optim.warmup_epochs=0.5", "trainer.precision=32-true", "trainer.loggers=[]",
        "eval.diagnostics=false", "eval.linear=false"]


def tiny(out: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.out_dir={out}", *overrides])


class Items(torch.utils.data.Dataset):
    """A plain torch dataset of (image (C, H, W) uint8 tensor, int label) items, as a user writes one."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.classes = images, labels.tolist(), classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class Net(nn.Module):
    """(B, 1, H, W) -> (B, 16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())

    def forward(self, x):
        return self.net(x)


def _view(spec):
    return v2.Compose([v2.RandomResizedCrop(spec.size, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory, fashion_mnist_dir):
    train, test, _ = load_data(tiny(tmp_path_factory.mktemp("x")))
    return train, test


def test_a_torch_dataset_of_the_configs_images_trains_the_configs_run(fmnist, tmp_path):
    """The config's Fashion-MNIST subset trains, and is measured, exactly as the same images passed as a plain
    Dataset of (tensor, int) items: decoding, order, labels and class count all carried over."""
    train, test = fmnist
    ref = pretrain(tiny(tmp_path, "train.run_name=ref", "train.steps=4"))
    own = pretrain(tiny(tmp_path, "train.run_name=own", "train.steps=4"),
                   dataset=Items(train.images, train.labels, train.classes),
                   test_dataset=Items(test.images, test.labels, test.classes))
    a, b = _weights(ref), _weights(own)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    db = ResultsDB(tmp_path / "runs.db")
    ea, eb = db.epochs("ref"), db.epochs("own")
    assert [e["knn_top1"] for e in ea] == [e["knn_top1"] for e in eb] and len(ea) == 2  # step 0 + 1 epoch
    saved = ckpt.load(own / "checkpoint.pt")
    assert saved["config"]["data"]["dataset"] == PYTHON and saved["config"]["model"]["backbone"] == "convnet"
    assert saved["python"] == {"dataset": "test_custom.Items", "test_dataset": "test_custom.Items"}
    # a command cannot reload a Dataset from Python: one line, status 2, naming the way out
    done = subprocess.run([sys.executable, "-m", "protoclr.cli", "evaluate", str(own), "--knn"], cwd=REPO,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO / "src"), "PATH": ""})
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "data.dataset=python" in done.stderr


def test_own_backbone_and_views_resume_bit_identical_with_fresh_objects(fmnist, tmp_path):
    """A run with a caller's backbone and view function, killed after 3 steps (train.max_steps) and resumed with
    newly built objects (other initial weights), ends with the weights of the uninterrupted run; load_run puts
    them in a module of the caller's class."""
    train, test = fmnist
    spec = config_view_spec(tiny(tmp_path).data)
    torch.manual_seed(1)
    net = Net()
    full = pretrain(tiny(tmp_path, "train.run_name=full"), backbone=net, dataset=train, test_dataset=test,
                    views=_view(spec))
    torch.manual_seed(1)
    part = pretrain(tiny(tmp_path, "train.run_name=part", "train.max_steps=3"), backbone=Net(), feature_dim=16,
                    dataset=train, test_dataset=test, views=_view(spec))
    assert ckpt.load(part / "checkpoint.pt")["step"] == 3
    # resuming without the view function it started with is refused, naming it
    with pytest.raises(ConfigError, match=r"views: torchvision\.transforms\.v2\._container\.Compose at the start, "
                                          r"none now"):
        pretrain(tiny(tmp_path, "train.run_name=part"), backbone=Net(), dataset=train, test_dataset=test)
    torch.manual_seed(99)  # the resumed run's module starts elsewhere: the checkpoint must overwrite it all
    pretrain(tiny(tmp_path, "train.run_name=part"), backbone=Net(), dataset=train, test_dataset=test,
             views=_view(spec))
    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    db = ResultsDB(tmp_path / "runs.db")
    assert db.epochs("full") == db.epochs("part")
    meta = json.loads((full / "meta.json").read_text())["python"]
    assert meta == {"backbone": "test_custom.Net", "dataset": "protoclr.data.LabeledImages",
                    "test_dataset": "protoclr.data.LabeledImages",
                    "views": "torchvision.transforms.v2._container.Compose"}
    encoder, cfg = load_run(full, backbone=Net())
    assert cfg.model.backbone == PYTHON and type(encoder.backbone) is Net and encoder.feature_dim == 16
    x = torch.randn(5, 1, 28, 28)
    net.eval().to(memory_format=torch.contiguous_format)  # the run trained it channels_last (trainer.channels_last)
    with torch.no_grad():
        assert torch.equal(encoder.backbone(x), net(x))  # the caller's own module object was trained in place
    with pytest.raises(UserError, match=r"trained with a backbone passed from Python \(test_custom\.Net\)"):
        load_run(full)


def test_function_views_are_seeded_per_image_and_view_and_leave_the_global_rng_alone():
    spec = config_view_spec(load_config(None).data)  # grey, 28 px
    fv = FunctionViews(_view(spec), spec, num_views=2)
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    torch.manual_seed(5)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    (full,) = fv.make(images, seed=0, epoch=1, indices=torch.tensor([7, 3, 9]))
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    (one,) = fv.make(images[1:2], seed=0, epoch=1, indices=torch.tensor([3]))  # image 3 alone, in another batch
    assert full.shape == (6, 1, 28, 28)
    assert torch.equal(one[0], full[1]) and torch.equal(one[1], full[4])  # rows v * B + b
    # each (view, epoch) is its own draw, reproduced from view_seed alone
    torch.manual_seed(view_seed(0, 1, 3, 1))
    random.seed(view_seed(0, 1, 3, 1))
    assert torch.equal(_view(spec)(images[1]), full[4])
    (other,) = fv.make(images[1:2], seed=0, epoch=2, indices=torch.tensor([3]))
    assert not torch.equal(other[0], one[0]) and not torch.equal(full[1], full[4])


def _pil(mode: str, arr: np.ndarray) -> Image.Image:
    return Image.fromarray(arr, mode=mode)


RGB = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)  # (H, W, C)
GREY = np.arange(30, dtype=np.uint8).reshape(5, 6)


@pytest.mark.parametrize("item,want", [
    (lambda: _pil("RGB", RGB), torch.from_numpy(RGB).permute(2, 0, 1)),
    (lambda: _pil("L", GREY), torch.from_numpy(GREY)[None]),
    (lambda: Image.fromarray(np.dstack([RGB, np.full((5, 6), 200, np.uint8)]), mode="RGBA"),
     torch.from_numpy(RGB).permute(2, 0, 1)),
    (lambda: RGB.copy(), torch.from_numpy(RGB).permute(2, 0, 1)),
    (lambda: torch.from_numpy(GREY), torch.from_numpy(GREY)[None]),
    (lambda: torch.from_numpy(RGB).permute(2, 0, 1).float() / 255, torch.from_numpy(RGB).permute(2, 0, 1)),
], ids=["pil-rgb", "pil-grey", "pil-rgba", "numpy-hwc", "tensor-hw", "float-chw"])
def test_every_image_form_becomes_the_same_uint8_tensor(item, want):
    got = as_images([(item(), 1), (item(), 0)])
    assert got.images.dtype == torch.uint8 and torch.equal(got.images[0], want) and got.labels.tolist() == [1, 0]
    assert got.classes == ["0", "1"]


def test_labels_classes_and_unlabeled_items():
    data = Items(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2, 2]), ["a", "b", "c"])
    assert as_images(data).classes == ["a", "b", "c"]  # the dataset's own names
    bare = as_images([torch.zeros(1, 4, 4, dtype=torch.uint8)] * 2)  # images alone: unlabeled
    assert bare.labels.tolist() == [-1, -1]


@pytest.mark.parametrize("items,match", [
    ([(torch.zeros(1, 4, 4, dtype=torch.uint8), 0), (torch.zeros(1, 5, 4, dtype=torch.uint8), 0)],
     r"dataset: item 1 is \(1, 5, 4\) but item 0 is \(1, 4, 4\)"),
    ([(torch.full((1, 4, 4), 2.0), 0)], r"item 0: a float image must lie in \[0, 1\].*drop the dataset's Normalize"),
    ([("a picture", 0)], r"item 0: an image must be a tensor, a PIL image or a numpy array, got str"),
    ([(torch.zeros(1, 4, 4, dtype=torch.uint8), -3)], r"item 0 has label -3"),
    ([], r"dataset holds no images"),
])
def test_a_dataset_that_cannot_be_images_is_one_line_naming_the_item(items, match):
    with pytest.raises(DataError, match=match):
        as_images(items)


def test_a_backbone_without_flat_features_or_with_another_width_is_refused():
    with pytest.raises(ConfigError, match=r"returns \(2, 8, 4, 4\) for a batch of 2.*nn\.Flatten"):
        backbone_width(nn.Conv2d(1, 8, 3, padding=1), feature_dim=None, channels=1, size=4)
    with pytest.raises(ConfigError, match=r"feature_dim=32 but backbone test_custom\.Net returns 16 features"):
        backbone_width(Net(), feature_dim=32, channels=1, size=8)
    with pytest.raises(ConfigError, match=r"fails on a \(2, 3, 8, 8\) batch"):
        backbone_width(Net(), feature_dim=None, channels=3, size=8)
    assert backbone_width(Net(), feature_dim=None, channels=1, size=8) == 16


def test_views_of_the_wrong_size_and_missing_pieces_are_refused(fmnist, tmp_path, capsys):
    train, test = fmnist
    with pytest.raises(ConfigError, match=r"views .* returns torch\.float32 \(1, 20, 20\) for one image; evaluation "
                                          r"feeds the backbone float \(1, 28, 28\)"):
        pretrain(tiny(tmp_path, "train.steps=1"), dataset=train, test_dataset=test,
                 views=v2.Compose([v2.RandomCrop(20), v2.ToDtype(torch.float32, scale=True)]))
    with pytest.raises(ConfigError, match="test_dataset without dataset"):
        pretrain(tiny(tmp_path), test_dataset=test)
    with pytest.raises(ConfigError, match=r"backbone: pass a torch\.nn\.Module, got function"):
        pretrain(tiny(tmp_path), backbone=lambda x: x)
    # no held-out images, or no labels: accuracy is not measured, and the run says why in one line
    more = Items(torch.cat([train.images, train.images[:44]]), torch.cat([train.labels, train.labels[:44]]),
                 train.classes)  # 300 images: data.train_subset=256 applies to a passed dataset too
    run = pretrain(tiny(tmp_path, "train.run_name=noheld", "train.steps=2"), dataset=more)
    out = capsys.readouterr().out
    assert "no test_dataset was passed to pretrain" in out and "eval.every=0" in out and "| 256 images," in out
    assert all("knn_top1" not in e for e in ResultsDB(run.parent / "runs.db").epochs("noheld"))
    pretrain(tiny(tmp_path, "train.run_name=nolabels", "train.steps=2"), dataset=[x for x, _ in Items(
        train.images[:128], train.labels[:128], train.classes)], test_dataset=test)
    assert "the dataset passed to pretrain has no labels" in capsys.readouterr().out


def test_a_rank_with_no_images_to_measure_needs_no_num_features_on_your_backbone():
    """Monitors shard extraction over processes; a rank whose shard is empty pads with F zero columns. A backbone of
    the caller's has no ``num_features``: the encoder's width is passed (it raised AttributeError)."""
    from types import SimpleNamespace

    from protoclr.custom import encoder_with
    from protoclr.data import LabeledImages
    from protoclr.measure import backbone_features

    cfg = load_config(None, ["model.projector_hidden_dim=8", "model.projector_dim=4"])
    spec = config_view_spec(cfg.data)
    enc = encoder_with(Net(), 16, cfg.model).eval()
    one = LabeledImages(labels=torch.tensor([3]), classes=[str(c) for c in range(10)],
                        images=torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8))
    f0, _ = backbone_features(enc.backbone, one, spec)  # rank 0 holds the only image
    gathered = []

    def all_gather(f):  # the other rank's rows first, then this one's padding
        gathered.append(f)
        return torch.stack([f0, f])

    dist = SimpleNamespace(world_size=2, global_rank=1, all_gather=all_gather)
    f1, y1 = backbone_features(enc.backbone, one, spec, dist=dist, dim=enc.feature_dim)
    assert gathered[0].shape == (1, 16) and not gathered[0].any() and torch.equal(f1, f0) and y1.tolist() == [3]


def test_a_view_function_that_raises_leaves_both_rngs_as_they_were():
    spec = config_view_spec(load_config(None).data)

    def broken(image):
        random.random()
        raise RuntimeError("bad view")

    random.seed(3)
    torch.manual_seed(3)
    before = (random.getstate(), torch.get_rng_state())
    with pytest.raises(RuntimeError, match="bad view"):
        FunctionViews(broken, spec).make(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), seed=0, epoch=0,
                                         indices=torch.tensor([0]))
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
