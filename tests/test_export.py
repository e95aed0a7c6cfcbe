"""protoclr export: each format is loaded with its consumer's own API (torchvision, timm, safetensors,
torch.jit.load, onnxruntime) and gives protoclr's features to 1e-5 on real images, at a batch size other than the
one traced; the printed loading lines are run as written; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protoclr.cli import main
from protoclr.config import load_config
from protoclr.data import load_dataset
from protoclr.export import FORMATS, export, open_run
from protoclr.train import pretrain
from protoclr.views import config_view_spec, eval_images

# one optimizer step from a fresh init: enough to make every weight (and the BatchNorm statistics) the run's own
QUIET = ["data.train_subset=64", "train.batch_size=32", "train.steps=1", "eval.every=0", "trainer.precision=32-true",
         "trainer.loggers=[]", "trainer.progress=false", "model.projector_hidden_dim=32", "model.projector_dim=16"]
# gray images repeated to 3 channels
RGB = ['data.view_overrides=["mean=[0.3, 0.3, 0.3]", "std=[0.35, 0.35, 0.35]"]']
RUNS = {
    "resnet18_small": ["model.backbone=resnet18"],  # small_images=true: the 3x3 stem, 1 channel
    "resnet18_plain": ["model.backbone=resnet18", "model.small_images=false", *RGB],  # torchvision's own stem
    "convnet": ["model.convnet_widths=[8,16]"],
    "vit": ["model.backbone=timm/vit_tiny_patch16_224", "model.timm_img_size=28", "model.timm_patch_size=7",
            "optim.name=adamw", "optim.base_lr=5e-4"],
}
TOL = dict(rtol=0, atol=1e-5)
# onnxruntime's kernels sum in their own order: measured up to 7e-6 on ResNet-18 features of size ~8 (64 images),
# so 1e-5 relative to the feature besides 1e-5 absolute
ONNX_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion_mnist_dir):
    out = tmp_path_factory.mktemp("runs")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            if name == "vit":
                pytest.importorskip("timm")
            made[name] = pretrain(load_config(None, [*QUIET, *RUNS[name], f"train.out_dir={out}",
                                                     f"train.run_name={name}"]))
        return made[name]

    return get


@pytest.fixture(scope="module")
def images(fashion_mnist_dir):
    """Three test images, uint8 (3, 1, 28, 28): the export must agree on real inputs, not only on noise."""
    return load_dataset("fashion_mnist", split="test").get_images(torch.arange(3))


def reference(run_dir: Path, images: torch.Tensor, *, with_projector: bool = False):
    """protoclr's own answer: the run's encoder (runs.load_run, eval mode) on the run's eval input."""
    run = open_run(run_dir)
    x = eval_images(images, run.spec)
    with torch.no_grad():
        h, z = run.encoder(x)
    return x, (h, z) if with_projector else h


def run_recipe(recipe: str, x: torch.Tensor) -> dict:
    """Run the printed loading lines as a user would, with ``x`` defined; their variables."""
    scope: dict = {"x": x}
    exec(compile(recipe, "<recipe>", "exec"), scope)
    return scope


def test_the_formats_table_is_the_documented_one():
    assert list(FORMATS) == ["torchvision", "safetensors", "torchscript", "onnx"]


def test_torchvision_loads_strictly_into_the_plain_resnet18(runs, images, tmp_path):
    """small_images=false, 3 channels: the unmodified torchvision model (fc set to the identity), strict=True."""
    import torchvision

    path = tmp_path / "resnet18.pt"
    recipe = export(open_run(runs("resnet18_plain")), fmt="torchvision", out=path)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x, h = reference(runs("resnet18_plain"), images)
    torch.testing.assert_close(model.eval()(x), h, **TOL)
    assert "conv1" not in recipe and "maxpool" not in recipe  # nothing to change in torchvision's model
    torch.testing.assert_close(run_recipe(recipe, x)["model"](x), h, **TOL)


def test_torchvision_small_image_stem_is_two_lines_and_timm_loads_it_too(runs, images, tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pt"
    recipe = export(open_run(runs("resnet18_small")), fmt="torchvision", out=path)
    x, h = reference(runs("resnet18_small"), images)
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)  # the documented two lines
    model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(model.eval()(x), h, **TOL)
    torch.testing.assert_close(run_recipe(recipe, x)["model"](x), h, **TOL)
    timm = pytest.importorskip("timm")  # timm's ResNet has torchvision's keys
    net = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    torch.testing.assert_close(net.eval()(x), h, **TOL)


def test_torchvision_with_projector_loads_the_projector_as_a_sequential(runs, images, tmp_path):
    path = tmp_path / "resnet18.pt"
    recipe = export(open_run(runs("resnet18_small")), fmt="torchvision", out=path, with_projector=True)
    x, (h, z) = reference(runs("resnet18_small"), images, with_projector=True)
    scope = run_recipe(recipe, x)
    torch.testing.assert_close(scope["model"](x), h, **TOL)
    torch.testing.assert_close(scope["projector"](scope["model"](x)), z, **TOL)
    assert any(k.startswith("projector.") for k in torch.load(path, weights_only=True))


