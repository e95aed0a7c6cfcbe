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
    protoclr export RUN_DIR --format torchvision --out resnet18.pt
"""

from __future__ import annotations

import importlib
import os
import sys

from protoclr.errors import UserError

# name -> ("module", "function", "one-line help")
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("protoclr.demo", "cli_main", "pretrain the CPU default, evaluate it, print a results table"),
    "pretrain": ("protoclr.train", "cli_main", "train an encoder without labels"),
    "evaluate": ("protoclr.evaluate_cmd", "cli_main", "kNN / linear probe of a run or checkpoint"),
    "diagnose": ("protoclr.diagnose", "cli_main", "prototype bias, bound terms and geometry of a run"),
    "views": ("protoclr.views", "cli_main", "save a grid of images and their augmented views"),
    "sweep": ("protoclr.sweep", "cli_main", "grid x seeds of pretraining + evaluation runs, local workers or SLURM"),
    "report": ("protoclr.report", "cli_main", "HTML + markdown report of a runs.db against the paper's numbers"),
    "export": ("protoclr.export", "cli_main", "write a run's encoder for torchvision, safetensors, TorchScript, ONNX"),
}


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
