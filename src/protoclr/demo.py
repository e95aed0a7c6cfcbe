"""``protoclr demo`` (``make demo``): the CPU default pretrained, then scored beside its floors, in one table.

    protoclr demo                          # Fashion-MNIST (fetched when missing), its CPU recipe, ~7 minutes
    protoclr demo train.steps=200          # any override of the CPU default

Rows: raw pixels (centered), the encoder before training (same seed) and after it, each with weighted kNN and the
linear probe of protoclr.measure fitted on every training image and scored on every test image; below the table
the pretraining minutes and images per second. runs.db gets them under the full protocol's keys
(``measure.full_metrics``: ``eval_knn_top1_full``, ``raw_pixel_knn_top1_full``, ...), not final_metrics' keys.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import time

import torch
from rich.console import Console
from rich.table import Table

from protoclr import checkpoint, splits
from protoclr import measure as M
from protoclr.commands import command_console
from protoclr.config import load_config
from protoclr.data import fetch_fashion_mnist
from protoclr.measure import evaluate_backbone, random_init_floor, raw_pixel_floor
from protoclr.runs import ResultsDB, RunDir, load_run
from protoclr.train import pretrain

# The Fashion-MNIST recipe (docs/results/cpu/recipe.md, "Fashion-MNIST: the demo"), applied to the CPU default
# before the user's overrides; configs/cpu_fashion_mnist.yaml spells the same config out (a test keeps them equal).
RECIPE = ["loss.alpha=8", "model.convnet_pool=2", "train.steps=1400", "eval.every=0"]


def _stage_printer(console: Console):
    """``stage(name)``: a context manager that prints one line with ``name`` and its time when it ends, and on a
    terminal also a line when it starts, then a bar with the remaining time (features, kNN, the probe's decays)."""

    @contextlib.contextmanager
    def stage(name: str):
        t0 = time.perf_counter()
        if console.is_terminal:
            console.print(f"  {name} ...")
        yield
        console.print(f"  {name}: {time.perf_counter() - t0:.1f} s")

    return stage


def cli_main(argv: list[str]) -> int:
    """``protoclr demo``: pretrain the CPU default, then score it beside its two floors (raw pixels and the same
    encoder before training) with the full protocol of protoclr.measure; fetches Fashion-MNIST if missing."""
    p = argparse.ArgumentParser(prog="protoclr demo", description=cli_main.__doc__)
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the CPU default")
    args = p.parse_args(argv)
    console = command_console()
    cfg = load_config(None, [*RECIPE, "train.out_dir=runs/demo", *args.overrides])
    if cfg.data.dataset == "fashion_mnist":
        fetch_fashion_mnist(cfg.data.root or None, log=console.print)
    t0 = time.perf_counter()
    run_dir = pretrain(cfg)
    run = RunDir(run_dir)
    t_train = time.perf_counter() - t0
    steps = int(checkpoint.load(run.checkpoint)["step"])
    meta = run.read_meta()
    encoder, cfg = load_run(run_dir)
    console.print("evaluating raw pixels and the encoder before and after pretraining: kNN and linear probe fitted "
                  "on every training image, scored on every test image ...")
    t1 = time.perf_counter()
    full = copy.deepcopy(cfg)
    full.data.train_subset, full.data.class_profile = 0, "none"
    train, test, spec = splits.load_data(full)
    stage = _stage_printer(console)
    key = {"train": M.data_fingerprint(train), "test": M.data_fingerprint(test), "spec": repr(spec)}
    init_key = {**key, "model": cfg.to_dict()["model"], "seed": cfg.train.seed}
    rows = {}
    for name, floor, k, compute in (
            ("raw pixels (centered)", "raw_pixels", key,
             lambda: raw_pixel_floor(train, test, stage=stage, progress=console.is_terminal)),
            (f"{cfg.model.backbone}, random init", "random_init", init_key,
             lambda: random_init_floor(cfg, train, test, spec, stage=stage, progress=console.is_terminal))):
        console.print(f"{name}:")
        rows[name], cached = M.cached_floor(floor, k, compute)
        if cached:
            console.print("  computed before with this data and protocol: read from the cache")
    console.print(f"{cfg.model.backbone}, pretrained:")
    rows[f"{cfg.model.backbone}, pretrained"] = evaluate_backbone(encoder.backbone, train, test, spec, stage=stage,
                                                                  progress=console.is_terminal)
    t_eval = time.perf_counter() - t1
    table = Table(title=f"protoclr demo: {cfg.data.dataset}, {cfg.loss.name} loss, {steps} steps of "
                        f"{cfg.train.batch_size} images")
    for col in ("representation", "kNN top-1 (k=200)", "linear probe top-1"):
        table.add_column(col, justify="left" if col == "representation" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{100 * r[M.SCORE_KNN]:.1f}%", f"{100 * r[M.SCORE_LINEAR]:.1f}%")
    console.print(table)
    console.print(f"pretraining {t_train / 60:.1f} min ({steps * cfg.train.batch_size / t_train:.0f} images/s, "
                  f"{meta['precision']} on {torch.get_num_threads()} threads), evaluation {t_eval / 60:.1f} min "
                  f"({t_eval / t_train:.2f} of the pretraining); "
                  f"run folder {run_dir}")
    raw, init, trained = rows.values()
    db = ResultsDB(run.db)
    row = db.get_run(run_dir.name)
    db.finish_run(run_dir.name, row["status"], {
        **(row["final_metrics"] or {}), **M.full_metrics(trained), **M.full_metrics(raw, of=M.RAW_PIXEL),
        **M.full_metrics(init, of=M.RANDOM_INIT)})
    return 0
