"""Every CLI user error is one line naming the culprit, exit status 2, no traceback; --debug shows it."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from protoclr.cli import main

REPO = Path(__file__).resolve().parents[1]


def _files(tmp: Path) -> dict[str, Path]:
    """The culprits: each a path a user might pass by mistake."""
    f = {
        "missing": tmp / "missing.yaml",
        "folder": tmp / "a_folder",
        "binary": tmp / "binary.yaml",
        "bad_yaml": tmp / "bad.yaml",
        "junk": tmp / "junk.pt",
        "torch_dict": tmp / "weights.pt",
        "junk_db": tmp / "junk.db",
        "empty_db": tmp / "empty.db",
        "bad_sweep": tmp / "sweep.yaml",
    }
    f["folder"].mkdir()
    f["binary"].write_bytes(b"\xff\xfe\x00garbage\xff")
    f["bad_yaml"].write_text("train:\n  epochs: [1, 2\n")
    f["junk"].write_text("not a checkpoint\n" * 10)
    torch.save({"weight": torch.zeros(2)}, f["torch_dict"])
    f["junk_db"].write_text("not a database\n" * 100)
    sqlite3.connect(f["empty_db"]).close()
    f["bad_sweep"].write_text("grid: {loss.alpha: [1, 2}\n")
    f["empty_sweep"] = tmp / "empty_sweep.yaml"
    f["empty_sweep"].write_text("# nothing yet\n")
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png, format="PNG")
    f["loose"] = tmp / "loose"  # images with no class subfolders
    f["loose"].mkdir()
    (f["loose"] / "a.png").write_bytes(png.getvalue())
    f["climbing_zip"] = tmp / "climbing.zip"
    with zipfile.ZipFile(f["climbing_zip"], "w") as z:
        z.writestr("cat/a.png", png.getvalue())
        z.writestr("../../etc/b.png", png.getvalue())
    f["bad_images"] = tmp / "bad_images"
    for c in ("cat", "dog"):
        (f["bad_images"] / c).mkdir(parents=True)
        (f["bad_images"] / c / "a.png").write_bytes(png.getvalue())
    (f["bad_images"] / "dog" / "broken.png").write_bytes(png.getvalue()[:30])  # truncated
    return f


# (command line with {name} placeholders for _files paths, text the one line must contain)
CASES = [
    ("pretrain --config {missing}", "missing.yaml: no such file"),
    ("pretrain --config {folder}", "a_folder is a folder"),
    ("pretrain --config {binary}", "binary.yaml: cannot read it"),
    ("pretrain --config {bad_yaml}", "bad.yaml: not valid YAML: line 3"),
    ("pretrain data.dataset=cifar11", "data.dataset: unknown dataset"),
    ("pretrain data.dataset=cifar10 data.root={folder}", "cifar10 not found"),
    ("pretrain train.epochs=two", "train.epochs: expected an integer"),
    ("pretrain loss.name=foo", "loss.name: unknown loss 'foo'; choose one of nt_xent, "),
    ("pretrain --resume {folder}", "holds no checkpoint.pt"),
    ("pretrain data.dataset=image_folder data.root={loose}", "loose has image files outside class folders"),
    ("pretrain data.dataset=image_folder data.root={climbing_zip}", "unsafe member name '../../etc/b.png'"),
    ("pretrain data.dataset=image_folder data.root={bad_images}", "1 bad image file(s) in "),
    ("pretrain data.dataset=image_folder data.root={bad_images}", "or pass on_bad='skip' (config: data.on_bad=skip; "
     "CLI: --skip-bad)"),
    ("pretrain data.on_bad=skip", "data.on_bad: skip leaves out bad image files; data.dataset=fashion_mnist is not"),
    ("pretrain data.on_bad=never", "data.on_bad: must be one of error, skip"),
    ("pretrain --dry-run data.root={missing}", "missing.yaml does not exist; point root="),
    ("pretrain --dry-run data.dataset=image_folder data.root={missing}", "image folder not found"),
    ("sweep {empty_sweep}", "empty_sweep.yaml is empty; a sweep file holds grid:"),
    *([] if torch.cuda.is_available() else [
        ("pretrain --dry-run trainer.accelerator=gpu", "trainer.accelerator=gpu: no CUDA GPU is visible")]),
    ("pretrain --dry-run model.backbone=timm/vit_tiny_patch16_224",
     "model.timm_img_size: timm/vit_tiny_patch16_224 takes 224-pixel input in 16-pixel patches but the views are "
     "28 px"),
    ("evaluate {junk}", "junk.pt is not a protoclr checkpoint"),
    ("evaluate {torch_dict}", "weights.pt is a torch file but not a protoclr checkpoint"),
    ("evaluate {folder}", "no checkpoint at"),
    ("diagnose {junk}", "junk.pt is not a protoclr checkpoint"),
    ("report {junk_db} --out {folder}", "junk.db is not an SQLite database"),
    ("report {empty_db} --out {folder}", "empty.db holds no protoclr tables"),
    ("report {missing} --out {folder}", "missing.yaml does not exist"),
    ("sweep {missing}", "missing.yaml does not exist"),
    ("sweep {bad_sweep}", "sweep.yaml: not valid YAML"),
    ("sweep {bad_sweep} --out {junk_db}", "sweep.yaml: not valid YAML"),
    ("views --dataset cifar11", "unknown dataset 'cifar11'"),
    ("views --dataset fashion_mnist --root {folder} --preset nope", "unknown view preset 'nope'"),
    ("export {folder} --format onnx --out {missing}.onnx", "a_folder holds no checkpoint.pt"),
    ("export {missing} --format onnx --out {missing}.onnx", "missing.yaml: no such checkpoint file"),
    ("export {junk} --format torchscript --out {missing}.pt", "junk.pt is not a protoclr checkpoint"),
    ("export {junk} --format tflite --out {missing}.pt", "--format: unknown format 'tflite'"),
    ("export {junk} --format onnxx --out {missing}.pt", "did you mean 'onnx'?"),
    ("export {junk} --format onnx --out {folder}", "a_folder is a folder; pass a file path"),
]


@pytest.mark.parametrize(("line", "expected"), CASES, ids=[c[0].split(" {")[0] + f"-{i}" for i, c in enumerate(CASES)])
def test_user_error_is_one_line_with_status_2(line, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROTOCLR_DEBUG", raising=False)
    monkeypatch.setenv("PROTOCLR_CACHE", str(tmp_path / "cache"))
    files = _files(tmp_path)
    argv = [part.format(**files) for part in line.split()]
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    assert expected in lines[0] and lines[0].startswith(f"protoclr {argv[0]}: "), lines[0]
    assert "Traceback" not in out.err + out.out


def test_merge_names_a_job_database_that_is_not_one(tmp_path, capsys):
    job = tmp_path / "jobs" / "r1"
    job.mkdir(parents=True)
    (job / "runs.db").write_text("garbage\n" * 50)
    assert main(["sweep", "--merge", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{job / 'runs.db'} is not an SQLite database" in err


def test_the_installed_entry_point_prints_one_line_and_debug_shows_the_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "src"), "HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "protoclr.cli", "pretrain", "--config", str(tmp_path / "nope.yaml")]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert "nope.yaml: no such file" in plain.stderr
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    via_env = subprocess.run(cmd, capture_output=True, text=True, env={**env, "PROTOCLR_DEBUG": "1"}, cwd=tmp_path,
                             timeout=120)
    assert "Traceback" in via_env.stderr


def _tiny_fashion_mnist(folder: Path, *, n_train: int = 300, n_test: int = 100) -> None:
    import gzip

    import numpy as np

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for c in range(10):  # a class-dependent bright square, so that classes are learnable
            x[y == c, 2 * c : 2 * c + 8, 4:12] += 150
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
            (folder / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + arr.tobytes()))


def _knn_reference(x_tr, y_tr, x_te, y_te, *, k: int, t: float) -> float:
    """Weighted kNN written out with numpy: cosine similarity, top k, class votes exp(sim / t)."""
    import numpy as np

    a = x_tr / np.linalg.norm(x_tr, axis=1, keepdims=True)
    b = x_te / np.linalg.norm(x_te, axis=1, keepdims=True)
    hits = 0
    for i in range(len(b)):
        sim = a @ b[i]
        top = np.argsort(-sim, kind="stable")[:k]
        votes = np.zeros(10)
        np.add.at(votes, y_tr[top], np.exp(sim[top] / t))
        hits += int(votes.argmax() == y_te[i])
    return hits / len(b)


def test_the_demo_runs_the_shipped_fashion_mnist_recipe():
    """configs/cpu_fashion_mnist.yaml is what `protoclr demo` runs: the same config, key for key."""
    from protoclr.config import load_config
    from protoclr.demo import RECIPE

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "cpu_fashion_mnist.yaml")
    demo = load_config(None, RECIPE)
    assert shipped.to_dict() == demo.to_dict()
    assert demo.loss.alpha != load_config(None).loss.alpha  # the recipe is applied, not only the defaults


@pytest.mark.slow
def test_demo_end_to_end_on_a_tiny_dataset(tmp_path, capsys, monkeypatch):
    from protoclr import demo, measure
    from protoclr.data import load_dataset
    from protoclr.models import build_encoder
    from protoclr.runs import ResultsDB, load_run

    _tiny_fashion_mnist(tmp_path / "fm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROTOCLR_CACHE", str(tmp_path / "cache"))
    args = ["demo", f"data.root={tmp_path / 'fm'}", "train.batch_size=64", "train.steps=6", "trainer.progress=false",
            "model.convnet_widths=8,16", "model.projector_hidden_dim=32", "model.projector_dim=16",
            "eval.every=0", "trainer.loggers=[]"]
    seen = []  # the backbones the demo scores: its floors' (through measure) and the pretrained one (its own import)

    def spy(real):
        def evaluate_backbone(backbone, *a, **kw):
            seen.append({k: v.clone() for k, v in backbone.state_dict().items()})
            return real(backbone, *a, **kw)
        return evaluate_backbone

    monkeypatch.setattr(measure, "evaluate_backbone", spy(measure.evaluate_backbone))
    monkeypatch.setattr(demo, "evaluate_backbone", spy(demo.evaluate_backbone))
    rc = main(args)
    out = capsys.readouterr().out
    assert rc == 0, out
    # one line per stage (output is not a terminal): features, kNN and probe for each encoder, kNN and probe for pixels
    stages = [line for line in out.splitlines() if line.startswith("  ") and line.rstrip().endswith(" s")]
    assert len(stages) == 8 and sum("linear probe" in line for line in stages) == 3, stages
    assert "read from the cache" not in out
    for row in ("raw pixels (centered)", "convnet, random init", "convnet, pretrained", "6 steps of 64 images",
                "pretraining", "images/s", "of the pretraining)"):
        assert row in out
    (run,) = ResultsDB(tmp_path / "runs" / "demo" / "runs.db").runs()
    fm = run["final_metrics"]
    train = load_dataset("fashion_mnist", root=tmp_path / "fm")
    test = load_dataset("fashion_mnist", split="test", root=tmp_path / "fm")
    x_tr = train.images.flatten(1).double().numpy()
    x_te = test.images.flatten(1).double().numpy()
    mean = x_tr.mean(0)
    ref = _knn_reference(x_tr - mean, train.labels.numpy(), x_te - mean, test.labels.numpy(), k=200, t=0.1)
    assert fm["raw_pixel_knn_top1_full"] == pytest.approx(ref, abs=1e-9)
    # the random-init row scores the seeded encoder, the pretrained row the run's checkpoint, and the two differ (on
    # 50 easy test images their scores may well coincide, so the weights are compared)
    encoder, cfg = load_run(tmp_path / "runs" / "demo" / run["run_id"])
    torch.manual_seed(cfg.train.seed)
    seeded = build_encoder(cfg.model, in_channels=1).backbone.state_dict()
    trained = encoder.backbone.state_dict()
    assert len(seen) == 2
    for got, want in zip(seen, (seeded, trained), strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(seeded[k], trained[k]) for k in trained)
    assert f"{100 * fm['eval_knn_top1_full']:.1f}%" in out and f"{100 * fm['raw_pixel_linear_top1_full']:.1f}%" in out
    # the full splits, not final_metrics' draws: the demo never writes final_metrics' keys
    assert "eval_knn_top1" not in fm and "eval_linear_top1" not in fm
    # a second demo reads both floors from the cache (the same numbers) and evaluates only the pretrained encoder
    assert main([*args, "train.run_name=again"]) == 0
    out = capsys.readouterr().out
    assert out.count("read from the cache") == 2 and f"{100 * fm['raw_pixel_knn_top1_full']:.1f}%" in out
    assert sum(line.startswith("  linear probe") for line in out.splitlines()) == 1