@pytest.mark.parametrize("name", ["resnet18_small", "convnet", pytest.param("vit", marks=pytest.mark.slow)])
def test_safetensors_loads_into_the_backbones_own_library_with_the_config_in_the_header(name, runs, images,
                                                                                        tmp_path):
    safetensors = pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    path = tmp_path / "encoder.safetensors"
    recipe = export(open_run(runs(name)), fmt="safetensors", out=path)
    x, h = reference(runs(name), images)
    torch.testing.assert_close(run_recipe(recipe, x)["model"](x), h, **TOL)
    with safetensors.safe_open(str(path), "pt") as f:
        header = f.metadata()
    saved = load_config(runs(name) / "config.yaml").to_dict()
    assert json.loads(header["protoclr_config"]) == saved
    assert (header["in_channels"], header["input_size"], json.loads(header["mean"])) == ("1", "28", [0.286])
    spec = config_view_spec(load_config(runs(name) / "config.yaml").data)  # the run's own view statistics
    assert (json.loads(header["mean"]), json.loads(header["std"])) == (list(spec.mean), list(spec.std))
    assert spec.std != spec.mean  # so that a header holding the mean twice fails
    assert header["key_layout"] == {"resnet18_small": "torchvision", "convnet": "protoclr", "vit": "timm"}[name]
    assert int(header["feature_dim"]) == h.shape[1]
    if name == "vit":  # the timm user's own lines, written out here rather than taken from the recipe
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=1, img_size=28,
                                  patch_size=7)
        model.load_state_dict(load_file(path), strict=True)
        torch.testing.assert_close(model.eval()(x), h, **TOL)


# (run, with_projector): both outputs on the CNNs, the backbone of the ViT
TRACED = [("resnet18_small", False), ("resnet18_small", True), ("convnet", False), ("convnet", True),
          pytest.param("vit", False, marks=pytest.mark.slow)]


@pytest.mark.parametrize(("name", "with_projector"), TRACED)
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # torch >= 2.9
def test_torchscript_runs_any_batch_size(name, with_projector, runs, images, tmp_path):
    path = tmp_path / "encoder.torchscript"
    export(open_run(runs(name)), fmt="torchscript", out=path, with_projector=with_projector)
    model = torch.jit.load(str(path)).eval()
    x, ref = reference(runs(name), images, with_projector=with_projector)  # batch 3; traced at batch 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, **TOL)
        one = model(x[:1])
    torch.testing.assert_close(one, tuple(r[:1] for r in ref) if with_projector else ref[:1], **TOL)


@pytest.mark.parametrize(("name", "with_projector"), TRACED)
def test_onnx_runs_in_onnxruntime_with_a_dynamic_batch(name, with_projector, runs, images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    path = tmp_path / "encoder.onnx"
    recipe = export(open_run(runs(name)), fmt="onnx", out=path, with_projector=with_projector)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 28, 28]
    assert [o.name for o in session.get_outputs()] == (["features", "projection"] if with_projector else ["features"])
    x, ref = reference(runs(name), images, with_projector=with_projector)
    refs = ref if with_projector else (ref,)
    for batch in (3, 1):  # traced at batch 2
        outs = session.run(None, {"images": x[:batch].numpy()})
        for got, want in zip(outs, refs, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), want[:batch], **ONNX_TOL)
    scope = run_recipe(recipe, x)
    torch.testing.assert_close(torch.from_numpy(scope["h"]), refs[0], **ONNX_TOL)


def test_torchvision_of_a_convnet_run_is_one_line_naming_the_formats_that_work(runs, tmp_path, capsys):
    assert main(["export", str(runs("convnet")), "--format", "torchvision", "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "this run's backbone is convnet: use --format safetensors, torchscript or onnx" in err
    assert not (tmp_path / "x.pt").exists()


def test_the_command_prints_the_loading_lines(runs, tmp_path, capsys):
    out = tmp_path / "deep" / "er" / "encoder.pt"  # missing folders are made
    assert main(["export", str(runs("resnet18_small")), "--format", "torchvision", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and f"wrote {out} (torchvision)" in printed
    assert "model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)" in printed
    assert "model.fc = torch.nn.Identity()" in printed and "mean=[0.286], std=[0.353]" in printed


def test_an_unwritable_out_path_is_one_line(runs, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder\n")
    out = blocker / "encoder.pt"  # a folder that cannot exist: its parent is a file
    assert main(["export", str(runs("convnet")), "--format", "torchscript", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"--out {out}: cannot write it" in err and "writable folder" in err


def test_the_readme_torchvision_lines_load_the_export(runs, images, tmp_path):
    """README's "Use the encoder elsewhere" block, run as written (with the file name pointed at a real export)."""
    import re

    import torchvision

    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split("## Use the encoder elsewhere")[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert block.count("\n") == 3 and "strict=True" in block  # three lines
    path = tmp_path / "resnet18.pt"
    export(open_run(runs("resnet18_plain")), fmt="torchvision", out=path)
    scope = {"torch": torch, "torchvision": torchvision}
    exec(block.replace('"resnet18.pt"', repr(str(path))), scope)
    x, h = reference(runs("resnet18_plain"), images)
    torch.testing.assert_close(scope["model"].eval()(x), h, **TOL)
