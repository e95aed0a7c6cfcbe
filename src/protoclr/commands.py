"""What the commands that measure a finished run share (``protoclr evaluate``, ``protoclr diagnose``): the run
argument and the options every such command takes, the run opened from them, and the dataset asked for.

    p = run_parser("protoclr evaluate", "kNN and linear probes ...")  # path, --dataset, --root, --batch-size, --device
    run = open_run(p.parse_args(argv))        # a missing or foreign checkpoint: one line (NotACheckpoint)
    test = run.load(run.cfg.data.test_split)  # --dataset / --root, or the run's own
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from protoclr.data import load_dataset
from protoclr.errors import NotACheckpoint
from protoclr.runs import checkpoint_file, load_run
from protoclr.splits import dataset_options


def run_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with the options of every command that measures a run; the command adds its own."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("path", help="run folder (with checkpoint.pt) or a checkpoint file")
    p.add_argument("--dataset", help="protoclr.data dataset name (default: the run's)")
    p.add_argument("--root", help="dataset location (default: the run's, when the dataset is the run's)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


@dataclass
class OpenRun:
    """A run opened for measuring: its checkpoint and folder, its encoder (eval mode, on the device), its config,
    and the dataset the command measures on."""

    checkpoint: Path
    run_dir: Path
    encoder: Any
    cfg: Any
    dataset: str  # --dataset, or the run's
    root: str | None  # --root, or the run's when the dataset is the run's

    @property
    def own_dataset(self) -> bool:
        """Whether the command measures on the dataset the run was trained on."""
        return self.dataset == self.cfg.data.dataset

    def load(self, split: str) -> Any:
        """``split`` of the dataset asked for (a ``LabeledImages``)."""
        options = dataset_options(self.cfg.data) if self.own_dataset else {}  # the run's data.on_bad
        return load_dataset(self.dataset, split=split, root=self.root, **options)


def open_run(args: argparse.Namespace) -> OpenRun:
    """The run of ``args.path`` (a run folder or a checkpoint file) on ``args.device``; no checkpoint there is a
    one-line user error."""
    ckpt = checkpoint_file(args.path)
    if not ckpt.is_file():
        raise NotACheckpoint(f"no checkpoint at {ckpt}; pass a run folder or a checkpoint file")
    encoder, cfg = load_run(ckpt, map_location=args.device)
    encoder.to(args.device).eval()
    dataset = args.dataset or cfg.data.dataset
    root = args.root or (cfg.data.root if dataset == cfg.data.dataset else None) or None
    return OpenRun(ckpt, ckpt.parent, encoder, cfg, dataset, root)


def command_console() -> Console:
    """The rich console a command prints its tables on: the terminal's width, or 120 columns where output is not a
    terminal (a log file, a pipe), where rich would wrap at 80 and cut the column headers."""
    c = Console()
    return c if c.is_terminal else Console(width=120)


__all__ = ["OpenRun", "command_console", "open_run", "run_parser"]
