"""The ``protoclr`` command: one entry point, one subcommand per module.

Each subcommand lives in the module that owns it as ``cli_main(argv: list[str]) -> int``; this file only
dispatches, so importing the CLI does not import torch until a subcommand runs.

    protoclr demo                      # the default CPU job end to end
    protoclr pretrain --config C.yaml key=value ...
    protoclr evaluate RUN_DIR --knn --linear cached
    protoclr diagnose RUN_DIR
    protoclr views --dataset cifar10_zip --preset simclr_cifar --out grid.png
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module", "function", "one-line help")
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("protoclr.train", "demo_main", "pretrain the CPU default, evaluate it, print a results table"),
    "pretrain": ("protoclr.train", "cli_main", "train an encoder without labels"),
    "evaluate": ("protoclr.evaluate", "cli_main", "kNN / linear probe of a run or checkpoint"),
    "diagnose": ("protoclr.diagnose", "cli_main", "prototype bias, bound terms and geometry of a run"),
    "views": ("protoclr.views", "cli_main", "save a grid of images and their augmented views"),
    "sweep": ("protoclr.sweep", "cli_main", "grid x seeds of pretraining + evaluation runs, local workers or SLURM"),
    "report": ("protoclr.report", "cli_main", "HTML + markdown report of a runs.db against the paper's numbers"),
}


def _usage() -> str:
    lines = ["usage: protoclr COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `protoclr COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"protoclr: unknown command {name!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if func is None:
        print(f"protoclr: command {name!r} is not available in this version.", file=sys.stderr)
        return 2
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
