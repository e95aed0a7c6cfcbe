"""examples/ run as a user runs them (a subprocess, from the repository root), each for a few steps: the loss in a
plain PyTorch loop, pretraining on an image folder from the CLI then exporting, and fine-tuning that export in
torchvision and in timm (whose loaded backbones must give protoclr's own features)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from protoclr.runs import load_run
from protoclr.views import config_view_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This interpreter's environment (its bin folder first, where `protoclr` is installed) importing this checkout's
    src/, with caches in ``tmp_path``."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(REPO / "src"),
            "PROTOCLR_CACHE": str(tmp_path / "cache"), "MPLCONFIGDIR": str(tmp_path / "mpl"), **extra}


def _run(cmd: list[str], tmp_path: Path, **extra: str) -> str:
    done = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path, **extra), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_example_is_tested_and_says_how_to_run_it():
    scripts = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh"))
    assert scripts == ["balanced_loss_plain_pytorch.py", "finetune_exported.py", "pretrain_own_objects.py",
                       "train_image_folder.sh"]
    for name in scripts:
        head = (EXAMPLES / name).read_text()[:600]
        assert f"examples/{name}" in head, f"{name} does not open with its command"


def test_balanced_loss_in_a_plain_pytorch_loop(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "balanced_loss_plain_pytorch.py"), "--steps", "3",
                "--batch-size", "16"], tmp_path)
    losses = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("step ")]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)  # steps 0 and 2 printed, finite
    assert "done" in out


def test_pretrain_with_your_own_backbone_dataset_and_views(tmp_path):
    """The example trains its own CNN on scikit-learn's digits with its own views; a second call finds the run
    complete; the printed kNN is the run's last epoch record and the floor the raw-pixel kNN of the same images."""
    from sklearn.datasets import load_digits
    from sklearn.neighbors import KNeighborsClassifier

    out = tmp_path / "own"
    text = _run([sys.executable, str(EXAMPLES / "pretrain_own_objects.py"), "--steps", "4", "--out", str(out)],
                tmp_path)
    last = text.strip().splitlines()[-1]
    assert "encoder SmallCNN, 64 features" in last and "after 4 steps" in last
    epochs = [json.loads(ln) for ln in (out / "digits" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in epochs if r["kind"] == "epoch"][-1]["knn_top1"]
    assert f"online kNN top-1 {knn:.3f}" in last
    # the floor: weighted kNN on centred raw pixels; a plain 1-NN from scikit-learn lands within a few points
    d = load_digits()
    x = d.images.reshape(len(d.images), -1)
    sk = KNeighborsClassifier(1).fit(x[:1297], d.target[:1297]).score(x[1297:], d.target[1297:])
    floor = float(last.split("raw-pixel kNN floor ")[1].split(")")[0])
    assert abs(floor - sk) < 0.05, (floor, sk)
    again = _run([sys.executable, str(EXAMPLES / "pretrain_own_objects.py"), "--steps", "4", "--out", str(out)],
                 tmp_path)
    assert "is complete (4 steps); nothing to resume" in again


TINY = ["train.steps=2", "train.batch_size=8", "eval.every=0", "trainer.loggers=[]", "trainer.progress=false",
        "trainer.precision=32-true", "model.projector_hidden_dim=32", "model.projector_dim=16"]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory) -> Path:
    """24 random 36x36 PNGs in 2 class folders."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("image_folder")
    gen = torch.Generator().manual_seed(0)
    for c in ("cats", "dogs"):
        (tmp / "images" / c).mkdir(parents=True)
        for i in range(12):
            pixels = torch.randint(0, 256, (36, 36, 3), dtype=torch.uint8, generator=gen).numpy()
            Image.fromarray(pixels).save(tmp / "images" / c / f"{i}.png")
    if not (Path(sys.executable).parent / "protoclr").is_file():
        pytest.skip("the protoclr command is not installed beside this Python (pip install -e .)")
    return tmp / "images"


@pytest.fixture(scope="module")
def image_folder_run(images_dir):
    """examples/train_image_folder.sh with its GPU setting (model.backbone=resnet18), 2 steps, then its export."""
    tmp = images_dir.parent
    out = _run(["bash", str(EXAMPLES / "train_image_folder.sh"), str(images_dir), "model.backbone=resnet18", *TINY],
               tmp, OUT_DIR=str(tmp / "runs"))
    return tmp / "runs" / "my_images", out


def test_image_folder_default_is_the_laptop_convnet_exported_as_safetensors(images_dir, tmp_path):
    pytest.importorskip("safetensors")
    out = _run(["bash", str(EXAMPLES / "train_image_folder.sh"), str(images_dir), *TINY], tmp_path,
               OUT_DIR=str(tmp_path / "runs"))
    run = tmp_path / "runs" / "my_images"
    encoder, cfg = load_run(run)
    assert (cfg.model.backbone, cfg.train.epochs, cfg.train.batch_size) == ("convnet", 10, 8)  # 8: TINY's override
    assert "run saved in" in out and not (run / "backbone_torchvision.pt").exists()
    # 36-pixel RGB images: RGB views at 36 px, said in one line (the script once forced 32-pixel views)
    assert "so the views are simclr_cifar at 36 px" in out and cfg.data.view_overrides == ["size=36"]
    from safetensors.torch import load_file

    exported, own = load_file(run / "backbone.safetensors"), encoder.backbone.state_dict()
    assert exported.keys() == own.keys()
    for k, v in own.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=0)  # the trained weights, not a fresh convnet


def test_pretrain_on_an_image_folder_from_the_cli_then_export(image_folder_run):
    run, out = image_folder_run
    assert "run saved in" in out and "model.fc = torch.nn.Identity()" in out  # pretrain, then export's lines
    encoder, cfg = load_run(run)
    assert (cfg.data.dataset, cfg.model.backbone, cfg.train.steps) == ("image_folder", "resnet18", 2)
    import torchvision

    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(run / "backbone_torchvision.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), encoder.backbone(x), rtol=0, atol=1e-5)


def _example_module(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_finetune_the_export_in_torchvision_and_timm(library, image_folder_run, tmp_path):
    if library == "timm":
        pytest.importorskip("timm")
    run, _ = image_folder_run
    weights = run / "backbone_torchvision.pt"
    encoder, cfg = load_run(run)
    spec = config_view_spec(cfg.data)
    # the example's loader gives protoclr's features: the export is the trained encoder, not just loadable
    backbone = _example_module("finetune_exported").load_backbone(str(weights), library=library, arch="resnet18",
                                                                  in_channels=3, small_images=True)
    x = torch.randn(2, 3, spec.size, spec.size)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x), encoder.backbone(x), rtol=0, atol=1e-5)
    out = _run([sys.executable, str(EXAMPLES / "finetune_exported.py"), str(weights), "--library", library,
                "--small-images", "--in-channels", "3", "--size", str(spec.size), "--mean", *map(str, spec.mean),
                "--std", *map(str, spec.std), "--images", str(run.parent.parent / "images"), "--steps", "2",
                "--batch-size", "8"], tmp_path)
    assert "step 0: cross-entropy" in out and "step 1: cross-entropy" in out
    assert f"fine-tuned resnet18 ({library}) with a 2-class head" in out
