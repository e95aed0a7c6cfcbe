"""The ``protoclr`` command: one entry point, one subcommand per module.

Each subcommand lives in the module that owns it as ``cli_main(argv: list[str]) -> int``; this file only
dispatches, so importing the CLI does not import torch until a subcommand runs.

User errors (:class:`protoclr.errors.UserError`: a config, sweep file, dataset, checkpoint or database that is
missing or wrong, and a missing or unreadable file) end the command with one line naming the culprit and exit
status 2; ``--debug`` anywhere on the command line, or ``PROTOCLR_DEBUG=1``, shows the traceback instead.

    protoclr demo                      # the default CPU job end to end
    protoclr pretrain --config C.yaml key=value ...
    protoclr evaluate RUN_DIR --knn --linear cached
    protoclr diagnose RUN_DIR
    protoclr views --dataset cifar10_zip --preset simclr_cifar --out grid.png
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> ("module", "function", "one-line help")
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("protoclr.cli", "demo_main", "pretrain the CPU default, evaluate it, print a results table"),
    "pretrain": ("protoclr.train", "cli_main", "train an encoder without labels"),
    "evaluate": ("protoclr.evaluate", "cli_main", "kNN / linear probe of a run or checkpoint"),
    "diagnose": ("protoclr.diagnose", "cli_main", "prototype bias, bound terms and geometry of a run"),
    "views": ("protoclr.views", "cli_main", "save a grid of images and their augmented views"),
    "sweep": ("protoclr.sweep", "cli_main", "grid x seeds of pretraining + evaluation runs, local workers or SLURM"),
    "report": ("protoclr.report", "cli_main", "HTML + markdown report of a runs.db against the paper's numbers"),
}


def demo_main(argv: list[str]) -> int:
    """``protoclr demo``: pretrain the CPU default, then score it beside its two floors (raw pixels and the same
    encoder before training) with the full protocol of protoclr.measure; fetches Fashion-MNIST if missing."""
    import argparse
    import copy
    import json
    import time
    from pathlib import Path

    p = argparse.ArgumentParser(prog="protoclr demo", description=demo_main.__doc__)
    p.add_argument("overrides", nargs="*", help="section.key=value applied to the CPU default")
    args = p.parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    from protoclr import checkpoint
    from protoclr.config import load_config
    from protoclr.data import fetch_fashion_mnist
    from protoclr.measure import evaluate_backbone, random_init_floor, raw_pixel_floor
    from protoclr.results import ResultsDB
    from protoclr.train import load_data, load_run, pretrain

    console = Console()
    cfg = load_config(None, ["train.out_dir=runs/demo", *args.overrides])
    if cfg.data.dataset == "fashion_mnist":
        fetch_fashion_mnist(cfg.data.root or None, log=console.print)
    t0 = time.perf_counter()
    run_dir = pretrain(cfg)
    t_train = time.perf_counter() - t0
    steps = int(checkpoint.load(run_dir / "checkpoint.pt")["step"])
    meta = json.loads((run_dir / "meta.json").read_text())
    encoder, cfg = load_run(run_dir)
    console.print("evaluating raw pixels and the encoder before and after pretraining: kNN and linear probe fitted "
                  "on every training image, scored on every test image ...")
    t1 = time.perf_counter()
    full = copy.deepcopy(cfg)
    full.data.train_subset, full.data.class_profile = 0, "none"
    train, test, spec = load_data(full)
    rows = {"raw pixels (centered)": raw_pixel_floor(train, test),
            f"{cfg.model.backbone}, random init": random_init_floor(cfg, train, test, spec),
            f"{cfg.model.backbone}, pretrained": evaluate_backbone(encoder.backbone, train, test, spec)}
    t_eval = time.perf_counter() - t1
    table = Table(title=f"protoclr demo: {cfg.data.dataset}, {cfg.loss.name} loss, {steps} steps of "
                        f"{cfg.train.batch_size} images")
    for col in ("representation", "kNN top-1 (k=200)", "linear probe top-1"):
        table.add_column(col, justify="left" if col == "representation" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{100 * r['knn_top1']:.1f}%", f"{100 * r['linear_top1']:.1f}%")
    console.print(table)
    console.print(f"pretraining {t_train / 60:.1f} min ({steps * cfg.train.batch_size / t_train:.0f} images/s, "
                  f"{meta['precision']} on {torch.get_num_threads()} threads), evaluation {t_eval / 60:.1f} min; "
                  f"run folder {run_dir}")
    raw, init, trained = rows.values()
    db = ResultsDB(Path(cfg.train.out_dir) / "runs.db")
    row = db.get_run(run_dir.name)
    db.finish_run(run_dir.name, row["status"], {
        **(row["final_metrics"] or {}), **{f"eval_{k}": v for k, v in trained.items()},
        **{f"raw_pixel_{k}": v for k, v in raw.items()}, **{f"random_init_{k}": v for k, v in init.items()}})
    return 0


def _usage() -> str:
    lines = ["usage: protoclr COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `protoclr COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("PROTOCLR_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"protoclr: unknown command {name!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    from protoclr.errors import UserError

    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except (UserError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if debug:
            raise
        print(f"protoclr {name}: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"protoclr {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
